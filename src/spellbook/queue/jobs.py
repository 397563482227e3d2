"""Job lifecycle on the store's `jobs` table: queued -> running -> done | failed | cancelled.

- submit: the job row and its credit debit are one transaction (no job without payment, no payment
  without a job).
- lease: a worker takes a group of compatible queued jobs (same batch key) and holds them for
  `lease_seconds`, renewed by heartbeats; fairness: the group is led by the oldest job of the owner with
  the fewest jobs running, so one user's thousand jobs do not starve another's one.
- a running job whose lease expired (its worker died) is queued again (up to `max_attempts` runs).
- complete / fail / cancel are recorded once: each is a conditional UPDATE on the job's state, so a late
  second completion (a job that ran twice after a lease expired) changes nothing. Failure and cancellation
  refund the debit, at most once (a unique ledger index).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from spellbook.errors import Conflict, Forbidden, InsufficientCredits, NotFound, UserError
from spellbook.recipe import Limits, Recipe
from spellbook.store.accounts import Accounts
from spellbook.store.db import Database

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class Job:
    id: str
    owner: int | None
    kind: str
    request: dict[str, Any]
    cost: int
    state: str
    batch_key: str
    created: float
    started: float | None
    finished: float | None
    attempts: int
    progress: float
    error: dict | None
    result: dict | None
    lease_owner: str | None = None

    @property
    def recipe(self) -> Recipe:
        """The recipe as queued (it was validated against the server's limits when submitted)."""
        return Recipe.from_dict(self.request["recipe"], Limits(max_pixels=2**62, max_batch=2**31, max_steps=2**31))

    def public(self) -> dict[str, Any]:
        """The job as the API shows it."""
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "progress": round(self.progress, 4),
            "cost": self.cost,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "attempts": self.attempts,
            "recipe": self.request.get("recipe"),
            **({"concept": self.request["concept"]} if "concept" in self.request else {}),
            "error": self.error,
            "result": self.result,
        }


def _job(row) -> Job:
    return Job(
        id=row["id"],
        owner=row["owner"],
        kind=row["kind"],
        request=json.loads(row["request"]),
        cost=row["cost"],
        state=row["state"],
        batch_key=row["batch_key"],
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        attempts=row["attempts"],
        progress=row["progress"],
        error=json.loads(row["error"]) if row["error"] else None,
        result=json.loads(row["result"]) if row["result"] else None,
        lease_owner=row["lease_owner"],
    )


