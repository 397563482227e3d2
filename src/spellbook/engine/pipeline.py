"""txt2img, img2img and inpaint: Components + Recipe -> images (float arrays in [0, 1]).

One entry, `generate(components, recipes, inputs)`, for every image: one recipe or several that share a
forward pass (the worker's cross-job batches), txt2img, img2img and inpaint.
The denoising loops are diffusers' own pipelines (StableDiffusionPipeline, …Img2ImgPipeline,
…InpaintPipeline), assembled around our components per forward pass (`_denoise`): we add the prompt syntax
(encoded once per prompt: the components' prompt cache), the per-image CPU noise, the A1111 sampler names,
progress, cancellation and the inpainting overlay, and nothing else.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from PIL import Image, ImageFilter

from spellbook.engine.guards import check_images
from spellbook.engine.noise import image_generators, initial_latents, slerp, variation_latents
from spellbook.engine.prompts import (
    ConceptTokens,
    check_concepts,
    chunk_count,
    encode_prompt_pair,
    prompt_signature,
)
from spellbook.engine.samplers import SAMPLER_SPECS, make_scheduler
from spellbook.engine.schedule import composable_parts, prompt_schedule, text_at_step
from spellbook.errors import Cancelled, UserError
from spellbook.models.components import Components
from spellbook.recipe import LATENT_UPSCALERS, Recipe

# After every denoising step: (step, total, latents), step 1-based, as k-diffusion's samplers call back.
StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class GenerationInputs:
    """What a recipe references by hash: the pixels and the concept vectors themselves."""

    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    concepts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> vectors (n, width)
    blend_image: Image.Image | None = None  # a blend of pictures: picture B (A is init_image)


@dataclass(frozen=True)
class _Slice:
    """Images `start` .. `start + count - 1` of recipe number `index`'s batch, with its encoded prompts."""

    index: int
    recipe: Recipe
    positive: torch.Tensor
    negative: torch.Tensor
    start: int
    count: int
    # Prompt editing / alternation: ((last_step, positive, negative), …) when the conditioning changes between
    # steps (engine/schedule.py); `positive`/`negative` are then step 1's.
    schedule: tuple = ()
    # Composable diffusion (`a AND b :0.7`): one weight per part; `positive` is then the parts' conditionings
    # side by side along the tokens, `negative` repeated as often (see `_ComposableUNet`).
    weights: tuple[float, ...] = (1.0,)

    def at_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        for last, positive, negative in self.schedule:
            if step <= last:
                return positive, negative
        return (self.schedule[-1][1], self.schedule[-1][2]) if self.schedule else (self.positive, self.negative)


