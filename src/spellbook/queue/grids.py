"""X/Y/Z plots as queued work: a grid is its axes and its cells, each cell a job of its own (store/migrations/
0006_grids.sql). Every cell is queued and paid in the transaction that records the grid, all or nothing; after
that a grid has no state of its own: its state, progress and images are read from its cells' jobs, so a restart
loses nothing and the two can never disagree.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from spellbook.errors import Conflict, NotFound
from spellbook.grid import Axis, Cell, axes_from_record, axes_record
from spellbook.queue.jobs import FINAL, Idempotency, Job, JobQueue, _job
from spellbook.store.db import Database


@dataclass(frozen=True)
class GridCell:
    x: int
    y: int
    z: int
    job: Job


@dataclass(frozen=True)
class Grid:
    id: str
    owner: int | None
    axes: list[Axis | None]  # x, y, z
    created: float
    cells: list[GridCell]  # in plan order: x fastest, then y, then z

    @property
    def z_count(self) -> int:
        return len(self.axes[2].values) if self.axes[2] else 1

    @property
    def state(self) -> str:
        """queued (no cell has started) → running → done (every cell), failed (a cell failed; the rest ended) or
        cancelled (a cell was cancelled; the rest ended)."""
        states = [cell.job.state for cell in self.cells]
        if all(state in FINAL for state in states):
            for final in ("failed", "cancelled"):
                if final in states:
                    return final
            return "done"
        return "queued" if all(state == "queued" for state in states) else "running"

    @property
    def cost(self) -> int:
        return sum(cell.job.cost for cell in self.cells)


class GridStore:
    def __init__(self, db: Database, queue: JobQueue):
        self.db = db
        self.queue = queue

    def submit(
        self, axes: list[Axis | None], cells: list[Cell], *, owner: int | None, idempotency: Idempotency | None = None
    ) -> Grid:
        """Record the grid, and queue and pay every cell, in one transaction. With `idempotency`, a key this owner
        used before for a grid gives that grid back, unpaid again (checked inside the paying transaction)."""
        grid_id = uuid.uuid4().hex
        with self.db.transaction() as conn:
            if idempotency is not None and (earlier := self._idempotent(conn, owner, idempotency)) is not None:
                return self.get(earlier)
            what = f"the {len(cells)} cells of this grid"
            job_ids = self.queue.insert_paid(conn, [cell.recipe for cell in cells], owner=owner, what=what)
            conn.execute(
                "INSERT INTO grids (id, owner, axes, created, idempotency_key, idempotency_request) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    grid_id, owner, json.dumps(axes_record(axes)), time.time(),
                    idempotency.key if idempotency else None, idempotency.request if idempotency else None,
                ),
            )  # fmt: skip
            conn.executemany(
                "INSERT INTO grid_cells (grid_id, position, x, y, z, job_id) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (grid_id, position, cell.x, cell.y, cell.z, job_id)
                    for position, (cell, job_id) in enumerate(zip(cells, job_ids, strict=True))
                ],
            )
        return self.get(grid_id)

    def find_idempotent(self, owner: int | None, idempotency: Idempotency) -> Grid | None:
        """The grid this owner already submitted with this key (a Conflict if it was for another request)."""
        grid_id = self._idempotent(self.db.conn, owner, idempotency)
        return self.get(grid_id) if grid_id else None

    @staticmethod
    def _idempotent(conn, owner: int | None, idempotency: Idempotency) -> str | None:
        row = conn.execute(
            "SELECT id, idempotency_request FROM grids WHERE owner IS ? AND idempotency_key = ?",
            (owner, idempotency.key),
        ).fetchone()
        if row is None:
            return None
        if row["idempotency_request"] != idempotency.request:
            raise Conflict(
                f"Idempotency-Key {idempotency.key!r} was used for another grid ({row['id']})",
                field="Idempotency-Key",
                hint="use a new key for a new grid; resend the same request to get that grid back",
            )
        return row["id"]

    def get(self, grid_id: str, *, viewer: int | None = None, admin: bool = True) -> Grid:
        """The grid with its cells' jobs as they are now; another's grid is a NotFound, as if it did not exist."""
        row = self.db.execute("SELECT * FROM grids WHERE id = ?", (grid_id,)).fetchone()
        if row is None or (not admin and row["owner"] != viewer):
            raise NotFound(f"no grid {grid_id!r}", field="grid_id")
        cells = self.db.execute(
            "SELECT c.x AS cell_x, c.y AS cell_y, c.z AS cell_z, j.* FROM grid_cells c JOIN jobs j ON j.id = c.job_id "
            "WHERE c.grid_id = ? ORDER BY c.position",
            (grid_id,),
        ).fetchall()
        return Grid(
            id=row["id"],
            owner=row["owner"],
            axes=axes_from_record(json.loads(row["axes"])),
            created=row["created"],
            cells=[GridCell(c["cell_x"], c["cell_y"], c["cell_z"], _job(c)) for c in cells],
        )

    def list(self, *, owner: int | None = None, all_users: bool = False, limit: int = 50) -> list[Grid]:
        if all_users:
            rows = self.db.execute("SELECT id FROM grids ORDER BY created DESC LIMIT ?", (limit,))
        else:
            rows = self.db.execute(
                "SELECT id FROM grids WHERE owner IS ? ORDER BY created DESC LIMIT ?", (owner, limit)
            )
        return [self.get(row["id"]) for row in rows.fetchall()]

    def cancel(self, grid_id: str, *, viewer: int | None = None, admin: bool = True) -> Grid:
        """Cancel every cell that has not ended (each refunded as a cancelled job is); a Conflict when none is left."""
        grid = self.get(grid_id, viewer=viewer, admin=admin)
        if self.queue.cancel_unfinished([cell.job.id for cell in grid.cells]) == 0:
            raise Conflict(f"grid {grid_id} has already ended ({grid.state}); nothing to cancel", field="grid_id")
        return self.get(grid_id)
