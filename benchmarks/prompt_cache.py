"""The prompt cache on a grid of one prompt: text-encoder passes and wall time, cache off vs on.

A 16-cell grid (one prompt, 16 seeds) on the shipped shapes model, each cell its own `generate` call, as a
grid, a morph or an A1111 client re-sending a prompt runs. "off" gives every call a fresh, disabled cache;
"on" shares one cache over the grid (empty at the grid's start). Cells alternate off/on, one torch thread,
and each cell's time is its fastest over the rounds, so a busy (shared) machine does not decide the result.
Prints one JSON line: text-encoder forward passes per grid (counted with a forward hook), wall and CPU
seconds per grid (sum over cells) and for the prompt encoding alone, and the ratios on / off.

    python benchmarks/prompt_cache.py             # 16 cells, 3 rounds, the model's default steps
    python benchmarks/prompt_cache.py --quick     # 2 rounds, 4 steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from spellbook.engine.pipeline import encode_conditioning, generate
from spellbook.models.components import Components, PromptCache
from spellbook.models.loading import ModelCache
from spellbook.recipe import make_recipe
from spellbook.settings import Settings

PROMPT = "a red circle on the left, black background"
NEGATIVE = "blurry, two shapes"


def grid_round(components: Components, recipes, passes: list[int]) -> dict[str, list[dict[str, float]]]:
    """One grid each way, cell by cell alternating; per mode and cell: wall and CPU seconds, text-encoder passes."""
    shared = replace(components, prompt_cache=PromptCache())
    cells: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for recipe in recipes:
        for mode in ("off", "on"):
            cell = shared if mode == "on" else replace(components, prompt_cache=PromptCache(max_entries=0))
            before, wall, cpu = passes[0], time.perf_counter(), time.process_time()
            generate(cell, recipe)
            cells[mode].append(
                {
                    "wall_s": time.perf_counter() - wall,
                    "cpu_s": time.process_time() - cpu,
                    "passes": passes[0] - before,
                }
            )
    return cells


def encode_round(components: Components, recipes) -> dict[str, float]:
    """Seconds spent in prompt encoding alone over the grid, each way (what the cache saves)."""
    seconds = {}
    for mode in ("off", "on"):  # fastest of three, for the same reason as the grid's cells
        best = float("inf")
        for _ in range(3):
            shared = replace(components, prompt_cache=PromptCache())
            started = time.perf_counter()
            for recipe in recipes:
                cell = shared if mode == "on" else replace(components, prompt_cache=PromptCache(max_entries=0))
                encode_conditioning(cell, recipe, {})
            best = min(best, time.perf_counter() - started)
        seconds[mode] = best
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared box)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 4 steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 3)
    steps = args.steps or (4 if args.quick else None)

    with tempfile.TemporaryDirectory() as home:
        components = ModelCache(Settings(home=home)).load("shapes")
        request = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 1}
        if steps:
            request["steps"] = steps
        first = make_recipe(request, components.recipe_defaults())
        recipes = [first.with_(seed=first.seed + cell) for cell in range(args.cells)]

        passes = [0]
        hook = components.text_encoder.register_forward_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
        try:
            grid_round(components, recipes[:1], passes)  # warm-up (allocator, kernels)
            grids = [grid_round(components, recipes, passes) for _ in range(rounds)]
            encodes = encode_round(components, recipes)
        finally:
            hook.remove()

    def grid_total(mode: str, key: str) -> float:
        """Sum over cells of each cell's fastest round."""
        return sum(min(grid[mode][i][key] for grid in grids) for i in range(len(recipes)))

    wall_off, wall_on = grid_total("off", "wall_s"), grid_total("on", "wall_s")
    cpu_off, cpu_on = grid_total("off", "cpu_s"), grid_total("on", "cpu_s")
    passes_off = statistics.median(sum(c["passes"] for c in grid["off"]) for grid in grids)
    passes_on = statistics.median(sum(c["passes"] for c in grid["on"]) for grid in grids)
    encode_off, encode_on = encodes["off"], encodes["on"]
    print(
        json.dumps(
            {
                "benchmark": "prompt_cache",
                "model": "shapes",
                "cells": args.cells,
                "steps": first.steps,
                "size": f"{first.width}x{first.height}",
                "rounds": rounds,
                "threads": torch.get_num_threads(),
                "text_encoder_passes_off": int(passes_off),
                "text_encoder_passes_on": int(passes_on),
                "passes_ratio": round(passes_on / passes_off, 4),
                "grid_wall_s_off": round(wall_off, 3),
                "grid_wall_s_on": round(wall_on, 3),
                "grid_wall_ratio": round(wall_on / wall_off, 3),
                "grid_cpu_s_off": round(cpu_off, 3),
                "grid_cpu_s_on": round(cpu_on, 3),
                "grid_cpu_ratio": round(cpu_on / cpu_off, 3),
                "encode_s_off": round(encode_off, 4),
                "encode_s_on": round(encode_on, 4),
                "encode_ratio": round(encode_on / encode_off, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
