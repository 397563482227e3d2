"""Pictures for the concepts walkthrough (README, docs/concepts.md).

python scripts/concept_grid.py pictures triangle wedges/          # 8 rendered pictures to learn from
spellbook concept train wedge --images wedges/                    # into SPELLBOOK_HOME/concepts
python scripts/concept_grid.py grid wedge wedges/ docs/concept-wedge.png [--round-trip]

The grid's first row is the training pictures (with --round-trip, the second row is the same pictures through
the model's VAE, encoded and decoded); then one row per prompt, seeds 0-5.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from spellbook.settings import Settings
from spellbook.studio import Studio
from spellbook.toy import world

CELL = 48
COLUMNS = 6
LABEL = 215
PROMPTS = [
    "a blue <{}>, white background",
    "a red <{}>, black background",
    "a yellow <{}>, gray background",
    "an orange <{}>, white background",
    "a <{}>",
]


def render_pictures(shape: str, folder: Path, count: int = 8, seed: int = 0) -> None:
    """Various colours, positions and backgrounds, as the semantic test renders them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours, positions, backgrounds = list(world.COLOURS), list(world.POSITIONS), list(world.BACKGROUNDS)
    for i in range(count):
        scene = world.Scene(colours[i % 6], shape, positions[i % 5], backgrounds[i % 3])
        Image.fromarray(world.render(scene, rng)).save(folder / f"{i}.png")
    print(f"{count} pictures of a {shape} in {folder}")


def round_trip(studio: Studio, images: list[Image.Image]) -> list[Image.Image]:
    vae = studio.components_for("shapes").vae
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1) for im in images])
    with torch.no_grad():
        decoded = vae.decode(vae.encode(x.permute(0, 3, 1, 2)).latent_dist.mean).sample
    pixels = ((decoded.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    return [Image.fromarray(p) for p in pixels]


def grid(name: str, pictures: Path, out: Path, with_round_trip: bool) -> None:
    studio = Studio(Settings.from_env())
    training = [Image.open(p).convert("RGB") for p in sorted(pictures.glob("*.png"))][:COLUMNS]
    rows: list[tuple[str, list[Image.Image]]] = [("training pictures", training)]
    if with_round_trip:
        rows.append(("the same, through the VAE", round_trip(studio, training)))
    for prompt in PROMPTS:
        recipe = studio.plan({"prompt": prompt.format(name), "seed": 0, "batch_size": COLUMNS})
        rows.append((prompt.format(name), [r.image for r in studio.run(recipe)]))
    sheet = Image.new("RGB", (LABEL + COLUMNS * CELL, len(rows) * CELL), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, (label, images) in enumerate(rows):
        for col, image in enumerate(images):
            sheet.paste(image.resize((CELL - 4, CELL - 4), Image.NEAREST), (LABEL + col * CELL + 2, row * CELL + 2))
        draw.text((6, row * CELL + CELL // 2 - 6), label, fill=(0, 0, 0))
    sheet.quantize(colors=256, dither=Image.Dither.NONE).save(out, optimize=True)  # small, colours kept
    print(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("pictures", help="render 8 pictures of a shape")
    render.add_argument("shape", choices=world.SHAPES)
    render.add_argument("folder", type=Path)
    sheet = commands.add_parser("grid", help="training pictures and generated images of a trained concept")
    sheet.add_argument("name")
    sheet.add_argument("pictures", type=Path)
    sheet.add_argument("out", type=Path)
    sheet.add_argument("--round-trip", action="store_true", help="add the pictures as the VAE gives them back")
    args = parser.parse_args()
    if args.command == "pictures":
        render_pictures(args.shape, args.folder)
    else:
        grid(args.name, args.pictures, args.out, args.round_trip)


if __name__ == "__main__":
    main()
