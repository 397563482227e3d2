"""Tiny random-weight components, as diffusers' own tests build them (fast, exact, no checkpoint)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from spellbook.models.components import Components
from spellbook.models.files import bundled_tokenizer_dir, load_clip_tokenizer
from spellbook.recipe import ModelRef


def tiny_components(in_channels: int = 4, seed: int = 0) -> Components:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=16,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=49408,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return Components(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(bundled_tokenizer_dir()),
        unet=unet,
        scheduler_config=dict(scheduler.config),
        ref=ModelRef("tiny", "0" * 64),
        family="sd-v1",
        defaults={"width": 16, "height": 16, "steps": 4, "sampler": "DDIM", "schedule": "Automatic", "guidance": 6.0},
    )
