"""Server throughput: 32 concurrent txt2img requests on the shapes model, batching on vs off, same run.

Prints one JSON line: images/s for each and the ratio (goal >= 3x). The requests go through the real
HTTP app (FastAPI TestClient, 32 client threads) and the embedded worker, as `spellbook serve` runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastapi.testclient import TestClient

from spellbook.server.app import build_services, create_app
from spellbook.settings import Settings

PROMPTS = [
    f"a {c} {s} {p}, {b} background"
    for c, s, p, b in zip(
        ["red", "blue", "green", "yellow"] * 8,
        ["circle", "square", "triangle", "circle"] * 8,
        ["on the left", "on the right", "at the top", "at the bottom", "in the center"] * 7,
        ["black", "white", "gray", "blue"] * 8,
    )
]


def run(batching: bool, requests: int, steps: int) -> float:
    home = tempfile.mkdtemp(prefix="spellbook-bench-")
    settings = Settings.from_env(home=home, batching=batching, rate_limit=0, max_jobs_batch=32)
    services = build_services(settings)
    with TestClient(create_app(settings, services=services)) as client:
        # Warm-up: load the model (and the gallery's embedder) before timing.
        warm = client.post("/api/v1/jobs", json={"prompt": "a red circle", "steps": steps}).json()["id"]
        while client.get(f"/api/v1/jobs/{warm}").json()["state"] != "done":
            time.sleep(0.05)
        started = time.perf_counter()

        def one(i: int) -> str:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": steps}
            return client.post("/api/v1/jobs", json=body).json()["id"]

        with ThreadPoolExecutor(requests) as pool:
            ids = list(pool.map(one, range(requests)))
        while services.queue.counts()["done"] < requests + 1:
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        assert all(client.get(f"/api/v1/jobs/{i}").json()["state"] == "done" for i in ids)
    return requests / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    off = run(False, args.requests, args.steps)
    on = run(True, args.requests, args.steps)
    print(
        json.dumps(
            {
                "benchmark": "serve_throughput",
                "requests": args.requests,
                "steps": args.steps,
                "images_per_s_batching_off": round(off, 2),
                "images_per_s_batching_on": round(on, 2),
                "ratio": round(on / off, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
