"""Loading models into Components, cached by content hash (a model loads once per process).

Formats: diffusers folders (the built-in `shapes` model is one), single-file SD 1.x/2.x `.safetensors`
(offline, with the configs shipped in the package), and pickles only with allow_pickle (scanned first,
then loaded with weights_only=True). Everything is float32 on the CPU unless the settings say otherwise.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch

from spellbook.errors import UserError
from spellbook.models.components import Components
from spellbook.models.info import DEFAULTS_FILE, check_diffusers_folder
from spellbook.models.registry import ModelEntry, ModelRegistry
from spellbook.recipe import ModelRef
from spellbook.settings import Settings


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise UserError(f"dtype {name!r}: use float32, float16 or bfloat16", field="dtype") from None


def load_diffusers_folder(path: Path, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from spellbook.models.files import load_clip_tokenizer

    check_diffusers_folder(path)
    scheduler_files = list((path / "scheduler").glob("*.json"))
    defaults = json.loads((path / DEFAULTS_FILE).read_text()) if (path / DEFAULTS_FILE).is_file() else {}
    return {
        "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, use_safetensors=True),
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, use_safetensors=True),
        "text_encoder": CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", dtype=dtype, use_safetensors=True
        ),
        "tokenizer": load_clip_tokenizer(path / "tokenizer"),
        "scheduler_config": json.loads(scheduler_files[0].read_text()),
        "defaults": defaults.get("defaults", {}),
        "family": defaults.get("family", "sd-v2" if _is_v2(path) else "sd-v1"),
    }


def _is_v2(path: Path) -> bool:
    try:
        config = json.loads((path / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("cross_attention_dim") == 1024


class ModelCache:
    """Loaded Components by content hash. One per process (a worker keeps its models loaded)."""

    def __init__(self, settings: Settings, registry: ModelRegistry | None = None):
        self.settings = settings
        self.registry = registry or ModelRegistry(settings)
        self._loaded: dict[str, Components] = {}
        self._vaes: dict[str, Any] = {}
        self._lock = threading.Lock()

    def load(self, name_or_path: str, *, allow_pickle: bool | None = None, allow_paths: bool = True) -> Components:
        entry = self.registry.resolve(name_or_path, allow_paths=allow_paths)
        return self.load_entry(entry, allow_pickle=allow_pickle)

    def load_entry(self, entry: ModelEntry, *, allow_pickle: bool | None = None) -> Components:
        allow_pickle = self.settings.allow_pickle if allow_pickle is None else allow_pickle
        if entry.format == "pickle" and not allow_pickle:
            from spellbook.models.safety import load_pickled_state_dict

            load_pickled_state_dict(entry.path, allow_pickle=False)  # raises Refused with the explanation
        digest = self.registry.sha256(entry)
        with self._lock:
            if digest in self._loaded:
                return self._loaded[digest]
            parts = self._load_parts(entry, allow_pickle)
            device = torch.device(self.settings.device)
            for key in ("vae", "unet", "text_encoder"):
                parts[key].to(device).eval().requires_grad_(False)
            components = Components(
                vae=parts["vae"],
                text_encoder=parts["text_encoder"],
                tokenizer=parts["tokenizer"],
                unet=parts["unet"],
                scheduler_config=dict(parts["scheduler_config"]),
                ref=ModelRef(entry.name, digest),
                family=parts.get("family", "sd-v1"),
                defaults=parts.get("defaults", {}),
            )
            self._loaded[digest] = components
            return components

    def _load_parts(self, entry: ModelEntry, allow_pickle: bool) -> dict[str, Any]:
        dtype = _dtype(self.settings.dtype)
        if entry.format == "diffusers":
            return load_diffusers_folder(entry.path, dtype)
        from spellbook.models.singlefile import load_single_file

        parts = load_single_file(entry.path, allow_pickle=allow_pickle)
        scheduler = parts.pop("scheduler")
        parts["scheduler_config"] = dict(scheduler.config)
        for key in ("vae", "unet", "text_encoder"):
            parts[key].to(dtype)
        return parts

    def vae_ref(self, name_or_path: str, *, allow_paths: bool = True) -> tuple[Path, ModelRef]:
        """Where a VAE override is and its name and content hash, without loading it."""
        path = self._vae_path(name_or_path, allow_paths)
        digest = self.registry.sha256(ModelEntry(path.name, path, "vae"))
        return path, ModelRef(path.stem if path.is_file() else path.name, digest)

    def load_vae(self, name_or_path: str, *, allow_paths: bool = True) -> tuple[Any, ModelRef]:
        """A VAE override: a diffusers VAE folder (config.json + safetensors) or a VAE .safetensors."""
        from diffusers import AutoencoderKL

        path, ref = self.vae_ref(name_or_path, allow_paths=allow_paths)
        digest = ref.sha256
        if digest in self._vaes:  # loaded once per process, like models
            return self._vaes[digest], ref
        dtype = _dtype(self.settings.dtype)
        if path.is_dir():
            vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
        else:
            from spellbook.models.files import CONFIGS_DIR

            vae = AutoencoderKL.from_single_file(
                path, config=str(CONFIGS_DIR / "sd-v1"), subfolder="vae", torch_dtype=dtype, local_files_only=True
            )
        vae.to(torch.device(self.settings.device)).eval().requires_grad_(False)
        self._vaes[digest] = vae
        return vae, ref

    def _vae_path(self, name_or_path: str, allow_paths: bool) -> Path:
        from spellbook.models.registry import check_name

        candidates = []
        if allow_paths and Path(name_or_path).expanduser().exists():
            candidates.append(Path(name_or_path).expanduser())
        else:
            check_name(name_or_path, "vae")
            base = self.settings.home / "vae"
            candidates += [base / name_or_path, base / f"{name_or_path}.safetensors"]
        for path in candidates:
            if _is_vae(path):
                return path
        raise UserError(
            f"VAE {name_or_path!r} not found: give a VAE folder (config.json + safetensors) or a .safetensors file, "
            f"or put it in {self.settings.home / 'vae'}",
            field="vae",
        )

    def vae_names(self) -> list[str]:
        """The VAEs in SPELLBOOK_HOME/vae, as `vae_ref` takes them by name: a folder's or a file's name."""
        base = self.settings.home / "vae"
        if not base.is_dir():
            return []
        return sorted(path.name for path in base.iterdir() if not path.name.startswith(".") and _is_vae(path))


def _is_vae(path: Path) -> bool:
    """A VAE override: a diffusers VAE folder (config.json + safetensors) or a VAE .safetensors file."""
    return (path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix == ".safetensors")
