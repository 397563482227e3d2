"""X/Y/Z plots (`spellbook grid`): axes parsed as A1111 writes them, every cell planned before anything runs,
the cells saved with their recipes, a labelled grid per Z value, and `reproduce` running a whole grid again."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from spellbook.errors import UserError
from spellbook.grid import parse_axis
from spellbook.provenance import read_grid


@pytest.mark.parametrize(
    "text, values",
    [
        ("seed=1,2,3", ("1", "2", "3")),
        ("steps=10-30 (+10)", ("10", "20", "30")),
        ("steps=1-4", ("1", "2", "3", "4")),
        ("cfg=3-9 [4]", ("3", "5", "7", "9")),
        ("cfg=1.5-2.5 (+0.5)", ("1.5", "2", "2.5")),
        ("seed=5-1 (-2)", ("5", "3", "1")),
        ('sampler="Euler a", DDIM', ("Euler a", "DDIM")),
        ("prompt_sr=red,green,blue", ("red", "green", "blue")),
        ("Prompt S/R=red,blue", ("red", "blue")),
        ("size=32x32,48x32", ("32x32", "48x32")),
    ],
)
def test_axes_read_as_a1111_writes_them(text, values):
    assert parse_axis(text, "--x").values == values


@pytest.mark.parametrize(
    "text, words",
    [
        ("seed", "FIELD=VALUES"),
        ("colour=red", "unknown field 'colour'"),
        ("steps=1,abc", "'abc' is not a number"),
        ("steps=1.5", "not a whole number"),
        ("steps=1-10 (-1)", "the step must go"),
        ("prompt_sr=red", "at least one replacement"),
        ("steps=inf", "'inf' is not a finite number"),
        ("cfg=1,nan", "'nan' is not a finite number"),
        ("size=32x32,abc", "'abc' is not WIDTHxHEIGHT"),
    ],
)
def test_bad_axes_are_refused_by_name(text, words):
    with pytest.raises(UserError) as refused:
        parse_axis(text, "--y")
    assert refused.value.field == "--y" and words in refused.value.message


def test_a_grid_saves_every_cell_and_a_labelled_grid_per_z_that_reproduces(cli, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = cli(
        "grid", "a red circle", "--x", "prompt_sr=red,blue", "--y", "steps=2-3", "--z", "cfg=3,6",
        "--model", "tiny", "--seed", "7", "--out", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    records = json.loads(stdout)
    assert len(records["cells"]) == 8 and len(records["grids"]) == 2
    recipes = [cell["recipe"] for cell in records["cells"]]
    assert [r["prompt"] for r in recipes[:4]] == ["a red circle", "a blue circle"] * 2  # x fastest
    assert [r["steps"] for r in recipes[:4]] == [2, 2, 3, 3] and {r["seed"] for r in recipes} == {7}
    assert [r["guidance"] for r in recipes] == [3.0] * 4 + [6.0] * 4
    first = Image.open(records["grids"][0])
    cell = Image.open(records["cells"][0]["path"])
    scale = -(-128 // cell.width)
    assert first.width >= 2 * cell.width * scale and first.height >= 2 * cell.height * scale  # labels around
    grid = read_grid(records["grids"][1])
    assert (
        grid["axes"]["x"]["values"] == ["red", "blue"] and [c["recipe"]["guidance"] for c in grid["cells"]] == [6.0] * 4
    )
    # reproduce runs the whole grid again: the same cells, the same grid pixels.
    code, stdout, err = cli("reproduce", records["grids"][1], "--out", tmp_path / "again", "--json")
    assert code == 0, err
    again = json.loads(stdout)
    assert [c["recipe"]["prompt"] for c in again["cells"]] == [c["recipe"]["prompt"] for c in records["cells"][4:]]
    assert np.array_equal(np.asarray(Image.open(again["grids"][0])), np.asarray(Image.open(records["grids"][1])))


def test_a_bad_cell_or_too_many_cells_stop_the_grid_before_anything_runs(cli, tmp_path, monkeypatch):
    out = tmp_path / "out"
    code, _, err = cli("grid", "x", "--x", "sampler=DDIM,Bogus", "--model", "tiny", "--out", out)
    assert code == 2 and "cell sampler=Bogus" in err and "unknown sampler" in err
    monkeypatch.setenv("SPELLBOOK_MAX_GRID_CELLS", "4")
    code, _, err = cli("grid", "x", "--x", "seed=1-3", "--y", "steps=1-2", "--model", "tiny", "--out", out)
    assert code == 2 and "6 cells" in err and "at most 4" in err
    assert not out.exists()  # nothing ran
    code, _, err = cli("grid", "x", "--model", "tiny", "--out", out)
    assert code == 2 and "at least one axis" in err


def test_compatible_cells_share_a_forward_pass_unless_batching_is_off(studio, monkeypatch):
    import spellbook.studio as studio_module

    calls = []
    real = studio_module.generate

    def counting(components, recipes, *args, **kwargs):
        calls.append(len(recipes))
        return real(components, recipes, *args, **kwargs)

    monkeypatch.setattr(studio_module, "generate", counting)
    recipes = [studio.plan({"prompt": p, "model": "tiny", "steps": 2, "seed": s}) for p in ("a", "b") for s in (1, 2)]
    recipes.append(studio.plan({"prompt": "a", "model": "tiny", "steps": 3, "seed": 1}))
    together = studio.run_many(recipes)
    assert calls == [4, 1]  # one size, sampler and step count: one pass; the 3-step cell alone
    from dataclasses import replace

    monkeypatch.setattr(studio, "settings", replace(studio.settings, batching=False))
    calls.clear()
    alone = studio.run_many(recipes)
    assert calls == [1] * 5
    for a, b in zip(together, alone, strict=True):
        assert a[0].recipe == b[0].recipe
        assert np.abs(np.asarray(a[0].image, dtype=int) - np.asarray(b[0].image, dtype=int)).max() <= 1
    assert np.array_equal(np.asarray(alone[0][0].image), np.asarray(studio.run(recipes[0])[0].image))


def test_prompt_sr_whose_text_is_not_in_the_prompt_is_refused_before_anything_runs(cli, tmp_path):
    code, _, err = cli("grid", "a red circle", "--model", "tiny", "--x", "prompt_sr=green,blue", "--out", tmp_path)
    assert code == 2 and "'green' is in neither the prompt nor the negative prompt" in err
    assert not list(tmp_path.glob("*.png"))


def test_a_variation_strength_axis_shares_one_variation_seed(cli, tmp_path):
    code, out, err = cli("grid", "a red circle", "--model", "tiny", "--steps", "2", "--x",
                         "variation_strength=0.2,0.6", "--out", tmp_path, "--json")  # fmt: skip
    assert code == 0, err
    subseeds = {cell["recipe"]["subseed"] for cell in json.loads(out)["cells"]}
    assert len(subseeds) == 1, subseeds
