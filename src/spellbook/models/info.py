"""Model metadata without weights: what a request can be validated and priced with.

`ModelInfo` is read from a diffusers folder's config files, or from a single-file checkpoint's safetensors
header (its tensor names and shapes) plus the configs shipped for its family. Nothing here loads a tensor,
so the API process can resolve any model by name in milliseconds; weights load only in workers
(models/loading.py). Infos are cached by content hash in the `ModelCatalog` that owns them.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spellbook.errors import Refused, UserError
from spellbook.models.files import CONFIGS_DIR
from spellbook.models.registry import ModelEntry, ModelRegistry
from spellbook.recipe import KINDS, ModelRef

DEFAULTS_FILE = "spellbook.json"  # optional, in a diffusers folder: the model's own generation defaults
FAMILIES = ("sd-v1", "sd-v2")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14 in transformers' layout
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14
SDXL_PREFIX = "conditioner.embedders."
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on a header


def recipe_defaults(native_size: int, declared: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `spellbook generate PROMPT` uses when the user names nothing else: the model's own `spellbook.json`
    defaults over A1111's usual ones at the model's native size."""
    base: dict[str, Any] = {
        "width": native_size,
        "height": native_size,
        "steps": 20,
        "sampler": "DPM++ 2M",
        "schedule": "Karras",
        "guidance": 7.0,
    }
    base.update(declared or {})
    return base


@dataclass(frozen=True)
class ModelInfo:
    """One model as a request sees it: name, content hash, family, defaults, and what it can do."""

    name: str
    sha256: str
    format: str  # diffusers | single-file | pickle
    family: str  # sd-v1 | sd-v2 | shapes | …
    text_width: int  # token-embedding width of the text encoder (what a concept's vectors must match)
    unet_in_channels: int  # 4, or 9 for an inpainting model
    native_size: int
    defaults: dict[str, Any] = field(default_factory=dict)
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    builtin: bool = False

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.sha256)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of image this model makes (an inpainting UNet also does img2img through its mask input)."""
        return KINDS

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "model_hash": self.sha256[:10],
            "format": self.format,
            "family": self.family,
            "text_width": self.text_width,
            "unet_in_channels": self.unet_in_channels,
            "native_size": self.native_size,
            "kinds": list(self.kinds),
            "defaults": dict(self.defaults),
            "prediction_type": self.scheduler_config.get("prediction_type", "epsilon"),
            "builtin": self.builtin,
        }


def detect_family(state_dict_keys: Iterable[str]) -> str:
    """The family, "sd-v1" or "sd-v2", from a checkpoint's tensor names (its text encoder tells them apart)."""
    keys = list(state_dict_keys)
    if any(key.startswith(SDXL_PREFIX) for key in keys):
        raise UserError(
            "not a Stable Diffusion 1.x/2.x checkpoint: it has SDXL text encoders (conditioner.embedders.*); "
            "SDXL is not supported yet",
            field="model",
        )
    missing = [
        f"{part} ({prefix}*)"
        for part, prefix in (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX))
        if not any(key.startswith(prefix) for key in keys)
    ]
    has_clip = any(key.startswith(CLIP_PREFIX) for key in keys)
    has_open_clip = any(key.startswith(OPEN_CLIP_PREFIX) for key in keys)
    if not (has_clip or has_open_clip):
        missing.append(f"text encoder ({CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}*)")
    if missing:
        sample = ", ".join(sorted(keys)[:3]) or "no keys at all"
        raise UserError(
            f"not a Stable Diffusion 1.x/2.x checkpoint: no {', no '.join(missing)} weights (its keys start: {sample})",
            field="model",
            hint="single files must hold UNet, VAE and text encoder in the original layout; load diffusers "
            "folders as folders",
        )
    return "sd-v1" if has_clip else "sd-v2"


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a `.safetensors` file (tensor names, dtypes, shapes), read without the tensors."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if not 2 <= length <= MAX_HEADER_BYTES:
                raise ValueError(f"header length {length} is not plausible")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path.name} is not a readable .safetensors file: {exc}", field="model") from None
    if not isinstance(header, dict):
        raise UserError(f"{path.name} is not a readable .safetensors file: its header is not an object", field="model")
    return header


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is missing or not valid JSON: {exc}", field="model") from None


def _native_size(unet: dict[str, Any], vae: dict[str, Any]) -> int:
    """The image side a UNet was trained at: its latent sample size times the VAE's downscale factor."""
    return int(unet.get("sample_size", 64)) * 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)


def _scheduler_config(folder: Path) -> dict[str, Any]:
    files = sorted((folder / "scheduler").glob("*.json"))
    if not files:
        raise UserError(f"{folder} has no scheduler/*.json: not a Stable Diffusion diffusers folder", field="model")
    return _json(files[0])


def check_diffusers_folder(path: Path) -> None:
    """A Stable Diffusion diffusers folder with safetensors weights, or a clear error saying what is missing."""
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / part).is_dir():
            raise UserError(f"{path} has no {part}/ folder: not a Stable Diffusion diffusers folder", field="model")
    if not any((path / part).glob("*.safetensors") for part in ("unet", "vae", "text_encoder")):
        raise Refused(
            f"{path} has no .safetensors weights (only pickled .bin files?); convert it to safetensors",
            field="model",
        )


