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
from spellbook.recipe import SAMPLERS, InputRef, Recipe, make_recipe


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
    [ours] = generate(tiny, recipe)
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
        {"prompt": "a cactus garden", "kind": "img2img", "strength": 0.6, "seed": 3},
        tiny.recipe_defaults(),
        init_image=InputRef("x"),
    )
    [ours] = generate(tiny, recipe, GenerationInputs(init_image=init))
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
        },
        tiny.recipe_defaults(),
        init_image=InputRef("x"),
        mask=InputRef("m"),
    )
    [raw] = generate(tiny, recipe, GenerationInputs(init, mask), overlay=False)
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
    [final] = generate(tiny, recipe, GenerationInputs(init, mask))
    outside = np.asarray(mask) == 0
    original = np.asarray(init, dtype=np.float32) / 255
    assert np.abs(final[0][outside] - original[outside]).max() < 1e-6
    assert np.abs(final[0][~outside] - raw[0][~outside]).max() < 1e-6


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE", "DDIM"])
def test_image_i_of_a_batch_equals_a_single_run_with_seed_plus_i(tiny, sampler):
    batch = make_recipe(
        {"prompt": "a blue square", "seed": 40, "batch_size": 3, "sampler": sampler}, tiny.recipe_defaults()
    )
    [images] = generate(tiny, batch)
    [single] = generate(tiny, batch.with_(seed=42, batch_size=1))
    # Kernels may sum in another order for another batch size: equal to float rounding, not bit for bit.
    assert np.abs(images[2] - single[0]).max() <= 1e-4
    assert np.abs(images[0] - images[1]).max() > 1e-3  # different seeds do differ


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_a1111_sampler_name_runs(tiny, sampler):
    recipe = make_recipe(
        {"prompt": "a green triangle", "seed": 1, "sampler": sampler, "steps": 3}, tiny.recipe_defaults()
    )
    [images] = generate(tiny, recipe)
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


def test_on_step_reports_every_step_and_cancel_stops(tiny):
    import threading

    recipe = make_recipe({"prompt": "x", "seed": 0, "steps": 5}, tiny.recipe_defaults())
    seen = []
    generate(tiny, recipe, on_step=lambda step, total, latents: seen.append((step, total, tuple(latents.shape))))
    assert seen == [(step, 5, (1, 4, 8, 8)) for step in range(1, 6)]

    cancel = threading.Event()

    def stop_after_two(step, total, latents):
        if step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        generate(tiny, recipe, on_step=stop_after_two, cancel=cancel)


