"""How fast the light CLI commands answer: whole processes, median of several runs, against a bare Python start.

Prints one JSON line: per command the median/min/max seconds and the ratio to `python -c pass` measured in
the same run. The goal (issue "the first ten minutes"): `--help`, `info`, `models list`, `models info` in
about a second; they import no torch, diffusers or transformers.

    python benchmarks/cli_start.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from spellbook.infotext import write_png_text


def timed(command: list[str], env: dict[str, str], runs: int) -> dict[str, float]:
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        seconds.append(time.perf_counter() - started)
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SPELLBOOK_HOME": str(Path(tmp) / "home")}
        png = Path(tmp) / "a1111.png"
        write_png_text(Image.new("RGB", (8, 8)), png, {"parameters": "an otter\nSteps: 20, Seed: 1, Size: 8x8"})
        spellbook = [sys.executable, "-m", "spellbook.cli"]
        commands = {
            "python": [sys.executable, "-c", "pass"],
            "--help": [*spellbook, "--help"],
            "info": [*spellbook, "info", str(png)],
            "models list": [*spellbook, "models", "list"],
            "models info": [*spellbook, "models", "info", "shapes"],
        }
        figures = {name: timed(command, env, args.runs) for name, command in commands.items()}
    base = figures["python"]["median"]
    for figure in figures.values():
        figure["ratio_to_python"] = round(figure["median"] / base, 2)
        for key in ("median", "min", "max"):
            figure[key] = round(figure[key], 3)
    print(json.dumps({"benchmark": "cli_start", "runs": args.runs, "commands": figures}))


if __name__ == "__main__":
    main()
