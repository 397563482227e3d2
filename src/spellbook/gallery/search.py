"""Finding images: by words (FTS5, bm25), by meaning (prompt embeddings), both (the default), by likeness.

Every function takes `viewer`: None is the local user (the CLI, a server without auth), who sees every
image; a user id sees that user's images and public ones, never another user's private image.

Hybrid ranking is reciprocal-rank fusion (Cormack et al., 2009): each list contributes 1 / (60 + rank),
so an image near the top of both lists wins, and neither list's raw scores need to be comparable.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from spellbook.errors import NotFound, UserError
from spellbook.gallery.records import IMAGE_COLUMNS, GalleryImage
from spellbook.stopwords import without_stopwords
from spellbook.store.db import Database
from spellbook.store.vectors import CodeIndex, load_sqlite_vec, sign_code, to_blob

MODES = ("hybrid", "words", "meaning")
RRF_K = 60
MAX_LIMIT = 1000
BROAD_MATCHES = 250  # matches ranked by bm25, newest first (see _ranked_matches)
# Words that carry no meaning in a prompt query; dropped unless the query holds nothing else.
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Filters:
    """What narrows a search. `owner`: a user id, a user name, or "local" for the local user's images."""

    model: str | None = None
    sampler: str | None = None
    since: str | datetime | None = None
    owner: int | str | None = None
    viewer: int | None = None


def home_of(db: Database) -> Path:
    """SPELLBOOK_HOME: the folder spellbook.db lives in (the home holds the database and images/)."""
    return db.path.parent


# --------------------------------------------------------------------------------------------- filters
def visible_sql(viewer: int | None, alias: str = "i") -> tuple[str, list]:
    """The condition that keeps what `viewer` may see."""
    if viewer is None:
        return "1", []
    return f"({alias}.owner = ? OR {alias}.visibility = 'public')", [viewer]


def parse_since(since: str | datetime) -> str:
    """A date or datetime (ISO 8601) as the `created` column writes it, UTC: 2026-11-01T00:00:00.000Z."""
    if isinstance(since, str):
        try:
            moment = datetime.fromisoformat(since.strip())
        except ValueError:
            raise UserError(
                f"{since!r} is not a date; give YYYY-MM-DD or an ISO date-time such as 2026-11-01T12:00",
                field="since",
            ) from None
    else:
        moment = since
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def resolve_owner(db: Database, owner: int | str) -> int | None:
    """A user id from an id, a name, or "local" (None: the local user, whose images have no owner)."""
    if isinstance(owner, int) or (isinstance(owner, str) and owner.isdigit()):
        row = db.execute("SELECT id FROM users WHERE id = ?", (int(owner),)).fetchone()
    else:
        row = db.execute("SELECT id FROM users WHERE name = ?", (owner,)).fetchone()
        if row is None and owner == "local":
            return None
    if row is None:
        names = [r[0] for r in db.execute("SELECT name FROM users ORDER BY name LIMIT 10")]
        known = ", ".join(["local", *names])
        raise UserError(f"unknown owner {owner!r}; owners are: {known}", field="owner")
    return row[0]


def filter_sql(db: Database, filters: Filters, alias: str = "i") -> tuple[str, list]:
    clauses, params = [], []
    sql, values = visible_sql(filters.viewer, alias)
    clauses.append(sql)
    params += values
    if filters.model:
        clauses.append(f"{alias}.model = ? COLLATE NOCASE")
        params.append(filters.model)
    if filters.sampler:
        clauses.append(f"{alias}.sampler = ? COLLATE NOCASE")
        params.append(filters.sampler)
    if filters.since:
        clauses.append(f"{alias}.created >= ?")
        params.append(parse_since(filters.since))
    if filters.owner is not None and filters.owner != "":
        owner = resolve_owner(db, filters.owner)
        clauses.append(f"{alias}.owner IS ?")
        params.append(owner)
    return " AND ".join(clauses), params


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise UserError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}", field="limit")
    return limit


