"""Morph animations: frames between keyframes (blends), placed for even motion, written as GIF/WebP/MP4 with every
frame a PNG with its recipe and a JSON sidecar that `reproduce` renders again."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from spellbook.errors import UserError
from spellbook.morph import EVEN_RATIO, Frame, Morph, even_frames, render, step_distances, unevenness
from spellbook.recipe import make_recipe


def test_frames_start_evenly_spaced_over_the_keyframes():
    assert even_frames(2, 5, loop=False) == [
        Frame(0, 0.0),
        Frame(0, 0.25),
        Frame(0, 0.5),
        Frame(0, 0.75),
        Frame(0, 1.0),
    ]
    assert even_frames(3, 6, loop=True) == [Frame(s, t) for s in range(3) for t in (0.0, 0.5)]
    assert unevenness([1.0, 1.0, 3.0]) == 3.0 and unevenness([2.0, 2.0]) == 1.0


def test_frames_are_added_where_the_motion_jumps(tiny):
    """A fake renderer whose picture brightens slowly, then steeply between t 0.4 and 0.5: frames are added in
    the steep part until no step is more than twice the median step."""
    defaults = tiny.recipe_defaults()
    keys = [make_recipe({"prompt": "a red circle", "seed": seed}, defaults) for seed in (1, 2)]
    morph = Morph(keys, even_frames(2, 11, loop=False))

    def draw(recipe):
        t = recipe.blend.t
        level = 40 * t + (40 * min(1.0, max(0.0, (t - 0.4) / 0.1)))
        return Image.new("RGB", (8, 8), (int(level),) * 3)

    images = render(morph, draw)
    assert len(images) == len(morph.frames) > 11
    assert unevenness(morph.distances) <= EVEN_RATIO, morph.distances
    added = [f.t for f in morph.frames if round(f.t * 10, 6) != round(f.t * 10)]
    assert added and all(0.4 <= t <= 0.5 for t in added), added
    assert morph.distances == step_distances(images, loop=False)


def test_the_morph_command_writes_frames_an_animation_and_a_sidecar_that_reproduces(cli, tmp_path):
    out = tmp_path / "anim" / "morph.gif"
    code, stdout, err = cli("morph", "a red circle", "a blue square", "--seeds", "3", "--model", "tiny", "--steps", "2",
                            "--frames", "4", "--no-even", "--scale", "2", "--out", out, "--json")  # fmt: skip
    assert code == 0, err
    record = json.loads(stdout)
    frames = [Image.open(path) for path in record["frames"]]
    assert len(frames) == 4 and json.loads(frames[1].text["spellbook"])["blend"]["t"] == pytest.approx(1 / 3)
    with Image.open(out) as gif:
        assert gif.n_frames == 4 and gif.size == (32, 32)
        assert json.loads(gif.info["comment"])["keyframes"][1]["prompt"] == "a blue square"
    sidecar = json.loads((tmp_path / "anim" / "morph.json").read_text())
    assert [f["t"] for f in sidecar["frames"]] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    code, stdout, err = cli("reproduce", tmp_path / "anim" / "morph.json", "--out", tmp_path / "again", "--json")
    assert code == 0, err
    again = json.loads(stdout)
    for first, second in zip(record["frames"], again["frames"], strict=True):
        assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    assert again["animation"].endswith("morph.gif")


def test_an_mp4_has_every_frame(cli, tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    out = tmp_path / "m.mp4"
    code, _, err = cli("morph", "a red circle", "--seeds", "1,2,3", "--loop", "--model", "tiny", "--steps", "2",
                       "--frames", "6", "--no-even", "--out", out)  # fmt: skip
    assert code == 0, err
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    assert meta["size"] == (16, 16) and sum(1 for _ in reader) == 6


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["a red circle", "--out", "x.txt"], ".gif, .webp, .mp4"),
        (["a red circle"], "at least two keyframes"),
        (["a", "b", "c", "--seeds", "1,2"], "2 seeds for 3 prompts"),
        (["a", "b", "--seeds", "x"], "whole numbers"),
    ],
)
def test_a_morph_that_cannot_run_says_why_in_one_line(cli, tmp_path, args, words):
    args = [str(tmp_path / a) if a == "x.txt" else a for a in args]
    code, _, err = cli("morph", *args, "--model", "tiny", "--steps", "2")
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_resume_keeps_the_frames_already_drawn(studio, tmp_path, monkeypatch):
    from spellbook.morph import run_morph

    defaults = {"model": "tiny", "steps": 2}
    keys = [studio.plan({**defaults, "prompt": "a red circle", "seed": seed}) for seed in (1, 2)]
    out = tmp_path / "r.gif"
    first = run_morph(studio, Morph(keys, even_frames(2, 3, False)), out, even=False)
    calls = []
    real = studio.run
    monkeypatch.setattr(studio, "run", lambda recipe, **kw: calls.append(recipe) or real(recipe, **kw))
    again = run_morph(studio, Morph(keys, even_frames(2, 3, False)), out, even=False, resume=True)
    assert calls == [] and again["frames"] == first["frames"]
    with pytest.raises(UserError):
        Morph.from_dict({"spellbook_morph": 99})
