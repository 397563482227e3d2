"""Components: the loaded parts of one model, named as diffusers names them. A plain dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from spellbook.recipe import ModelRef


@dataclass
class Components:
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    unet: Any  # diffusers.UNet2DConditionModel
    scheduler_config: dict[str, Any]
    ref: ModelRef
    family: str = "sd-v1"  # sd-v1 | sd-v2 | shapes
    defaults: dict[str, Any] = field(default_factory=dict)  # width, height, steps, sampler, guidance, ...

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def is_inpainting_model(self) -> bool:
        return int(self.unet.config.in_channels) == 9

    def with_vae(self, vae: Any) -> Components:
        return replace(self, vae=vae)

    def recipe_defaults(self) -> dict[str, Any]:
        """What `spellbook generate PROMPT` uses when the user names nothing else."""
        size = self.native_size
        base = {
            "width": size,
            "height": size,
            "steps": 20,
            "sampler": "DPM++ 2M",
            "schedule": "Karras",
            "guidance": 7.0,
        }
        base.update(self.defaults)
        return base