# ----------------------------------------------------------------------------------------------- words
def fts_terms(text: str) -> list[str]:
    """The words of a query as FTS5 will see them; every FTS5 operator and quote a user types is dropped.

    Only runs of letters and digits survive, so "otter (hat:1.2)", a lone "-", unbalanced quotes or
    `NEAR(`, `AND`, `*` can never be a syntax error. Lone numbers (prompt weights such as 1.2) are dropped
    when words remain, and stop words when anything else remains.
    """
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(text)))
    words = [w for w in words if not w.isdigit()] or words
    return without_stopwords(words)


def fts_query(terms: list[str]) -> str:
    # Each term quoted as an FTS5 string, all required; the column filter keeps a negative prompt from matching.
    return "prompt : (" + " AND ".join(f'"{term}"' for term in terms) + ")"


def search_words(db: Database, text: str, filters: Filters = Filters(), limit: int = 20) -> list[GalleryImage]:
    """BM25 over the prompt, every word required; when no image holds every word, those that miss one word
    ("fluffy otter in a top hat" still finds "an otter wearing a top hat").

    Not an OR of the words: an OR with a common word ("detailed") matches most of a gallery of community
    prompts; leaving one word out keeps each query a narrow intersection.
    """
    _check_limit(limit)
    terms = fts_terms(text)
    if not terms:
        return []
    found = _ranked_matches(db, terms, filters, limit)
    if found or len(terms) == 1:
        return found
    # Each image that misses one word is scored on the words it holds, weighted by how rare each word is,
    # so missing "the" costs less than missing "otter".
    weights = {term: _idf(db, term) for term in terms}
    relaxed: dict[int, GalleryImage] = {}
    for left_out in range(len(terms)):
        kept = terms[:left_out] + terms[left_out + 1 :]
        for image in _ranked_matches(db, kept, filters, limit, weights):
            if image.id not in relaxed or image.score > relaxed[image.id].score:
                relaxed[image.id] = image
    return sorted(relaxed.values(), key=lambda image: (-image.score, -image.id))[:limit]


BM25_K1, BM25_B = 1.2, 0.75  # FTS5's own bm25() constants


def _ranked_matches(
    db: Database, terms: list[str], filters: Filters, limit: int, weights: dict[str, float] | None = None
) -> list[GalleryImage]:
    """The best `limit` of the newest max(BROAD_MATCHES, limit) images whose prompt holds every term, by BM25.

    FTS5 finds the matches, newest first, in one streaming pass that stops at the window's end; the score is
    computed here, from the candidates' prompts, rather than by FTS5's bm25(). That function counts, on its
    first call in each query, every image that holds each query word (the IDF): a full read of the word's
    index, ~20 ms for a word in a tenth of a million prompts, paid by every query with a common word. Among
    images that all hold every query word the IDF weighs each word the same for every candidate, so the order
    comes from term frequency and prompt length (BM25's k1 and b, lengths relative to the candidates' mean);
    `weights` (IDFs) are given when scores of different word sets are compared.
    """
    where, params = filter_sql(db, filters)
    window = max(BROAD_MATCHES, limit)
    if where == "1":
        sql = "SELECT rowid FROM images_fts WHERE images_fts MATCH ? ORDER BY rowid DESC LIMIT ?"
        values: list = [fts_query(terms), window]
    else:
        sql = (
            "SELECT i.id FROM images_fts JOIN images i ON i.id = images_fts.rowid "
            f"WHERE images_fts MATCH ? AND {where} ORDER BY images_fts.rowid DESC LIMIT ?"
        )
        values = [fts_query(terms), *params, window]
    ids = [row[0] for row in db.execute(sql, values).fetchall()]
    if not ids:
        return []
    prompts = db.execute(f"SELECT id, prompt FROM images WHERE id IN ({','.join('?' * len(ids))})", ids).fetchall()
    words = [_WORD.findall((prompt or "").lower()) for _, prompt in prompts]
    mean_length = max(1.0, sum(len(w) for w in words) / len(words))
    scores = {}
    for (image_id, _), prompt_words in zip(prompts, words, strict=True):
        norm = BM25_K1 * (1 - BM25_B + BM25_B * len(prompt_words) / mean_length)
        score = 0.0
        for term in terms:
            tf = max(1, prompt_words.count(term))  # FTS5 matched it (perhaps as another form of the word)
            score += (weights[term] if weights else 1.0) * tf * (BM25_K1 + 1) / (tf + norm)
        scores[image_id] = round(score, 6)
    best = sorted(scores, key=lambda image_id: (-scores[image_id], -image_id))[:limit]
    rows = db.execute(f"SELECT {IMAGE_COLUMNS} FROM images i WHERE i.id IN ({','.join('?' * len(best))})", best)
    home = home_of(db)
    found = [GalleryImage.from_row(row, home, scores[row["id"]]) for row in rows.fetchall()]
    return sorted(found, key=lambda image: (-image.score, -image.id))