def generate(
    components: Components,
    recipes: Recipe | Sequence[Recipe],
    inputs: GenerationInputs | None = None,
    *,
    on_step: StepCallback | None = None,
    cancel: threading.Event | None = None,
    overlay: bool = True,
) -> list[np.ndarray]:
    """Run whole batches; returns one float32 array (batch, height, width, 3) in [0, 1] per recipe (a list of one
    for a single recipe).

    Several recipes run together only if they can share a forward pass (`can_share_batch`: txt2img, a
    batch-invariant sampler, equal in all but prompt, negative prompt, seed and batch size); otherwise this is a
    ValueError, not a silent sequential run: the caller groups its recipes (queue/worker.py). Each image still
    gets its own noise from seed + index, so image for image the result equals separate runs up to float
    rounding of the larger matrix products (about 1e-6; see docs/server.md). `inputs` carries the init image,
    mask and the concept vectors the recipes name (all the same: that is part of sharing a batch).

    `on_step(step, total, latents)` runs after every denoising step, step 1..total over the whole call: work
    that takes several forward passes (prompts of different lengths, a sampler run image by image) counts on.
    `cancel` stops between steps with `Cancelled`. `overlay` (inpaint only) pastes the original pixels back
    outside the mask, as A1111 does, so what was not masked stays exactly as it was.
    """
    recipes = [recipes] if isinstance(recipes, Recipe) else list(recipes)
    inputs = inputs or GenerationInputs()
    # 1. Check inputs: recipes that run together must be able to share a batch.
    if not recipes:
        raise ValueError("generate needs at least one recipe, got an empty list")
    first = recipes[0]
    for recipe in recipes[1:]:
        mismatch = _batch_mismatch(first, recipe)
        if mismatch:
            raise ValueError(f"these recipes cannot share a forward pass: {mismatch}; run them in separate calls")
    init_image, mask = _check_inputs(components, first, inputs)
    concepts = _concepts(components, first, inputs)
    if first.kind == "blend":
        [blended] = recipes  # a blend is never batched (batch_key is empty for it)
        progress = _Progress(on_step, cancel)
        if blended.blend.by_pictures:
            images = _blend_pictures(components, blended, inputs, concepts, progress)
        else:
            images = _blend(components, blended, concepts, progress)
        check_images(images, blended)
        return [images]
    # 2. Encode each prompt once (A1111 syntax, long prompts, concepts); a repeated prompt comes from the cache.
    slices = _slices(components, recipes, concepts)
    # 3. Denoise and decode, pass after pass (`_run_passes`); with a hires fix the first pass stays in latents
    #    (or pixels, for a pixel upscaler) and a second pass re-draws it larger.
    hires = first.hires
    first_output = "np" if hires is None or hires.upscaler not in LATENT_UPSCALERS else "latent"
    progress = _Progress(on_step, cancel, hires.steps_to_run(first.steps) / first.steps if hires else 0.0)
    results = _run_passes(components, slices, init_image, mask, progress, first_output)
    if hires is not None:
        results = _hires_pass(components, recipes, results, concepts, progress)
    for recipe, images in zip(recipes, results):
        check_images(images, recipe)  # NaN/inf or a flat image: a clear failure, never a silent black PNG
    # 4. Inpainting: keep the unmasked pixels exactly.
    if first.kind == "inpaint" and overlay:
        results = [_overlay(images, init_image, mask) for images in results]
    return results


def _slices(components: Components, recipes: list[Recipe], concepts: dict[str, torch.Tensor]) -> list[_Slice]:
    """Each recipe's images with their conditioning (a prompt encoded before comes from the prompt cache)."""
    slices = []
    for index, recipe in enumerate(recipes):
        weights, schedule = prompt_conditioning(components, recipe, concepts)
        slices.append(_Slice(index, recipe, schedule[0][1], schedule[0][2], 0, recipe.batch_size, schedule, weights))
    return slices


def _run_passes(
    components: Components,
    slices: list[_Slice],
    init_image,
    mask: Image.Image | None,
    progress: _Progress,
    output_type: str = "np",
    inits: list | None = None,
) -> list:
    """Each slice's images (float arrays, or latents with output_type 'latent'). Prompts of different lengths
    (75-token chunks) or with a different number of AND parts cannot share a tensor, so they run as separate
    forward passes; a batch whose sampler draws one noise stream for all images runs image by image (batch
    invariance). `inits` (hires fix): per slice, its images' own init (latents, or a list of PIL images)."""
    by_shape: dict[tuple[int, ...], list[_Slice]] = {}
    for piece in slices:
        by_shape.setdefault((*piece.positive.shape, len(piece.weights)), []).append(piece)
    passes = list(by_shape.values())
    if not SAMPLER_SPECS[slices[0].recipe.sampler].batch_invariant:
        passes = [[replace(x, start=i, count=1)] for x in slices for i in range(x.count)]
    pieces: list[list] = [[] for _ in slices]
    for number, group in enumerate(passes):
        init = init_image
        if inits is not None:
            parts = [inits[piece.index][piece.start : piece.start + piece.count] for piece in group]
            init = torch.cat(parts) if torch.is_tensor(parts[0]) else [image for part in parts for image in part]
        reporter = progress.reporter(number, len(passes))
        images = _denoise(components, group, init, mask, reporter, output_type)
        offsets = np.cumsum([0] + [piece.count for piece in group])
        for piece, start, end in zip(group, offsets[:-1], offsets[1:]):
            pieces[piece.index].append(images[start:end])
    if output_type == "latent":
        return [torch.cat(parts) for parts in pieces]
    return [np.concatenate(parts).astype(np.float32) for parts in pieces]


