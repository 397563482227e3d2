"""Stable Diffusion 1.x's own component classes, sized for the shapes world and two CPU cores."""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from spellbook.toy.world import NATIVE_SIZE

LATENT_DOWNSAMPLE = 4  # 32x32 pixels -> 8x8x4 latents
TEXT_HIDDEN = 64
CLIP_VOCAB_SIZE = 49408  # the real CLIP BPE vocabulary, so prompt syntax and concepts behave as on SD


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=NATIVE_SIZE,
    )


def make_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        projection_dim=TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=NATIVE_SIZE // LATENT_DOWNSAMPLE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
    )


def make_train_scheduler() -> DDPMScheduler:
    # v-prediction: with epsilon prediction the very noisy steps, where layout is decided, get almost no
    # weight and position is never learned (measured, docs/shapes-model.md).
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
    )


def make_inference_scheduler() -> DDIMScheduler:
    return DDIMScheduler.from_config(
        make_train_scheduler().config, timestep_spacing="trailing", set_alpha_to_one=False, steps_offset=1
    )
