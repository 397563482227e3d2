"""One SQLite database per home, WAL mode, schema kept by numbered migrations.

Migrations are the files `migrations/NNNN_name.sql`, applied in order inside one transaction each; the
number of the last one applied is SQLite's `user_version`, so a database says which schema it has and an
older one is brought forward on open. A migration is never edited once released: add the next number.
Datasette opens the file as is (FTS tables are plain FTS5 tables with `content=` pointing at their table).
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str, str]]:
    """(number, file name, SQL) of every shipped migration, in order."""
    found = []
    for entry in resources.files("spellbook.store").joinpath("migrations").iterdir():
        match = MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    numbers = [n for n, _, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"store migrations must be numbered 1..n without gaps, found {numbers}")
    return found


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the settings every Spellbook connection uses (WAL, foreign keys, busy wait)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def migrate(conn: sqlite3.Connection, *, to: int | None = None) -> int:
    """Apply the migrations the database lacks (up to `to`, default all); returns the schema version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    pending = [m for m in migrations() if m[0] > version and (to is None or m[0] <= to)]
    if not pending:
        return version
    # Foreign keys are off while migrations run (the pragma is a no-op inside a transaction, so it is set
    # before): a table rebuilt the way SQLite's ALTER TABLE page describes must not cascade its DROP into the
    # tables that reference it. Each migration checks them before it commits.
    foreign_keys = conn.execute("PRAGMA foreign_keys").fetchone()[0]
    conn.execute("PRAGMA foreign_keys=OFF")
    try:
        for number, name, sql in pending:
            try:
                conn.execute("BEGIN IMMEDIATE")
                # executescript would commit the open transaction first; run the statements one by one instead.
                for statement in split_statements(sql):
                    conn.execute(statement)
                broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"{len(broken)} rows would break foreign keys, e.g. {tuple(broken[0])}")
                conn.execute(f"PRAGMA user_version={number}")
                conn.execute("COMMIT")
            except Exception as exc:
                conn.execute("ROLLBACK")
                raise RuntimeError(f"store migration {name} failed: {exc}") from exc
            version = number
    finally:
        conn.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
    return version


def split_statements(sql: str) -> list[str]:
    """Split a migration into complete statements (triggers keep their inner semicolons)."""
    statements, current = [], ""
    for line in sql.splitlines(keepends=True):
        if line.strip().startswith("--") and not current.strip():
            continue
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip():
        raise RuntimeError(f"incomplete SQL statement in migration: {current.strip()[:80]}")
    return statements


class Database:
    """The home's spellbook.db: migrated on open; one connection per thread; `transaction()` for writes.

    SQLite has one writer at a time; `transaction()` starts with BEGIN IMMEDIATE so a read-then-write
    (a credit check, a job lease) cannot interleave with another writer's.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._local = threading.local()
        # Caches of data derived from this database (e.g. the gallery's word statistics), owned by it: they
        # live as long as the object that opened the file, and another home never sees them.
        self.caches: dict[str, Any] = {}
        self.cache_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        try:
            migrate(self.conn)
            self.conn.execute("BEGIN IMMEDIATE")  # can this process write here? (a read-only file or folder)
            self.conn.execute("ROLLBACK")
        except (sqlite3.OperationalError, OSError) as exc:
            from spellbook.errors import UserError

            raise UserError(
                f"cannot open the database {self.path} for writing: {exc}",
                field="home",
                hint="give this user write access to the file and its folder, or set SPELLBOOK_HOME to another folder",
            ) from None

    def executor(self) -> ThreadPoolExecutor:
        """Two threads for work that reads this database beside the caller's thread (made on first use)."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="spellbook-db")
            return self._executor

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def execute(self, sql: str, params: tuple | dict = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
