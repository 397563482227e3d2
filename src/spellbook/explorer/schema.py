"""The explorer database: tables (created with sqlite-utils) and the derived tables computed after ingest.

Tables
- `images`: one row per caption/image URL (LAION columns renamed: TEXT -> caption, AESTHETIC_SCORE ->
  aesthetic, __index_level_0__ -> source_index), `domain_id` -> `domains`.
- `images_fts`: FTS5 over `images.caption`, external content (the text is stored once, in `images`).
  Tokenizer `unicode61 remove_diacritics 2`, not porter: a count here means "captions containing these
  words", exactly — porter would count "paintings" and "painted" for "painting", and an artist's name is
  not an English word to be stemmed. Diacritics are folded so "Dali" finds "Dalí". No triggers: ingest
  writes each row to both tables in one transaction; the database is read-only after that.
- `domains`: host names from the URLs, with precomputed `image_count` and `share`.
- `artists`: the shipped artist list (data/artists.txt) with `caption_count` from FTS phrase queries.
- `words`: caption counts of the words in at least WORD_MIN_CAPTIONS captions (from FTS5's vocabulary),
  so counting a common single word costs a lookup instead of a pass over its matches.
- `aesthetic_histogram`, `size_distribution`, `stats`: precomputed aggregates, so pages that show them do
  not scan millions of rows.
- `ingest_files`, `rejected_rows`: what was read from which file, how far (this is what makes ingest
  resumable), and every row that was not ingested, with the reason.
"""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from spellbook.errors import UserError
from spellbook.explorer.text import Artist

FTS_TOKENIZER = "unicode61 remove_diacritics 2"
SCHEMA_VERSION = 1
AESTHETIC_BUCKET = 0.25  # width of the aesthetic score histogram's buckets
# Shorter side of an image, in pixels: where each size bucket starts.
SIZE_BUCKETS = (0, 256, 512, 768, 1024, 2048)
WORD_MIN_CAPTIONS = 100  # words in fewer captions are counted through FTS at query time (fast: few matches)


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection for ingest (WAL, explicit transactions) or for queries (read-only)."""
    if readonly:
        # A file: URI (percent-encoded by as_uri) so names with "?" or "#" still open read-only.
        conn = sqlite3.connect(
            f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=30, check_same_thread=False
        )
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    try:
        if not readonly:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a killed process loses nothing committed; only a power cut can lose
            # the last transactions, and ingest resumes from whatever was committed.
            conn.execute("PRAGMA synchronous=NORMAL")
        # A bounded page cache (128 MiB) keeps index and FTS updates in memory whatever the data's size.
        conn.execute("PRAGMA cache_size=-131072")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError:
        conn.close()
        raise UserError(f"{path} is not an SQLite database", field="db") from None
    return conn


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables that do not exist yet (idempotent)."""
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    if "domains" not in db.table_names():
        db["domains"].create(
            {"id": int, "domain": str, "image_count": int, "share": float},
            pk="id",
            not_null={"domain", "image_count", "share"},
            defaults={"image_count": 0, "share": 0.0},
        )
        db["domains"].create_index(["domain"], unique=True)
        db["domains"].create_index([sqlite_utils.db.DescIndex("image_count")], index_name="domains_by_image_count")
    if "images" not in db.table_names():
        db["images"].create(
            {
                "id": int,
                "url": str,
                "caption": str,
                "width": int,
                "height": int,
                "similarity": float,
                "punsafe": float,
                "pwatermark": float,
                "aesthetic": float,
                "hash": int,
                "source_index": int,
                "domain_id": int,
            },
            pk="id",
            not_null={"url", "caption", "domain_id"},
            foreign_keys=[("domain_id", "domains", "id")],
        )
        db["images"].enable_fts(["caption"], fts_version="FTS5", tokenize=FTS_TOKENIZER)
    if "artists" not in db.table_names():
        db["artists"].create(
            {"id": int, "name": str, "spellings": str, "caption_count": int, "share": float},
            pk="id",
            not_null={"name", "caption_count"},
        )
        db["artists"].create_index(["name"], unique=True)
    if "aesthetic_histogram" not in db.table_names():
        db["aesthetic_histogram"].create(
            {"bucket_start": float, "bucket_end": float, "image_count": int, "share": float}, pk="bucket_start"
        )
    if "size_distribution" not in db.table_names():
        db["size_distribution"].create(
            {"shorter_side_from": int, "shorter_side": str, "orientation": str, "image_count": int, "share": float},
            pk=("shorter_side_from", "orientation"),
        )
    if "words" not in db.table_names():
        db["words"].create({"term": str, "caption_count": int, "share": float}, pk="term")
    if "stats" not in db.table_names():
        db["stats"].create({"name": str, "value": str, "description": str}, pk="name")
    if "ingest_files" not in db.table_names():
        db["ingest_files"].create(
            {
                "id": int,
                "name": str,
                "path": str,
                "fingerprint": str,
                "size_bytes": int,
                "rows_total": int,
                "rows_done": int,
                "rows_ingested": int,
                "rows_rejected": int,
                "missing_columns": str,
                "synthetic": int,
                "started_at": str,
                "finished_at": str,
            },
            pk="id",
            not_null={"fingerprint", "rows_total", "rows_done", "rows_ingested", "rows_rejected"},
            defaults={"rows_done": 0, "rows_ingested": 0, "rows_rejected": 0},
        )
        db["ingest_files"].create_index(["fingerprint"], unique=True)
    if "rejected_rows" not in db.table_names():
        db["rejected_rows"].create(
            {"id": int, "file_id": int, "row_number": int, "reason": str, "value": str, "url": str, "caption": str},
            pk="id",
            foreign_keys=[("file_id", "ingest_files", "id")],
        )


