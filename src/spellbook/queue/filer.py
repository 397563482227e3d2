"""Filing finished jobs' images in the gallery, after the job is done: the gallery outbox.

`JobQueue.complete` marks a job done and adds it to `gallery_outbox` in one transaction, as soon as its PNGs
are durable. The `GalleryFiler` thread drains the outbox: it files the results the worker handed over in
memory (pixels and recipe in hand, nothing decoded again), or, after a restart or for PNGs a remote worker
sent, reads them from the job's files. A failure backs off and retries; it never re-runs the job or loses
an image, and the image appears in the gallery once the fault clears.
"""

from __future__ import annotations

import logging
import threading
import time

from spellbook.provenance import Result
from spellbook.queue.jobs import JobQueue
from spellbook.queue.worker import BackgroundLoop
from spellbook.settings import Settings

log = logging.getLogger("spellbook.filer")
RETRY_SECONDS = (1, 2, 5, 15, 60)  # back-off after 1, 2, 3, … failed attempts (then every minute)


class GalleryFiler(BackgroundLoop):
    thread_name = "spellbook-filer"

    def __init__(self, settings: Settings, queue: JobQueue, *, batch: int = 16):
        self.settings = settings
        self.queue = queue
        self.db = queue.db
        self.batch = batch
        self._handed: dict[str, list[Result]] = {}
        self._lock = threading.Lock()
        super().__init__()

    def hand_over(self, job_id: str, results: list[Result]) -> None:
        """The written results of a job just completed: filed from memory on the next pass."""
        with self._lock:
            self._handed[job_id] = results
        self.wake.set()

    def pending(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM gallery_outbox").fetchone()[0]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.drain()
            except Exception:  # the loop must outlive a bad row; each row's failure is recorded by drain
                log.exception("gallery filer loop error")
                worked = 0
            if not worked:
                self.wake.wait(0.5)
                self.wake.clear()

    def drain(self, now: float | None = None) -> int:
        """File every due outbox entry once; returns how many were filed."""
        from spellbook import gallery

        now = time.time() if now is None else now
        rows = self.db.execute(
            "SELECT job_id, attempts FROM gallery_outbox WHERE next_try <= ? ORDER BY next_try LIMIT ?",
            (now, self.batch),
        ).fetchall()
        filed = 0
        for row in rows:
            job_id = row["job_id"]
            with self._lock:
                handed = self._handed.pop(job_id, None)
            try:
                if handed is not None:
                    gallery.file_results(self.db, handed, home=self.settings.home)
                else:
                    gallery.file_job_images(self.db, self.settings, self.queue.get(job_id))
            except Exception as exc:  # noqa: BLE001 - any failure (disk, database, embedding model): retried
                attempts = row["attempts"] + 1
                delay = RETRY_SECONDS[min(attempts, len(RETRY_SECONDS)) - 1]
                log.warning("filing job %s in the gallery failed (attempt %d): %s", job_id, attempts, exc)
                with self.db.transaction() as conn:
                    conn.execute(
                        "UPDATE gallery_outbox SET attempts = ?, next_try = ?, last_error = ? WHERE job_id = ?",
                        (attempts, time.time() + delay, f"{type(exc).__name__}: {exc}", job_id),
                    )
                if handed is not None:
                    with self._lock:
                        self._handed.setdefault(job_id, handed)
                continue
            with self.db.transaction() as conn:
                conn.execute("DELETE FROM gallery_outbox WHERE job_id = ?", (job_id,))
            filed += 1
        return filed
