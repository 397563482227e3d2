"""Diffusers state dicts -> the original CompVis / Stability single-file layout, for tests.

The inverse of what diffusers does when it loads a single-file checkpoint (see diffusers'
`scripts/convert_diffusers_to_original_stable_diffusion.py` for the same tables, hard-coded to the full-size
SD UNet). Here the tables are derived from the model config, so tiny test models convert too:

    model.diffusion_model.*              UNet        (input_blocks / middle_block / output_blocks)
    first_stage_model.*                  VAE         (encoder.down.N.block.M / decoder.up.N ..., 1x1-conv attention)
    cond_stage_model.transformer.*       SD 1.x text encoder (HF CLIP, `text_model.` inside)
    cond_stage_model.model.*             SD 2.x text encoder (OpenCLIP: resblocks, fused in_proj q/k/v)
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

_UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_original(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights -> `model.diffusion_model.*` keys."""
    layers = config["layers_per_block"]
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    prefixes = {  # diffusers prefix -> original prefix
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    # Down path: input_blocks.0 is conv_in; then per block `layers` x (resnet .0, attention .1), then a downsampler.
    index = 1
    for block, _ in enumerate(down_types):
        for layer in range(layers):
            prefixes[f"down_blocks.{block}.resnets.{layer}."] = f"input_blocks.{index}.0."
            prefixes[f"down_blocks.{block}.attentions.{layer}."] = f"input_blocks.{index}.1."
            index += 1
        if block < len(down_types) - 1:
            prefixes[f"down_blocks.{block}.downsamplers.0.conv."] = f"input_blocks.{index}.0.op."
            index += 1
    # Up path: per block `layers + 1` x (resnet .0, attention .1); the upsampler follows the last one's parts.
    index = 0
    for block, block_type in enumerate(up_types):
        for layer in range(layers + 1):
            prefixes[f"up_blocks.{block}.resnets.{layer}."] = f"output_blocks.{index}.0."
            prefixes[f"up_blocks.{block}.attentions.{layer}."] = f"output_blocks.{index}.1."
            if layer == layers and block < len(up_types) - 1:
                slot = 2 if "CrossAttn" in block_type else 1
                prefixes[f"up_blocks.{block}.upsamplers.0.conv."] = f"output_blocks.{index}.{slot}.conv."
            index += 1

    converted = {}
    for key, value in state_dict.items():
        prefix = _longest_prefix(key, prefixes)
        rest = key[len(prefix) :]
        if ".resnets." in prefix:
            head, _, tail = rest.partition(".")
            rest = f"{_UNET_RESNET_RENAMES.get(head, head)}.{tail}"
        converted[UNET_PREFIX + prefixes[prefix] + rest] = value
    return converted


def vae_to_original(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights -> `first_stage_model.*` keys (mid-block attention as 1x1 convolutions)."""
    blocks = len(config["down_block_types"])
    prefixes = {
        "encoder.conv_norm_out.": "encoder.norm_out.",
        "decoder.conv_norm_out.": "decoder.norm_out.",
    }
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.conv_in."] = f"{part}.conv_in."
        prefixes[f"{part}.conv_out."] = f"{part}.conv_out."
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        for resnet in range(2):
            prefixes[f"{part}.mid_block.resnets.{resnet}."] = f"{part}.mid.block_{resnet + 1}."
    for name in ("quant_conv.", "post_quant_conv."):
        prefixes[name] = name
    for block in range(blocks):
        prefixes[f"encoder.down_blocks.{block}.downsamplers.0.conv."] = f"encoder.down.{block}.downsample.conv."
        for resnet in range(config["layers_per_block"]):
            prefixes[f"encoder.down_blocks.{block}.resnets.{resnet}."] = f"encoder.down.{block}.block.{resnet}."
        # The decoder's up blocks are numbered from the bottom in the original layout.
        original_block = blocks - 1 - block
        prefixes[f"decoder.up_blocks.{block}.upsamplers.0.conv."] = f"decoder.up.{original_block}.upsample.conv."
        for resnet in range(config["layers_per_block"] + 1):
            prefixes[f"decoder.up_blocks.{block}.resnets.{resnet}."] = f"decoder.up.{original_block}.block.{resnet}."

    converted = {}
    for key, value in state_dict.items():
        prefix = _longest_prefix(key, prefixes)
        rest = key[len(prefix) :]
        if ".resnets." in prefix:
            rest = rest.replace("conv_shortcut", "nin_shortcut")
        if ".attentions." in prefix:
            layer, _, parameter = rest.rpartition(".")
            rest = f"{_VAE_ATTENTION_RENAMES[layer]}.{parameter}"
            if layer != "group_norm" and parameter == "weight":
                value = value.reshape(*value.shape, 1, 1)  # a Linear weight -> the original's Conv2d(1x1) weight
        converted[VAE_PREFIX + prefixes[prefix] + rest] = value
    return converted


def clip_to_original(state_dict: dict[str, torch.Tensor], *, position_ids: bool = True) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights -> SD 1.x `cond_stage_model.transformer.text_model.*` keys.

    `position_ids` adds the buffer that real SD 1.x files carry (older transformers saved it).
    """
    converted = {}
    for key, value in state_dict.items():
        key = key if key.startswith("text_model.") else "text_model." + key  # transformers >= 5.6 flattened it
        converted[CLIP_PREFIX + key] = value
    converted.pop(CLIP_PREFIX + "text_model.embeddings.position_ids", None)
    if position_ids:
        length = converted[CLIP_PREFIX + "text_model.embeddings.position_embedding.weight"].shape[0]
        converted[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(length)[None]
    return converted


def open_clip_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights -> SD 2.x OpenCLIP `cond_stage_model.model.*` keys (q/k/v fused into in_proj).

    Real SD 2.x files also hold one more transformer block (unused: SD 2 takes the penultimate layer) and a
    text projection; we add the projection (diffusers reads its width) but not the extra block.
    """
    plain = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
    plain.pop("embeddings.position_ids", None)
    converted = {
        "token_embedding.weight": plain.pop("embeddings.token_embedding.weight"),
        "positional_embedding": plain.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": plain.pop("final_layer_norm.weight"),
        "ln_final.bias": plain.pop("final_layer_norm.bias"),
    }
    hidden = converted["token_embedding.weight"].shape[1]
    converted["text_projection"] = torch.eye(hidden)
    renames = {
        "self_attn.out_proj": "attn.out_proj",
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    layer_ids = sorted({int(key.split(".")[2]) for key in plain if key.startswith("encoder.layers.")})
    for layer in layer_ids:
        source, target = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for parameter in ("weight", "bias"):
            fused = [plain.pop(f"{source}self_attn.{name}_proj.{parameter}") for name in ("q", "k", "v")]
            converted[f"{target}attn.in_proj_{parameter}"] = torch.cat(fused)
        for old, new in renames.items():
            for parameter in ("weight", "bias"):
                converted[f"{target}{new}.{parameter}"] = plain.pop(f"{source}{old}.{parameter}")
    if plain:
        raise ValueError(f"unconverted text encoder keys: {sorted(plain)}")
    return {OPEN_CLIP_PREFIX + key: value for key, value in converted.items()}


def to_original_checkpoint(unet, vae, text_encoder, *, family: str = "sd-v1", extras: bool = True) -> dict:
    """One original-layout state dict from three diffusers/transformers models.

    `extras` adds the non-model entries real checkpoints carry (the DDPM schedule buffers, an EMA counter),
    which a loader must ignore.
    """
    text_state = dict(text_encoder.state_dict())
    text = clip_to_original(text_state) if family == "sd-v1" else open_clip_to_original(text_state)
    checkpoint = {
        **unet_to_original(unet.state_dict(), dict(unet.config)),
        **vae_to_original(vae.state_dict(), dict(vae.config)),
        **text,
    }
    if extras:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        checkpoint["betas"] = betas.float()
        checkpoint["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
        checkpoint["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return {key: value.contiguous() for key, value in checkpoint.items()}


def _longest_prefix(key: str, prefixes: dict[str, str]) -> str:
    matches = [prefix for prefix in prefixes if key.startswith(prefix)]
    if not matches:
        raise ValueError(f"no original-layout name for {key!r}")
    return max(matches, key=len)
