"""Blend ("halfway between these two"): a picture from two pictures' recipes, their noises slerped and their
prompt encodings interpolated. t = 0 and t = 1 are the two pictures bit for bit; reproduce and verify hold."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from spellbook.engine.pipeline import generate, to_pil
from spellbook.errors import UserError
from spellbook.queue.jobs import job_cost
from spellbook.recipe import Recipe, make_blend, make_recipe
from spellbook.toy.judge import judge_trained


def parents(tiny):
    defaults = tiny.recipe_defaults()
    a = make_recipe({"prompt": "a red circle", "seed": 10, "steps": 3, "batch_size": 2}, defaults)
    b = make_recipe({"prompt": "a blue square on a long white background", "seed": 70, "steps": 3}, defaults)
    return a, b


def test_the_ends_are_the_pictures_bit_for_bit_and_the_middle_is_new(tiny):
    a, b = parents(tiny)
    image_a = generate(tiny, a)[0][1]  # image 1 of a batch of 2: its own place in that batch
    image_b = generate(tiny, b)[0][0]
    picture_a, picture_b = a.for_image(1), b.for_image(0)
    assert np.array_equal(generate(tiny, make_blend(picture_a, picture_b, 0.0))[0][0], image_a)
    assert np.array_equal(generate(tiny, make_blend(picture_a, picture_b, 1.0))[0][0], image_b)
    middle = make_blend(picture_a, picture_b, 0.5)
    image = generate(tiny, middle)[0][0]
    assert np.abs(image - image_a).max() > 1e-3 and np.abs(image - image_b).max() > 1e-3
    again = Recipe.from_json(middle.to_json())
    assert again == middle and np.array_equal(generate(tiny, again)[0][0], image)
    assert (middle.kind, middle.seed, middle.blend.t) == ("blend", 11, 0.5)
    assert job_cost(middle) == job_cost(b)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"width": 24}, "differ in width"),
        ({"steps": 5}, "differ in steps"),
        ({"prompt": "a AND b"}, "AND or prompt editing"),
        ({"prompt": "[a:b:0.5]"}, "AND or prompt editing"),
    ],
)
def test_pictures_whose_recipes_cannot_be_blended_are_refused_by_name(tiny, change, words):
    a, b = parents(tiny)
    with pytest.raises(UserError) as refused:
        make_blend(a.for_image(0), b.with_(**change), 0.5)
    assert refused.value.field == "blend" and words in refused.value.message


def test_a_recipe_that_says_blend_is_checked_like_any_other(tiny):
    a, b = parents(tiny)
    data = make_blend(a.for_image(0), b, 0.5).to_dict()
    for change, field in (({"t": 1.5}, "blend.t"), ({"a": {"prompt": 3}}, "blend.a"), ({"c": 1}, "blend.c")):
        with pytest.raises(UserError) as refused:
            Recipe.from_dict({**data, "blend": {**data["blend"], **change}})
        assert refused.value.field == field, refused.value
    with pytest.raises(UserError) as refused:
        Recipe.from_dict({**data, "kind": "txt2img"})
    assert refused.value.field == "blend"


def test_the_blend_command_draws_frames_that_verify(cli, tmp_path):
    made = []
    for prompt, seed in (("a red circle", "5"), ("a green square", "9")):
        code, out, err = cli("generate", prompt, "--model", "tiny", "--steps", "2", "--seed", seed,
                             "--out", tmp_path / "in", "--json")  # fmt: skip
        assert code == 0, err
        made.append(json.loads(out)[0]["path"])
    code, out, err = cli("blend", *made, "--frames", "3", "--out", tmp_path / "blend", "--json")
    assert code == 0, err
    frames = json.loads(out)
    assert [f["t"] for f in frames] == [0.0, 0.5, 1.0]
    pixels = [np.asarray(Image.open(path)) for path in (*made, *(f["path"] for f in frames))]
    assert np.array_equal(pixels[2], pixels[0]) and np.array_equal(pixels[4], pixels[1])
    middle = Image.open(frames[1]["path"])
    assert "Blend: 0.5" in middle.text["parameters"] and "Blend seed: 9" in middle.text["parameters"]
    code, out, err = cli("verify", frames[1]["path"])
    assert code == 0 and "identical" in out, (out, err)
    code, _, err = cli("blend", made[0], tmp_path / "missing.png", "--out", tmp_path)
    assert code == 2 and "does not exist" in err
    code, _, err = cli("blend", *made, "--t", "1.5", "--out", tmp_path)
    assert code == 2 and "between 0" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from spellbook.models.loading import ModelCache
    from spellbook.settings import Settings

    return ModelCache(Settings(home=tmp_path_factory.mktemp("home"))).load("shapes")


def red_x(picture: Image.Image) -> tuple[float, int]:
    """The mean column of the red pixels, and how many there are."""
    pixels = np.asarray(picture).astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 110) & (pixels[..., 2] < 110)
    return (float(red.nonzero()[1].mean()) if red.any() else float("nan")), int(red.sum())


def test_between_a_circle_on_the_left_and_one_on_the_right_the_circle_moves_across(shapes):
    """Measured (8 seed pairs, 20 steps): every frame at t 0.25, 0.5, 0.75 was judged one red circle (24/24); the
    red pixels' mean column rose left to right in every pair (about 7, 16-22, 23 of 32); at t 0.5 the judge said
    centre 3, top or bottom 3, right 2 times (the shapes model places one circle; it moves through the middle)."""
    defaults = shapes.recipe_defaults()
    moved = one_circle = 0
    for i in range(8):
        a = make_recipe({"prompt": "a red circle on the left", "seed": 100 + i}, defaults)
        b = make_recipe({"prompt": "a red circle on the right", "seed": 300 + i}, defaults)
        frames = [to_pil(generate(shapes, make_blend(a, b, t))[0])[0] for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
        columns, counts = zip(*(red_x(frame) for frame in frames), strict=True)
        moved += columns[1] < columns[2] < columns[3] and 10 < columns[2] < 22
        for frame, count in zip(frames[1:4], counts[1:4], strict=True):
            judged = judge_trained(frame)
            one_circle += (judged.colour, judged.shape) == ("red", "circle") and count < 1.5 * max(counts[0], counts[4])
    assert moved >= 6 and one_circle >= 20, (moved, one_circle)


def test_the_api_blends_two_gallery_images_as_a_queued_job(make_client):
    import io

    from jobwait import wait_done, wait_filed

    client, _ = make_client()
    ids, pictures = [], []
    for prompt, seed in (("a red circle", 5), ("a green square", 9)):
        job = client.post("/api/v1/jobs", json={"prompt": prompt, "steps": 2, "seed": seed}).json()
        done = wait_filed(client, job["id"])
        ids.append(done["result"]["images"][0]["image_id"])
        pictures.append(np.asarray(Image.open(io.BytesIO(client.get(f"/api/v1/jobs/{job['id']}/images/0").content))))
    for t, expected in ((0.0, pictures[0]), (0.5, None)):
        response = client.post("/api/v1/blends", json={"a": ids[0], "b": ids[1], "t": t})
        assert response.status_code == 202, response.text
        done = wait_done(client, response.json()["id"])
        assert done["state"] == "done" and done["recipe"]["kind"] == "blend" and done["recipe"]["blend"]["t"] == t
        image = np.asarray(Image.open(io.BytesIO(client.get(f"/api/v1/jobs/{done['id']}/images/0").content)))
        if expected is not None:
            assert np.array_equal(image, expected)  # t = 0 is picture A again
        else:
            assert not np.array_equal(image, pictures[0]) and not np.array_equal(image, pictures[1])
    missing = client.post("/api/v1/blends", json={"a": ids[0], "b": 99999})
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "b"
    bad = client.post("/api/v1/blends", json={"a": ids[0], "b": ids[1], "t": 2})
    assert bad.status_code in (400, 422) and "t" in bad.text
    other = client.post("/api/v1/jobs", json={"prompt": "x", "steps": 3, "seed": 1}).json()
    third = wait_filed(client, other["id"])["result"]["images"][0]["image_id"]
    refused = client.post("/api/v1/blends", json={"a": ids[0], "b": third})
    assert refused.status_code == 400 and "differ in steps" in refused.json()["error"]["message"]


def test_pictures_without_recipes_blend_by_their_latents(cli, tmp_path):
    rng = np.random.default_rng(4)
    paths = []
    for name in ("sketch", "photo"):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(paths[-1])
    code, _, err = cli("blend", *paths, "--out", tmp_path / "x")
    assert code == 2 and "carries no recipe" in err and "--prompt" in err, err
    code, _, err = cli("blend", *paths, "--steps", "3", "--out", tmp_path / "x")
    assert code == 2 and "--steps needs --prompt" in err
    code, out, err = cli("blend", *paths, "--prompt", "a red circle", "--model", "tiny", "--steps", "4", "--seed",
                         "3", "--frames", "3", "--out", tmp_path / "blend", "--json")  # fmt: skip
    assert code == 0, err
    frames = json.loads(out)
    recipe = frames[1]["recipe"]
    assert (recipe["kind"], recipe["blend"]["a"], recipe["width"], recipe["height"]) == ("blend", None, 24, 16)
    assert recipe["strength"] == 0.6 and len(recipe["blend"]["b_sha256"]) == 64
    pixels = [np.asarray(Image.open(f["path"]), dtype=int) for f in frames]
    assert np.abs(pixels[0] - pixels[2]).max() > 0
    assert "Blend picture: " in Image.open(frames[1]["path"]).text["parameters"]
    code, out, err = cli("verify", frames[1]["path"])
    assert code == 0 and "identical" in out, (out, err)


def test_a_blend_of_two_drawn_circles_is_one_circle(shapes, tmp_path):
    """Measured (8 seeds, strength 0.6, 20 steps): two pictures of the world (a red circle on the left, one on the
    right) blended at t 0.5 under "a red circle" gave one red circle every time (8/8, judged), never two."""
    from spellbook.engine.pipeline import GenerationInputs
    from spellbook.recipe import Blend, InputRef
    from spellbook.toy.world import Scene, render

    rng = np.random.default_rng(0)
    left, right = (Image.fromarray(render(Scene("red", "circle", p, "gray"), rng)) for p in ("left", "right"))
    found = []
    for seed in range(8):
        recipe = make_recipe(
            {"kind": "img2img", "prompt": "a red circle", "seed": seed, "strength": 0.6},
            shapes.recipe_defaults(),
            init_image=InputRef("0" * 64),
        ).with_(kind="blend", blend=Blend(0.5, None, None, "0" * 64, "1" * 64))
        inputs = GenerationInputs(init_image=left, blend_image=right)
        picture = to_pil(generate(shapes, recipe, inputs)[0])[0]
        judged, (_, count) = judge_trained(picture), red_x(picture)
        found.append((judged.colour, judged.shape, count < 1.5 * red_x(left)[1]))
    assert found.count(("red", "circle", True)) >= 7, found


def test_the_api_blends_two_gallery_pictures_by_their_pixels_given_a_prompt(make_client):
    from jobwait import wait_done, wait_filed

    client, _ = make_client()
    ids = []
    for prompt, steps in (("a red circle", 2), ("a green square", 3)):  # their recipes cannot be blended
        job = client.post("/api/v1/jobs", json={"prompt": prompt, "steps": steps, "seed": 1}).json()
        ids.append(wait_filed(client, job["id"])["result"]["images"][0]["image_id"])
    refused = client.post("/api/v1/blends", json={"a": ids[0], "b": ids[1], "strength": 0.5})
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "strength"
    body = {"a": ids[0], "b": ids[1], "prompt": "a red square", "strength": 0.5, "steps": 4, "seed": 8}
    response = client.post("/api/v1/blends", json=body)
    assert response.status_code == 202, response.text
    done = wait_done(client, response.json()["id"])
    assert done["state"] == "done", done
    recipe = done["recipe"]
    assert (recipe["kind"], recipe["blend"]["a"], recipe["strength"], recipe["prompt"]) == ("blend", None, 0.5,
                                                                                          "a red square")  # fmt: skip