def read_folder_info(entry: ModelEntry, sha256: str) -> ModelInfo:
    """A diffusers folder: configs of the UNet, VAE, text encoder and scheduler, plus spellbook.json."""
    path = entry.path
    check_diffusers_folder(path)
    unet = _json(path / "unet" / "config.json")
    vae = _json(path / "vae" / "config.json")
    text = _json(path / "text_encoder" / "config.json")
    declared = _json(path / DEFAULTS_FILE) if (path / DEFAULTS_FILE).is_file() else {}
    native = _native_size(unet, vae)
    width = int(text.get("hidden_size", 768))
    return ModelInfo(
        name=entry.name,
        sha256=sha256,
        format=entry.format,
        family=declared.get("family", "sd-v2" if unet.get("cross_attention_dim") == 1024 else "sd-v1"),
        text_width=width,
        unet_in_channels=int(unet.get("in_channels", 4)),
        native_size=native,
        defaults=recipe_defaults(native, declared.get("defaults")),
        scheduler_config=_scheduler_config(path),
        builtin=entry.builtin,
    )


def read_single_file_info(entry: ModelEntry, sha256: str) -> ModelInfo:
    """A single-file `.safetensors` checkpoint: its tensor names say the family, the first UNet convolution's
    shape says whether it inpaints; the rest comes from the configs shipped for that family."""
    header = safetensors_header(entry.path)
    keys = [k for k in header if k != "__metadata__"]
    family = detect_family(keys)
    first_conv = header.get(UNET_PREFIX + "input_blocks.0.0.weight", {})
    shape = first_conv.get("shape") if isinstance(first_conv, dict) else None
    in_channels = int(shape[1]) if isinstance(shape, list) and len(shape) == 4 else 4
    return bundled_family_info(entry, sha256, family, in_channels)


def bundled_family_info(entry: ModelEntry, sha256: str, family: str, in_channels: int = 4) -> ModelInfo:
    """A checkpoint without configs of its own, described by the configs shipped for its family."""
    config_dir = CONFIGS_DIR / family
    unet = _json(config_dir / "unet" / "config.json")
    vae = _json(config_dir / "vae" / "config.json")
    text = _json(config_dir / "text_encoder" / "config.json")
    native = _native_size(unet, vae)
    return ModelInfo(
        name=entry.name,
        sha256=sha256,
        format=entry.format,
        family=family,
        text_width=int(text.get("hidden_size", 768)),
        unet_in_channels=in_channels,
        native_size=native,
        defaults=recipe_defaults(native),
        scheduler_config=_scheduler_config(config_dir),
        builtin=entry.builtin,
    )


def parameter_count(entry: ModelEntry) -> int | None:
    """How many numbers the UNet, VAE and text encoder hold, from the safetensors headers (None for a pickle)."""
    if entry.format == "pickle":
        return None
    if entry.format == "diffusers":
        files = [
            f for part in ("unet", "vae", "text_encoder") for f in sorted((entry.path / part).glob("*.safetensors"))
        ]
    else:
        files = [entry.path]
    total = 0
    for file in files:
        for key, tensor in safetensors_header(file).items():
            if key != "__metadata__" and isinstance(tensor, dict):
                count = 1
                for dim in tensor.get("shape", []):
                    count *= int(dim)
                total += count
    return total


class ModelCatalog:
    """Model names -> ModelInfo, cached by content hash; owned by whoever validates requests (the Studio)."""

    def __init__(self, registry: ModelRegistry, *, allow_pickle: bool = False):
        self.registry = registry
        self.allow_pickle = allow_pickle
        self._infos: dict[str, ModelInfo] = {}
        self._lock = threading.Lock()

    def info(self, name_or_path: str, *, allow_paths: bool = True) -> ModelInfo:
        return self.info_of(self.registry.resolve(name_or_path, allow_paths=allow_paths))

    def info_of(self, entry: ModelEntry) -> ModelInfo:
        if entry.format == "pickle":
            if not self.allow_pickle:
                from spellbook.models.safety import load_pickled_state_dict

                load_pickled_state_dict(entry.path, allow_pickle=False)  # raises Refused with the explanation
            # A pickle's tensor names cannot be read without unpickling it; its family is SD 1.x unless the
            # worker, which loads it (scanned, weights only), finds otherwise.
            return bundled_family_info(entry, self.registry.sha256(entry), "sd-v1")
        sha256 = self.registry.sha256(entry)
        key = f"{sha256}:{entry.name}"
        with self._lock:
            found = self._infos.get(key)
        if found is not None:
            return found
        info = read_folder_info(entry, sha256) if entry.format == "diffusers" else read_single_file_info(entry, sha256)
        with self._lock:
            self._infos[key] = info
        return info

    def check_file(self, path: Path) -> ModelInfo:
        """What `models add` checks before registering a file or folder: it reads as a model of a known
        architecture (safetensors header or configs), and a pickle is refused unless allowed."""
        entry = self.registry.source_entry(path)
        if entry.format == "pickle" and self.allow_pickle:
            from spellbook.models.safety import scan_pickle

            dangerous = scan_pickle(entry.path)  # read without unpickling
            if dangerous:
                raise Refused(
                    f"{path.name} imports {', '.join(dangerous)} when unpickled, which a checkpoint of plain "
                    "tensors never needs; it was not added",
                    field="path",
                )
        return self.info_of(entry)

    def by_hash(self, sha256: str) -> ModelInfo | None:
        """The model in the models folder with this content hash (a recipe run from a path records only that)."""
        for entry in self.registry.list():
            if sha256 and self.registry.sha256(entry) == sha256:
                return self.info_of(entry)
        return None
