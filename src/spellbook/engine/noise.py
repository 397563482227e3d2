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
