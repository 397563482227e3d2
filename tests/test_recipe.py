"""Recipes: strict JSON, field-precise validation, defaults from the model."""

from __future__ import annotations

import json
import random

import pytest

from spellbook.errors import UserError
from spellbook.recipe import ConceptRef, InputRef, ModelRef, Recipe, make_recipe, parse_sampler

DEFAULTS = {"width": 512, "height": 512, "steps": 20, "sampler": "DPM++ 2M", "schedule": "Karras", "guidance": 7.0}


def test_json_round_trip_is_exact():
    recipe = make_recipe(
        {
            "prompt": "一只水獭, an otter",
            "negative_prompt": "blurry",
            "seed": 7,
            "batch_size": 2,
        },
        DEFAULTS,
        concepts=(ConceptRef("charlie", "ab" * 32),),
        model=ModelRef("sd15", "cd" * 32),
    )
    assert Recipe.from_json(recipe.to_json()) == recipe


def test_unknown_fields_are_an_error_not_dropped():
    data = make_recipe({"prompt": "x", "seed": 1}, DEFAULTS).to_dict()
    data["sampler_eta"] = 0.5
    with pytest.raises(UserError) as err:
        Recipe.from_dict(data)
    assert err.value.field == "sampler_eta"
    data.pop("sampler_eta")
    data["model"]["url"] = "x"
    with pytest.raises(UserError) as err:
        Recipe.from_dict(data)
    assert err.value.field == "model.url"


@pytest.mark.parametrize(
    "request_, field, message",
    [
        (
            {"size": "500x500"},
            "size",
            "size 500x500: width and height must be positive multiples of 8, e.g. 496x496 or 504x504",
        ),
        ({"size": "big"}, "size", "is not WIDTHxHEIGHT"),
        ({"sampler": "Eular a"}, "sampler", "did you mean 'Euler a'"),
        ({"schedule": "karas"}, "schedule", "did you mean 'Karras'"),
        ({"steps": 0}, "steps", "between 1 and 150"),
        ({"guidance": 31}, "guidance", "between 0 and 30"),
        ({"batch_size": 99}, "batch_size", "between 1 and 16"),
        ({"seed": 2**40}, "seed", "between 0 and"),
        ({"steps": "20"}, "steps", "must be int"),
        ({"size": "4096x4096"}, "size", "the limit is"),
        ({"kind": "img2img"}, "init_image", "needs an init image"),
        ({"kind": "inpaint", "init_image": InputRef("a")}, "mask", "needs a mask"),
        ({"kind": "img2img", "init_image": InputRef("a"), "strength": 1.5}, "strength", "above 0 and at most 1"),
    ],
)
def test_bad_values_name_their_field_and_what_is_accepted(request_, field, message):
    request_ = dict(request_)
    init_image = request_.pop("init_image", None)  # what the studio resolved the request's pixels to
    with pytest.raises(UserError) as err:
        make_recipe({"prompt": "x", **request_}, DEFAULTS, init_image=init_image)
    assert err.value.field == field
    assert message in str(err.value)


def test_old_style_sampler_names_carry_their_schedule():
    assert parse_sampler("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert parse_sampler("euler a") == ("Euler a", "Automatic")
    assert parse_sampler("Euler a", "karras") == ("Euler a", "Karras")
    recipe = make_recipe({"prompt": "x", "sampler": "DPM++ 2M Karras", "schedule": "Automatic"}, DEFAULTS)
    assert (recipe.sampler, recipe.schedule) == ("DPM++ 2M", "Karras")


def test_random_seed_is_chosen_once_and_recorded():
    recipe = make_recipe({"prompt": "x", "seed": -1}, DEFAULTS, rng=random.Random(3))
    assert 0 <= recipe.seed < 2**32
    assert json.loads(recipe.to_json())["seed"] == recipe.seed


def test_defaults_come_from_the_model_and_the_request_wins():
    recipe = make_recipe({"prompt": "x", "steps": 30}, {**DEFAULTS, "width": 32, "height": 32})
    assert (recipe.width, recipe.height, recipe.steps, recipe.sampler) == (32, 32, 30, "DPM++ 2M")


def test_image_seed_is_seed_plus_batch_index():
    recipe = make_recipe({"prompt": "x", "seed": 100, "batch_size": 4}, DEFAULTS)
    assert [recipe.for_image(i).image_seed for i in range(4)] == [100, 101, 102, 103]
