"""How fast the light CLI commands answer: whole processes, median of several runs, against a bare Python start.

Prints one JSON line: per command the median/min/max seconds and the ratio to `python -c pass` measured in
the same run. The goal (issue "the first ten minutes"): `--help`, `info`, `models list`, `models info` and
`gallery search` (words and meaning: the encoder runs in NumPy) in about a second; they import no torch,
diffusers or transformers. For `generate` on a terminal (a pseudo-terminal here) it times the first output
(the spinner while torch and diffusers load) and the first denoising step on the progress bar.

    python benchmarks/cli_start.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
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


def terminal_timings(command: list[str], env: dict[str, str], runs: int, step_marker: bytes) -> dict[str, dict]:
    """Seconds to the first byte on a terminal's stderr, and to `step_marker` (the bar's label once steps run)."""
    first, step = [], []
    for _ in range(runs):
        controller, terminal = pty.openpty()
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=terminal)
        os.close(terminal)
        seen, got_first, got_step = b"", None, None
        while process.poll() is None or select.select([controller], [], [], 0)[0]:
            if select.select([controller], [], [], 0.02)[0]:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:
                    break
                now = time.perf_counter() - started
                got_first = got_first or now
                seen += chunk
                if got_step is None and step_marker in seen:
                    got_step = now
        os.close(controller)
        process.wait()
        first.append(got_first or float("nan"))
        step.append(got_step or float("nan"))
    return {
        "first output": {"median": statistics.median(first), "min": min(first), "max": max(first)},
        "first step": {"median": statistics.median(step), "min": min(step), "max": max(step)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SPELLBOOK_HOME": str(Path(tmp) / "home")}
        png = Path(tmp) / "pictures" / "a1111.png"
        png.parent.mkdir()
        write_png_text(Image.new("RGB", (8, 8)), png, {"parameters": "an otter\nSteps: 20, Seed: 1, Size: 8x8"})
        spellbook = [sys.executable, "-m", "spellbook.cli"]
        commands = {
            "python": [sys.executable, "-c", "pass"],
            "--help": [*spellbook, "--help"],
            "info": [*spellbook, "info", str(png)],
            "models list": [*spellbook, "models", "list"],
            "models info": [*spellbook, "models", "info", "shapes"],
            "gallery search": [*spellbook, "gallery", "search", "an otter in a hat"],
        }
        subprocess.run(
            [*spellbook, "gallery", "import", str(png.parent)], env=env, stdout=subprocess.DEVNULL, check=True
        )
        figures = {name: timed(command, env, args.runs) for name, command in commands.items()}
        out = str(Path(tmp) / "out")
        generate = [*spellbook, "generate", "a red circle", "--seed", "1", "--out", out, "--no-gallery"]
        for name, figure in terminal_timings(generate, env, args.runs, b"txt2img").items():
            figures[f"generate: {name}"] = figure
    base = figures["python"]["median"]
    for figure in figures.values():
        figure["ratio_to_python"] = round(figure["median"] / base, 2)
        for key in ("median", "min", "max"):
            figure[key] = round(figure[key], 3)
    print(json.dumps({"benchmark": "cli_start", "runs": args.runs, "commands": figures}))


if __name__ == "__main__":
    main()