def job_cost(recipe: Recipe) -> int:
    """Credits for a recipe: its work, images x steps x pixels, in units of 2^16 pixel-steps (at least 1).

    The shapes model's default (32x32, 20 steps) costs 1 per image; SD 1.5 at 512x512 and 20 steps, 80. A prompt
    of n parts joined by AND runs n + 1 UNet passes a step instead of 2, and costs (n + 1) / 2 times as much. A
    hires fix adds its second pass: its steps at the hires size.
    """
    from spellbook.engine.schedule import composable_parts

    steps = (
        recipe.steps
        if recipe.kind == "txt2img" or (recipe.kind == "blend" and not recipe.blend.by_pictures)
        else max(1, int(recipe.steps * (recipe.strength or 1.0)))
    )
    passes = max(2, len(composable_parts(recipe.prompt)) + 1)
    work = recipe.batch_size * steps * recipe.width * recipe.height * passes // 2
    if recipe.hires is not None:
        hires = recipe.hires
        second = max(2, len(composable_parts(hires.prompt or recipe.prompt)) + 1)
        work += recipe.batch_size * hires.steps_to_run(recipe.steps) * hires.width * hires.height * second // 2
    return max(1, -(-work // 65536))


@dataclass(frozen=True)
class Idempotency:
    """An `Idempotency-Key` header and a hash of the request it came with."""

    key: str
    request: str

    @classmethod
    def of(cls, key: str | None, body: str | bytes) -> Idempotency | None:
        if key is None:
            return None
        key = key.strip()
        if not key or len(key) > 200 or not key.isprintable():
            raise UserError(
                "Idempotency-Key must be 1 to 200 printable characters, e.g. a UUID", field="Idempotency-Key"
            )
        data = body.encode() if isinstance(body, str) else body
        return cls(key, hashlib.sha256(data).hexdigest())


def batch_key(recipe: Recipe) -> str:
    """Jobs with equal keys can share one forward pass (same model, size, sampler, steps, guidance)."""
    from spellbook.engine.samplers import SAMPLER_SPECS

    if recipe.kind != "txt2img" or not SAMPLER_SPECS[recipe.sampler].batch_invariant:
        return ""  # image inputs, or a sampler with one noise stream per batch: run alone
    return json.dumps(
        [
            recipe.model.sha256 or recipe.model.name,
            recipe.vae.sha256 if recipe.vae else None,
            [c.to_dict() for c in recipe.concepts],
            recipe.sampler,
            recipe.schedule,
            recipe.steps,
            recipe.guidance,
            recipe.width,
            recipe.height,
            recipe.clip_skip,
            recipe.hires.pass_key() if recipe.hires else None,
        ]
    )


class JobQueue:
    def __init__(self, db: Database, *, lease_seconds: float = 60.0, max_attempts: int = 3):
        self.db = db
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts

    # ----------------------------------------------------------------------------------------- submit
    def submit(
        self,
        recipe: Recipe,
        *,
        owner: int | None,
        cost: int | None = None,
        extra: dict | None = None,
        idempotency: Idempotency | None = None,
    ) -> Job:
        """Queue a recipe, paid now. With `idempotency`, a key this owner used before gives that job back, unpaid
        again (checked inside the paying transaction, so two racing retries make one job)."""
        job_id = uuid.uuid4().hex
        cost = job_cost(recipe) if cost is None else cost
        request = {"recipe": recipe.to_dict(), **(extra or {})}
        with self.db.transaction() as conn:
            if idempotency is not None and (earlier := self._idempotent(conn, owner, idempotency)) is not None:
                return earlier
            if owner is not None:
                Accounts.debit(conn, owner, cost, job_id)
            conn.execute(
                "INSERT INTO jobs (id, owner, kind, request, cost, batch_key, created, idempotency_key, "
                "idempotency_request) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id, owner, recipe.kind, json.dumps(request), cost, batch_key(recipe), time.time(),
                    idempotency.key if idempotency else None, idempotency.request if idempotency else None,
                ),
            )  # fmt: skip
        return self.get(job_id)

    @staticmethod
    def insert_paid(conn, recipes: list[Recipe], *, owner: int | None, what: str = "") -> list[str]:
        """Inside the caller's transaction (queue/grids.py records a grid in it too): a job row and its debit per
        recipe; their ids, in order. All or nothing: if the credits run out at the seventh, the transaction rolls
        back and nothing is queued or debited. The whole cost is checked first, so a refusal names it (`what`,
        plural: e.g. "the 9 cells of this grid"), not the seventh job's."""
        costs = [job_cost(recipe) for recipe in recipes]
        if owner is not None:
            balance = conn.execute("SELECT balance FROM users WHERE id = ?", (owner,)).fetchone()[0]
            if balance < sum(costs):
                raise InsufficientCredits(
                    f"{what or f'these {len(recipes)} jobs'} cost {sum(costs)} credits in all and the balance is "
                    f"{balance}; ask an admin for credits",
                    field="credits",
                )
        ids, now = [], time.time()
        for recipe, cost in zip(recipes, costs, strict=True):
            job_id = uuid.uuid4().hex
            if owner is not None:
                Accounts.debit(conn, owner, cost, job_id)
            conn.execute(
                "INSERT INTO jobs (id, owner, kind, request, cost, batch_key, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, owner, recipe.kind, json.dumps({"recipe": recipe.to_dict()}), cost, batch_key(recipe), now),
            )
            ids.append(job_id)
        return ids

    def find_idempotent(self, owner: int | None, idempotency: Idempotency) -> Job | None:
        """The job this owner already submitted with this key (a Conflict if it was for another request)."""
        return self._idempotent(self.db.conn, owner, idempotency)

    @staticmethod
    def _idempotent(conn, owner: int | None, idempotency: Idempotency) -> Job | None:
        row = conn.execute(
            "SELECT * FROM jobs WHERE owner IS ? AND idempotency_key = ?", (owner, idempotency.key)
        ).fetchone()
        if row is None:
            return None
        if row["idempotency_request"] != idempotency.request:
            raise Conflict(
                f"Idempotency-Key {idempotency.key!r} was used for another request (job {row['id']})",
                field="Idempotency-Key",
                hint="use a new key for a new request; resend the same request to get that job back",
            )
        return _job(row)

    def submit_task(self, kind: str, request: dict[str, Any], *, owner: int | None, cost: int) -> Job:
        """A job that is not a recipe (e.g. `concept`: train a concept): paid the same way, never batched."""
        job_id = uuid.uuid4().hex
        with self.db.transaction() as conn:
            if owner is not None:
                Accounts.debit(conn, owner, cost, job_id)
            conn.execute(
                "INSERT INTO jobs (id, owner, kind, request, cost, batch_key, created) VALUES (?, ?, ?, ?, ?, '', ?)",
                (job_id, owner, kind, json.dumps(request), cost, time.time()),
            )
        return self.get(job_id)

    # -------------------------------------------------------------------------------------------- read
    def get(self, job_id: str, *, viewer: int | None = None, admin: bool = True) -> Job:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        job = _job(row)
        if not admin and job.owner != viewer:
            raise NotFound(f"no job {job_id!r}", field="job_id")  # another's job: as if it did not exist
        return job

    def list(self, *, owner: int | None = None, all_users: bool = False, limit: int = 50) -> list[Job]:
        if all_users:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,))
        else:
            rows = self.db.execute("SELECT * FROM jobs WHERE owner IS ? ORDER BY created DESC LIMIT ?", (owner, limit))
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        found = dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {state: found.get(state, 0) for state in STATES}

    # ----------------------------------------------------------------------------------------- workers
    def requeue_expired(self, now: float | None = None) -> int:
        """Running jobs whose worker stopped renewing the lease go back to the queue (or fail, refunded,
        after max_attempts runs)."""
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            expired = conn.execute(
                "SELECT id, attempts FROM jobs WHERE state = 'running' AND lease_expires < ?", (now,)
            ).fetchall()
            for row in expired:
                if row["attempts"] >= self.max_attempts:
                    error = {"code": "worker_lost", "message": f"the job's worker stopped {row['attempts']} times"}
                    conn.execute(
                        "UPDATE jobs SET state = 'failed', finished = ?, error = ?, lease_owner = NULL WHERE id = ?",
                        (now, json.dumps(error), row["id"]),
                    )
                    Accounts.refund(conn, row["id"])
                else:
                    conn.execute(
                        "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires = NULL, progress = 0 "
                        "WHERE id = ?",
                        (row["id"],),
                    )
        return len(expired)

    def lease(self, worker: str, *, max_batch: int = 8, max_images: int = 16) -> list[Job]:
        """Take the next group of compatible jobs (fair across owners); empty when the queue is empty."""
        now = time.time()
        with self.db.transaction() as conn:
            lead = conn.execute(
                """
                SELECT j.* FROM jobs j
                WHERE j.state = 'queued'
                ORDER BY (SELECT COUNT(*) FROM jobs r WHERE r.state = 'running' AND r.owner IS j.owner),
                         (SELECT MAX(started) FROM jobs s WHERE s.owner IS j.owner AND s.started IS NOT NULL),
                         j.created
                LIMIT 1
                """
            ).fetchone()
            if lead is None:
                return []
            group = [lead]
            if lead["batch_key"] and max_batch > 1:
                # Round-robin over owners within the group too: each owner's oldest compatible jobs first.
                candidates = conn.execute(
                    """
                    SELECT * FROM (
                        SELECT j.*, ROW_NUMBER() OVER (PARTITION BY owner ORDER BY created) AS turn
                        FROM jobs j WHERE state = 'queued' AND batch_key = ? AND id != ?
                    ) ORDER BY turn, created LIMIT ?
                    """,
                    (lead["batch_key"], lead["id"], max_batch - 1),
                ).fetchall()
                images = json.loads(lead["request"])["recipe"]["batch_size"]
                for row in candidates:
                    size = json.loads(row["request"])["recipe"]["batch_size"]
                    if images + size > max_images:
                        continue
                    group.append(row)
                    images += size
            ids = [row["id"] for row in group]
            conn.executemany(
                "UPDATE jobs SET state = 'running', lease_owner = ?, lease_expires = ?, started = ?, "
                "attempts = attempts + 1, progress = 0 WHERE id = ? AND state = 'queued'",
                [(worker, now + self.lease_seconds, now, job_id) for job_id in ids],
            )
        return [self.get(job_id) for job_id in ids]

    def heartbeat(self, worker: str, job_ids: list[str], progress: float | None = None) -> list[str]:
        """Renew the lease; returns the ids this worker should stop (cancelled, or taken over by another)."""
        now = time.time()
        stop = []
        with self.db.transaction() as conn:
            for job_id in job_ids:
                if progress is None:
                    updated = conn.execute(
                        "UPDATE jobs SET lease_expires = ? WHERE id = ? AND state = 'running' AND lease_owner = ?",
                        (now + self.lease_seconds, job_id, worker),
                    )
                else:
                    updated = conn.execute(
                        "UPDATE jobs SET lease_expires = ?, progress = ? "
                        "WHERE id = ? AND state = 'running' AND lease_owner = ?",
                        (now + self.lease_seconds, progress, job_id, worker),
                    )
                if updated.rowcount == 0:
                    stop.append(job_id)
        return stop

    def complete(self, job_id: str, result: dict) -> bool:
        """Record the result once. False when the job already ended (done by another run, or cancelled).

        Call it as soon as the job's PNGs are durable. A result with images also enters the gallery outbox in
        the same transaction: filing happens after, retried by the GalleryFiler, and never re-runs the job."""
        now = time.time()
        with self.db.transaction() as conn:
            done = conn.execute(
                "UPDATE jobs SET state = 'done', finished = ?, result = ?, progress = 1, lease_owner = NULL "
                "WHERE id = ? AND state IN ('running', 'queued')",
                (now, json.dumps(result), job_id),
            )
            if done.rowcount == 1 and result.get("images"):
                conn.execute(
                    "INSERT OR IGNORE INTO gallery_outbox (job_id, created, next_try) VALUES (?, ?, ?)",
                    (job_id, now, now),
                )
        return done.rowcount == 1

    def fail(self, job_id: str, error: dict) -> bool:
        with self.db.transaction() as conn:
            done = conn.execute(
                "UPDATE jobs SET state = 'failed', finished = ?, error = ?, lease_owner = NULL "
                "WHERE id = ? AND state IN ('running', 'queued')",
                (time.time(), json.dumps(error), job_id),
            )
            if done.rowcount == 1:
                Accounts.refund(conn, job_id)
        return done.rowcount == 1

    def cancel(self, job_id: str, *, viewer: int | None = None, admin: bool = True) -> Job:
        job = self.get(job_id, viewer=viewer, admin=admin)
        if not admin and job.owner != viewer:
            raise Forbidden("that job is not yours", field="job_id")
        with self.db.transaction() as conn:
            done = conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished = ?, cancel_requested = 1, lease_owner = NULL "
                "WHERE id = ? AND state IN ('running', 'queued')",
                (time.time(), job_id),
            )
            if done.rowcount == 1:
                Accounts.refund(conn, job_id)
        if done.rowcount == 0:
            raise Conflict(f"job {job_id} has already ended ({job.state}); nothing to cancel", field="job_id")
        return self.get(job_id)

    def cancel_unfinished(self, job_ids: list[str]) -> int:
        """Cancel those of these jobs that have not ended (refunded, once each), in one transaction; how many
        were. The caller has checked that they may (e.g. the jobs are the cells of the caller's grid)."""
        now, cancelled = time.time(), 0
        with self.db.transaction() as conn:
            for job_id in job_ids:
                done = conn.execute(
                    "UPDATE jobs SET state = 'cancelled', finished = ?, cancel_requested = 1, lease_owner = NULL "
                    "WHERE id = ? AND state IN ('running', 'queued')",
                    (now, job_id),
                )
                if done.rowcount == 1:
                    Accounts.refund(conn, job_id)
                    cancelled += 1
        return cancelled

    def is_active(self, job_id: str) -> bool:
        row = self.db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None and row["state"] == "running"
