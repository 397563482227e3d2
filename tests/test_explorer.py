"""Training-data explorer: ingest (malformed rows, missing columns, kill -9 and resume), exact counts checked
against a brute-force count in Python, domain shares, the prompt link, Datasette's JSON API and the CLI."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clirun import run_cli
from spellbook.errors import UserError
from spellbook.explorer.datasette_app import make_datasette
from spellbook.explorer.ingest import domain_of, ingest
from spellbook.explorer.query import Explorer
from spellbook.explorer.synth import write_synthetic
from spellbook.explorer.text import ArtistFinder, known_artists, split_prompt, words

LAION_COLUMNS = [
    "URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE", "hash",
    "__index_level_0__",
]  # fmt: skip


def laion_row(url, text, **values) -> dict:
    row = {
        "URL": url,
        "TEXT": text,
        "WIDTH": 512.0,
        "HEIGHT": 768.0,
        "similarity": 0.3,
        "punsafe": 0.01,
        "pwatermark": 0.1,
        "AESTHETIC_SCORE": 6.5,
        "hash": 42,
        "__index_level_0__": 7,
    }
    row.update(values)
    return row


def write_parquet(path: Path, rows: list[dict], columns: list[str] = LAION_COLUMNS, types: dict | None = None) -> Path:
    types = {
        "URL": pa.string(),
        "TEXT": pa.string(),
        "WIDTH": pa.float64(),
        "HEIGHT": pa.float64(),
        "similarity": pa.float64(),
        "punsafe": pa.float32(),
        "pwatermark": pa.float32(),
        "AESTHETIC_SCORE": pa.float32(),
        "hash": pa.int64(),
        "__index_level_0__": pa.int64(),
        **(types or {}),
    }
    schema = pa.schema([(c, types[c]) for c in columns])
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}, schema=schema), path)
    return path


# Hand-made captions whose counts are known: unicode61 splits on punctuation, folds case and diacritics,
# and does not stem.
CAPTIONS = [
    ("https://i.pinimg.com/736x/a.jpg", "a castle by Greg Rutkowski"),
    ("https://i.pinimg.com/736x/b.jpg", "Greg Rutkowski's castle at night"),
    ("https://I.PINIMG.com:443/736x/c.jpg", "rutkowski greg, castles"),
    ("https://render.fineartamerica.com/x.jpg", "castles by greg-rutkowski"),
    ("https://render.fineartamerica.com/y.jpg", "Dalí dreams, oil painting"),
    ("https://cdn.shopify.com/z.jpg?v=1", "dali mug"),
    ("http://user@www.example.org/p.png", "Salvador Dali melting clocks"),
    ("https://www.example.org/q.png", "a CASTLE at night, trending on artstation"),
    ("https://www.example.org/r.png", "castle"),
    ("https://www.example.org/s.png", "an otter holding a shell"),
]


@pytest.fixture(scope="module")
def small_db(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    path = write_parquet(folder / "small.parquet", [laion_row(u, t, hash=i) for i, (u, t) in enumerate(CAPTIONS)])
    ingest([path], folder / "small.db")
    return folder / "small.db"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    """(parquet, database) of 6,000 synthetic rows in row groups of 1,000."""
    folder = tmp_path_factory.mktemp("synthetic")
    parquet = write_synthetic(folder / "synthetic.parquet", 6000, seed=5, row_group_rows=1000)
    ingest([parquet], folder / "synthetic.db", batch_rows=700)
    return parquet, folder / "synthetic.db"


# ------------------------------------------------------------------------------------------------ ingest
def test_ingest_counts_and_reports_malformed_rows_and_missing_columns(tmp_path):
    good = laion_row("https://a.example.com/1.jpg", "a red fox")
    rows = [
        good,
        laion_row(None, "no url"),
        laion_row("", "empty url"),
        laion_row("not a url", "no host"),
        laion_row("https://a.example.com/2.jpg", None),
        laion_row("https://a.example.com/3.jpg", "   "),
        laion_row("https://a.example.com/4.jpg", "wide image", WIDTH="wide"),
        laion_row("https://a.example.com/5.jpg", "fractional width", WIDTH="640.5"),
        laion_row("https://a.example.com/6.jpg", "width as text", WIDTH="640"),
        laion_row("https://a.example.com/7.jpg", "no width", WIDTH=None),
        laion_row("https://b.example.com/8.jpg", "bad score", AESTHETIC_SCORE="high"),
    ]
    strings = {"WIDTH": pa.string(), "AESTHETIC_SCORE": pa.string()}
    for row in rows:
        row["AESTHETIC_SCORE"] = None if row["AESTHETIC_SCORE"] is None else str(row["AESTHETIC_SCORE"])
        row["WIDTH"] = None if row["WIDTH"] is None else str(row["WIDTH"]).removesuffix(".0")
    first = write_parquet(tmp_path / "first.parquet", rows, types=strings)
    without = [c for c in LAION_COLUMNS if c not in ("pwatermark", "similarity")]
    second = write_parquet(
        tmp_path / "second.parquet", [laion_row("https://c.example.com/x.jpg", "a blue owl")], without
    )

    report = ingest([first, second], tmp_path / "e.db")

    one, two = report.files
    assert (one.rows_total, one.rows_ingested, one.rows_rejected) == (11, 3, 8)
    assert one.rejected_by_reason == {
        "URL missing": 2,
        "URL has no host": 1,
        "TEXT missing": 2,
        "WIDTH not an integer": 2,  # "wide" and "640.5"
        "AESTHETIC_SCORE not a number": 1,
    }
    assert one.missing_columns == [] and two.missing_columns == ["similarity", "pwatermark"]
    assert (two.rows_ingested, report.images_total, report.rows_rejected) == (1, 4, 8)
    conn = sqlite3.connect(tmp_path / "e.db")
    rejected = conn.execute("SELECT row_number, reason, value FROM rejected_rows ORDER BY row_number").fetchall()
    assert rejected[0] == (1, "URL missing", None)
    assert (6, "WIDTH not an integer", "wide") in rejected and (10, "AESTHETIC_SCORE not a number", "high") in rejected
    widths = dict(conn.execute("SELECT caption, width FROM images").fetchall())
    assert widths == {"a red fox": 512, "width as text": 640, "no width": None, "a blue owl": 512}
    assert conn.execute("SELECT similarity, pwatermark FROM images WHERE caption = 'a blue owl'").fetchone() == (
        None,
        None,
    )
    assert conn.execute("SELECT value FROM stats WHERE name = 'rejected_rows'").fetchone() == ("8",)


def test_a_file_without_text_is_refused_before_anything_is_written(tmp_path):
    good = write_parquet(tmp_path / "good.parquet", [laion_row("https://a.example.com/1.jpg", "fox")])
    bad = write_parquet(tmp_path / "bad.parquet", [laion_row("https://a.example.com/1.jpg", "fox")], ["URL", "WIDTH"])
    with pytest.raises(UserError, match="no TEXT column"):
        ingest([good, bad], tmp_path / "e.db")
    assert not (tmp_path / "e.db").exists()
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="not a parquet file"):
        ingest([tmp_path / "junk.parquet"], tmp_path / "e.db")


def test_ingest_refuses_other_databases_and_the_same_file_twice(tmp_path):
    good = write_parquet(tmp_path / "good.parquet", [laion_row("https://a.example.com/1.jpg", "fox")])
    other = tmp_path / "spellbook.db"
    sqlite3.connect(other).execute("CREATE TABLE jobs (id INTEGER)").connection.commit()
    with pytest.raises(UserError, match="not an explorer database"):
        ingest([good], other)
    (tmp_path / "text.db").write_text("not sqlite" * 200)
    with pytest.raises(UserError, match="not an SQLite database"):
        ingest([good], tmp_path / "text.db")
    with pytest.raises(UserError, match="same file"):
        ingest([good, tmp_path / "." / "good.parquet"], tmp_path / "e.db")


def test_domains_are_host_names():
    assert domain_of("https://I.PinImg.com:443/736x/a.jpg") == "i.pinimg.com"
    assert domain_of("http://user:pw@www.example.org/p?q#f") == "www.example.org"
    assert domain_of("https://[2001:db8::1]:8080/x") == "[2001:db8::1]"
    assert domain_of("example.com/x.jpg") is None and domain_of("https:///x") is None


# ---------------------------------------------------------------------------------------- exact counts
def test_phrase_and_artist_counts_are_exact(small_db):
    with Explorer.open(small_db) as explorer:
        assert explorer.search("greg rutkowski", phrase=True).count == 3  # not "rutkowski greg"
        assert explorer.search("rutkowski greg").count == 4  # all words, any order
        assert explorer.search("castle").count == 4  # "castles" is another word: no stemming
        assert explorer.search("DALI").count == 3  # case and diacritics folded
        # Stop words are left out of an all-words search, not out of a phrase.
        assert explorer.search("castle at night").count == 2  # "castle" and "night"
        assert explorer.search("castle in the night").count == 2  # no caption has "in": still found
        assert explorer.search("castle in the night", phrase=True).count == 0
        assert explorer.search("by").count == 2  # only stop words: searched as they are
        artists = {a.artist: a.count for a in explorer.artists(min_count=1)}
        assert artists == {"Greg Rutkowski": 3, "Salvador Dalí": 3}
        link = explorer.prompt("a (castle:1.3) by greg rutkowski, [trending on artstation], ((otter))")
        assert [(p.term, p.count) for p in link.phrases] == [
            ("a castle", 2),
            ("trending on artstation", 1),
            ("otter", 1),
        ]
        assert [(a.artist, a.count, a.known) for a in link.artists] == [("Greg Rutkowski", 3, True)]
        assert link.phrases[0].share == pytest.approx(2 / len(CAPTIONS))
        assert {s.caption for s in link.phrases[0].samples} == {
            "a castle by Greg Rutkowski",
            "a CASTLE at night, trending on artstation",
        }
        unknown = explorer.prompt("castle by melting clocks").artists
        assert [(a.artist, a.count, a.known) for a in unknown] == [("melting clocks", 1, False)]


def brute_force_counts(captions: list[str], spellings_by_name: dict[str, list[str]]) -> dict[str, int]:
    """Captions containing any spelling as consecutive words, counted in plain Python."""
    having = defaultdict(set)  # n-gram -> captions that contain it
    for i, caption in enumerate(captions):
        tokens = words(caption)
        for n in range(1, 6):
            for start in range(len(tokens) - n + 1):
                having[tuple(tokens[start : start + n])].add(i)
    return {
        name: len(set().union(*(having.get(tuple(words(s)), set()) for s in spellings)))
        for name, spellings in spellings_by_name.items()
    }


def test_counts_match_a_brute_force_count_on_synthetic_data(synthetic):
    parquet, db = synthetic
    captions = pq.read_table(parquet, columns=["TEXT"]).column("TEXT").to_pylist()
    expected = brute_force_counts(captions, {a.name: list(a.spellings) for a in known_artists()})
    with Explorer.open(db) as explorer:
        assert {a.artist: a.count for a in explorer.artists()} == expected
        assert sum(expected.values()) > 200  # the synthetic data does name artists
        phrases = ["trending on artstation", "sea otter", "oil painting", "stock photo", "at sunset"]
        counted = brute_force_counts(captions, {p: [p] for p in phrases})
        assert {p: explorer.search(p, phrase=True).count for p in phrases} == counted
        assert all(counted.values())
        # Common words come from the precomputed `words` table, rare ones from FTS: both exact.
        single = ["painting", "otter", "by", "kinkade", "zeppelin"]
        assert {w: explorer.search(w).count for w in single} == brute_force_counts(captions, {w: [w] for w in single})
        common = dict(explorer.conn.execute("SELECT term, caption_count FROM words"))
        assert "painting" in common and "zeppelin" not in common and min(common.values()) >= 100


def test_domain_counts_and_shares(synthetic):
    parquet, db = synthetic
    urls = pq.read_table(parquet, columns=["URL"]).column("URL").to_pylist()
    expected = defaultdict(int)
    for url in urls:
        expected[domain_of(url)] += 1
    with Explorer.open(db) as explorer:
        top = explorer.domains(limit=len(expected) + 1)
        assert {d.domain: d.count for d in top} == expected
        assert [d.count for d in top] == sorted((d.count for d in top), reverse=True)
        assert all(d.share == pytest.approx(d.count / len(urls), rel=1e-5) for d in top)
        assert top[0].domain == "i.pinimg.com" and 0.07 < top[0].share < 0.10  # Pinterest ~8 %, as in LAION
        page = explorer.domain("https://render.fineartamerica.com/anything", limit=3)
        assert page.count == expected["render.fineartamerica.com"] and len(page.rows) == 3
        assert all(r.domain == "render.fineartamerica.com" for r in page.rows)


# ---------------------------------------------------------------------------------------------- resume
KILL_IN_THIRD_BATCH = """
import os, signal, sys
from spellbook.explorer import ingest as module

