"""Gallery search at scale: insert rate, database size, and p50/p95 latency of word, meaning and hybrid search.

Rows are synthetic but shaped like community prompts (subject, action, place, style, artists, modifiers,
a negative prompt from a common pool). They go in through the gallery's own tables, triggers and FTS5
index; no image files are written (the benchmark is about the database).

Embedding every prompt with all-MiniLM-L6-v2 runs at ~100 prompts/s on one busy CPU core, so a 1M-row run
would spend hours in the model. `--embed-rows N` embeds N real prompts and gives every other row the vector
of one of them plus a little noise: the search work (the code scan over every row, the exact re-rank) is
the same as with real vectors, and the embedding rate measured on the N is reported for extrapolation.

Baseline, in the same process and on the same vectors: sqlite-vec's vec0 exact KNN (`--no-baseline` skips
it), and the recall@10 of our sign-bit scan + exact re-rank against exact cosine over every row.

    python benchmarks/gallery_search.py                       # 1,000,000 rows
    python benchmarks/gallery_search.py --rows 100000 --embed-rows 3000
    python benchmarks/gallery_search.py --rows 20000 --embed-rows 500 --queries 50   # CI-sized
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np

SUBJECTS = (
    "otter",
    "red fox",
    "astronaut",
    "samurai",
    "dragon",
    "cat",
    "owl",
    "wolf",
    "knight",
    "witch",
    "robot",
    "mermaid",
    "old fisherman",
    "little girl",
    "cyborg",
    "viking warrior",
    "elf princess",
    "tiger",
    "koi fish",
    "lighthouse",
    "castle",
    "treehouse",
    "spaceship",
    "steam locomotive",
    "bonsai tree",
    "jellyfish",
    "bear",
    "raccoon",
    "hummingbird",
    "octopus",
    "deer",
    "giraffe",
    "penguin",
    "panda",
    "frog",
    "snail",
    "whale",
    "wizard",
    "pirate captain",
    "ballerina",
    "street musician",
    "monk",
    "detective",
    "queen",
    "alchemist",
    "mech",
    "golem",
    "phoenix",
    "unicorn",
    "kitsune",
    "vampire",
    "zombie",
    "ghost",
    "skeleton king",
    "goblin",
    "city street",
    "mountain village",
    "desert temple",
    "floating island",
    "abandoned factory",
    "cathedral",
    "bowl of ramen",
    "cup of coffee",
    "vintage car",
    "motorcycle",
    "sailboat",
    "hot air balloon",
    "library",
)
ADJECTIVES = (
    "cute",
    "majestic",
    "ancient",
    "futuristic",
    "tiny",
    "giant",
    "happy",
    "sad",
    "mysterious",
    "glowing",
    "steampunk",
    "cyberpunk",
    "gothic",
    "whimsical",
    "fluffy",
    "armored",
    "ethereal",
    "ornate",
    "rusty",
    "cozy",
)
ACTIONS = (
    "wearing a top hat",
    "reading a book",
    "drinking tea",
    "playing the violin",
    "riding a bicycle",
    "holding a lantern",
    "in a spacesuit",
    "sleeping",
    "dancing in the rain",
    "looking at the stars",
    "surrounded by flowers",
    "made of crystal",
    "covered in moss",
    "on fire",
    "underwater",
    "in the snow",
    "wearing a crown",
    "with a sword",
    "casting a spell",
    "eating noodles",
    "",
    "",
    "",
)
PLACES = (
    "in a misty forest",
    "on a mountain top",
    "in a neon city at night",
    "on the moon",
    "in a cozy cabin",
    "at the beach at sunset",
    "in a field of sunflowers",
    "in a haunted mansion",
    "in a japanese garden",
    "in a post-apocalyptic wasteland",
    "inside a cathedral",
    "in space",
    "on a pirate ship",
    "",
    "",
    "",
)
STYLES = (
    "oil painting",
    "watercolor",
    "digital art",
    "concept art",
    "studio ghibli style",
    "pixar style 3d render",
    "photorealistic",
    "35mm film photo",
    "anime",
    "ukiyo-e woodblock print",
    "pencil sketch",
    "pixel art",
    "art nouveau",
    "low poly",
    "vaporwave",
    "charcoal drawing",
    "matte painting",
    "isometric",
    "claymation",
    "stained glass",
    "comic book style",
    "impressionist painting",
    "fantasy illustration",
    "synthwave",
)
ARTISTS = (
    "greg rutkowski",
    "alphonse mucha",
    "artgerm",
    "hayao miyazaki",
    "james gurney",
    "thomas kinkade",
    "makoto shinkai",
    "wlop",
    "ross tran",
    "simon stalenhag",
    "beeple",
    "moebius",
    "studio ghibli",
    "craig mullins",
    "john singer sargent",
    "claude monet",
    "van gogh",
    "hokusai",
    "ilya kuvshinov",
    "loish",
    "peter mohrbacher",
    "zdzislaw beksinski",
    "h.r. giger",
    "norman rockwell",
    "frank frazetta",
)
MODIFIERS = (
    "highly detailed",
    "intricate",
    "8k",
    "4k",
    "trending on artstation",
    "octane render",
    "unreal engine",
    "sharp focus",
    "volumetric lighting",
    "cinematic lighting",
    "dramatic lighting",
    "golden hour",
    "soft lighting",
    "bokeh",
    "depth of field",
    "hdr",
    "masterpiece",
    "best quality",
    "award winning",
    "smooth",
    "elegant",
    "vibrant colors",
    "pastel colors",
    "muted colors",
    "epic composition",
    "wide angle",
    "symmetrical",
    "centered",
    "ultra realistic",
    "hyperrealistic",
    "moody",
    "dreamy",
    "(masterpiece:1.2)",
)
NEGATIVES = (
    "blurry, lowres, bad anatomy, bad hands, extra fingers, watermark, text",
    "ugly, deformed, disfigured, poorly drawn face, mutation, extra limbs",
    "lowres, jpeg artifacts, signature, watermark, username, cropped",
    "nsfw, blurry, out of focus, worst quality, low quality",
    "",
)
MODELS = ("sd15", "dreamshaper_8", "realisticVision_v51", "anything_v5", "deliberate_v2", "sdxl_base")
SAMPLERS = ("Euler a", "Euler", "DPM++ 2M", "DPM++ SDE", "DDIM", "UniPC", "DPM++ 2M SDE")
QUERY_TEMPLATES = (
    "{subject}",
    "{subject} {action}",
    "{adjective} {subject}",
    "{subject} {style}",
    "{subject} by {artist}",
    "{style} {place}",
    "{adjective} {subject} {place}",
)


def make_prompt(rng: random.Random) -> str:
    subject = f"{rng.choice(('a', 'an', 'the', 'portrait of a', 'a photo of a'))} {rng.choice(ADJECTIVES)} "
    subject += rng.choice(SUBJECTS)
    parts = [" ".join(p for p in (subject, rng.choice(ACTIONS), rng.choice(PLACES)) if p)]
    parts.append(rng.choice(STYLES))
    if rng.random() < 0.7:
        artists = rng.sample(ARTISTS, rng.choice((1, 1, 2, 3)))
        parts.append("by " + " and ".join(artists))
    parts += rng.sample(MODIFIERS, rng.randint(2, 7))
    return ", ".join(parts)


def make_query(rng: random.Random) -> str:
    return rng.choice(QUERY_TEMPLATES).format(
        subject=rng.choice(SUBJECTS),
        action=rng.choice([a for a in ACTIONS if a]),
        adjective=rng.choice(ADJECTIVES),
        style=rng.choice(STYLES),
        artist=rng.choice(ARTISTS),
        place=rng.choice([p for p in PLACES if p]),
    )


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2)}


def timed(call, queries) -> tuple[list[float], list]:
    times, results = [], []
    for query in queries:
        started = time.perf_counter()
        results.append(call(query))
        times.append(time.perf_counter() - started)
    return times, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--embed-rows", type=int, default=None, help="prompts embedded by the model (default all)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the embedding model")
    parser.add_argument("--dir", type=Path, default=None, help="where to build the database (default: a temp dir)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the sqlite-vec vec0 comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from spellbook.gallery import embed as embedding
    from spellbook.gallery.search import Filters, nearest_by_vector, search, search_words
    from spellbook.store import Database
    from spellbook.store.vectors import load_sqlite_vec, sign_code, to_blob

    rng = random.Random(args.seed)
    nprng = np.random.default_rng(args.seed)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="gallery-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db_path = workdir / "spellbook.db"
    for leftover in workdir.glob("spellbook.db*"):
        leftover.unlink()
    db = Database(db_path)

    # 1. Embed a sample of real prompts (the model's rate is a figure of its own).
    embed_rows = min(args.rows, args.embed_rows if args.embed_rows is not None else args.rows)
    prompts = [make_prompt(rng) for _ in range(embed_rows)]
    embedding.embed(["warm up"])
    started = time.perf_counter()
    sample_vectors = embedding.embed(prompts, batch_size=128)
    embed_rate = embed_rows / (time.perf_counter() - started)

    # 2. Insert every row through the gallery's tables (FTS5 triggers, embeddings with codes).
    insert_sql = (
        "INSERT INTO images (path, sha256, recipe, prompt, negative_prompt, model, sampler, seed, width, height, "
        "guidance, steps, visibility, created, source, phash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    vectors = np.empty((args.rows, sample_vectors.shape[1]), dtype=np.float32)
    started = time.perf_counter()
    batch = 5000
    for start in range(0, args.rows, batch):
        count = min(batch, args.rows - start)
        with db.transaction() as conn:
            for offset in range(count):
                n = start + offset
                if n < embed_rows:
                    prompt, vector = prompts[n], sample_vectors[n]
                else:
                    k = rng.randrange(embed_rows)
                    prompt = make_prompt(rng)
                    vector = sample_vectors[k] + nprng.normal(0, 0.02, sample_vectors.shape[1]).astype(np.float32)
                    vector /= np.linalg.norm(vector)
                vectors[n] = vector
                model, sampler = rng.choice(MODELS), rng.choice(SAMPLERS)
                seed, steps, guidance = rng.randrange(2**32), rng.choice((20, 25, 30, 40)), rng.choice((5, 7, 7.5, 9))
                recipe = {
                    "prompt": prompt,
                    "negative_prompt": (negative := rng.choice(NEGATIVES)),
                    "model": model,
                    "sampler": sampler,
                    "steps": steps,
                    "guidance": guidance,
                    "seed": seed,
                    "width": 512,
                    "height": 768,
                }
                day = f"2026-{1 + n * 11 // args.rows:02d}-{1 + n % 28:02d}"
                cursor = conn.execute(
                    insert_sql,
                    (
                        f"images/{day.replace('-', '/')}/{n}.png",
                        f"{n:064x}",
                        json.dumps(recipe),
                        prompt,
                        negative,
                        model,
                        sampler,
                        seed,
                        512,
                        768,
                        guidance,
                        steps,
                        "public" if n % 10 == 0 else "private",
                        f"{day}T12:00:00.000Z",
                        "spellbook",
                        f"{rng.getrandbits(64):016x}",
                    ),
                )
                conn.execute(
                    "INSERT INTO image_embeddings (image_id, model, code, vector) VALUES (?, ?, ?, ?)",
                    (cursor.lastrowid, embedding.MODEL_NAME, sign_code(vector).tobytes(), to_blob(vector)),
                )
    insert_seconds = time.perf_counter() - started
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db_bytes = sum(p.stat().st_size for p in workdir.glob("spellbook.db*"))

    # 3. Queries: words, meaning (with and without encoding the query), hybrid.
    queries = [make_query(rng) for _ in range(args.queries)]
    started = time.perf_counter()
    nearest_by_vector(db, vectors[0], Filters(), 20)  # loads the code index (once per process)
    index_load_seconds = time.perf_counter() - started
    word_times, _ = timed(lambda q: search_words(db, q, Filters(), 20), queries)
    query_vectors = {}
    encode_times, _ = timed(lambda q: query_vectors.setdefault(q, embedding.embed([q])[0]), queries)
    meaning_times, meaning_results = timed(lambda q: nearest_by_vector(db, query_vectors[q], Filters(), 20), queries)
    filtered_times, _ = timed(
        lambda q: nearest_by_vector(db, query_vectors[q], Filters(viewer=1, model="sd15"), 20), queries
    )
    embedding._embed_query.cache_clear()
    hybrid_times, _ = timed(lambda q: search(db, q, limit=20), queries)

    # 4. Quality and the baseline: exact cosine over every row, and sqlite-vec's vec0 KNN.
    # Recall counts ids; with near-copies of sampled vectors many rows tie within ~1e-4 of cosine, so the
    # cosine ratio (ours / exact, top 10) says how close the answers are when the ids differ.
    recall, cosine_ratio = [], []
    for q, results in zip(queries[:50], meaning_results[:50], strict=False):
        similarity = vectors @ query_vectors[q]
        exact = np.argpartition(-similarity, 10)[:10]
        recall.append(len({int(i) + 1 for i in exact} & {r.id for r in results[:10]}) / 10)  # ids = rows + 1
        cosine_ratio.append(float(np.mean([r.score for r in results[:10]]) / similarity[exact].mean()))
    report = {
        "benchmark": "gallery_search",
        "rows": args.rows,
        "embedded_rows": embed_rows,
        "cpu_threads": args.threads,
        "insert_rows_per_s": round(args.rows / insert_seconds),
        "embed_prompts_per_s": round(embed_rate, 1),
        "embed_1m_hours_estimate": round(1_000_000 / embed_rate / 3600, 2),
        "db_mb": round(db_bytes / 1e6, 1),
        "code_index_load_s": round(index_load_seconds, 2),
        "words": percentiles(word_times),
        "query_encode": percentiles(encode_times),
        "meaning_excluding_encode": percentiles(meaning_times),
        "meaning_including_encode": percentiles([a + b for a, b in zip(meaning_times, encode_times, strict=True)]),
        "meaning_filtered_viewer_model": percentiles(filtered_times),
        "hybrid": percentiles(hybrid_times),
        "meaning_recall_at_10": round(float(np.mean(recall)), 3),
        "meaning_top10_cosine_vs_exact": round(float(np.mean(cosine_ratio)), 4),
        "sqlite_vec_native": load_sqlite_vec(db.conn),
    }
    if not args.no_baseline and report["sqlite_vec_native"]:
        from spellbook.store.db import connect

        vec_conn = connect(workdir / "vec0-baseline.db")
        load_sqlite_vec(vec_conn)
        vec_conn.execute("DROP TABLE IF EXISTS baseline")
        vec_conn.execute(
            f"CREATE VIRTUAL TABLE baseline USING vec0(embedding float[{vectors.shape[1]}] distance_metric=cosine)"
        )
        vec_conn.execute("BEGIN")
        vec_conn.executemany(
            "INSERT INTO baseline(rowid, embedding) VALUES (?, ?)", ((i + 1, to_blob(v)) for i, v in enumerate(vectors))
        )
        vec_conn.execute("COMMIT")
        sql = "SELECT rowid, distance FROM baseline WHERE embedding MATCH ? AND k = 20"
        vec_times, _ = timed(lambda q: vec_conn.execute(sql, (to_blob(query_vectors[q]),)).fetchall(), queries[:20])
        report["baseline_sqlite_vec_vec0_exact"] = percentiles(vec_times)
        report["meaning_p95_ratio_vs_vec0"] = round(
            report["meaning_excluding_encode"]["p95_ms"] / report["baseline_sqlite_vec_vec0_exact"]["p95_ms"], 3
        )
        vec_conn.close()
    print(json.dumps(report))
    db.close()
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
