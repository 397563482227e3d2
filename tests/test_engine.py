"""The engine against diffusers' reference pipelines on the same tiny weights, seeds and schedulers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image

from spellbook.engine.pipeline import GenerationInputs, generate
from spellbook.engine.samplers import SAMPLER_SPECS, make_scheduler
from spellbook.errors import Cancelled, UserError
from spellbook.recipe import SAMPLERS, InputRef, make_recipe


def reference(cls, c, recipe):
    return cls(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        unet=c.unet,
        scheduler=make_scheduler(recipe.sampler, recipe.schedule, c.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def generators(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def picture(seed: int, size: int = 16) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a", "DPM++ 2M"])
def test_txt2img_matches_diffusers_pipeline(tiny, sampler):
    recipe = make_recipe(
        {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 11, "batch_size": 2, "sampler": sampler},
        tiny.recipe_defaults(),
    )
    ours = generate(tiny, recipe)
    theirs = reference(StableDiffusionPipeline, tiny, recipe)(
        ["a red circle"] * 2,
        negative_prompt=["blurry"] * 2,
        num_inference_steps=recipe.steps,
        guidance_scale=recipe.guidance,
        height=16,
        width=16,
        generator=generators(11, 2),
        output_type="np",
    ).images
    assert ours.shape == (2, 16, 16, 3)
    assert np.abs(ours - theirs).max() <= 1e-5


def test_img2img_matches_diffusers_pipeline(tiny):
    init = picture(1)
    recipe = make_recipe(
        {"prompt": "a cactus garden", "kind": "img2img", "strength": 0.6, "seed": 3, "init_image": InputRef("x")},
        tiny.recipe_defaults(),
    )
    ours = generate(tiny, recipe, GenerationInputs(init_image=init))
    theirs = reference(StableDiffusionImg2ImgPipeline, tiny, recipe)(
        "a cactus garden",
        image=init,
        strength=0.6,
        num_inference_steps=recipe.steps,
        guidance_scale=recipe.guidance,
        generator=generators(3, 1),
        output_type="np",
    ).images
    assert np.abs(ours - theirs).max() <= 1e-5


def test_inpaint_matches_diffusers_pipeline_and_keeps_unmasked_pixels(tiny):
    init = picture(2)
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    recipe = make_recipe(
        {
            "prompt": "a red circle",
            "kind": "inpaint",
            "strength": 1.0,
            "seed": 5,
            "init_image": InputRef("x"),
            "mask": InputRef("m"),
        },
        tiny.recipe_defaults(),
    )
    raw = generate(tiny, recipe, GenerationInputs(init, mask), overlay=False)
    theirs = reference(StableDiffusionInpaintPipeline, tiny, recipe)(
        "a red circle",
        image=init,
        mask_image=mask,
        height=16,
        width=16,
        strength=1.0,
        num_inference_steps=recipe.steps,
        guidance_scale=recipe.guidance,
        generator=generators(5, 1),
        output_type="np",
    ).images
    assert np.abs(raw - theirs).max() <= 1e-5
    final = generate(tiny, recipe, GenerationInputs(init, mask))
    outside = np.asarray(mask) == 0
    original = np.asarray(init, dtype=np.float32) / 255
    assert np.abs(final[0][outside] - original[outside]).max() < 1e-6
    assert np.abs(final[0][~outside] - raw[0][~outside]).max() < 1e-6


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE", "DDIM"])
def test_image_i_of_a_batch_equals_a_single_run_with_seed_plus_i(tiny, sampler):
    batch = make_recipe(
        {"prompt": "a blue square", "seed": 40, "batch_size": 3, "sampler": sampler}, tiny.recipe_defaults()
    )
    images = generate(tiny, batch)
    single = generate(tiny, batch.with_(seed=42, batch_size=1))
    # Kernels may sum in another order for another batch size: equal to float rounding, not bit for bit.
    assert np.abs(images[2] - single[0]).max() <= 1e-4
    assert np.abs(images[0] - images[1]).max() > 1e-3  # different seeds do differ


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_a1111_sampler_name_runs(tiny, sampler):
    recipe = make_recipe(
        {"prompt": "a green triangle", "seed": 1, "sampler": sampler, "steps": 3}, tiny.recipe_defaults()
    )
    images = generate(tiny, recipe)
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    assert isinstance(
        make_scheduler(sampler, "Automatic", tiny.scheduler_config), SAMPLER_SPECS[sampler].scheduler_class
    )


def test_karras_schedule_changes_the_sigmas(tiny):
    plain = make_scheduler("DPM++ 2M", "Automatic", tiny.scheduler_config)
    karras = make_scheduler("DPM++ 2M", "Karras", tiny.scheduler_config)
    plain.set_timesteps(10)
    karras.set_timesteps(10)
    assert not torch.equal(plain.timesteps, karras.timesteps)


def test_a_schedule_a_sampler_cannot_use_is_an_error_not_ignored(tiny):
    unsupported = [s for s, spec in SAMPLER_SPECS.items() if not spec.accepts("use_karras_sigmas")]
    if not unsupported:
        pytest.skip("every sampler supports Karras sigmas in this diffusers")
    with pytest.raises(UserError, match="has no Karras schedule"):
        make_scheduler(unsupported[0], "Karras", tiny.scheduler_config)


def test_progress_reports_every_step_and_cancel_stops(tiny):
    import threading

    recipe = make_recipe({"prompt": "x", "seed": 0, "steps": 5}, tiny.recipe_defaults())
    seen = []
    generate(tiny, recipe, progress=lambda p: seen.append((p.step, p.total, tuple(p.latents.shape))))
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5] and seen[0][1] == 5 and seen[0][2] == (1, 4, 8, 8)

    cancel = threading.Event()

    def stop_after_two(p):
        if p.step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        generate(tiny, recipe, progress=stop_after_two, cancel=cancel)


def test_inpaint_rejects_a_mask_of_another_size(tiny):
    recipe = make_recipe(
        {"prompt": "x", "kind": "inpaint", "init_image": InputRef("x"), "mask": InputRef("m")}, tiny.recipe_defaults()
    )
    with pytest.raises(UserError, match="mask is 8x8 but the image is 16x16"):
        generate(tiny, recipe, GenerationInputs(picture(0), Image.new("L", (8, 8))))


@pytest.mark.parametrize("sampler", ["Heun", "DPM2", "DPM++ 2M", "Euler"])
def test_karras_schedule_runs_on_an_sd_schedule(tiny, sampler):
    recipe = make_recipe(
        {"prompt": "x", "seed": 1, "sampler": sampler, "schedule": "Karras", "steps": 5}, tiny.recipe_defaults()
    )
    assert np.isfinite(generate(tiny, recipe)).all()


def test_a_schedule_that_repeats_timesteps_is_a_clear_error(tiny):
    # A cosine noise schedule reaches extreme noise; Karras spacing then repeats timesteps (diffusers would
    # step past its sigmas with an IndexError).
    from dataclasses import replace

    cosine = replace(tiny, scheduler_config={**tiny.scheduler_config, "beta_schedule": "squaredcos_cap_v2"})
    recipe = make_recipe(
        {"prompt": "x", "seed": 1, "sampler": "DPM++ 2M", "schedule": "Karras", "steps": 20}, tiny.recipe_defaults()
    )
    with pytest.raises(UserError, match="repeats timesteps"):
        generate(cosine, recipe)
