"""Questions to the explorer database: caption search, domains, artists and the prompt link.

Every count is exact (an FTS5 count or a precomputed GROUP BY), never an estimate. Results are plain
dataclasses; `to_dict()` gives the JSON the CLI prints (each term, artist or domain with an integer `count`
and its `share` of all images). Sample rows come in ingest order, which costs nothing whatever the
number of matches; ranking millions of matches would not.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

from spellbook.errors import NotFound, UserError
from spellbook.explorer import schema
from spellbook.explorer.ingest import domain_of
from spellbook.explorer.text import (
    Artist,
    ArtistFinder,
    fts_all_words,
    fts_phrase,
    known_artists,
    search_words,
    split_prompt,
    words,
)


@dataclass
class Sample:
    id: int
    url: str
    caption: str
    domain: str
    width: int | None
    height: int | None
    aesthetic: float | None


@dataclass
class SearchResult:
    term: str
    count: int
    share: float
    rows: list[Sample]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DomainCount:
    domain: str
    count: int
    share: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DomainPage:
    domain: str
    count: int
    share: float
    rank: int
    rows: list[Sample]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ArtistCount:
    artist: str
    count: int
    share: float
    known: bool = True  # in the shipped artist list (unknown ones come from "by NAME" in a prompt)
    spellings: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PhraseCount:
    term: str
    count: int
    share: float
    samples: list[Sample]


@dataclass
class PromptLink:
    prompt: str
    images: int  # captions in the database: what `share` is a share of
    phrases: list[PhraseCount]
    artists: list[ArtistCount]

    def to_dict(self) -> dict:
        return asdict(self)


def _round(share: float | None) -> float:
    """Shares to 6 significant digits: plenty for one image in 12 M, without float noise in the JSON."""
    return float(f"{share or 0.0:.6g}")


_SAMPLE_COLUMNS = "images.id, images.url, images.caption, domains.domain, images.width, images.height, images.aesthetic"


COUNT_CACHE = 10_000  # FTS counts an Explorer remembers


class Explorer:
    """A read-only view of one explorer database."""

    def __init__(self, conn: sqlite3.Connection, artists: tuple[Artist, ...] | list[Artist] | None = None):
        self.conn = conn
        self.artist_list = tuple(known_artists() if artists is None else artists)
        self.finder = ArtistFinder(self.artist_list)
        row = conn.execute("SELECT value FROM stats WHERE name = 'images'").fetchone()
        self.images = int(row[0]) if row else 0
        # Exact counts already asked for. The database does not change under a reader (an ingest writes
        # another connection's snapshot: open a new Explorer to see it), and a phrase common enough to be
        # slow to count ("stock photo": 490,000 captions in 12 M, ~70 ms) is the one asked again and again.
        self._counts: dict[str, int] = {}

    @classmethod
    def open(cls, path: Path | str, artists: tuple[Artist, ...] | list[Artist] | None = None) -> Explorer:
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"no explorer database at {path}", field="db", hint="run `spellbook explore ingest FILE.parquet` first"
            )
        conn = schema.connect(path, readonly=True)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"images", "images_fts", "domains", "artists", "words", "stats"} <= tables:
            conn.close()
            raise UserError(f"{path} is not an explorer database (no images/stats tables)", field="db")
        return cls(conn, artists)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _share(self, count: int) -> float:
        return _round(count / self.images) if self.images else 0.0

    # ---------------------------------------------------------------------------------------- building blocks
    def count_text(self, text: str, fts_query: str) -> int:
        """Captions matching `fts_query`, built from `text`. A single word is read from the precomputed
        `words` table when it is there (common words); anything else is counted through FTS. Exact."""
        tokens = words(text)
        if len(tokens) == 1:
            row = self.conn.execute("SELECT caption_count FROM words WHERE term = ?", (tokens[0],)).fetchone()
            if row is not None:
                return row[0]
        return self.count(fts_query)

    def count(self, fts_query: str) -> int:
        """Captions matching an FTS5 query (exact; remembered for this Explorer's life, at most COUNT_CACHE)."""
        count = self._counts.get(fts_query)
        if count is None:
            sql = "SELECT count(*) FROM images_fts WHERE images_fts MATCH ?"
            count = self.conn.execute(sql, (fts_query,)).fetchone()[0]
            if len(self._counts) >= COUNT_CACHE:
                self._counts.clear()
            self._counts[fts_query] = count
        return count

    def samples(self, fts_query: str, limit: int) -> list[Sample]:
        if limit <= 0:
            return []
        rows = self.conn.execute(
            f"SELECT {_SAMPLE_COLUMNS} FROM images JOIN domains ON domains.id = images.domain_id "
            "WHERE images.id IN (SELECT rowid FROM images_fts WHERE images_fts MATCH ? LIMIT ?) ORDER BY images.id",
            (fts_query, limit),
        )
        return [Sample(*row) for row in rows]

    # ------------------------------------------------------------------------------------------------ search
    def search(self, text: str, *, limit: int = 20, phrase: bool = False) -> SearchResult:
        """Captions containing every word of `text` but stop words (as Datasette's search box does, less
        "in", "the", …), or the exact phrase (every word, in order)."""
        query = fts_phrase(text) if phrase else fts_all_words(text)
        if query is None:
            raise UserError(f"search text {text!r} has no words to search for", field="query")
        if limit < 0:
            raise UserError(f"limit must be 0 or more, got {limit}", field="limit")
        count = self.count_text(text if phrase else " ".join(search_words(text)), query)
        return SearchResult(text, count, self._share(count), self.samples(query, limit))

    # ----------------------------------------------------------------------------------------------- domains
    def domains(self, *, limit: int = 20, offset: int = 0) -> list[DomainCount]:
        """The hosts with the most images, from the precomputed counts."""
        if limit < 0 or offset < 0:
            raise UserError(f"limit and offset must be 0 or more, got {limit} and {offset}", field="limit")
        rows = self.conn.execute(
            "SELECT domain, image_count, share FROM domains ORDER BY image_count DESC, domain LIMIT ? OFFSET ?",
            (limit, offset),
        )
        return [DomainCount(domain, count, _round(share)) for domain, count, share in rows]

    def domain(self, name: str, *, limit: int = 20) -> DomainPage:
        """One host: its image count, share, rank and its first images. Accepts a host name or a URL."""
        host = domain_of(name) if "://" in name else name.strip().lower().rstrip(".")
        row = self.conn.execute(
            "SELECT id, domain, image_count, share FROM domains WHERE domain = ?", (host,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no images from {host!r}", field="domain", hint="`spellbook explore domains` lists them")
        domain_id, domain, count, share = row
        rank = 1 + self.conn.execute("SELECT count(*) FROM domains WHERE image_count > ?", (count,)).fetchone()[0]
        rows = self.conn.execute(
            f"SELECT {_SAMPLE_COLUMNS} FROM images JOIN domains ON domains.id = images.domain_id "
            "WHERE images.domain_id = ? ORDER BY images.id LIMIT ?",
            (domain_id, limit),
        )
        return DomainPage(domain, count, _round(share), rank, [Sample(*r) for r in rows])

    # ----------------------------------------------------------------------------------------------- artists
    def artists(self, *, limit: int | None = None, min_count: int = 0) -> list[ArtistCount]:
        """Listed artists by caption count (precomputed at ingest with FTS phrase queries)."""
        rows = self.conn.execute(
            "SELECT name, caption_count, share, spellings FROM artists WHERE caption_count >= ? "
            "ORDER BY caption_count DESC, name LIMIT ?",
            (min_count, -1 if limit is None else limit),
        )
        return [
            ArtistCount(name, count, _round(share), True, spellings.split(" | "))
            for name, count, share, spellings in rows
        ]

    def artist_count(self, artist: Artist) -> int:
        row = self.conn.execute("SELECT caption_count FROM artists WHERE name = ?", (artist.name,)).fetchone()
        return row[0] if row else self.count(artist.fts_query)

    # ------------------------------------------------------------------------------------------- prompt link
    def prompt(self, prompt: str, *, samples: int = 3) -> PromptLink:
        """How much training data stands behind each phrase and artist of a prompt."""
        if not prompt.strip():
            raise UserError("the prompt is empty", field="prompt")
        parts = split_prompt(prompt, self.finder)
        phrases = []
        for phrase in parts.phrases:
            query = fts_phrase(phrase)
            count = self.count_text(phrase, query)
            phrases.append(PhraseCount(phrase, count, self._share(count), self.samples(query, samples)))
        artists = []
        for name, artist in parts.artists:
            if artist is not None:
                count = self.artist_count(artist)
                query = artist.fts_query
                artists.append(
                    ArtistCount(
                        artist.name,
                        count,
                        self._share(count),
                        True,
                        list(artist.spellings),
                        self.samples(query, samples),
                    )
                )
            else:
                query = fts_phrase(name)
                count = self.count_text(name, query)
                artists.append(
                    ArtistCount(name, count, self._share(count), False, [name], self.samples(query, samples))
                )
        return PromptLink(prompt, self.images, phrases, artists)
