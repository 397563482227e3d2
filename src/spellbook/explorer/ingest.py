"""Parquet (LAION improved_aesthetics_6plus columns) -> the explorer database, streaming and resumable.

- Memory is bounded: files are read a batch of rows at a time (pyarrow `iter_batches`), never whole.
- Resumable: each batch's rows, its FTS entries, its rejected rows and the file's new row offset are
  written in one transaction. A kill loses at most the batch in flight; running the same command again
  skips what was committed (files are recognised by a hash of their parquet footer, not by path).
- Nothing is dropped silently: a row without a URL or caption, or with a value of the wrong type, is
  stored in `rejected_rows` with its reason and counted in the report; missing optional columns are
  reported per file and stored as NULL.
"""

from __future__ import annotations

import hashlib
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spellbook.errors import UserError
from spellbook.explorer import schema
from spellbook.explorer.text import Artist, known_artists

REQUIRED_COLUMNS = ("URL", "TEXT")
# Source column -> (images column, Python type). All optional: a file without them is ingested with NULLs.
OPTIONAL_COLUMNS = {
    "WIDTH": ("width", int),
    "HEIGHT": ("height", int),
    "similarity": ("similarity", float),
    "punsafe": ("punsafe", float),
    "pwatermark": ("pwatermark", float),
    "AESTHETIC_SCORE": ("aesthetic", float),
    "hash": ("hash", int),
    "__index_level_0__": ("source_index", int),
}
DEFAULT_BATCH_ROWS = 10_000
SYNTHETIC_KEY = b"spellbook_synthetic"  # parquet key-value metadata written by `synth`
_HOST = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#@]*@)?(\[[^\]/?#]*\]|[^/?#:]*)")
_MAX_STORED_TEXT = 500  # characters of a rejected row's URL/caption kept for the report


def domain_of(url: str) -> str | None:
    """The host name of an absolute URL, lower case ('https://I.PinImg.com:443/x' -> 'i.pinimg.com')."""
    match = _HOST.match(url)
    if not match:
        return None
    host = match.group(1).strip().lower().rstrip(".")
    return host or None


@dataclass
class FileReport:
    path: str
    rows_total: int
    rows_ingested: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    missing_columns: list[str] = field(default_factory=list)
    status: str = "ingested"  # ingested | resumed | already ingested
    resumed_from_row: int = 0


@dataclass
class IngestReport:
    db: str
    files: list[FileReport]
    rows_ingested: int  # by this run
    rows_rejected: int  # by this run
    images_total: int  # in the database afterwards
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class IngestProgress:
    file: str
    rows_done: int  # source rows read (ingested or rejected) across all files of this run
    rows_total: int
    stage: str = "rows"  # rows, or the finalize step being computed


@dataclass
class _Source:
    path: Path
    file: object  # pyarrow.parquet.ParquetFile
    fingerprint: str
    columns: dict[str, str]  # expected name -> name in the file (matched case-insensitively)
    missing: list[str]
    synthetic: bool


def _footer_fingerprint(path: Path) -> str:
    """sha256 of the parquet footer: it holds the row counts and column statistics, so two different
    files practically never share it, and reading it costs one seek whatever the file's size."""
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        if size < 12:
            raise UserError(f"{path} is not a parquet file (too short)", field="files")
        f.seek(size - 8)
        tail = f.read(8)
        if tail[4:] != b"PAR1":
            raise UserError(f"{path} is not a parquet file (no PAR1 footer)", field="files")
        footer_length = int.from_bytes(tail[:4], "little")
        f.seek(max(0, size - 8 - footer_length))
        return hashlib.sha256(f.read(footer_length) + str(size).encode()).hexdigest()


