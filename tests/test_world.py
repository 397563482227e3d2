"""The shapes world and its judge: the yardstick every semantic test relies on."""

from __future__ import annotations

import numpy as np

from spellbook.toy import world
from spellbook.toy.judge import judge
from spellbook.toy.prompts import attributes_of


def test_judge_reads_rendered_images_right_at_least_99_percent():
    rng = np.random.default_rng(123)
    scenes = world.all_scenes(world.SHAPES)
    right = 0
    n = 600
    for _ in range(n):
        scene = scenes[rng.integers(len(scenes))]
        verdict = judge(world.render(scene, rng, size=int(rng.choice([32, 64]))))
        right += (verdict.colour, verdict.shape, verdict.position, verdict.background) == (
            scene.colour,
            scene.shape,
            scene.position,
            scene.background,
        )
    assert right / n >= 0.99


def test_held_out_combinations_are_at_least_ten_percent_and_never_drawn_in_training():
    held = set(world.held_out_scenes())
    assert len(held) / len(world.all_scenes()) >= 0.10
    for attribute in ("colour", "shape", "position", "background"):  # every value is still seen in training
        assert {getattr(s, attribute) for s in world.training_scenes()} == {
            getattr(s, attribute) for s in world.all_scenes()
        }
    full_captions = {s.caption() for s in held}
    for step in range(20):
        _, captions = world.training_batch(0, step, 64)
        assert not full_captions & set(captions)
    assert all(s.shape in world.TRAINED_SHAPES for s in world.training_scenes())


def test_training_stream_is_deterministic_per_seed_and_step():
    a, ca = world.training_batch(5, 3, 8)
    b, cb = world.training_batch(5, 3, 8)
    c, _ = world.training_batch(5, 4, 8)
    assert np.array_equal(a, b) and ca == cb and not np.array_equal(a, c)


def test_captions_follow_the_grammar():
    assert (
        world.Scene("orange", "triangle", "center", "gray").caption()
        == "an orange triangle in the center, gray background"
    )
    assert world.caption_for("red", "circle", None, None) == "a red circle"
    assert attributes_of("an orange triangle in the center, gray background") == {
        "colour": "orange",
        "shape": "triangle",
        "position": "center",
        "background": "gray",
    }
