"""Vectors in SQLite: sqlite-vec's blob format, the extension loaded where it can be, and a fast scan.

Embeddings are stored as plain BLOBs in `image_embeddings` (see migration 0002), not in a vec0 virtual
table: Datasette refuses to open a database holding a vec0 table unless it has the extension loaded, and a
brute-force vec0 KNN over 1M x 384 floats took ~1 s on 2 cores (benchmarks/gallery_search.py prints the
comparison). The blobs are sqlite-vec's own format, so with the extension `vec_distance_cosine(vector, ?)`
ranks them in SQL; `load_sqlite_vec` loads it, or registers a Python `vec_distance_cosine` that gives the
same numbers, so one query works either way.

Nearest-neighbour search is two steps: `CodeIndex` keeps every vector's sign bits (48 bytes for 384
dimensions) in memory and finds the candidates closest in Hamming distance with numpy (~50 ms for 1M rows),
then SQL re-ranks those candidates by exact cosine on the stored float vectors.
"""

from __future__ import annotations

import ctypes
import sqlite3
import sys
import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from spellbook.store.db import Database

SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION = 1005


def to_blob(vector: np.ndarray) -> bytes:
    """float32 little-endian, sqlite-vec's `float[N]` format."""
    return np.asarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")


def sign_code(vectors: np.ndarray) -> np.ndarray:
    """One bit per dimension (1 where > 0), packed: (n, dim) floats -> (n, dim / 8) uint8."""
    return np.packbits(np.asarray(vectors) > 0, axis=-1)


def _python_distance_cosine(a: bytes | None, b: bytes | None) -> float | None:
    if a is None or b is None:
        return None
    x, y = from_blob(a), from_blob(b)
    if x.shape != y.shape:
        raise ValueError(f"vectors of {x.size} and {y.size} dimensions cannot be compared")
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return 1.0 - float(x @ y) / norm if norm else 1.0


def _load_with_ctypes(conn: sqlite3.Connection, library: str) -> bool:
    """Load an extension through SQLite's C API, for Pythons built without `enable_load_extension`.

    pyenv and python.org builds leave out `--enable-loadable-sqlite-extensions`, yet link a libsqlite3
    that can load extensions; the connection's `sqlite3 *` is the first field after the object header in
    CPython 3.11-3.14. The handle is checked (its file name must be the connection's) before it is used.
    """
    if sys.implementation.name != "cpython" or not ((3, 11) <= sys.version_info[:2] <= (3, 14)):
        return False
    import _sqlite3

    lib = ctypes.CDLL(_sqlite3.__file__)  # its symbol lookup reaches the libsqlite3 it is linked with
    lib.sqlite3_libversion.restype = ctypes.c_char_p
    if lib.sqlite3_libversion().decode() != sqlite3.sqlite_version:
        return False
    handle = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
    lib.sqlite3_db_filename.restype = ctypes.c_char_p
    lib.sqlite3_db_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    main_file = next((row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"), "")
    if not handle or (lib.sqlite3_db_filename(handle, b"main") or b"").decode() != (main_file or ""):
        return False
    lib.sqlite3_db_config.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.sqlite3_load_extension.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_char_p),
    ]
    # Enables the C function only (not SQL's load_extension()), and only while loading.
    lib.sqlite3_db_config(handle, SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 1, None)
    try:
        error = ctypes.c_char_p()
        return lib.sqlite3_load_extension(handle, library.encode(), None, ctypes.byref(error)) == 0
    finally:
        lib.sqlite3_db_config(handle, SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 0, None)


