"""Settings: one object, built from SPELLBOOK_* environment variables and flags; no globals.

Every setting is listed in the README's Settings table (tests/test_settings.py checks that the two agree).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
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
    max_grid_cells: int = 100  # cells of one X/Y/Z grid
    allow_pickle: bool = False
    # server
    host: str = "127.0.0.1"
    port: int = 7860
    auth: str = "auto"  # auto: off on a loopback bind, required on any other; on; off (loopback only)
    allowed_hosts: str = ""  # names (comma-separated) this server answers to besides loopback and its bind address
    broker: str = ""  # redis://… : scale-out mode (jobs go to Celery workers); empty: embedded worker
    max_body_mb: int = 32  # request body cap
    rate_limit: int = 120  # job submissions per user per minute
    batching: bool = True  # run compatible queued txt2img jobs in one forward pass
    max_jobs_batch: int = 8  # jobs per forward pass
    lease_seconds: int = 30  # a running job's worker renews its lease; an expired lease requeues the job
    visibility_timeout: int = 60  # Celery/Redis: an unacknowledged task (its worker died) is redelivered after this

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
    def db_path(self) -> Path:
        return self.home / "spellbook.db"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def concepts_dir(self) -> Path:
        return self.home / "concepts"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    def image_path(self, name: str, when: datetime | None = None) -> Path:
        """The one place image paths are made: images/YYYY/MM/DD/NAME under the home (UTC date, now by default)."""
        when = when or datetime.now(UTC)
        return self.images_dir / f"{when:%Y}" / f"{when:%m}" / f"{when:%d}" / name

    @property
    def upscalers_dir(self) -> Path:
        """ESRGAN / Real-ESRGAN models (.safetensors), by file name: `spellbook upscale --upscaler NAME`."""
        return self.home / "upscalers"

    @property
    def inputs_dir(self) -> Path:
        """Init images and masks, stored by content hash so `reproduce` can find them."""
        return self.home / "inputs"