_IDF_SECONDS = 600.0


def _idf(db: Database, term: str) -> float:
    """BM25's inverse document frequency of a word in prompts, as FTS5 computes it; cached for ten minutes
    (counting a common word reads its whole index entry, and a slightly stale count ranks the same)."""
    idf_cache: dict[str, tuple[float, float]] = db.caches.setdefault("gallery_idf", {})
    key, now = term, time.monotonic()
    cached = idf_cache.get(key)
    if cached and now - cached[1] < _IDF_SECONDS:
        return cached[0]
    total = db.execute("SELECT count(*) FROM images").fetchone()[0]
    having = db.execute("SELECT count(*) FROM images_fts WHERE images_fts MATCH ?", (fts_query([term]),)).fetchone()[0]
    idf = max(1e-6, math.log((total - having + 0.5) / (having + 0.5)))
    if len(idf_cache) > 100_000:
        idf_cache.clear()
    idf_cache[key] = (idf, now)
    return idf


# --------------------------------------------------------------------------------------------- meaning


def embed_pending(db: Database, batch_size: int = 64) -> int:
    """Embed the prompts of images filed without an embedding (`embed=False`, as the CLI files them).

    Returns how many were embedded. Cheap when there are none: one look-up in a partial index.
    """
    from spellbook.gallery.embed import MODEL_NAME, embed

    done = 0
    while True:
        rows = db.execute(
            "SELECT id, prompt FROM images WHERE embed_pending = 1 ORDER BY id LIMIT ?", (batch_size,)
        ).fetchall()
        if not rows:
            return done
        vectors = embed([row["prompt"] for row in rows])
        with db.transaction() as conn:
            for row, vector in zip(rows, vectors, strict=True):
                # OR IGNORE: another process may have embedded the same image meanwhile.
                conn.execute(
                    "INSERT OR IGNORE INTO image_embeddings (image_id, model, code, vector) VALUES (?, ?, ?, ?)",
                    (row["id"], MODEL_NAME, sign_code(vector).tobytes(), to_blob(vector)),
                )
                conn.execute("UPDATE images SET embed_pending = 0 WHERE id = ?", (row["id"],))
        done += len(rows)


def _code_index(db: Database) -> CodeIndex:
    embed_pending(db)
    index = CodeIndex.for_database(db)
    index.refresh(db.conn)
    return index


def nearest_by_vector(
    db: Database, vector: np.ndarray, filters: Filters = Filters(), limit: int = 20, exclude: int | None = None
) -> list[GalleryImage]:
    """Images whose prompt embeddings are closest to `vector` (cosine), best first.

    Candidates come from the sign-bit scan (20 x limit, at least 200), re-ranked by exact cosine in SQL
    together with the filters; when the filters leave fewer than `limit`, the candidate pool grows 8-fold
    until it holds every image.
    """
    _check_limit(limit)
    load_sqlite_vec(db.conn)
    index = _code_index(db)
    where, params = filter_sql(db, filters)
    query = to_blob(vector)
    code = sign_code(vector)
    sql = (
        f"SELECT {IMAGE_COLUMNS}, 1 - vec_distance_cosine(e.vector, ?) AS score "
        "FROM json_each(?) AS c JOIN image_embeddings e ON e.image_id = c.value JOIN images i ON i.id = e.image_id "
        f"WHERE {where} AND i.id IS NOT ? ORDER BY score DESC LIMIT ?"
    )
    home = home_of(db)
    pool = max(200, 20 * limit)
    while True:
        candidates = index.nearest(code, pool)
        rows = db.execute(sql, [query, json.dumps(candidates.tolist()), *params, exclude, limit]).fetchall()
        if len(rows) >= limit or pool >= len(index):
            return [GalleryImage.from_row(row, home, row["score"]) for row in rows]
        pool *= 8