def _hires_pass(
    components: Components,
    recipes: list[Recipe],
    first: list,
    concepts: dict[str, torch.Tensor],
    progress: _Progress,
) -> list[np.ndarray]:
    """A1111's hires fix: the first pass's latents (or pixels) upscaled to the hires size and re-drawn as img2img
    at the hires denoise, for `steps_to_run` denoising steps, each image from its own seed's noise again."""
    hires = recipes[0].hires
    inference_steps = hires.inference_steps(recipes[0].steps)
    seconds = [
        recipe.with_(
            kind="img2img",
            width=hires.width,
            height=hires.height,
            steps=inference_steps,
            strength=hires.denoise,
            prompt=hires.prompt if hires.prompt is not None else recipe.prompt,
            negative_prompt=hires.negative_prompt if hires.negative_prompt is not None else recipe.negative_prompt,
            subseed=None,
            subseed_strength=0.0,
            seed_resize_from_w=0,
            seed_resize_from_h=0,
            hires=None,
        )
        for recipe in recipes
    ]
    if hires.upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[hires.upscaler]
        size = (hires.height // components.vae_scale_factor, hires.width // components.vae_scale_factor)
        inits = [
            torch.nn.functional.interpolate(latents, size=size, mode=mode, antialias=antialias) for latents in first
        ]
    else:
        resample = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}[hires.upscaler]
        inits = [[image.resize((hires.width, hires.height), resample) for image in to_pil(images)] for images in first]
    slices = _slices(components, seconds, concepts)
    progress.second_pass()
    return _run_passes(components, slices, None, None, progress, "np", inits)


