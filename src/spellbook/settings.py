"""Settings: one object, built from SPELLBOOK_* environment variables and flags; no globals.

Every setting is listed in docs/settings.md (a test checks that the two agree).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path


def _default_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "spellbook"


@dataclass(frozen=True)
class Settings:
    home: Path = None  # type: ignore[assignment]  # filled in __post_init__
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    max_pixels: int = 2048 * 2048  # per image, width x height
    max_batch: int = 16
    max_steps: int = 150
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "home", Path(self.home).expanduser() if self.home else _default_home())

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"SPELLBOOK_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            if f.type in ("int", int):
                values[f.name] = int(raw)
            elif f.type in ("bool", bool):
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes) -> Settings:
        return replace(self, **changes)

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def concepts_dir(self) -> Path:
        return self.home / "concepts"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def inputs_dir(self) -> Path:
        """Init images and masks, stored by content hash so `reproduce` can find them."""
        return self.home / "inputs"