def search_meaning(db: Database, text: str, filters: Filters = Filters(), limit: int = 20) -> list[GalleryImage]:
    """Images whose prompts mean what `text` means (all-MiniLM-L6-v2 sentence embeddings)."""
    if not text.strip():
        return []
    from spellbook.gallery.embed import embed_query

    return nearest_by_vector(db, embed_query(text), filters, limit)


# ---------------------------------------------------------------------------------------------- hybrid
def fuse(lists: list[list[GalleryImage]], limit: int) -> list[GalleryImage]:
    """Reciprocal-rank fusion; ties keep the order of the first list an image appears in."""
    scores: dict[int, float] = {}
    first: dict[int, GalleryImage] = {}
    for results in lists:
        for rank, image in enumerate(results, start=1):
            scores[image.id] = scores.get(image.id, 0.0) + 1.0 / (RRF_K + rank)
            first.setdefault(image.id, image)
    order = sorted(scores, key=lambda image_id: -scores[image_id])
    return [first[image_id].with_score(scores[image_id]) for image_id in order[:limit]]


def search(
    db: Database,
    text: str,
    *,
    mode: str = "hybrid",
    model: str | None = None,
    sampler: str | None = None,
    since: str | datetime | None = None,
    owner: int | str | None = None,
    viewer: int | None = None,
    limit: int = 20,
    offset: int = 0,
) -> list[GalleryImage]:
    """The gallery search: words, meaning, or both fused (the default).

    `offset` skips that many of the best results (the next page). A search ranks at most its first
    MAX_LIMIT results: a page beyond them is empty.
    """
    if mode not in MODES:
        raise UserError(f"unknown search mode {mode!r}; modes are {', '.join(MODES)}", field="mode")
    _check_limit(limit)
    if offset < 0:
        raise UserError(f"offset must be 0 or more, got {offset}", field="offset")
    filters = Filters(model=model, sampler=sampler, since=since, owner=owner, viewer=viewer)
    wanted = min(MAX_LIMIT, offset + limit)  # ranked from the top each time, then the page is cut out
    if not fts_terms(text) or offset >= wanted:
        return []  # only punctuation (nothing to look for, in words or in meaning), or a page past the window
    if mode == "words":
        return search_words(db, text, filters, wanted)[offset:]
    if mode == "meaning":
        return search_meaning(db, text, filters, wanted)[offset:]
    # Each list a little longer than asked, so an image ranked just below the cut in one list can still win.
    # The word search runs on another thread meanwhile (SQLite, numpy and torch release the GIL): at 1M
    # images that takes the p95 from ~150 to ~95 ms on 2 cores.
    depth = min(MAX_LIMIT, max(50, 2 * wanted))
    by_words = db.executor().submit(_words_on_own_connection, db, text, filters, depth)
    by_meaning = search_meaning(db, text, filters, depth)
    return fuse([by_words.result(), by_meaning], wanted)[offset:]


def _words_on_own_connection(db: Database, text: str, filters: Filters, limit: int) -> list[GalleryImage]:
    try:
        return search_words(db, text, filters, limit)
    finally:
        db.close()  # this pool thread's connection only: a pool thread outlives any one database


