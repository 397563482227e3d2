"""Single-file Stable Diffusion 1.x / 2.x checkpoints (the original CompVis / Stability layout), offline.

A single-file checkpoint holds the weights only; the architecture comes from a diffusers config folder. We
ship those folders (`configs/sd-v1`: runwayml SD 1.5, `configs/sd-v2`: stabilityai SD 2.1 768-v), tokenizer
files included, so loading never needs the network.

The weights go through diffusers' own single-file converters, fed a state dict we read ourselves:
`.safetensors` with safetensors, pickles only through `safety.load_pickled_state_dict` (refused unless
allowed, scanned before unpickling). diffusers is never handed a path, so it has nothing to download; every
config is read from a local folder with `local_files_only=True`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from transformers import CLIPTextModel

from spellbook.errors import UserError
from spellbook.models.files import CONFIGS_DIR, load_clip_tokenizer
from spellbook.models.info import (  # noqa: F401 - detect_family is part of this module's API
    CLIP_PREFIX,
    FAMILIES,
    OPEN_CLIP_PREFIX,
    SDXL_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    detect_family,
)
from spellbook.models.safety import PICKLE_SUFFIXES, load_pickled_state_dict

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def bundled_config_dir(family: str) -> Path:
    """The diffusers config folder shipped for `family` ("sd-v1" or "sd-v2")."""
    if family not in FAMILIES:
        raise UserError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}", field="family")
    return CONFIGS_DIR / family


def read_state_dict(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file, or of a pickle checkpoint when allowed (see `safety`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint file at {path}", field="model")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return load_pickled_state_dict(path, allow_pickle=allow_pickle)
    if suffix != ".safetensors":
        raise UserError(
            f"{path.name}: unknown checkpoint format {suffix or '(no suffix)'}; expected .safetensors "
            f"(or, with --allow-pickle, one of {', '.join(sorted(PICKLE_SUFFIXES))})",
            field="model",
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path.name} is not a readable .safetensors file: {error}", field="model") from error


def load_single_file(
    path: Path,
    *,
    allow_pickle: bool = False,
    config_dir: Path | None = None,
    prediction_type: str | None = None,
) -> dict:
    """Load a single-file SD 1.x/2.x checkpoint into diffusers components (float32, CPU, eval mode).

    Returns {"vae", "text_encoder", "tokenizer", "unet", "scheduler", "family"}. `config_dir` is a diffusers
    folder whose configs describe the checkpoint (default: the bundled one for its family);
    `prediction_type` overrides the scheduler's (SD 2.x 512px "base" models predict "epsilon", the 768px
    ones "v_prediction", and the file does not say which).
    """
    path = Path(path)
    # 1. Check inputs.
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UserError(
            f"prediction type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}",
            field="prediction_type",
        )
    # 2. Read the weights (pickles are refused or scanned here, before anything is unpickled).
    state_dict = _with_text_model_prefix(read_state_dict(path, allow_pickle=allow_pickle))
    # 3. Pick the architecture.
    family = detect_family(state_dict.keys())
    config_dir = Path(config_dir) if config_dir is not None else bundled_config_dir(family)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (config_dir / part).is_dir():
            raise UserError(f"config folder {config_dir} has no {part}/ subfolder", field="config")
    unet_overrides = {}
    first_conv = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if first_conv is not None and first_conv.ndim == 4:
        unet_overrides["in_channels"] = int(first_conv.shape[1])  # 9 for inpainting models, 4 otherwise
    # 4. Convert and load each model with diffusers' converters, configs from the local folder only.
    # (No torch_dtype for the diffusers models: they are built in float32 and cast while loading; passing it
    # only adds a cast that fails on a missing tensor before we can name it, plus a spurious warning.)
    common = {"config": str(config_dir), "local_files_only": True}
    unet = _load_part(
        "unet",
        path,
        config_dir,
        lambda: UNet2DConditionModel.from_single_file(state_dict, subfolder="unet", **common, **unet_overrides),
    )
    vae = _load_part(
        "vae", path, config_dir, lambda: AutoencoderKL.from_single_file(state_dict, subfolder="vae", **common)
    )
    text_encoder = _load_part(
        "text_encoder",
        path,
        config_dir,
        lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state_dict, subfolder="text_encoder", torch_dtype=torch.float32, **common
        ),
    )
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        _check_fully_loaded(model, name, path)
        if any(tensor.is_floating_point() and tensor.dtype != torch.float32 for tensor in model.parameters()):
            model.float()
        model.eval()
    tokenizer = load_clip_tokenizer(config_dir / "tokenizer")
    scheduler = _load_scheduler(config_dir / "scheduler", prediction_type)
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
        "family": family,
    }


def _with_text_model_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Some older SD 1.x files name text encoder keys without `text_model.` (older transformers); add it."""
    fixed = {}
    for key, value in state_dict.items():
        if key.startswith(CLIP_PREFIX) and not key.startswith(CLIP_PREFIX + "text_model."):
            key = CLIP_PREFIX + "text_model." + key.removeprefix(CLIP_PREFIX)
        fixed[key] = value
    return fixed


def _load_part(name: str, path: Path, config_dir: Path, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Run one diffusers loader, turning its failures on a bad file into a UserError naming the part."""
    try:
        return load()
    except NotImplementedError as error:  # moving a tensor still on the meta device: the file lacks it
        raise UserError(
            f"{path.name} lacks some {name} tensors that the config in {config_dir} expects",
            field="model",
        ) from error
    except (ValueError, RuntimeError, KeyError) as error:  # a tensor whose shape the config does not expect
        raise UserError(
            f"the {name} weights in {path.name} do not fit the config in {config_dir}: {error}", field="model"
        ) from error


def _check_fully_loaded(model: torch.nn.Module, name: str, path: Path) -> None:
    """diffusers' single-file loaders build on the meta device and skip tensors the file lacks; catch that."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    empty = [key for key, tensor in tensors if tensor.is_meta]
    if empty:
        raise UserError(
            f"{path.name} lacks {len(empty)} {name} tensor(s) the config expects, e.g. {', '.join(empty[:3])}",
            field="model",
        )


def _load_scheduler(folder: Path, prediction_type: str | None):
    config = json.loads((folder / "scheduler_config.json").read_text())
    class_name = config.get("_class_name", "")
    scheduler_class = getattr(diffusers, class_name, None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
        raise UserError(f"{folder}/scheduler_config.json names {class_name!r}, not a diffusers scheduler")
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    return scheduler_class.from_config(config, **overrides)