def open_source(path: Path) -> _Source:
    """Open and check one parquet file: required columns present, optional ones noted if missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"{path} does not exist", field="files")
    fingerprint = _footer_fingerprint(path)
    try:
        # pre_buffer=False: with pyarrow's default, iter_batches keeps every row group it has read buffered
        # until the iterator ends (measured: +120 MB per million LAION-shaped rows, 1.76 GB peak at 12 M).
        file = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable parquet file: {exc}", field="files") from None
    by_lower = {name.lower(): name for name in file.schema_arrow.names}
    columns, missing = {}, []
    for expected in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
        actual = by_lower.get(expected.lower())
        if actual is not None:
            columns[expected] = actual
        elif expected in REQUIRED_COLUMNS:
            raise UserError(
                f"{path} has no {expected} column (has: {', '.join(file.schema_arrow.names)}); "
                f"LAION-style files need {' and '.join(REQUIRED_COLUMNS)}",
                field="files",
            )
        else:
            missing.append(expected)
    metadata = file.schema_arrow.metadata or {}
    return _Source(path, file, fingerprint, columns, missing, metadata.get(SYNTHETIC_KEY) == b"true")


# ------------------------------------------------------------------------------------------ conversions
def _float_to_int(value):
    if value is None or math.isnan(value):  # NaN: pandas' "missing" in float columns
        return None
    if not float(value).is_integer():
        raise ValueError
    return int(value)


def _parse_int(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        try:
            return int(value)
        except ValueError:
            return _float_to_int(float(value))
    if isinstance(value, float):
        return _float_to_int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError


def _parse_float(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        return float(value) if value else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError


def _converter(arrow_type, kind: type) -> Callable | None:
    """None when the column's values are already the right Python type (the fast path for LAION files)."""
    import pyarrow as pa

    if kind is int:
        if pa.types.is_integer(arrow_type):
            return None
        return _float_to_int if pa.types.is_floating(arrow_type) else _parse_int
    if pa.types.is_floating(arrow_type) or pa.types.is_integer(arrow_type):
        return None
    return _parse_float


def _short(value) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else repr(value)
    return text[:_MAX_STORED_TEXT]


