"""The shapes world: procedurally drawn training images and their captions.

Specification: docs/shapes-world.md (kept word for word in step with the team's shared spec). Everything
here is a pure function of its arguments and a seed, so the dataset, the held-out split and the judge's
templates are the same on every machine.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
TRAINED_SHAPES = ("circle", "square", "triangle")
UNSEEN_SHAPES = ("cross", "heart")  # never drawn in training: reserved for textual inversion
SHAPES = TRAINED_SHAPES + UNSEEN_SHAPES
POSITIONS = ("left", "right", "top", "bottom", "center")

NATIVE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down: smooth, slightly anti-aliased edges
SIZE_RANGE = (0.30, 0.45)  # bounding-box side as a fraction of the canvas side


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    background: str

    def caption(self) -> str:
        return caption_for(self.colour, self.shape, self.position, self.background)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def position_phrase(position: str) -> str:
    return "in the center" if position == "center" else f"on the {position}"


def caption_for(colour: str | None, shape: str | None, position: str | None, background: str | None) -> str:
    """The caption grammar; any attribute may be None (left free), e.g. "a red circle"."""
    noun = shape or "shape"
    head = f"{colour} {noun}" if colour else noun
    text = f"{article(head)} {head}"
    if position:
        text += " " + position_phrase(position)
    if background:
        text += f", {background} background"
    return text


def all_scenes(shapes: tuple[str, ...] = TRAINED_SHAPES) -> list[Scene]:
    return [Scene(c, s, p, b) for c, s, p, b in itertools.product(COLOURS, shapes, POSITIONS, BACKGROUNDS)]


def is_held_out(scene: Scene) -> bool:
    """About one combination in seven (39 of 270, 14 %) is never drawn in training.

    The rule spreads the held-out set evenly over every attribute value, so each colour, shape, position
    and background is still seen in training, only not in these combinations.
    """
    index = (
        list(COLOURS).index(scene.colour)
        + list(SHAPES).index(scene.shape)
        + list(POSITIONS).index(scene.position)
        + list(BACKGROUNDS).index(scene.background)
    )
    return scene.shape in TRAINED_SHAPES and index % 7 == 3


def held_out_scenes() -> list[Scene]:
    return [s for s in all_scenes() if is_held_out(s)]


def training_scenes() -> list[Scene]:
    return [s for s in all_scenes() if not is_held_out(s)]


# ---------------------------------------------------------------------------------------------- drawing


@functools.lru_cache(maxsize=4096)
def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean mask of `shape` filling a height x width box (the judge's templates use this too).

    Cached: callers must not modify the returned array.
    """
    y, x = np.mgrid[0:height, 0:width]
    u = (x + 0.5) / width  # 0..1 across the box
    v = (y + 0.5) / height  # 0..1 down the box
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # upright isosceles, apex at top centre, base along the bottom
        return np.abs(u - 0.5) <= 0.5 * v
    if shape == "cross":  # plus sign, arms one third of the box wide
        return (np.abs(u - 0.5) <= 1 / 6) | (np.abs(v - 0.5) <= 1 / 6)
    if shape == "heart":  # two lobes on top, a point at the bottom centre; fills its box
        lobes = ((u - 0.26) ** 2 + (v - 0.27) ** 2 <= 0.27**2) | ((u - 0.74) ** 2 + (v - 0.27) ** 2 <= 0.27**2)
        point = (v >= 0.36) & (np.abs(u - 0.5) <= 0.49 * (1.0 - v) / 0.64)
        return lobes | point
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def position_of(cx: float, cy: float) -> str:
    """Position word of a centroid given as fractions of the canvas (0..1), by thirds."""
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < 1 / 6:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _in_cell(cx: float, cy: float, position: str, margin: float) -> bool:
    lo, hi = 1 / 3 + margin, 2 / 3 - margin
    first, last = (0.0, 1 / 3 - margin), (2 / 3 + margin, 1.0)
    mid = (lo, hi)
    cells = {
        "left": (first, mid),
        "right": (last, mid),
        "top": (mid, first),
        "bottom": (mid, last),
        "center": (mid, mid),
    }
    (x0, x1), (y0, y1) = cells[position]
    return x0 <= cx <= x1 and y0 <= cy <= y1