def encode_conditioning(
    components: Components,
    recipe: Recipe,
    concepts: dict[str, torch.Tensor],
    prompt: str | None = None,
    negative_prompt: str | None = None,
    min_chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's (positive, negative) prompt embeddings, each (1, 77 * chunks, width), through the components'
    prompt cache: keyed by model, text-encoder state, the concepts' vectors, prompts and clip skip. `prompt` and
    `negative_prompt` replace the recipe's (one step's text of a scheduled prompt)."""
    prompt = recipe.prompt if prompt is None else prompt
    negative_prompt = recipe.negative_prompt if negative_prompt is None else negative_prompt
    key = prompt_signature(
        components.ref.sha256,
        components.text_encoder,
        prompt,
        negative_prompt,
        recipe.clip_skip,
        concepts,
        min_chunks,
    )
    return components.prompt_cache.get_or_encode(
        key,
        components.text_encoder,
        lambda: encode_prompt_pair(
            components.tokenizer,
            components.text_encoder,
            prompt,
            negative_prompt,
            recipe.clip_skip,
            concepts,
            min_chunks,
        ),
    )


def prompt_conditioning(
    components: Components, recipe: Recipe, concepts: dict[str, torch.Tensor]
) -> tuple[tuple[float, ...], tuple[tuple[int, torch.Tensor, torch.Tensor], ...]]:
    """(weights, ((last_step, positive, negative), …)): the weight of each AND part of the prompt, and the
    conditioning of each stretch of steps. One stretch, the prompts as written, unless prompt editing or
    alternation (`[a:b:0.5]`, `[a|b]`) changes a text between steps; then every text is encoded to the same
    number of chunks, so one step's can replace another's. With several parts, `positive` holds each part's
    conditioning side by side along the tokens (1, parts * tokens, width) and `negative` is repeated to match."""
    steps = recipe.steps
    parts = composable_parts(recipe.prompt)
    weights = tuple(weight for _, weight in parts)
    positives = [prompt_schedule(text, steps) for text, _ in parts]
    negative = prompt_schedule(recipe.negative_prompt, steps)
    if len(parts) == 1 and positives[0] == ((steps, parts[0][0]),) and negative == ((steps, recipe.negative_prompt),):
        return weights, ((steps, *encode_conditioning(components, recipe, concepts, parts[0][0])),)
    lasts = sorted({last for schedule in (*positives, negative) for last, _ in schedule})
    texts = [
        (last, [text_at_step(schedule, last) for schedule in positives], text_at_step(negative, last)) for last in lasts
    ]
    tokens = ConceptTokens.build(concepts, components.text_encoder.get_input_embeddings().num_embeddings)
    chunks = max(chunk_count(components.tokenizer, text, tokens) for _, texts_, neg in texts for text in (*texts_, neg))
    stretches = []
    for last, texts_, neg in texts:
        pairs = [encode_conditioning(components, recipe, concepts, text, neg, min_chunks=chunks) for text in texts_]
        positive = torch.cat([pos for pos, _ in pairs], dim=1)
        stretches.append((last, positive, pairs[0][1].repeat(1, len(pairs), 1)))
    return weights, tuple(stretches)


def _check_inputs(
    components: Components, recipe: Recipe, inputs: GenerationInputs
) -> tuple[Image.Image | None, Image.Image | None]:
    if recipe.kind in ("txt2img", "blend"):
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
    concepts = {c.key: inputs.concepts[c.name] for c in recipe.concepts}  # `<name>` when bracket-only
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


def _pipeline(components: Components, recipe: Recipe, noise_seed: int, unet=None):
    # make_scheduler refuses a sampler/schedule pair that cannot run on this model (check_pair) before anything runs.
    scheduler = make_scheduler(
        recipe.sampler, recipe.schedule, components.scheduler_config, noise_seed, steps=recipe.steps
    )
    cls = {
        "txt2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    }[recipe.kind]
    pipe = cls(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet if unet is None else unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Progress:
    """diffusers' `callback_on_step_end` for each forward pass: cancellation, then `on_step(step, total)` over the
    whole call. Every pass of one stage has the same timesteps, so a stage's total is known at its first step
    (`num_timesteps`: what diffusers iterates, e.g. 2n - 1 for Heun's n steps, fewer for img2img's strength). A
    hires fix adds a second stage: the first reports a total that includes an estimate of the second (`ratio`
    of its own), the second counts on from where the first ended."""

    def __init__(self, on_step: StepCallback | None, cancel: threading.Event | None, ratio: float = 0.0):
        self.on_step, self.cancel, self.ratio = on_step, cancel, ratio
        self.offset = 0  # steps of the stages before this one
        self.done = 0  # steps reported so far

    def second_pass(self) -> None:
        self.offset, self.ratio = self.done, 0.0

    def reporter(self, number: int, passes: int) -> Callable[..., dict]:
        def on_step_end(pipe, step_index, _timestep, callback_kwargs):
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled("generation cancelled")
            per_pass = pipe.num_timesteps
            stage_total = passes * per_pass
            self.done = self.offset + number * per_pass + step_index + 1
            if self.on_step is not None:
                total = self.offset + stage_total + round(stage_total * self.ratio)
                self.on_step(self.done, total, callback_kwargs["latents"])
            return callback_kwargs

        return on_step_end


def _denoise(
    components: Components,
    group: list[_Slice],
    init_image,
    mask: Image.Image | None,
    on_step_end: Callable[..., dict],
    output_type: str = "np",
    latents: torch.Tensor | None = None,
):
    """One forward pass over the images of `group` (recipes that share everything but prompts and seeds).
    `init_image` (img2img, inpaint): one picture for all, or (hires fix) each image's own, as latents or a list.
    `latents` (txt2img): the starting noise, when it is not the recipes' own (a blend's)."""
    first = group[0]
    recipe = first.recipe
    # 1. The pipeline; a Brownian-tree sampler (DPM++ SDE) seeds its tree from the pass's first image; AND parts
    #    or a prompt weight: the UNet behind composable guidance.
    unet = components.unet
    if any(piece.weights != (1.0,) for piece in group):
        if recipe.guidance <= 1:
            raise UserError(
                f"AND and prompt weights (`prompt :1.5`) work through classifier-free guidance; cfg is {recipe.guidance}",
                field="guidance",
                hint="use a CFG scale above 1",
            )
        weights = torch.tensor([piece.weights for piece in group for _ in range(piece.count)], dtype=torch.float32)
        unet = _ComposableUNet(components.unet, weights)
    pipe = _pipeline(components, recipe, noise_seed=recipe.seed + first.start, unet=unet)
    # 2. Each image's prompt embeddings, in order (step 1's, when a prompt changes between steps).
    positive = torch.cat([piece.positive.repeat(piece.count, 1, 1) for piece in group])
    negative = torch.cat([piece.negative.repeat(piece.count, 1, 1) for piece in group])
    if any(len(piece.schedule) > 1 for piece in group):
        on_step_end = _with_schedule(on_step_end, group)
    # 3. Per-image generators on the CPU: seed + index. They also feed ancestral samplers' noise.
    generators = [
        g for piece in group for g in image_generators(piece.recipe.seed, piece.count, first_index=piece.start)
    ]
    common = {
        "prompt_embeds": positive,
        "negative_prompt_embeds": negative,
        "num_inference_steps": recipe.steps,
        "guidance_scale": recipe.guidance,
        "generator": generators,
        "output_type": output_type,
        "callback_on_step_end": on_step_end,
        "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"],
    }
    # 4. Denoise and decode.
    with torch.inference_mode():
        if recipe.kind == "txt2img" and latents is not None:
            result = pipe(
                height=recipe.height, width=recipe.width, latents=latents.to(components.unet.device), **common
            )
        elif recipe.kind == "txt2img":
            latent_shape = (
                components.unet.config.in_channels,
                recipe.height // components.vae_scale_factor,
                recipe.width // components.vae_scale_factor,
            )
            latents = torch.cat(  # each piece's own noise, moved towards its variation seed's where asked
                [
                    variation_latents(
                        part,
                        piece.recipe.subseed or 0,
                        piece.recipe.subseed_strength,
                        piece.start,
                        seed=piece.recipe.seed,
                        resize_from=_seed_resize(piece.recipe, components.vae_scale_factor),
                    )
                    for piece, part in zip(
                        group, initial_latents(generators, *latent_shape).split([p.count for p in group]), strict=True
                    )
                ]
            ).to(components.unet.device)
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


def _parent_noise(components: Components, recipe: Recipe) -> torch.Tensor:
    """The starting noise of one image of a txt2img recipe, exactly as `_denoise` draws it."""
    shape = (
        components.unet.config.in_channels,
        recipe.height // components.vae_scale_factor,
        recipe.width // components.vae_scale_factor,
    )
    noise = initial_latents(image_generators(recipe.seed, 1, first_index=recipe.batch_index), *shape)
    return variation_latents(
        noise,
        recipe.subseed or 0,
        recipe.subseed_strength,
        recipe.batch_index,
        seed=recipe.seed,
        resize_from=_seed_resize(recipe, components.vae_scale_factor),
    )


def _blend(components: Components, recipe: Recipe, concepts: dict[str, torch.Tensor], progress: _Progress):
    """A picture between two: the spherical interpolation (A1111's slerp) of their starting noises, conditioned on
    the linear interpolation of their prompt encodings. t = 0 and t = 1 run the parent's own batch, so they are
    its picture bit for bit; between them, sampling noise (ancestral samplers) comes from A's generator."""
    blend = recipe.blend
    if blend.t in (0.0, 1.0):
        parent = blend.a if blend.t == 0.0 else blend.b
        whole = parent.with_(batch_index=0)
        images = _run_passes(components, _slices(components, [whole], concepts), None, None, progress)[0]
        return images[parent.batch_index : parent.batch_index + 1]
    a, b = blend.a, blend.b
    (_, [(_, pos_a, neg_a)]), (_, [(_, pos_b, neg_b)]) = (prompt_conditioning(components, p, concepts) for p in (a, b))
    if pos_a.shape != pos_b.shape:  # prompts of different lengths: both encoded to the longer's chunks
        chunks = max(pos_a.shape[1], pos_b.shape[1]) // 77
        pos_a, neg_a = encode_conditioning(components, a, concepts, min_chunks=chunks)
        pos_b, neg_b = encode_conditioning(components, b, concepts, min_chunks=chunks)
    t = blend.t
    noise = slerp(t, _parent_noise(components, a)[0], _parent_noise(components, b)[0]).unsqueeze(0)
    runner = a.with_(kind="txt2img", seed=a.image_seed, batch_index=0, batch_size=1, guidance=recipe.guidance,
                     subseed=None, subseed_strength=0.0, seed_resize_from_w=0, seed_resize_from_h=0)  # fmt: skip
    piece = _Slice(0, runner, torch.lerp(pos_a, pos_b, t), torch.lerp(neg_a, neg_b, t), 0, 1)
    return _denoise(components, [piece], None, None, progress.reporter(0, 1), latents=noise).astype(np.float32)


def _blend_pictures(
    components: Components, recipe: Recipe, inputs: GenerationInputs, concepts: dict[str, torch.Tensor], progress
):
    """A blend of two pictures: both VAE-encoded (the distribution's mode), their latents slerped at t, drawn
    again as img2img at the recipe's strength under its prompt."""
    if inputs.init_image is None or inputs.blend_image is None:
        raise UserError("a blend of pictures needs both pictures", field="blend")
    size = (recipe.width, recipe.height)
    vae = components.vae
    encoded = []
    with torch.inference_mode():
        for picture in (inputs.init_image, inputs.blend_image):
            pixels = np.asarray(picture.convert("RGB").resize(size, Image.LANCZOS), dtype=np.float32) / 127.5 - 1.0
            tensor = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).to(vae.device, vae.dtype)
            encoded.append(vae.encode(tensor).latent_dist.mode()[0] * vae.config.scaling_factor)
    latents = slerp(recipe.blend.t, encoded[0].float(), encoded[1].float()).unsqueeze(0)
    runner = recipe.with_(kind="img2img", blend=None)
    return _run_passes(components, _slices(components, [runner], concepts), latents, None, progress)[0]