# ------------------------------------------------------------------------------------------- derived tables
def _stats_value(conn: sqlite3.Connection, name: str) -> str | None:
    row = conn.execute("SELECT value FROM stats WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def artist_list_digest(artists: tuple[Artist, ...] | list[Artist]) -> str:
    text = "\n".join("|".join(a.spellings) for a in artists)
    return hashlib.sha256(text.encode()).hexdigest()


def images_count(conn: sqlite3.Connection) -> int:
    """Rows in `images`, from the ingest bookkeeping (no table scan)."""
    return conn.execute("SELECT coalesce(sum(rows_ingested), 0) FROM ingest_files").fetchone()[0]


def needs_finalize(conn: sqlite3.Connection, artists: tuple[Artist, ...] | list[Artist]) -> bool:
    return _stats_value(conn, "finalized_images") != str(images_count(conn)) or _stats_value(
        conn, "artist_list_sha256"
    ) != artist_list_digest(artists)


def finalize(
    conn: sqlite3.Connection,
    artists: tuple[Artist, ...] | list[Artist],
    on_step: Callable[[str], None] | None = None,
) -> None:
    """Compute everything derived from `images`. Each step is one transaction and idempotent, so a kill
    here is repaired by running ingest again."""

    def step(name: str) -> None:
        if on_step:
            on_step(name)

    def transaction(*statements: tuple[str, tuple | dict]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    total = images_count(conn)
    share = 1.0 / total if total else 0.0

    # 1. Indexes are built once, after the bulk insert: sorting once is much faster than growing a
    # B-tree row by row in random order.
    step("indexes")
    conn.execute("CREATE INDEX IF NOT EXISTS images_domain_id ON images(domain_id)")
    conn.execute("CREATE INDEX IF NOT EXISTS images_aesthetic ON images(aesthetic DESC)")

    # 2. Domains: image counts and shares.
    step("domains")
    transaction(
        (
            (
                "WITH counted AS (SELECT domain_id, count(*) AS n FROM images GROUP BY domain_id) "
                "UPDATE domains SET image_count = counted.n, share = counted.n * :share "
                "FROM counted WHERE domains.id = counted.domain_id"
            ),
            {"share": share},
        ),
    )

    # 3. Artists: exact caption counts from FTS phrase queries.
    step("artists")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM artists")
        for artist in artists:
            count = conn.execute("SELECT count(*) FROM images_fts WHERE images_fts MATCH ?", (artist.fts_query,))
            n = count.fetchone()[0]
            conn.execute(
                "INSERT INTO artists (name, spellings, caption_count, share) VALUES (?, ?, ?, ?)",
                (artist.name, " | ".join(artist.spellings), n, n * share),
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise

    # 4. Aesthetic score histogram and size distribution.
    step("statistics")
    size_case = "CASE " + " ".join(
        f"WHEN min(width, height) >= {start} THEN {start}" for start in reversed(SIZE_BUCKETS[1:])
    )
    size_case += " WHEN min(width, height) >= 0 THEN 0 ELSE -1 END"
    labels = {start: f"{start}–{end - 1} px" for start, end in itertools.pairwise(SIZE_BUCKETS)}
    labels[SIZE_BUCKETS[-1]] = f"≥ {SIZE_BUCKETS[-1]} px"
    labels[-1] = "unknown"
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM aesthetic_histogram")
        conn.execute(
            "INSERT INTO aesthetic_histogram (bucket_start, bucket_end, image_count, share) "
            "SELECT b * :w, (b + 1) * :w, count(*), count(*) * :share FROM "
            "(SELECT CAST(aesthetic / :w AS INTEGER) AS b FROM images WHERE aesthetic IS NOT NULL) GROUP BY b",
            {"w": AESTHETIC_BUCKET, "share": share},
        )
        conn.execute("DELETE FROM size_distribution")
        rows = conn.execute(
            f"SELECT {size_case} AS bucket, CASE WHEN width IS NULL OR height IS NULL THEN 'unknown' "
            "WHEN width > height THEN 'landscape' WHEN width < height THEN 'portrait' ELSE 'square' END, "
            "count(*) FROM images GROUP BY 1, 2"
        ).fetchall()
        conn.executemany(
            "INSERT INTO size_distribution VALUES (?, ?, ?, ?, ?)",
            [(bucket, labels[bucket], orientation, n, n * share) for bucket, orientation, n in rows],
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise

    # 5. Merge the FTS index into one b-tree: fewer segments, faster searches.
    step("search index")
    conn.execute("INSERT INTO images_fts(images_fts) VALUES ('optimize')")

    # 6. Caption counts of every word in at least WORD_MIN_CAPTIONS captions, read from the index's
    # vocabulary in one pass. Counting a common word through FTS costs time in proportion to its
    # captions (tens of ms for a word in a million captions); this table answers it in one lookup.
    step("words")
    conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.images_fts_vocab USING fts5vocab(main, images_fts, 'row')")
    transaction(
        ("DELETE FROM words", ()),
        (
            (
                "INSERT INTO words (term, caption_count, share) SELECT term, doc, doc * :share "
                "FROM temp.images_fts_vocab WHERE doc >= :min"
            ),
            {"share": share, "min": WORD_MIN_CAPTIONS},
        ),
    )
    conn.execute("DROP TABLE temp.images_fts_vocab")

    # 7. The summary Datasette's front page and the CLI read.
    step("summary")
    aesthetic = conn.execute("SELECT min(aesthetic), avg(aesthetic), max(aesthetic) FROM images").fetchone()
    files = conn.execute(
        "SELECT count(*), coalesce(sum(rows_rejected), 0), coalesce(sum(synthetic), 0) FROM ingest_files"
    ).fetchone()
    synthetic_files = files[2]
    source = "synthetic" if synthetic_files == files[0] else "laion" if synthetic_files == 0 else "mixed"
    with_artist = " OR ".join(a.fts_query for a in artists) or None
    captions_with_artist = (
        conn.execute("SELECT count(*) FROM images_fts WHERE images_fts MATCH ?", (with_artist,)).fetchone()[0]
        if with_artist and total
        else 0
    )
    values = [
        ("images", total, "Rows in images"),
        ("rejected_rows", files[1], "Source rows not ingested (see rejected_rows)"),
        ("files", files[0], "Parquet files ingested"),
        ("domains", conn.execute("SELECT count(*) FROM domains").fetchone()[0], "Distinct host names"),
        ("captions_with_artist", captions_with_artist, "Captions naming at least one listed artist"),
        ("aesthetic_min", aesthetic[0], "Lowest aesthetic score"),
        ("aesthetic_mean", aesthetic[1], "Mean aesthetic score"),
        ("aesthetic_max", aesthetic[2], "Highest aesthetic score"),
        ("source", source, "laion, synthetic (spellbook explore synth) or mixed"),
        ("fts_tokenizer", FTS_TOKENIZER, "Tokenizer of images_fts"),
        ("schema_version", SCHEMA_VERSION, "Explorer schema version"),
        ("artist_list_sha256", artist_list_digest(artists), "The artist list the artists table was counted with"),
        ("finalized_images", total, "images when the derived tables were last computed"),
        ("finalized_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "When they were computed (UTC)"),
    ]
    transaction(
        *[
            ("INSERT OR REPLACE INTO stats (name, value, description) VALUES (?, ?, ?)", (name, value, description))
            for name, value, description in values
        ]
    )

    # 8. Planner statistics for the indexes; then fold the WAL back into the database file.
    step("analyze")
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
