"""Training-data explorer at scale, on synthetic LAION-style data.

Writes `--rows` synthetic rows (in a child process, so its memory does not count), ingests them, then
times the questions users ask, warm, through the library and through Datasette's JSON API:
caption search (count + first 20 rows), domain page (a host's count, rank and first 20 images), prompt
link (every phrase and artist of a prompt with counts and 3 samples each). Prints one JSON line: ingest
rate, database size per million rows, p50/p95 latencies in ms, peak memory of this process, and linear
extrapolations to 12 M rows (labelled as such).

    python benchmarks/explorer.py                  # 1,000,000 rows
    python benchmarks/explorer.py --rows 200000    # smaller, for a shared machine
    python benchmarks/explorer.py --rows 12000000  # the full-scale run (LAION-Aesthetics 6+ is ~12 M)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spellbook.explorer.datasette_app import database_name, make_datasette
from spellbook.explorer.ingest import ingest
from spellbook.explorer.query import Explorer
from spellbook.explorer.synth import ANIMALS, FANTASY, LANDSCAPES, MEDIUMS, PLACES, PRODUCTS

# Common words (hundreds of thousands of matches at 1 M rows) and rare or absent ones, as people search.
COMMON = ["painting", "art", "print", "stock photo", "wallpaper", "dress", "at sunset", "digital art", "by"]
ABSENT = ["zeppelin", "quokka", "greg rutkowski", "masterpiece", "octane render", "unreal engine"]
PROMPTS = [
    "a castle by greg rutkowski, trending on artstation",
    "portrait of a woman, (masterpiece:1.2), best quality, by artgerm and alphonse mucha",
    "a cozy living room, interior design, 8k, octane render",
    "an otter holding a shell, watercolor painting, cute",
    "mountain lake at sunset, oil painting by thomas kinkade",
    "cyberpunk city at night, neon lights, digital art, by syd mead",
    "a red fox in a misty forest, photograph, national geographic",
    "starry night over a village, in the style of van gogh, canvas print",
    "((best quality)), [blurry], a dragon on a cliff, concept art, wlop",
    "still life with sunflowers, claude monet, impressionism",
]

SYNTH_IN_CHILD = (
    "import sys; from spellbook.explorer.synth import write_synthetic; "
    "write_synthetic(sys.argv[1], int(sys.argv[2]), seed=int(sys.argv[3]))"
)


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in samples_s)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return round(statistics.median(ms), 2), round(p95, 2)


def timed(function, items, repeat: int) -> tuple[list[float], list[float]]:
    """(first asks, repeats): each item once as a user's first question (the statement cache and the page
    cache warmed by another item), then `repeat` passes over all of them (what the Explorer remembers helps)."""
    first = []
    for item in items:
        started = time.perf_counter()
        function(item)
        first.append(time.perf_counter() - started)
    again = []
    for _ in range(repeat):
        for item in items:
            started = time.perf_counter()
            function(item)
            again.append(time.perf_counter() - started)
    return first, again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timed passes over the query set")
    parser.add_argument("--dir", type=Path, default=None, help="keep the parquet and database here")
    parser.add_argument(
        "--queries-only", action="store_true", help="time the queries on the database an earlier run left in --dir"
    )
    args = parser.parse_args()

    folder = args.dir or Path(tempfile.mkdtemp(prefix="spellbook-explorer-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    parquet, db = folder / "synthetic.parquet", folder / "explorer.db"
    if args.queries_only:
        if args.dir is None or not db.is_file():
            parser.error("--queries-only needs --dir with the explorer.db of an earlier run")
        ingested, synth_seconds, ingest_seconds, finalize_seconds = None, None, None, None
    else:
        for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            stale.unlink(missing_ok=True)
        # 1. Synthetic data, in a child process.
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", SYNTH_IN_CHILD, str(parquet), str(args.rows), str(args.seed)], check=True)
        synth_seconds = time.perf_counter() - started

        # 2. Ingest, noting when the rows are in and the derived tables start.
        marks: dict[str, float] = {}

        def progress(p) -> None:
            if p.stage != "rows" and "finalize" not in marks:
                marks["finalize"] = time.perf_counter()

        started = time.perf_counter()
        ingested = ingest([parquet], db, progress=progress).images_total
        ingest_seconds = time.perf_counter() - started
        finalize_seconds = time.perf_counter() - marks.get("finalize", time.perf_counter())
    db_bytes = db.stat().st_size

    # 3. Queries through the library.
    rng = random.Random(args.seed)
    with Explorer.open(db) as explorer:
        terms = COMMON + ABSENT + rng.sample(ANIMALS, 12) + rng.sample(PLACES, 6) + rng.sample(LANDSCAPES, 6)
        terms += rng.sample(MEDIUMS, 4) + rng.sample(PRODUCTS, 4) + rng.sample(FANTASY, 4)
        terms += [a.artist for a in explorer.artists(limit=6)]
        hosts = [d.domain for d in explorer.domains(limit=20)]
        tail = explorer.conn.execute(
            "SELECT domain FROM domains WHERE image_count < 50 ORDER BY id LIMIT 2000"
        ).fetchall()
        hosts += [h for (h,) in rng.sample(tail, min(30, len(tail)))]
        search_first, search = timed(lambda t: explorer.search(t, limit=20), terms, args.repeat)
        # The slowest first search and its match count: counting grows with the matches of multi-word
        # queries, which is what extrapolating to more rows needs.
        per_term = search_first
        slowest = max(range(len(terms)), key=per_term.__getitem__)
        slowest_term = {
            "term": terms[slowest],
            "count": explorer.search(terms[slowest], limit=0).count,
            "ms": round(per_term[slowest] * 1000, 2),
        }
        domain_first, domain_page = timed(lambda h: explorer.domain(h, limit=20), hosts, args.repeat)
        prompt_first, prompt_link = timed(lambda p: explorer.prompt(p, samples=3), PROMPTS, args.repeat)
        domain_ids = {
            h: explorer.conn.execute("SELECT id FROM domains WHERE domain = ?", (h,)).fetchone()[0] for h in hosts
        }

    # 4. The same through Datasette's JSON API (in-process client: no network, but all of Datasette's work).
    name = database_name(db)

    async def datasette_latencies() -> tuple[list[float], list[float]]:
        ds = make_datasette(db)
        await ds.invoke_startup()

        async def get(path: str) -> None:
            response = await ds.client.get(path)
            assert response.status_code == 200, (path, response.status_code, response.text[:200])

        async def run(paths: list[str]) -> list[float]:
            for path in paths:
                await get(path)
            out = []
            for _ in range(args.repeat):
                for path in paths:
                    started = time.perf_counter()
                    await get(path)
                    out.append(time.perf_counter() - started)
            return out

        searches = [f"/{name}/images.json?_search={t.replace(' ', '+')}&_size=20" for t in terms]
        domains = [f"/{name}/images.json?domain_id={domain_ids[h]}&_size=20" for h in hosts]
        return await run(searches), await run(domains)

    ds_search, ds_domain = asyncio.run(datasette_latencies())

    scale = 12_000_000 / args.rows

    def rounded(value, digits=1):
        return None if value is None else round(value, digits)

    result = {
        "rows": args.rows,
        "rows_ingested": ingested,
        "cpus": os.cpu_count(),
        "synth_rows_per_s": round(args.rows / synth_seconds) if synth_seconds else None,
        "ingest_seconds": rounded(ingest_seconds),
        "ingest_finalize_seconds": rounded(finalize_seconds),
        "ingest_rows_per_s": round(args.rows / ingest_seconds) if ingest_seconds else None,
        "db_bytes": db_bytes,
        "db_mb_per_million_rows": round(db_bytes / 1e6 / (args.rows / 1e6), 1),
        # "first": each query asked once, as a user's first question; "again": repeated passes (the Explorer
        # remembers counts it computed).
        "search_first_p50_ms": percentiles(search_first)[0],
        "search_first_p95_ms": percentiles(search_first)[1],
        "search_again_p50_ms": percentiles(search)[0],
        "search_again_p95_ms": percentiles(search)[1],
        "search_slowest_first": slowest_term,
        "domain_page_first_p95_ms": percentiles(domain_first)[1],
        "domain_page_again_p50_ms": percentiles(domain_page)[0],
        "domain_page_again_p95_ms": percentiles(domain_page)[1],
        "prompt_link_first_p50_ms": percentiles(prompt_first)[0],
        "prompt_link_first_p95_ms": percentiles(prompt_first)[1],
        "prompt_link_again_p95_ms": percentiles(prompt_link)[1],
        "datasette_search_p50_ms": percentiles(ds_search)[0],
        "datasette_search_p95_ms": percentiles(ds_search)[1],
        "datasette_domain_p50_ms": percentiles(ds_domain)[0],
        "datasette_domain_p95_ms": percentiles(ds_domain)[1],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "linear_extrapolation_12m": {
            "ingest_minutes": round(ingest_seconds * scale / 60, 1) if ingest_seconds else None,
            "db_gb": round(db_bytes * scale / 1e9, 2),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