def _seed_resize(recipe: Recipe, factor: int) -> tuple[int, int] | None:
    """A1111's "resize seed from" in latent pixels (its sides // 8), or None."""
    if not recipe.seed_resize_from_w:
        return None
    return recipe.seed_resize_from_h // factor, recipe.seed_resize_from_w // factor


def _with_schedule(on_step_end: Callable[..., dict], group: list[_Slice]) -> Callable[..., dict]:
    """Wrap a step callback so that after loop step i the pipeline conditions step i + 2 (1-based, as A1111 counts
    sampler steps) with that step's embeddings: diffusers re-reads `prompt_embeds` from the callback's result,
    [negative; positive] stacked when it guides."""

    def step_end(pipe, step_index, timestep, callback_kwargs):
        callback_kwargs = on_step_end(pipe, step_index, timestep, callback_kwargs)
        step = step_index + 2
        pairs = [piece.at_step(step) for piece in group]
        positive = torch.cat([pos.repeat(piece.count, 1, 1) for piece, (pos, _) in zip(group, pairs, strict=True)])
        negative = torch.cat([neg.repeat(piece.count, 1, 1) for piece, (_, neg) in zip(group, pairs, strict=True)])
        embeds = torch.cat([negative, positive]) if pipe.do_classifier_free_guidance else positive
        current = callback_kwargs["prompt_embeds"]
        callback_kwargs["prompt_embeds"] = embeds.to(device=current.device, dtype=current.dtype)
        return callback_kwargs

    return step_end


