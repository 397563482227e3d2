"""Render a grid of shapes-model samples (rows: prompts, columns: seeds) for the docs.

python scripts/shapes_grid.py docs/shapes-samples.png
"""

import sys

from PIL import Image, ImageDraw

from spellbook.settings import Settings
from spellbook.studio import Studio
from spellbook.toy import world

PROMPTS = [
    "a red circle on the left, black background",
    "a blue square on the right, white background",
    "a yellow triangle on the top, gray background",
    "a green circle on the bottom, white background",
    "a purple square in the center, black background",
    "an orange triangle on the left, white background",
] + [s.caption() for s in world.held_out_scenes()[:2]]
SEEDS = 6
CELL = 96


def main(out: str) -> None:
    studio = Studio(Settings.from_env())
    label_width = 330
    grid = Image.new("RGB", (label_width + SEEDS * CELL, len(PROMPTS) * CELL), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    held = {s.caption() for s in world.held_out_scenes()}
    for row, prompt in enumerate(PROMPTS):
        recipe = studio.plan({"prompt": prompt, "seed": 0, "batch_size": SEEDS})
        for col, result in enumerate(studio.run(recipe)):
            grid.paste(
                result.image.resize((CELL - 4, CELL - 4), Image.NEAREST), (label_width + col * CELL + 2, row * CELL + 2)
            )
        draw.text((6, row * CELL + CELL // 2 - 6), prompt + (" (held out)" if prompt in held else ""), fill=(0, 0, 0))
    grid.save(out)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