def has_sqlite_vec(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("SELECT vec_version()")
    except sqlite3.OperationalError:
        return False
    return True


def load_sqlite_vec(conn: sqlite3.Connection) -> bool:
    """Make `vec_distance_cosine` available on `conn`; True when it is sqlite-vec's, False for ours.

    Calling it again on the same connection costs one query.
    """
    if has_sqlite_vec(conn):
        return True
    try:
        import sqlite_vec

        library = sqlite_vec.loadable_path()
    except ImportError:
        library = None
    if library is not None:
        if hasattr(conn, "enable_load_extension"):
            try:
                conn.enable_load_extension(True)
                conn.load_extension(library)
                return True
            except sqlite3.OperationalError:
                pass
            finally:
                conn.enable_load_extension(False)
        elif _load_with_ctypes(conn, library) and has_sqlite_vec(conn):
            return True
    conn.create_function("vec_distance_cosine", 2, _python_distance_cosine, deterministic=True)
    return False


class CodeIndex:
    """Sign-bit codes of every stored embedding, in memory, refreshed with what was added since.

    Ids are never reused (AUTOINCREMENT), so a row deleted since loading only yields a candidate that the
    SQL re-ranking no longer finds; callers over-fetch for that reason. One index per database file and
    process (`for_database`); it is safe to share between threads. Codes are kept one 64-bit word per
    row in separate contiguous columns, so the scan is a few passes of XOR + popcount + add over flat
    arrays (~40 ms for 1M rows on a busy core, against ~70 ms for a row-major (n, 6) layout).
    """

    def __init__(self) -> None:
        self.last_row = 0
        self.image_ids = np.zeros(0, dtype=np.int64)
        self.columns = np.zeros((0, 0), dtype=np.uint64)  # (words per code, rows)
        self._lock = threading.Lock()

    @classmethod
    def for_database(cls, db: Database) -> CodeIndex:
        """The index of `db`, kept with the Database object (it lives as long as whoever opened the file)."""
        with db.cache_lock:
            return db.caches.setdefault("code_index", cls())

    def refresh(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            newest = conn.execute("SELECT max(id) FROM image_embeddings").fetchone()[0] or 0
            if newest < self.last_row:  # the database file was replaced: start again
                self.__init__()
            rows = conn.execute(
                "SELECT id, image_id, code FROM image_embeddings INDEXED BY image_embeddings_codes "
                "WHERE id > ? ORDER BY id",
                (self.last_row,),
            ).fetchall()
            if not rows:
                return
            width = len(rows[0][2])
            codes = np.frombuffer(b"".join(bytes(r[2]) for r in rows), dtype=np.uint8).reshape(len(rows), width)
            padded = np.zeros((len(rows), -(-width // 8) * 8), dtype=np.uint8)
            padded[:, :width] = codes
            new_columns = np.ascontiguousarray(padded.view(np.uint64).T)
            new_ids = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
            if self.columns.size and self.columns.shape[0] != new_columns.shape[0]:
                raise RuntimeError("embeddings of different sizes in one database; re-embed with one model")
            self.columns = new_columns if not self.columns.size else np.concatenate([self.columns, new_columns], 1)
            self.image_ids = np.concatenate([self.image_ids, new_ids])
            self.last_row = rows[-1][0]

    def __len__(self) -> int:
        return len(self.image_ids)

    def nearest(self, code: np.ndarray, count: int) -> np.ndarray:
        """Image ids of the `count` codes closest to `code` (Hamming distance), closest first."""
        with self._lock:
            columns, ids = self.columns, self.image_ids
        if not len(ids):
            return ids
        query = np.zeros(columns.shape[0] * 8, dtype=np.uint8)
        query[: len(code)] = code
        distances = np.zeros(len(ids), dtype=np.uint16)
        word, bits = np.empty(len(ids), dtype=np.uint64), np.empty(len(ids), dtype=np.uint8)
        for column, query_word in zip(columns, query.view(np.uint64), strict=True):
            np.bitwise_xor(column, query_word, out=word)
            np.bitwise_count(word, out=bits)
            distances += bits
        if count < len(ids):
            # Distances are small integers: the count-th smallest comes from a histogram, which is cheaper
            # than a partition of every row.
            cutoff = int(np.searchsorted(np.cumsum(np.bincount(distances)), count))
            chosen = np.flatnonzero(distances <= cutoff)
        else:
            chosen = np.arange(len(ids))
        return ids[chosen[np.argsort(distances[chosen], kind="stable")]][:count]
