"""Noise: drawn on the CPU, per image, from torch.Generator().manual_seed(seed + index).

So image i of a batch equals a single run with seed + i, and results do not depend on the GPU model.
"""

from __future__ import annotations

import torch


def image_generators(seed: int, count: int, first_index: int = 0) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + first_index + i) for i in range(count)]


def initial_latents(generators: list[torch.Generator], channels: int, height: int, width: int) -> torch.Tensor:
    """Standard normal latents (before the scheduler's init sigma), one draw per image generator."""
    return torch.cat([torch.randn((1, channels, height, width), generator=g, dtype=torch.float32) for g in generators])


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of two noises (modules/processing.py `slerp`), as it writes it: norms
    along dim 1 of a (channels, height, width) tensor, and its near-parallel shortcut unchanged, so a variation
    seed draws the noise A1111 draws from the same CPU noise."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def variation_latents(
    latents: torch.Tensor,
    subseed: int,
    strength: float,
    first_index: int = 0,
    *,
    seed: int = 0,
    resize_from: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A1111's variation seed: each image's noise moved towards the noise of subseed + index by `strength`
    (0: the seed's own noise, 1: the subseed's). The subseed's noise comes from generators of its own, so the
    seed's generators (which ancestral samplers draw from later) are untouched.

    `resize_from` (latent height, width; A1111's "resize seed from"): the noise of seed + index (and of the
    variation seed) is drawn at that size instead and pasted, centred, over `latents` (cropped where it is
    larger), as A1111's ImageRNG does, so a picture keeps its composition at another size."""
    channels, height, width = latents.shape[1:]
    if resize_from is None or resize_from == (height, width):
        if not strength:
            return latents
        sub = initial_latents(image_generators(subseed, len(latents), first_index), channels, height, width)
        return torch.stack([slerp(strength, a, b) for a, b in zip(latents, sub, strict=True)])
    small_h, small_w = resize_from
    noise = initial_latents(image_generators(seed, len(latents), first_index), channels, small_h, small_w)
    if strength:
        sub = initial_latents(image_generators(subseed, len(latents), first_index), channels, small_h, small_w)
        noise = torch.stack([slerp(strength, a, b) for a, b in zip(noise, sub, strict=True)])
    dx, dy = (width - small_w) // 2, (height - small_h) // 2
    w = small_w if dx >= 0 else small_w + 2 * dx
    h = small_h if dy >= 0 else small_h + 2 * dy
    tx, ty, dx, dy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    pasted = latents.clone()
    pasted[:, :, ty : ty + h, tx : tx + w] = noise[:, :, dy : dy + h, dx : dx + w]
    return pasted
