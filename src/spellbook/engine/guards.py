"""Checks on what the engine made, so a sampler that breaks down fails loudly instead of saving a black image.

A NaN or inf anywhere in the latents reaches the decoded pixels (the VAE propagates it, diffusers' postprocess
clamps but keeps NaN), and `to_pil` would then write it as 0: an all-black PNG with exit code 0. A sampler that
collapses without NaN leaves one flat colour. Both are a GenerationFailed naming the sampler and schedule.
"""

from __future__ import annotations

import numpy as np

from spellbook.errors import GenerationFailed
from spellbook.recipe import Recipe


def check_images(images: np.ndarray, recipe: Recipe) -> None:
    """Raise GenerationFailed if any image of the batch (batch, height, width, 3), floats in [0, 1], has a NaN or
    inf value, or (txt2img) is one flat colour at 8-bit precision."""
    pair = f"sampler {recipe.sampler!r} with the {recipe.schedule} schedule ({recipe.steps} steps)"
    advice = "try schedule Automatic or another sampler, and please report it with the recipe"
    for number, image in enumerate(images):
        bad = ~np.isfinite(image)
        if bad.any():
            raise GenerationFailed(
                f"{pair} produced NaN/inf values in image {number + 1} of {len(images)} "
                f"({int(bad.sum())} of {bad.size} values); {advice}",
                field="sampler",
            )
        if recipe.kind != "txt2img":
            continue  # img2img of a flat picture at low strength may rightly stay flat
        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        if (pixels == pixels[0, 0]).all():
            raise GenerationFailed(
                f"{pair} produced a flat image (every pixel {tuple(int(v) for v in pixels[0, 0])}) in image "
                f"{number + 1} of {len(images)}; {advice}",
                field="sampler",
            )