def _place_in_cell(
    position: str, offset_x: float, offset_y: float, w: int, h: int, big: int, rng: np.random.Generator
) -> tuple[float, float]:
    """Box corner such that the shape's centroid falls in the cell, where the canvas allows it."""
    margin = 0.03
    thirds = {
        "first": (margin, 1 / 3 - margin),
        "mid": (1 / 3 + margin, 2 / 3 - margin),
        "last": (2 / 3 + margin, 1 - margin),
    }
    cell_x, cell_y = {
        "left": ("first", "mid"),
        "right": ("last", "mid"),
        "top": ("mid", "first"),
        "bottom": ("mid", "last"),
        "center": ("mid", "mid"),
    }[position]

    def axis(cell: str, offset: float, extent: int) -> float:
        lo = max(thirds[cell][0] * big - offset, 0.0)
        hi = min(thirds[cell][1] * big - offset, big - extent)
        return rng.uniform(lo, hi) if hi > lo else min(max(lo, 0.0), big - extent)

    return axis(cell_x, offset_x, w), axis(cell_y, offset_y, h)


def render(scene: Scene, rng: np.random.Generator, size: int = NATIVE_SIZE, noise: float = 0.0) -> np.ndarray:
    """Draw one scene; returns uint8 HxWx3. Size and position jitter come from `rng`."""
    big = size * SUPERSAMPLE
    for attempt in range(400):
        side_w = rng.uniform(*SIZE_RANGE) * big
        side_h = side_w * rng.uniform(0.9, 1.1)
        w, h = max(round(side_w), 4), max(round(side_h), 4)
        mask = shape_mask(scene.shape, h, w)
        ys, xs = np.nonzero(mask)
        if attempt < 200:  # plain rejection sampling: what the shipped model was trained on
            left = rng.uniform(0, big - w)
            top = rng.uniform(0, big - h)
        else:  # rare: place the centroid inside the cell directly (a big triangle at the top, say)
            left, top = _place_in_cell(scene.position, xs.mean() + 0.5, ys.mean() + 0.5, w, h, big, rng)
        cx = (left + xs.mean() + 0.5) / big
        cy = (top + ys.mean() + 0.5) / big
        if _in_cell(cx, cy, scene.position, margin=0.02):
            break
    else:  # pragma: no cover - the direct placement always finds room for the smaller sizes
        raise RuntimeError(f"could not place {scene}")
    canvas = np.zeros((big, big), dtype=np.float32)
    x0, y0 = round(left), round(top)
    canvas[y0 : y0 + h, x0 : x0 + w] = mask[: big - y0, : big - x0]
    coverage = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    fg = np.array(COLOURS[scene.colour], dtype=np.float32)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    image = coverage * fg + (1 - coverage) * bg
    if noise:
        image = image + rng.normal(0, noise, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- dataset


def random_caption(scene: Scene, rng: np.random.Generator, full_share: float = 0.55) -> str:
    """A full caption most of the time; otherwise some attributes left out, as short prompts do."""
    if rng.random() < full_share:
        return scene.caption()
    keep = rng.random(4) < np.array([0.7, 0.85, 0.5, 0.5])
    return caption_for(
        scene.colour if keep[0] else None,
        scene.shape if keep[1] else None,
        scene.position if keep[2] else None,
        scene.background if keep[3] else None,
    )


def training_batch(
    seed: int, step: int, batch_size: int, size: int = NATIVE_SIZE, full_share: float = 0.55
) -> tuple[np.ndarray, list[str]]:
    """Batch number `step` of the infinite training stream of `seed` (so training resumes exactly)."""
    rng = np.random.default_rng([seed, step])
    scenes = training_scenes()
    images, captions = [], []
    for _ in range(batch_size):
        scene = scenes[rng.integers(len(scenes))]
        images.append(render(scene, rng, size))
        captions.append(random_caption(scene, rng, full_share))
    return np.stack(images), captions