class _ComposableUNet(torch.nn.Module):
    """The UNet under composable diffusion (A1111's CFGDenoiser with AND): the pipeline hands it [uncond; cond]
    as for plain guidance, the cond rows holding every part's conditioning side by side along the tokens. It
    runs the uncond and each part, and answers [uncond; uncond + sum(weight * (part - uncond))], so that the
    pipeline's guidance, uncond + cfg * (answer - uncond), is A1111's uncond + cfg * sum(weight * (part - uncond)).
    """

    def __init__(self, unet: torch.nn.Module, weights: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.weights = weights  # (images, parts)

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True, **kwargs):
        images, parts = self.weights.shape
        if sample.shape[0] != 2 * images:
            raise RuntimeError(
                f"composable guidance expects {2 * images} rows (uncond and cond), got {sample.shape[0]}"
            )
        tokens = encoder_hidden_states.shape[1] // parts
        width = encoder_hidden_states.shape[2]
        uncond_context = encoder_hidden_states[:images, :tokens]
        # (images, parts * tokens, width) -> part-major rows: part 0's images, part 1's, …
        part_context = encoder_hidden_states[images:].reshape(images, parts, tokens, width).transpose(0, 1)
        context = torch.cat([uncond_context, part_context.reshape(parts * images, tokens, width)])
        latents = torch.cat([sample[:images], *[sample[images:]] * parts])
        if torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.numel() > 1:
            timestep = torch.cat([timestep[:images], *[timestep[images:]] * parts])
        out = self.unet(latents, timestep, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
        uncond = out[:images]
        per_part = out[images:].reshape(parts, images, *out.shape[1:])
        weights = self.weights.T.to(out.dtype).reshape(parts, images, *[1] * (out.ndim - 1))
        combined = uncond + (weights * (per_part - uncond)).sum(0)
        result = torch.cat([uncond, combined])
        return UNet2DConditionOutput(sample=result) if return_dict else (result,)


def _overlay(images: np.ndarray, init_image: Image.Image, mask: Image.Image, blur: int = 0) -> np.ndarray:
    keep = np.asarray(init_image, dtype=np.float32) / 255.0
    m = mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask
    alpha = (np.asarray(m, dtype=np.float32) / 255.0)[None, :, :, None]
    return images * alpha + keep[None] * (1.0 - alpha)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """Float [0, 1] -> 8-bit images, rounding as diffusers does."""
    return [Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)) for image in images]