# ---------------------------------------------------------------------------------------------- writing
_INSERT_IMAGE = (
    "INSERT INTO images (id, url, caption, width, height, similarity, punsafe, pwatermark, aesthetic, hash, "
    "source_index, domain_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class _DomainIds:
    """domain -> id, inserting new domains. The cache is bounded; the table is the truth."""

    def __init__(self, conn: sqlite3.Connection, cache_limit: int = 200_000):
        self.conn, self.cache, self.cache_limit = conn, {}, cache_limit

    def resolve(self, hosts: Iterable[str]) -> dict[str, int]:
        # In order of first appearance, not set order: ids must not depend on Python's string hashing,
        # so a resumed ingest numbers domains exactly as an uninterrupted one.
        wanted = list(dict.fromkeys(hosts))
        unknown = [h for h in wanted if h not in self.cache]
        if unknown:
            if len(self.cache) + len(unknown) > self.cache_limit:
                self.cache.clear()
                unknown = wanted
            self.conn.executemany("INSERT OR IGNORE INTO domains (domain) VALUES (?)", ((h,) for h in unknown))
            for start in range(0, len(unknown), 500):
                chunk = unknown[start : start + 500]
                marks = ",".join("?" * len(chunk))
                self.cache.update(self.conn.execute(f"SELECT domain, id FROM domains WHERE domain IN ({marks})", chunk))
        return self.cache

    def forget(self) -> None:
        """After a rollback the ids of domains inserted in it are no longer valid."""
        self.cache.clear()


def _write_batch(
    conn: sqlite3.Connection,
    domains: _DomainIds,
    first_id: int,
    rows: list[tuple],
    rejected: list[tuple],
    file_id: int,
    rows_done: int,
) -> None:
    """Everything one batch writes; the caller wraps it in a transaction (tests kill the process here)."""
    ids = domains.resolve(row[-1] for row in rows)
    rows = [(first_id + offset, *row[:-1], ids[row[-1]]) for offset, row in enumerate(rows)]
    conn.executemany(_INSERT_IMAGE, rows)
    conn.executemany("INSERT INTO images_fts (rowid, caption) VALUES (?, ?)", ((row[0], row[2]) for row in rows))
    if rejected:
        conn.executemany(
            "INSERT INTO rejected_rows (file_id, row_number, reason, value, url, caption) VALUES (?, ?, ?, ?, ?, ?)",
            rejected,
        )
    conn.execute(
        "UPDATE ingest_files SET rows_done = ?, rows_ingested = rows_ingested + ?, "
        "rows_rejected = rows_rejected + ? WHERE id = ?",
        (rows_done, len(rows), len(rejected), file_id),
    )


def _batches(source: _Source, start_row: int, batch_rows: int) -> Iterator[tuple[int, object]]:
    """(row number of the batch's first row, record batch) from `start_row` on, reading only the row
    groups from the one that holds `start_row`."""
    metadata = source.file.metadata
    group, group_start = 0, 0
    while group < metadata.num_row_groups and group_start + metadata.row_group(group).num_rows <= start_row:
        group_start += metadata.row_group(group).num_rows
        group += 1
    if group >= metadata.num_row_groups:
        return
    position = group_start
    for batch in source.file.iter_batches(
        batch_size=batch_rows,
        row_groups=list(range(group, metadata.num_row_groups)),
        columns=list(source.columns.values()),
    ):
        if position + batch.num_rows <= start_row:
            position += batch.num_rows
            continue
        if position < start_row:
            batch = batch.slice(start_row - position)
            position = start_row
        yield position, batch
        position += batch.num_rows


def _column_values(array, kind: type) -> tuple[list, Callable | None]:
    """A column's values as Python objects, plus the per-value converter still needed (None: none)."""
    import pyarrow as pa

    convert = _converter(array.type, kind)
    if convert is _float_to_int:
        # LAION stores WIDTH/HEIGHT as doubles. A safe cast converts a whole column at C speed and fails
        # on any fraction or NaN; only then are the values checked one by one (to name the bad rows).
        try:
            return array.cast(pa.int64()).to_pylist(), None
        except pa.ArrowInvalid:
            pass
    return array.to_pylist(), convert


def _rows_of(source: _Source, batch, first_row: int, file_id: int) -> tuple[list[tuple], list[tuple], Counter]:
    """Validate and convert one record batch: (image rows ending with their host, rejected rows, reasons).

    Works column by column (the per-row Python work is the ingest's main cost): URL and TEXT checks,
    then any column that needs converting, then the rows are zipped together."""
    names = batch.schema.names
    column = {expected: batch.column(names.index(actual)) for expected, actual in source.columns.items()}
    n = batch.num_rows
    urls = column["URL"].to_pylist()
    texts = column["TEXT"].to_pylist()
    bad: dict[int, tuple[str, object]] = {}  # row -> (reason, offending value); the first problem only

    # 1. URL and caption.
    hosts: list[str | None] = [None] * n
    for i, (url, text) in enumerate(zip(urls, texts)):
        if url is None or (isinstance(url, str) and not url.strip()):
            bad[i] = ("URL missing", url)
        elif not isinstance(url, str):
            bad[i] = ("URL not text", url)
        elif (host := domain_of(url)) is None:
            bad[i] = ("URL has no host", url)
        elif text is None or (isinstance(text, str) and not text.strip()):
            bad[i] = ("TEXT missing", text)
        elif not isinstance(text, str):
            bad[i] = ("TEXT not text", text)
        else:
            hosts[i] = host

    # 2. Optional columns, converted where the file's type is not the one we store.
    columns = [urls, texts]
    for name, (_, kind) in OPTIONAL_COLUMNS.items():
        if name not in column:
            columns.append([None] * n)
            continue
        values, convert = _column_values(column[name], kind)
        if convert is not None:
            reason = f"{name} not {'an integer' if kind is int else 'a number'}"
            for i, value in enumerate(values):
                if i in bad:
                    continue
                try:
                    values[i] = convert(value)
                except (ValueError, TypeError, OverflowError):
                    bad[i] = (reason, value)
        columns.append(values)
    columns.append(hosts)

    # 3. Rows, and the rejected ones in row order.
    if bad:
        rows = [tuple(c[i] for c in columns) for i in range(n) if i not in bad]
    else:
        rows = list(zip(*columns))
    rejected = [
        (file_id, first_row + i, reason, _short(value), _short(urls[i]), _short(texts[i]))
        for i, (reason, value) in sorted(bad.items())
    ]
    return rows, rejected, Counter(reason for reason, _ in bad.values())


# ----------------------------------------------------------------------------------------------- ingest
def ingest(
    paths: Iterable[Path | str],
    db_path: Path | str,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: Callable[[IngestProgress], None] | None = None,
    artists: tuple[Artist, ...] | list[Artist] | None = None,
) -> IngestReport:
    """Ingest parquet files into the explorer database at `db_path` (created if needed), then compute the
    derived tables. Safe to re-run with the same files: finished files are skipped, a partial one resumes."""
    started = time.perf_counter()
    artists = known_artists() if artists is None else artists
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("give at least one parquet file", field="files")
    if batch_rows < 1:
        raise UserError(f"batch size must be at least 1, got {batch_rows}", field="batch_rows")

    # 1. Check every file before writing anything: a typo in the last name should not wait an hour.
    sources = [open_source(p) for p in paths]
    seen: dict[str, Path] = {}
    for source in sources:
        if source.fingerprint in seen:
            raise UserError(f"{seen[source.fingerprint]} and {source.path} are the same file", field="files")
        seen[source.fingerprint] = source.path
    conn = schema.connect(db_path)
    try:
        _check_database(conn, db_path)
        schema.create_schema(conn)
        reports, work = [], []
        for source in sources:
            record = conn.execute(
                "SELECT id, rows_done, rows_total, rows_ingested, rows_rejected FROM ingest_files "
                "WHERE fingerprint = ?",
                (source.fingerprint,),
            ).fetchone()
            report = FileReport(str(source.path), source.file.metadata.num_rows, missing_columns=source.missing)
            reports.append(report)
            if record is None:
                now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                cursor = conn.execute(
                    "INSERT INTO ingest_files (name, path, fingerprint, size_bytes, rows_total, missing_columns, "
                    "synthetic, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        source.path.name,
                        str(source.path.resolve()),
                        source.fingerprint,
                        source.path.stat().st_size,
                        report.rows_total,
                        ", ".join(source.missing),
                        int(source.synthetic),
                        now,
                    ),
                )
                work.append((source, report, cursor.lastrowid, 0))
            elif record[1] >= record[2]:
                report.status = "already ingested"
                report.rows_ingested, report.rows_rejected = record[3], record[4]
            else:
                report.status, report.resumed_from_row = "resumed", record[1]
                work.append((source, report, record[0], record[1]))

        # 2. Stream the rows, one transaction per batch.
        rows_total = sum(r.rows_total - start for _, r, _, start in work)
        rows_done = 0
        domains = _DomainIds(conn)
        next_id = (conn.execute("SELECT max(id) FROM images").fetchone()[0] or 0) + 1
        run_ingested = run_rejected = 0
        for source, report, file_id, start_row in work:
            if progress:
                progress(IngestProgress(source.path.name, rows_done, rows_total))
            for first_row, batch in _batches(source, start_row, batch_rows):
                rows, rejected, reasons = _rows_of(source, batch, first_row, file_id)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    _write_batch(conn, domains, next_id, rows, rejected, file_id, first_row + batch.num_rows)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    domains.forget()
                    raise
                next_id += len(rows)
                report.rows_ingested += len(rows)
                report.rows_rejected += len(rejected)
                for reason, n in reasons.items():
                    report.rejected_by_reason[reason] = report.rejected_by_reason.get(reason, 0) + n
                run_ingested += len(rows)
                run_rejected += len(rejected)
                rows_done += batch.num_rows
                if progress:
                    progress(IngestProgress(source.path.name, rows_done, rows_total))
            conn.execute(
                "UPDATE ingest_files SET finished_at = ? WHERE id = ?",
                (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), file_id),
            )
            if report.status == "resumed":
                # Reasons counted before the interruption are in the table, not in this run's counter.
                report.rejected_by_reason = _reasons_of(conn, file_id)
                report.rows_ingested, report.rows_rejected = conn.execute(
                    "SELECT rows_ingested, rows_rejected FROM ingest_files WHERE id = ?", (file_id,)
                ).fetchone()
        for source, report in zip(sources, reports):
            if report.status == "already ingested":
                file_id = conn.execute(
                    "SELECT id FROM ingest_files WHERE fingerprint = ?", (source.fingerprint,)
                ).fetchone()[0]
                report.rejected_by_reason = _reasons_of(conn, file_id)

        # 3. Derived tables, when the rows or the artist list changed since they were last computed.
        if schema.needs_finalize(conn, artists):
            schema.finalize(
                conn,
                artists,
                on_step=(lambda name: progress(IngestProgress("", rows_done, rows_total, name))) if progress else None,
            )
        return IngestReport(
            str(db_path),
            reports,
            run_ingested,
            run_rejected,
            schema.images_count(conn),
            time.perf_counter() - started,
        )
    finally:
        conn.close()


def _check_database(conn: sqlite3.Connection, db_path: Path | str) -> None:
    """Refuse an SQLite database of something else (spellbook.db, say): the explorer's tables must not be
    added to another application's database. (A file that is not SQLite is refused by `connect`.)"""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables and "ingest_files" not in tables:
        raise UserError(
            f"{db_path} is another database (tables: {', '.join(sorted(tables)[:5])}), not an explorer database",
            field="db",
            hint="choose a new --db file",
        )


def _reasons_of(conn: sqlite3.Connection, file_id: int) -> dict[str, int]:
    return dict(
        conn.execute(
            "SELECT reason, count(*) FROM rejected_rows WHERE file_id = ? GROUP BY reason ORDER BY reason", (file_id,)
        ).fetchall()
    )
