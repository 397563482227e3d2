"""txt2img, img2img and inpaint: Components + Recipe -> images (float arrays in [0, 1]).

The denoising loops are diffusers' own pipelines (StableDiffusionPipeline, …Img2ImgPipeline,
…InpaintPipeline), assembled around our components per call: we add the prompt syntax, the per-image CPU
noise, the A1111 sampler names, progress, cancellation and the inpainting overlay, and nothing else.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image, ImageFilter

from spellbook.engine.noise import image_generators, initial_latents
from spellbook.engine.prompts import check_concepts, encode_prompt_pair
from spellbook.engine.samplers import SAMPLER_SPECS, make_scheduler
from spellbook.errors import Cancelled, UserError
from spellbook.models.components import Components
from spellbook.recipe import Recipe


@dataclass(frozen=True)
class Progress:
    step: int  # 1-based
    total: int
    image_offset: int  # first image of the batch this step belongs to (batches that run image by image)
    latents: torch.Tensor


@dataclass
class GenerationInputs:
    """What a recipe references by hash: the pixels and the concept vectors themselves."""

    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    concepts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> vectors (n, width)


ProgressCallback = Callable[[Progress], None]


def generate(
    components: Components,
    recipe: Recipe,
    inputs: GenerationInputs | None = None,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    overlay: bool = True,
) -> np.ndarray:
    """Run the whole batch of `recipe`; returns float32 images (batch, height, width, 3) in [0, 1].

    `overlay` (inpaint only) pastes the original pixels back outside the (blurred) mask, as A1111 does, so
    what was not masked stays exactly as it was.
    """
    inputs = inputs or GenerationInputs()
    # 1. Check inputs.
    init_image, mask = _check_inputs(components, recipe, inputs)
    concepts = _concepts(components, recipe, inputs)
    # 2. A batch whose sampler draws one noise stream for all images runs image by image (batch invariance).
    groups = [(0, recipe.batch_size)]
    if not SAMPLER_SPECS[recipe.sampler].batch_invariant:
        groups = [(i, 1) for i in range(recipe.batch_size)]
    outputs = [
        _run_group(components, recipe, init_image, mask, concepts, start, count, progress, cancel)
        for start, count in groups
    ]
    images = np.concatenate(outputs).astype(np.float32)
    # 3. Inpainting: keep the unmasked pixels exactly.
    if recipe.kind == "inpaint" and overlay:
        images = _overlay(images, init_image, mask)
    return images


def _check_inputs(
    components: Components, recipe: Recipe, inputs: GenerationInputs
) -> tuple[Image.Image | None, Image.Image | None]:
    if recipe.kind == "txt2img":
        return None, None
    if inputs.init_image is None:
        raise UserError(f"{recipe.kind} needs an init image", field="init_image")
    size = (recipe.width, recipe.height)
    init_image = inputs.init_image.convert("RGB")
    if init_image.size != size:
        init_image = init_image.resize(size, Image.LANCZOS)
    mask = None
    if recipe.kind == "inpaint":
        if inputs.mask is None:
            raise UserError("inpaint needs a mask", field="mask")
        check_mask_size(inputs.init_image, inputs.mask)
        mask = _mask_to_l(inputs.mask)
        if mask.size != size:
            mask = mask.resize(size, Image.NEAREST)
    return init_image, mask


def _concepts(components: Components, recipe: Recipe, inputs: GenerationInputs) -> dict[str, torch.Tensor]:
    """The vectors of the concepts the recipe names (and only those: a prompt word is a concept only if the
    recipe says so, so a recipe runs the same whatever concepts are added later)."""
    missing = [c.name for c in recipe.concepts if c.name not in inputs.concepts]
    if missing:
        raise UserError(f"the recipe uses concept {missing[0]!r}, but its vectors were not given", field="concepts")
    concepts = {c.name: inputs.concepts[c.name] for c in recipe.concepts}
    check_concepts(concepts, components.text_encoder, components.ref.name)
    return concepts


def check_mask_size(image: Image.Image, mask: Image.Image) -> None:
    if mask.size != image.size:
        raise UserError(
            f"mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
            "they must be the same size",
            field="mask",
        )


def _mask_to_l(mask: Image.Image) -> Image.Image:
    """White = repaint. An RGBA mask uses its alpha channel when the colour channels are blank."""
    if mask.mode in ("RGBA", "LA"):
        alpha = mask.getchannel("A")
        if mask.convert("L").getextrema() == (0, 0) or alpha.getextrema()[0] < 255:
            return alpha
    return mask.convert("L")


def _pipeline(components: Components, recipe: Recipe, noise_seed: int):
    scheduler = make_scheduler(recipe.sampler, recipe.schedule, components.scheduler_config, noise_seed)
    _check_timesteps(scheduler, recipe)
    cls = {
        "txt2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    }[recipe.kind]
    pipe = cls(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_timesteps(scheduler, recipe: Recipe) -> None:
    """Karras/exponential spacing can repeat timesteps on schedules that reach extreme noise (cosine ones):
    diffusers then steps past the end of its sigmas. Say so instead of failing deep inside the sampler."""
    # Only the sigma spacings can degenerate; second-order samplers (Heun, DPM2) and PLMS repeat timesteps by
    # design.
    if recipe.schedule == "Automatic" or getattr(scheduler, "order", 1) > 1:
        return
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(recipe.steps)
    timesteps = probe.timesteps.tolist()
    if len(set(timesteps)) < len(timesteps):
        raise UserError(
            f"sampler {recipe.sampler!r} with the {recipe.schedule} schedule repeats timesteps on this model's noise "
            f"schedule ({recipe.steps} steps); use schedule Automatic, or another sampler",
            field="schedule",
        )


def _run_group(
    components: Components,
    recipe: Recipe,
    init_image: Image.Image | None,
    mask: Image.Image | None,
    concepts: dict[str, torch.Tensor],
    start: int,
    count: int,
    progress: ProgressCallback | None,
    cancel: threading.Event | None,
) -> np.ndarray:
    pipe = _pipeline(components, recipe, noise_seed=recipe.seed + start)
    # 1. Encode the prompt (A1111 syntax, long prompts, concepts) once; every image of the group shares it.
    positive, negative = encode_prompt_pair(
        components.tokenizer,
        components.text_encoder,
        recipe.prompt,
        recipe.negative_prompt,
        recipe.clip_skip,
        concepts,
    )
    positive, negative = positive.repeat(count, 1, 1), negative.repeat(count, 1, 1)
    # 2. Per-image generators on the CPU: seed + index. They also feed ancestral samplers' noise.
    generators = image_generators(recipe.seed, count, first_index=start)
    # 3. Progress and cancellation between steps.
    total = _step_count(recipe)

    def on_step_end(_pipe, step_index, _timestep, callback_kwargs):
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")
        if progress is not None:
            progress(Progress(step_index + 1, total, start, callback_kwargs["latents"]))
        return callback_kwargs

    common = {
        "prompt_embeds": positive,
        "negative_prompt_embeds": negative,
        "num_inference_steps": recipe.steps,
        "guidance_scale": recipe.guidance,
        "generator": generators,
        "output_type": "np",
        "callback_on_step_end": on_step_end,
    }
    # 4. Denoise and decode.
    with torch.inference_mode():
        if recipe.kind == "txt2img":
            latent_shape = (
                components.unet.config.in_channels,
                recipe.height // components.vae_scale_factor,
                recipe.width // components.vae_scale_factor,
            )
            latents = initial_latents(generators, *latent_shape).to(components.unet.device)
            result = pipe(height=recipe.height, width=recipe.width, latents=latents, **common)
        elif recipe.kind == "img2img":
            result = pipe(image=init_image, strength=recipe.strength, **common)
        else:
            result = pipe(
                image=init_image,
                mask_image=mask,
                height=recipe.height,
                width=recipe.width,
                strength=recipe.strength,
                **common,
            )
    return result.images


def _step_count(recipe: Recipe) -> int:
    if recipe.kind == "txt2img" or recipe.strength is None:
        return recipe.steps
    return max(1, min(int(recipe.steps * recipe.strength), recipe.steps))


def _overlay(images: np.ndarray, init_image: Image.Image, mask: Image.Image, blur: int = 0) -> np.ndarray:
    keep = np.asarray(init_image, dtype=np.float32) / 255.0
    m = mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask
    alpha = (np.asarray(m, dtype=np.float32) / 255.0)[None, :, :, None]
    return images * alpha + keep[None] * (1.0 - alpha)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """Float [0, 1] -> 8-bit images, rounding as diffusers does."""
    return [Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)) for image in images]


# Fields that may differ between recipes sharing one forward pass; everything else must be equal.
_PER_JOB_FIELDS = {"prompt", "negative_prompt", "seed", "batch_size", "batch_index", "build"}


def can_share_batch(a: Recipe, b: Recipe) -> bool:
    if a.kind != "txt2img" or b.kind != "txt2img" or not SAMPLER_SPECS[a.sampler].batch_invariant:
        return False
    da, db = a.to_dict(), b.to_dict()
    return all(da[k] == db[k] for k in da if k not in _PER_JOB_FIELDS)


def generate_batch(
    components: Components,
    recipes: list[Recipe],
    inputs: GenerationInputs | None = None,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> list[np.ndarray]:
    """Several txt2img recipes (different prompts and seeds, same everything else) in one forward pass.

    Each image still gets its own noise from seed + index, so image for image the result equals separate
    runs up to float rounding of the larger matrix products (about 1e-6; see docs/server.md).
    Returns one array per recipe, as `generate` would. `inputs` carries the concept vectors the recipes
    name (they all name the same concepts: that is part of being batchable).
    """
    inputs = inputs or GenerationInputs()
    if len(recipes) == 1:
        return [generate(components, recipes[0], inputs, progress=progress, cancel=cancel)]
    first = recipes[0]
    for recipe in recipes[1:]:
        if not can_share_batch(first, recipe):
            raise ValueError(
                "generate_batch needs txt2img recipes that differ only in prompt, negative prompt and seed"
            )
    # 1. Encode every prompt; prompts of different lengths (75-token chunks) cannot share a tensor.
    concepts = _concepts(components, first, inputs)
    encoded = [
        encode_prompt_pair(
            components.tokenizer, components.text_encoder, r.prompt, r.negative_prompt, r.clip_skip, concepts
        )
        for r in recipes
    ]
    if len({positive.shape for positive, _ in encoded}) > 1:
        by_shape: dict[tuple, list[int]] = {}
        for i, (positive, _) in enumerate(encoded):
            by_shape.setdefault(tuple(positive.shape), []).append(i)
        results: list[np.ndarray | None] = [None] * len(recipes)
        for indices in by_shape.values():
            for i, images in zip(indices, generate_batch(components, [recipes[i] for i in indices], inputs)):
                results[i] = images
        return results  # type: ignore[return-value]
    positive = torch.cat([p.repeat(r.batch_size, 1, 1) for (p, _), r in zip(encoded, recipes)])
    negative = torch.cat([n.repeat(r.batch_size, 1, 1) for (_, n), r in zip(encoded, recipes)])
    # 2. Per-image generators: each recipe's seed + index, in order.
    generators = [g for r in recipes for g in image_generators(r.seed, r.batch_size)]
    pipe = _pipeline(components, first, noise_seed=first.seed)

    def on_step_end(_pipe, step_index, _timestep, callback_kwargs):
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")
        if progress is not None:
            progress(Progress(step_index + 1, first.steps, 0, callback_kwargs["latents"]))
        return callback_kwargs

    latent_shape = (
        components.unet.config.in_channels,
        first.height // components.vae_scale_factor,
        first.width // components.vae_scale_factor,
    )
    # 3. Denoise and decode, then split the images back per recipe.
    with torch.inference_mode():
        latents = initial_latents(generators, *latent_shape).to(components.unet.device)
        images = pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            generator=generators,
            output_type="np",
            callback_on_step_end=on_step_end,
            height=first.height,
            width=first.width,
            latents=latents,
        ).images.astype(np.float32)
    offsets = np.cumsum([0] + [r.batch_size for r in recipes])
    return [images[offsets[i] : offsets[i + 1]] for i in range(len(recipes))]