@pytest.mark.parametrize(
    ("sampler", "batch_size", "passes"),
    [("DDIM", 3, 1), ("DPM++ SDE", 3, 3), ("Heun", 1, 1)],  # SDE: image by image; Heun: 2n - 1 timesteps
)
def test_on_step_counts_1_to_total_across_forward_passes(tiny, sampler, batch_size, passes):
    recipe = make_recipe(
        {"prompt": "x", "seed": 0, "steps": 3, "sampler": sampler, "batch_size": batch_size}, tiny.recipe_defaults()
    )
    seen = []
    generate(tiny, recipe, on_step=lambda step, total, latents: seen.append((step, total, len(latents))))
    scheduler = make_scheduler(sampler, "Automatic", tiny.scheduler_config)
    scheduler.set_timesteps(3)
    total = passes * len(scheduler.timesteps)  # what diffusers iterates: 2n - 1 for second-order samplers
    assert seen == [(step, total, batch_size // passes) for step in range(1, total + 1)]


def test_inpaint_rejects_a_mask_of_another_size(tiny):
    recipe = make_recipe(
        {"prompt": "x", "kind": "inpaint"}, tiny.recipe_defaults(), init_image=InputRef("x"), mask=InputRef("m")
    )
    with pytest.raises(UserError, match="mask is 8x8 but the image is 16x16"):
        generate(tiny, recipe, GenerationInputs(picture(0), Image.new("L", (8, 8))))


@pytest.mark.parametrize("sampler", ["Heun", "DPM2", "DPM++ 2M", "Euler"])
def test_karras_schedule_runs_on_an_sd_schedule(tiny, sampler):
    recipe = make_recipe(
        {"prompt": "x", "seed": 1, "sampler": sampler, "schedule": "Karras", "steps": 5}, tiny.recipe_defaults()
    )
    assert np.isfinite(generate(tiny, recipe)[0]).all()


def test_karras_runs_on_a_cosine_schedule(tiny):
    # A cosine noise schedule reaches sigma 20291; diffusers' Karras spacing from there repeated DPM++ 2M's first
    # timestep (and it then stepped past its sigmas). Spacing starts at SD's largest sigma instead (samplers.py).
    from dataclasses import replace

    cosine = replace(tiny, scheduler_config={**tiny.scheduler_config, "beta_schedule": "squaredcos_cap_v2"})
    recipe = make_recipe(
        {"prompt": "x", "seed": 1, "sampler": "DPM++ 2M", "schedule": "Karras", "steps": 20}, tiny.recipe_defaults()
    )
    assert np.isfinite(generate(cosine, recipe)).all()


# --- several recipes through the one entry ---------------------------------------------------------------------


def test_several_recipes_equal_separate_runs(tiny):
    defaults = tiny.recipe_defaults()
    recipes = [
        make_recipe({"prompt": p, "negative_prompt": n, "seed": s, "batch_size": b}, defaults)
        for p, n, s, b in (
            ("a red circle", "", 1, 2),
            ("a very long prompt " * 30, "blurry", 7, 1),  # two 75-token chunks: its own forward pass
            ("a blue square", "blurry", 9, 1),
        )
    ]
    steps = []
    together = generate(tiny, recipes, on_step=lambda step, total, latents: steps.append((step, total)))
    assert [len(images) for images in together] == [2, 1, 1]
    for recipe, images in zip(recipes, together):
        [alone] = generate(tiny, recipe)
        assert images.shape == alone.shape and images.dtype == np.float32
        np.testing.assert_allclose(images, alone, atol=1e-4)
    # Two forward passes (one per prompt length); the step count runs on across them.
    assert steps == [(step, 2 * recipes[0].steps) for step in range(1, 2 * recipes[0].steps + 1)]


def test_recipes_that_cannot_share_a_forward_pass_are_an_error(tiny):
    defaults = tiny.recipe_defaults()
    base = make_recipe({"prompt": "a red circle", "seed": 1}, defaults)
    with pytest.raises(ValueError, match="steps differs"):
        generate(tiny, [base, base.with_(steps=base.steps + 1)])
    sde = base.with_(sampler="DPM++ SDE")
    with pytest.raises(ValueError, match="noise stream"):
        generate(tiny, [sde, sde.with_(seed=2)])
    with pytest.raises(ValueError, match="empty"):
        generate(tiny, [])


# --- the prompt cache ----------------------------------------------------------------------------------------


@pytest.fixture
def counted(tiny):
    """`tiny` with a fresh prompt cache, and a list that grows by one per text-encoder forward pass."""
    from dataclasses import replace

    from spellbook.models.components import PromptCache

    calls = []
    hook = tiny.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    yield replace(tiny, prompt_cache=PromptCache(max_entries=4)), calls
    hook.remove()


def test_a_repeated_prompt_costs_no_text_encoder_pass(counted):
    components, calls = counted
    recipe = make_recipe(
        {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 3}, components.recipe_defaults()
    )
    [first] = generate(components, recipe)
    encoded = len(calls)
    assert encoded == 2  # positive and negative, one chunk each
    [second] = generate(components, recipe.with_(seed=3))
    [other_seed] = generate(components, recipe.with_(seed=4))
    assert len(calls) == encoded and components.prompt_cache.hits == 2
    assert np.array_equal(first, second)  # bit for bit: `verify` still holds
    assert not np.array_equal(first, other_seed)


def test_cached_encodings_are_exactly_fresh_ones_and_callers_cannot_change_them(counted):
    from spellbook.engine.pipeline import encode_conditioning
    from spellbook.engine.prompts import encode_prompt_pair

    components, _ = counted
    recipe = make_recipe({"prompt": "a (red:1.3) circle", "negative_prompt": "blurry"}, components.recipe_defaults())
    fresh = encode_prompt_pair(components.tokenizer, components.text_encoder, recipe.prompt, recipe.negative_prompt)
    positive, _ = encode_conditioning(components, recipe, {})
    positive.mul_(0)  # a careless caller
    again = encode_conditioning(components, recipe, {})
    assert torch.equal(again[0], fresh[0]) and torch.equal(again[1], fresh[1])


def test_the_signature_covers_clip_skip_concept_vectors_and_encoder_state(counted):
    from spellbook.engine.pipeline import encode_conditioning

    components, calls = counted
    width = components.text_encoder.get_input_embeddings().embedding_dim
    recipe = make_recipe({"prompt": "a <x> on the left"}, components.recipe_defaults())
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(0))

    def encode(recipe, concepts) -> int:
        before = len(calls)
        encode_conditioning(components, recipe, concepts)
        return len(calls) - before

    assert encode(recipe, {"x": x}) == 2
    assert encode(recipe, {"x": x.clone()}) == 0  # same vectors, another tensor: a hit
    assert encode(recipe, {"x": x + 1e-3}) == 2  # same name, other vectors: a miss
    assert encode(recipe.with_(clip_skip=2), {"x": x}) == 2
    assert encode(recipe, {}) == 2
    with torch.no_grad():  # the text encoder changed in place (an optimizer step, load_state_dict)
        next(components.text_encoder.parameters()).add_(0)
    assert encode(recipe, {"x": x}) == 2


def test_the_prompt_cache_is_a_bounded_lru():
    from spellbook.models.components import PromptCache

    class Encoder(torch.nn.Module):
        pass

    encoder, calls = Encoder(), []
    cache = PromptCache(max_entries=2)

    def encode(key):
        def run():
            calls.append(key)
            return torch.zeros(1), torch.zeros(1)

        return cache.get_or_encode(key, encoder, run)

    for key in ("a", "b", "a", "c"):  # "a" was used after "b", so "b" is the one to go
        encode(key)
    assert len(cache) == 2 and calls == ["a", "b", "c"]
    encode("a")
    encode("b")
    assert calls == ["a", "b", "c", "b"]
    assert cache.get_or_encode("a", Encoder(), lambda: (torch.ones(1), torch.ones(1)))[0].item() == 1  # other encoder
    disabled = PromptCache(max_entries=0)
    disabled.get_or_encode("a", encoder, lambda: (torch.zeros(1), torch.zeros(1)))
    assert len(disabled) == 0


def test_variation_seeds_move_the_noise_from_the_seed_to_the_subseed(tiny):
    """A1111's variation seed: strength 0 is the seed's image, 1 the subseed's (a deterministic sampler), between
    them a new image; image i uses subseed + i; the recipe and infotext keep both, and it reproduces."""
    from spellbook.provenance import infotext_params

    defaults = tiny.recipe_defaults()
    base = {"prompt": "a red circle", "seed": 10, "steps": 4, "sampler": "DDIM", "batch_size": 2}
    plain = generate(tiny, make_recipe(base, defaults))[0]
    other = generate(tiny, make_recipe({**base, "seed": 50}, defaults))[0]
    none = make_recipe({**base, "subseed": 50, "subseed_strength": 0.0}, defaults)
    assert none.subseed is None and "subseed" not in none.to_dict()  # no strength: nothing recorded
    assert np.array_equal(generate(tiny, none)[0], plain)
    full = generate(tiny, make_recipe({**base, "subseed": 50, "subseed_strength": 1.0}, defaults))[0]
    assert np.abs(full - other).max() < 1e-5
    half_recipe = make_recipe({**base, "subseed": 50, "subseed_strength": 0.5}, defaults)
    half = generate(tiny, half_recipe)[0]
    assert np.abs(half - plain).max() > 1e-3 and np.abs(half - other).max() > 1e-3
    again = Recipe.from_json(half_recipe.to_json())
    assert again == half_recipe and np.array_equal(generate(tiny, again)[0], half)
    params = infotext_params(half_recipe.for_image(1))
    assert (params["Seed"], params["Variation seed"], params["Variation seed strength"]) == (11, 51, "0.5")
    random = make_recipe({**base, "subseed_strength": 0.3}, defaults)
    assert random.subseed is not None  # drawn and recorded, like a random seed
    with pytest.raises(UserError) as refused:
        make_recipe({**base, "subseed": 5, "subseed_strength": 1.5}, defaults)
    assert refused.value.field == "subseed_strength"


def test_resize_seed_from_pastes_the_seeds_noise_drawn_at_the_old_size_as_a1111(tiny):
    """A1111's "resize seed from" (its ImageRNG): the seed's noise drawn at the old size, centred over the noise of
    the new size (cropped where the old is larger; with floor division, as A1111 writes it)."""
    from spellbook.engine.noise import image_generators, initial_latents, variation_latents
    from spellbook.infotext import read_foreign_recipe
    from spellbook.provenance import infotext, request_from_foreign

    for (big_h, big_w), (small_h, small_w) in (((6, 9), (4, 4)), ((4, 4), (7, 5)), ((5, 8), (5, 8))):
        full = initial_latents(image_generators(3, 2), 4, big_h, big_w)
        pasted = variation_latents(full, 0, 0.0, seed=3, resize_from=(small_h, small_w))
        small = initial_latents(image_generators(3, 2), 4, small_h, small_w)
        dy, dx = (big_h - small_h) // 2, (big_w - small_w) // 2
        rows, cols = small_h + 2 * min(dy, 0), small_w + 2 * min(dx, 0)  # A1111's region, negative offsets crop
        for y in range(big_h):
            for x in range(big_w):
                inside = 0 <= y - max(dy, 0) < rows and 0 <= x - max(dx, 0) < cols
                source = small[:, :, y - dy, x - dx] if inside else full[:, :, y, x]
                assert torch.equal(pasted[:, :, y, x], source), (big_h, big_w, small_h, small_w, y, x)
    defaults = tiny.recipe_defaults()
    base = {"prompt": "a red circle", "seed": 10, "steps": 3, "sampler": "DDIM", "size": "16x24"}
    plain = generate(tiny, make_recipe(base, defaults))[0]
    same = make_recipe({**base, "seed_resize_from_w": 16, "seed_resize_from_h": 24}, defaults)
    assert np.array_equal(generate(tiny, same)[0], plain)
    resized = make_recipe({**base, "seed_resize_from_w": 16, "seed_resize_from_h": 16}, defaults)
    image = generate(tiny, resized)[0]
    assert np.abs(image - plain).max() > 1e-3
    again = Recipe.from_json(resized.to_json())
    assert again == resized and np.array_equal(generate(tiny, again)[0], image)
    text = infotext(resized)
    assert "Seed resize from: 16x16" in text
    assert make_recipe(request_from_foreign(read_foreign_recipe({"parameters": text})), defaults) == resized
    assert "seed_resize_from_w" not in make_recipe({**base, "seed_resize_from_w": -1, "seed_resize_from_h": -1},
                                                   defaults).to_dict()  # fmt: skip
    for bad in ({"seed_resize_from_w": 16}, {"seed_resize_from_w": 12, "seed_resize_from_h": 16}):
        with pytest.raises(UserError) as refused:
            make_recipe({**base, **bad}, defaults)
        assert refused.value.field == "seed_resize_from_w"
