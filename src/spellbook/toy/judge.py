"""The judge: reads back what a shapes-world image shows, by pixel analysis.

It is how the tests, the demo and the benchmarks check that "a red circle on the left" gave a red circle
on the left. Steps (docs/shapes-world.md): background from the border, foreground by distance from it,
colour from the foreground's median, position from its centroid, shape by template IoU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from spellbook.toy.world import BACKGROUNDS, COLOURS, NATIVE_SIZE, SHAPES, TRAINED_SHAPES, position_of, shape_mask

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background colour that makes a pixel foreground


@dataclass(frozen=True)
class Verdict:
    background: str
    colour: str | None
    shape: str | None
    position: str | None
    confidence: dict[str, float]
    foreground_share: float

    def matches(self, **expected: str | None) -> dict[str, bool]:
        """Per attribute: does the image show what was asked? Attributes given as None are skipped."""
        return {k: getattr(self, k) == v for k, v in expected.items() if v is not None}

    def to_dict(self) -> dict:
        return asdict(self)


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(palette)
    dists = np.linalg.norm(np.array([palette[n] for n in names], dtype=np.float32) - colour, axis=1)
    order = np.argsort(dists)
    best, second = dists[order[0]], dists[order[1]]
    confidence = float(1.0 - best / max(second, 1e-6))
    return names[order[0]], confidence


def judge(image: Image.Image | np.ndarray, shapes: tuple[str, ...] = SHAPES) -> Verdict:
    """Judge one image of any size (resized to the native size first)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (NATIVE_SIZE, NATIVE_SIZE):
        image = image.resize((NATIVE_SIZE, NATIVE_SIZE), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)

    # 1. Background: the palette background nearest to the median of the border pixels.
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background, bg_conf = _nearest(np.median(border, axis=0), BACKGROUNDS)

    # 2. Foreground: pixels far from that background colour; its colour is the median's nearest palette colour.
    distance = np.linalg.norm(pixels - np.array(BACKGROUNDS[background], dtype=np.float32), axis=2)
    mask = distance > FOREGROUND_DISTANCE
    share = float(mask.mean())
    if mask.sum() < 4:
        return Verdict(background, None, None, None, {"background": bg_conf}, share)
    colour, colour_conf = _nearest(np.median(pixels[mask], axis=0), COLOURS)
    # Refine the mask to pixels at least half-way from the background to the shape's colour, so
    # anti-aliased edges count as they were drawn (a thin cross does not read as a fat blob).
    fg_median = np.median(pixels[mask], axis=0)
    bg_colour = np.array(BACKGROUNDS[background], dtype=np.float32)
    axis = fg_median - bg_colour
    coverage = ((pixels - bg_colour) @ axis) / max(float(axis @ axis), 1e-6)
    refined = mask & (coverage >= 0.5)
    if refined.sum() >= 4:
        mask = refined

    # 3. Position: the foreground centroid, by thirds of the canvas.
    ys, xs = np.nonzero(mask)
    position = position_of((xs.mean() + 0.5) / NATIVE_SIZE, (ys.mean() + 0.5) / NATIVE_SIZE)

    # 4. Shape: the template drawn in the foreground's bounding box with the highest IoU.
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    ious = {}
    for name in shapes:
        template = _template(name, y1 - y0, x1 - x0)
        ious[name] = float((template & box).sum() / max((template | box).sum(), 1))
    ranked = sorted(ious, key=ious.get, reverse=True)
    shape = ranked[0]
    shape_conf = ious[shape] - (ious[ranked[1]] if len(ranked) > 1 else 0.0)
    confidence = {
        "background": bg_conf,
        "colour": colour_conf,
        "shape": shape_conf,
        "position": 1.0,
    }
    return Verdict(background, colour, shape, position, confidence, share)


def _template(shape: str, height: int, width: int) -> np.ndarray:
    # Templates are drawn at 4x and averaged down, like the renderer, then thresholded at half coverage.
    big = shape_mask(shape, height * 4, width * 4).astype(np.float32)
    return big.reshape(height, 4, width, 4).mean(axis=(1, 3)) >= 0.5


def judge_trained(image: Image.Image | np.ndarray) -> Verdict:
    """Judge among the shapes the model was trained on only (circle, square, triangle)."""
    return judge(image, TRAINED_SHAPES)
