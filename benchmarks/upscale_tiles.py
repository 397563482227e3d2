"""Tiled model upscaling: peak memory and time, whole picture vs tiles, for a 4x RRDBNet (ESRGAN's shape).

Each run is a fresh process (so its peak RSS is its own): it builds an RRDBNet with random weights (ESRGAN's
widths, fewer blocks unless --full: the memory that grows with the picture is the activations, not the
weights), upscales a random picture of SIDE px to 4 x SIDE, and reports its peak RSS and seconds. The baseline
is the whole picture at once (tile 0), measured in the same run; the ratios are tiles / whole. Prints one JSON
line.

    python benchmarks/upscale_tiles.py               # 512 -> 2048, tiles 256 and 128
    python benchmarks/upscale_tiles.py --quick       # 128 -> 512, tiles 64 and 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = """
import resource, sys, time
import numpy as np, torch
from PIL import Image
from spellbook.upscale import build_rrdbnet, _tiled
side, tile, blocks = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
net = build_rrdbnet(3, 3, 64, blocks, 32, 2, 1).eval()
for p in net.parameters():
    p.data *= 0.1
picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
start = time.perf_counter()
out = _tiled(net, picture, 4, tile, 16 if tile else 0)
seconds = time.perf_counter() - start
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, out.size[0])
"""


def measure(side: int, tile: int, blocks: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(side), str(tile), str(blocks)], capture_output=True, text=True, check=True
    )
    seconds, rss_kib, width = done.stdout.split()
    assert int(width) == 4 * side, done.stdout
    return {"tile": tile, "seconds": round(float(seconds), 2), "peak_rss_mib": round(int(rss_kib) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 -> 512 with tiles 64 and 32")
    parser.add_argument("--full", action="store_true", help="ESRGAN's 23 blocks instead of 2")
    args = parser.parse_args()
    side, tiles = (128, (64, 32)) if args.quick else (512, (256, 128))
    blocks = 23 if args.full else 2
    started = time.time()
    whole = measure(side, 0, blocks)
    runs = [measure(side, tile, blocks) for tile in tiles]
    print(json.dumps({
        "benchmark": "upscale_tiles",
        "input": f"{side}x{side}",
        "output": f"{4 * side}x{4 * side}",
        "rrdb_blocks": blocks,
        "whole": whole,
        "tiled": runs,
        "peak_rss_ratio": {str(r["tile"]): round(r["peak_rss_mib"] / whole["peak_rss_mib"], 3) for r in runs},
        "time_ratio": {str(r["tile"]): round(r["seconds"] / whole["seconds"], 3) for r in runs},
        "wall_seconds": round(time.time() - started, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