# ------------------------------------------------------------------------------------------------ similar
class _HashIndex:
    """Every image's perceptual hash, in memory, extended with what was added since (ids are never reused)."""

    def __init__(self) -> None:
        self.last_id = 0
        self.ids = np.zeros(0, dtype=np.int64)
        self.hashes = np.zeros(0, dtype=np.uint64)
        self.lock = threading.Lock()

    @classmethod
    def for_database(cls, db: Database) -> _HashIndex:
        with db.cache_lock:
            index = db.caches.setdefault("phash_index", cls())
        with index.lock:
            newest = db.execute("SELECT max(id) FROM images").fetchone()[0] or 0
            if newest < index.last_id:  # the database file was replaced: start again
                index.__init__()
            rows = db.execute(
                "SELECT id, phash FROM images WHERE id > ? AND phash IS NOT NULL ORDER BY id", (index.last_id,)
            ).fetchall()
            if rows:
                index.ids = np.concatenate([index.ids, np.array([r[0] for r in rows], dtype=np.int64)])
                index.hashes = np.concatenate([index.hashes, np.array([int(r[1], 16) for r in rows], dtype=np.uint64)])
                index.last_id = rows[-1][0]
        return index


def similar(db: Database, image: int | str | Path, *, viewer: int | None = None, limit: int = 20) -> list[GalleryImage]:
    """Images like `image` (a gallery id, or any image file): perceptual hash and prompt meaning, fused.

    The image itself is left out. A file without a prompt is matched by its pixels alone.
    """
    from spellbook.gallery.likeness import phash

    _check_limit(limit)
    filters = Filters(viewer=viewer)
    home = home_of(db)
    exclude = None
    vector = None
    if isinstance(image, int) or (isinstance(image, str) and image.isdigit()):
        exclude = int(image)
        embed_pending(db)
        where, params = visible_sql(viewer)
        row = db.execute(
            f"SELECT i.phash, e.vector FROM images i LEFT JOIN image_embeddings e ON e.image_id = i.id "
            f"WHERE i.id = ? AND {where}",
            [exclude, *params],
        ).fetchone()
        if row is None:
            raise NotFound(f"no image {exclude} in the gallery", field="image")
        query_hash = row["phash"]
        if row["vector"] is not None:
            vector = np.frombuffer(row["vector"], dtype="<f4")
    else:
        from spellbook.provenance import open_image, read_metadata

        path = Path(image)
        query_hash = phash(open_image(path, "image"))
        meta = read_metadata(path)
        prompt = meta.recipe.prompt if meta.recipe else (meta.foreign or {}).get("prompt", "")
        if prompt:
            from spellbook.gallery.embed import embed_query

            vector = embed_query(prompt)
    lists = []
    if query_hash:
        lists.append(_nearest_by_hash(db, query_hash, filters, limit, exclude, home))
    if vector is not None:
        lists.append(nearest_by_vector(db, vector, filters, limit, exclude=exclude))
    return fuse(lists, limit)


def _nearest_by_hash(
    db: Database, query_hash: str, filters: Filters, limit: int, exclude: int | None, home: Path
) -> list[GalleryImage]:
    from spellbook.gallery.likeness import distances

    index = _HashIndex.for_database(db)
    if not len(index.ids):
        return []
    distance = distances(index.hashes, query_hash)
    where, params = filter_sql(db, filters)
    pool = max(200, 20 * limit)
    while True:
        if pool < len(distance):
            chosen = np.argpartition(distance, pool)[:pool]
            chosen = chosen[np.argsort(distance[chosen], kind="stable")]
        else:
            chosen = np.argsort(distance, kind="stable")
        by_id = {int(index.ids[k]): int(distance[k]) for k in chosen}
        rows = db.execute(
            f"SELECT {IMAGE_COLUMNS} FROM json_each(?) AS c JOIN images i ON i.id = c.value "
            f"WHERE {where} AND i.id IS NOT ?",
            [json.dumps(list(by_id)), *params, exclude],
        ).fetchall()
        if len(rows) >= limit or pool >= len(index.ids):
            break
        pool *= 8
    rows = sorted(rows, key=lambda r: (by_id[r["id"]], -r["id"]))[:limit]
    # 64 bits: a score of 1.0 is the same picture, about 0.5 an unrelated one.
    return [GalleryImage.from_row(r, home, 1 - by_id[r["id"]] / 64) for r in rows]