original, calls = module._write_batch, []

def write_then_die(*args, **kwargs):
    original(*args, **kwargs)  # rows written, transaction not yet committed
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)

module._write_batch = write_then_die
module.ingest(sys.argv[2:], sys.argv[1], batch_rows=500)
"""


def table_contents(path: Path) -> dict[str, list]:
    conn = sqlite3.connect(path)
    tables = {
        "images": "SELECT * FROM images ORDER BY id",
        "domains": "SELECT * FROM domains ORDER BY id",
        "artists": "SELECT * FROM artists ORDER BY id",
        "aesthetic_histogram": "SELECT * FROM aesthetic_histogram ORDER BY 1",
        "size_distribution": "SELECT * FROM size_distribution ORDER BY 1, 2",
        "rejected_rows": "SELECT * FROM rejected_rows ORDER BY id",
        "ingest_files": "SELECT id, name, fingerprint, rows_total, rows_done, rows_ingested, rows_rejected, "
        "missing_columns FROM ingest_files ORDER BY id",
        "words": "SELECT * FROM words ORDER BY term",
        "stats": "SELECT name, value FROM stats WHERE name != 'finalized_at' ORDER BY name",
        "fts": "SELECT count(*) FROM images_fts WHERE images_fts MATCH 'castle OR otter OR \"van gogh\"'",
    }
    contents = {name: conn.execute(sql).fetchall() for name, sql in tables.items()}
    conn.execute("INSERT INTO images_fts(images_fts, rank) VALUES ('integrity-check', 1)")
    conn.close()
    return contents


def test_resume_after_kill_gives_the_same_database(tmp_path):
    malformed = write_parquet(
        tmp_path / "malformed.parquet", [laion_row(None, "lost"), laion_row("https://x.example/1.jpg", "kept")]
    )
    parquet = write_synthetic(tmp_path / "part.parquet", 2600, seed=9, row_group_rows=800)
    files = [str(malformed), str(parquet)]
    killed = tmp_path / "killed.db"

    run = subprocess.run(
        [sys.executable, "-c", KILL_IN_THIRD_BATCH, str(killed), *files], capture_output=True, check=False
    )

    assert run.returncode == -9, run.stderr.decode()
    conn = sqlite3.connect(killed)
    done = conn.execute("SELECT name, rows_done FROM ingest_files ORDER BY id").fetchall()
    assert done == [("malformed.parquet", 2), ("part.parquet", 500)]  # the batch in flight was rolled back
    assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 1 + 500
    conn.close()

    report = ingest(files, killed, batch_rows=500)
    assert [f.status for f in report.files] == ["already ingested", "resumed"]
    assert report.files[1].resumed_from_row == 500 and report.files[1].rows_ingested == 2600
    reference = tmp_path / "reference.db"
    ingest(files, reference, batch_rows=500)
    assert table_contents(killed) == table_contents(reference)


# ----------------------------------------------------------------------------------------------- synth
def test_synth_is_deterministic_and_laion_shaped(tmp_path):
    a = pq.read_table(write_synthetic(tmp_path / "a.parquet", 1500, seed=1, row_group_rows=400))
    b = pq.read_table(write_synthetic(tmp_path / "b.parquet", 1500, seed=1))
    prefix = pq.read_table(write_synthetic(tmp_path / "p.parquet", 500, seed=1))
    other = pq.read_table(write_synthetic(tmp_path / "o.parquet", 500, seed=2))
    assert a.column_names == LAION_COLUMNS
    assert a.equals(b) and a.slice(0, 500).equals(prefix) and not prefix.equals(other)
    assert min(a.column("AESTHETIC_SCORE").to_pylist()) >= 6.0
    assert all(domain_of(u) for u in a.column("URL").to_pylist())
    with pytest.raises(UserError):
        write_synthetic(tmp_path / "none.parquet", 0)


# ---------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize(
    ("prompt", "phrases", "artists"),
    [
        (
            "a castle by greg rutkowski, trending on artstation",
            ["a castle", "trending on artstation"],
            ["Greg Rutkowski"],
        ),
        (
            "((masterpiece)), (best quality:1.2), [blurry], {cute} otter, <lora:detail:0.7>",
            ["masterpiece", "best quality", "blurry", "cute otter"],
            [],
        ),
        (
            "portrait of a knight, art by artgerm and wlop & alphonse mucha, in the style of Van Gogh",
            ["portrait of a knight", "art"],
            ["Artgerm", "WLOP", "Alphonse Mucha", "Vincent van Gogh"],
        ),
        ("[cat:dog:0.5] BREAK Salvador Dalí, oil painting", ["cat", "dog", "oil painting"], ["Salvador Dalí"]),
        ("castle, Castle, CASTLE by Jane Unknown", ["castle"], ["Jane Unknown"]),
    ],
)
def test_split_prompt(prompt, phrases, artists):
    parts = split_prompt(prompt, ArtistFinder(known_artists()))
    assert parts.phrases == phrases
    assert [a.name if a else name for name, a in parts.artists] == artists


def test_shipped_artist_list():
    artists = known_artists()
    assert len(artists) >= 300
    names = {a.name for a in artists}
    assert {"Greg Rutkowski", "Alphonse Mucha", "Thomas Kinkade", "Vincent van Gogh"} <= names


# -------------------------------------------------------------------------------------------- datasette
def test_datasette_json_api_answers_search_facets_and_canned_queries(synthetic):
    _, db = synthetic

    async def scenario():
        ds = make_datasette(db)
        await ds.invoke_startup()
        get = ds.client.get
        searched = (await get("/synthetic/images.json?_search=sea+otter&_facet=domain_id&_shape=objects")).json()
        top = (await get("/synthetic/top_domains.json?_shape=objects")).json()
        by_artist = (await get("/synthetic/captions_by_artist.json?artist=Thomas+Kinkade&_shape=objects")).json()
        above = (await get("/synthetic/images_above_score.json?score=7.5&_shape=objects")).json()
        page = await get("/synthetic/images?_search=otter")
        index = await get("/")
        return searched, top, by_artist, above, page, index

    searched, top, by_artist, above, page, index = asyncio.run(scenario())
    with Explorer.open(db) as explorer:
        expected = explorer.search("sea otter")
        kinkade = explorer.search("thomas kinkade", phrase=True).count
        pinterest = explorer.domains(limit=1)[0]
    assert searched["filtered_table_rows_count"] == expected.count > 0
    assert all("otter" in words(r["caption"]) for r in searched["rows"])
    facet = searched["facet_results"]["domain_id"]["results"]
    assert sum(f["count"] for f in facet) <= expected.count and facet[0]["label"]  # labels from domains
    assert top["rows"][0] == {
        "domain": "i.pinimg.com",
        "image_count": pinterest.count,
        "percent": round(100 * pinterest.share, 2),
    }
    assert len(by_artist["rows"]) == kinkade > 0
    assert above["rows"] and all(r["aesthetic"] >= 7.5 for r in above["rows"])
    assert page.status_code == 200 and '<img src="https://' in page.text and 'referrerpolicy="no-referrer"' in page.text
    assert "Synthetic data" in index.text  # source note from the metadata


# -------------------------------------------------------------------------------------------------- cli


def test_cli_json_outputs(small_db, capsys, monkeypatch):
    code, out, err = run_cli(["explore", "domains", "--db", small_db, "--json", "--limit", "2"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out) == [
        {"domain": "www.example.org", "count": 4, "share": 0.4},  # user@www.example.org counts too
        {"domain": "i.pinimg.com", "count": 3, "share": 0.3},  # I.PINIMG.com:443 counts too
    ]
    code, out, _ = run_cli(["explore", "artists", "--db", small_db, "--json", "--min-count", "1"], capsys, monkeypatch)
    assert [(a["artist"], a["count"]) for a in json.loads(out)] == [("Greg Rutkowski", 3), ("Salvador Dalí", 3)]
    code, out, _ = run_cli(["explore", "search", "castle", "--db", small_db, "--json"], capsys, monkeypatch)
    result = json.loads(out)
    assert (result["term"], result["count"], len(result["rows"])) == ("castle", 4, 4)
    code, out, _ = run_cli(
        ["explore", "prompt", "a castle by greg rutkowski, trending on artstation", "--db", small_db, "--json"],
        capsys,
        monkeypatch,
    )
    link = json.loads(out)
    assert [(p["term"], p["count"]) for p in link["phrases"]] == [("a castle", 2), ("trending on artstation", 1)]
    assert [(a["artist"], a["count"]) for a in link["artists"]] == [("Greg Rutkowski", 3)]
    code, out, _ = run_cli(["explore", "prompt", "otter", "--db", small_db], capsys, monkeypatch)
    assert code == 0 and "phrase 'otter': 1 captions" in out


def test_cli_ingest_synth_and_errors(tmp_path, home, capsys, monkeypatch):
    code, out, err = run_cli(
        ["explore", "synth", "--rows", "300", "--out", tmp_path / "s.parquet"], capsys, monkeypatch
    )
    assert code == 0, err
    code, out, err = run_cli(["explore", "ingest", tmp_path / "s.parquet"], capsys, monkeypatch)
    assert code == 0, err
    assert (home / "explorer.db").is_file() and "300 images" in out  # default --db: SPELLBOOK_HOME/explorer.db
    code, out, err = run_cli(["explore", "search", "otter", "--db", tmp_path / "missing.db"], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: db: no explorer database") and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["explore", "ingest", tmp_path / "nothing.parquet"], capsys, monkeypatch)
    assert code == 2 and "does not exist" in err
