"""How well inpainting with the shapes model follows the prompt inside the mask. Prints one JSON line.

A base picture from the shapes world (one object, e.g. a red circle on the left) is inpainted with a full
prompt for a different object elsewhere ("a blue square on the right, white background"), the mask covering
the half (or a centered box) where the new object should go. Only the masked area is judged: outside the
mask the picture is replaced by the background colour, so the judge sees just what was painted. Reported per
strength (1.0 and 0.75) and overall: share of images whose masked area shows the asked colour, shape, both,
and position, and whether the unmasked area was left bit for bit.

    python benchmarks/inpaint_adherence.py [--seeds 12] [--grid /tmp/inpaint_grid.png]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image

from spellbook.settings import Settings
from spellbook.studio import Studio
from spellbook.toy import world
from spellbook.toy.judge import judge_trained
from spellbook.toy.prompts import attributes_of

SIZE = world.NATIVE_SIZE
STRENGTHS = (1.0, 0.75)

# (name, base scene, prompt, mask box (left, top, right, bottom) painted white = repaint)
SETUPS = (
    (
        "right_half",
        world.Scene("red", "circle", "left", "white"),
        "a blue square on the right, white background",
        (SIZE // 2, 0, SIZE, SIZE),
    ),
    (
        "left_half",
        world.Scene("green", "triangle", "right", "black"),
        "a yellow circle on the left, black background",
        (0, 0, SIZE // 2, SIZE),
    ),
    (
        "top_half",
        world.Scene("orange", "square", "bottom", "gray"),
        "a purple triangle on the top, gray background",
        (0, 0, SIZE, SIZE // 2),
    ),
    (
        "center_box",
        world.Scene("blue", "triangle", "left", "white"),
        "a red square in the center, white background",
        (SIZE // 4, SIZE // 4, 3 * SIZE // 4, 3 * SIZE // 4),
    ),
)


def make_mask(box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, box)
    return mask


def masked_only(image: Image.Image, mask: Image.Image, background: str) -> np.ndarray:
    """The image with everything outside the mask replaced by the background colour."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
    outside = np.asarray(mask) < 128
    return np.where(outside[..., None], np.array(world.BACKGROUNDS[background], dtype=np.uint8), pixels)


def summarise(rows: list[dict]) -> dict:
    def share(key: str) -> float:
        return round(sum(r[key] for r in rows) / len(rows), 3)

    return {"n": len(rows), **{k: share(k) for k in ("colour", "shape", "both", "position", "untouched")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=12, help="seeds per mask/prompt setup and strength")
    parser.add_argument("--grid", help="also save a PNG grid of the results (rows: setup x strength)")
    args = parser.parse_args()
    started = time.perf_counter()
    rows: list[dict] = []
    tiles: dict[tuple[int, float], list[Image.Image]] = {}
    with tempfile.TemporaryDirectory() as home:
        studio = Studio(Settings(home=home))
        for index, (name, scene, prompt, box) in enumerate(SETUPS):
            base = Image.fromarray(world.render(scene, np.random.default_rng(index)))
            mask = make_mask(box)
            expected = attributes_of(prompt)
            before = np.asarray(base, dtype=np.int16)
            outside = np.asarray(mask) < 128
            for strength in STRENGTHS:
                tiles[(index, strength)] = [base, mask.convert("RGB")]
                for seed in range(args.seeds):
                    request = {
                        "kind": "inpaint",
                        "prompt": prompt,
                        "init_image": base,
                        "mask": mask,
                        "seed": 1000 * index + seed,
                        "strength": strength,
                    }
                    [result] = studio.run(studio.plan(request))
                    image = result.image.convert("RGB")
                    verdict = judge_trained(masked_only(image, mask, expected["background"]))
                    after = np.asarray(image.resize((SIZE, SIZE)), dtype=np.int16)
                    rows.append(
                        {
                            "setup": name,
                            "strength": strength,
                            "colour": verdict.colour == expected["colour"],
                            "shape": verdict.shape == expected["shape"],
                            "both": (verdict.colour, verdict.shape) == (expected["colour"], expected["shape"]),
                            "position": verdict.position == expected["position"],
                            "untouched": bool(np.abs(after[outside] - before[outside]).max() == 0),
                        }
                    )
                    tiles[(index, strength)].append(image.resize((SIZE, SIZE)))
    if args.grid:
        scale, columns = 4, 2 + args.seeds
        grid = Image.new("RGB", (columns * SIZE * scale, len(tiles) * SIZE * scale), (255, 0, 255))
        for r, row in enumerate(tiles.values()):
            for c, tile in enumerate(row):
                grid.paste(
                    tile.resize((SIZE * scale, SIZE * scale), Image.NEAREST), (c * SIZE * scale, r * SIZE * scale)
                )
        grid.save(args.grid)
    result = {
        "benchmark": "inpaint_adherence",
        "seeds": args.seeds,
        "setups": [name for name, *_ in SETUPS],
        **{f"strength_{s}": summarise([r for r in rows if r["strength"] == s]) for s in STRENGTHS},
        "per_setup": {
            f"{name}@{s}": summarise([r for r in rows if r["setup"] == name and r["strength"] == s])["both"]
            for name, *_ in SETUPS
            for s in STRENGTHS
        },
        "overall": summarise(rows),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