# Fields that may differ between recipes sharing one forward pass; everything else must be equal.
_PER_JOB_FIELDS = {
    "prompt", "negative_prompt", "seed", "batch_size", "batch_index", "build", "styles", "subseed", "subseed_strength",
    "seed_resize_from_w", "seed_resize_from_h",
}  # fmt: skip


def can_share_batch(a: Recipe, b: Recipe) -> bool:
    return _batch_mismatch(a, b) is None


def _batch_mismatch(a: Recipe, b: Recipe) -> str | None:
    """Why `a` and `b` cannot share one forward pass, or None if they can."""
    for recipe in (a, b):
        if recipe.kind != "txt2img":
            return f"only txt2img recipes share a batch, got {recipe.kind}"
        if not SAMPLER_SPECS[recipe.sampler].batch_invariant:
            return f"sampler {recipe.sampler!r} draws one noise stream per batch, so its images run one by one"
    da, db = a.to_dict(), b.to_dict()
    for recipe, data in ((a, da), (b, db)):
        if recipe.hires is not None:
            data["hires"] = recipe.hires.pass_key()  # its prompts may differ, as the first pass's
    for key in dict.fromkeys([*da, *db]):
        if key not in _PER_JOB_FIELDS and da.get(key) != db.get(key):
            return f"{key} differs ({da.get(key)!r} vs {db.get(key)!r}); only {', '.join(sorted(_PER_JOB_FIELDS))} may"
    return None
