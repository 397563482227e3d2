"""JobQueue on its own: leases, expiry, worker_lost, cancel, fail, complete, fairness and batching.

No server, no worker, no model: a temp database and the queue's methods, with `requeue_expired(now=...)`
standing in for the clock, so each lifecycle rule is checked directly and fast.
"""

from __future__ import annotations

import time

import pytest

from spellbook.errors import Conflict, InsufficientCredits, NotFound
from spellbook.queue.jobs import JobQueue
from spellbook.recipe import Recipe
from spellbook.store.accounts import Accounts
from spellbook.store.db import Database

CREDITS = 100


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "spellbook.db")
    yield database
    database.close()


@pytest.fixture
def accounts(db):
    return Accounts(db)


@pytest.fixture
def alice(accounts):
    accounts.add_user("alice")
    return accounts.grant("alice", CREDITS)


@pytest.fixture
def bob(accounts):
    accounts.add_user("bob")
    return accounts.grant("bob", CREDITS)


def recipe(prompt: str = "a red circle on the left, black background", **changes) -> Recipe:
    return Recipe(prompt=prompt, **{"width": 32, "height": 32, "steps": 4, **changes})


def ledger_rows(db: Database, job_id: str) -> list[tuple[str, int]]:
    rows = db.execute("SELECT reason, delta FROM ledger WHERE job_id = ? ORDER BY id", (job_id,))
    return [(r["reason"], r["delta"]) for r in rows]


def later(queue: JobQueue) -> float:
    """A moment after every lease taken so far has expired."""
    return time.time() + queue.lease_seconds + 1


# ------------------------------------------------------------------------------------------------ submit
def test_submit_debits_the_owner_in_the_same_transaction(db, accounts, alice):
    queue = JobQueue(db)
    job = queue.submit(recipe(), owner=alice.id, cost=7)
    assert job.state == "queued" and job.cost == 7 and job.attempts == 0
    assert accounts.user("alice").balance == CREDITS - 7
    assert ledger_rows(db, job.id) == [("debit", -7)]
    assert job.recipe == Recipe.from_dict(recipe().to_dict())


def test_submit_without_credits_leaves_no_job(db, accounts, alice):
    queue = JobQueue(db)
    with pytest.raises(InsufficientCredits):
        queue.submit(recipe(), owner=alice.id, cost=CREDITS + 1)
    assert queue.counts()["queued"] == 0
    assert accounts.user("alice").balance == CREDITS


# ------------------------------------------------------------------------------------------ lease expiry
def test_a_live_lease_is_not_requeued(db, alice):
    queue = JobQueue(db, lease_seconds=30)
    job = queue.submit(recipe(), owner=alice.id)
    [leased] = queue.lease("w1")
    assert leased.id == job.id and leased.state == "running" and leased.lease_owner == "w1" and leased.attempts == 1
    assert queue.requeue_expired(now=time.time()) == 0
    assert queue.get(job.id).state == "running"


def test_an_expired_lease_puts_the_job_back_and_a_new_worker_takes_it(db, alice):
    queue = JobQueue(db, lease_seconds=30, max_attempts=3)
    job = queue.submit(recipe(), owner=alice.id)
    queue.lease("w1")
    queue.heartbeat("w1", [job.id], progress=0.5)
    assert queue.get(job.id).progress == 0.5

    assert queue.requeue_expired(now=later(queue)) == 1
    requeued = queue.get(job.id)
    assert (requeued.state, requeued.lease_owner, requeued.progress, requeued.attempts) == ("queued", None, 0, 1)

    [again] = queue.lease("w2")
    assert again.id == job.id and again.lease_owner == "w2" and again.attempts == 2
    # The first worker comes back: its heartbeat tells it to stop, it no longer holds the job.
    assert queue.heartbeat("w1", [job.id]) == [job.id]
    assert queue.heartbeat("w2", [job.id]) == []
    assert queue.get(job.id).lease_owner == "w2"


def test_after_max_attempts_the_job_fails_worker_lost_refunded_once(db, accounts, alice):
    queue = JobQueue(db, lease_seconds=30, max_attempts=2)
    job = queue.submit(recipe(), owner=alice.id, cost=5)
    for worker in ("w1", "w2"):
        assert [j.id for j in queue.lease(worker)] == [job.id]
        assert queue.requeue_expired(now=later(queue)) == 1

    failed = queue.get(job.id)
    assert failed.state == "failed" and failed.attempts == 2
    assert failed.error["code"] == "worker_lost"
    assert failed.finished is not None and failed.lease_owner is None
    assert queue.lease("w3") == []  # not queued again

    # Nothing more happens however often expiry is checked, or whoever reports late.
    assert queue.requeue_expired(now=later(queue) + 100) == 0
    assert queue.fail(job.id, {"code": "boom", "message": "late"}) is False
    assert queue.complete(job.id, {"images": []}) is False
    assert ledger_rows(db, job.id) == [("debit", -5), ("refund", 5)]
    assert accounts.user("alice").balance == CREDITS


# ------------------------------------------------------------------------------------------------ cancel
def test_cancel_during_run_stops_the_worker_and_refunds_once(db, accounts, alice):
    queue = JobQueue(db)
    job = queue.submit(recipe(), owner=alice.id, cost=3)
    queue.lease("w1")
    assert accounts.user("alice").balance == CREDITS - 3

    cancelled = queue.cancel(job.id, viewer=alice.id, admin=False)
    assert cancelled.state == "cancelled" and cancelled.finished is not None
    assert queue.heartbeat("w1", [job.id], progress=0.9) == [job.id]  # the worker is told to stop
    assert queue.complete(job.id, {"images": ["late.png"]}) is False
    assert queue.fail(job.id, {"code": "interrupted", "message": "stopped"}) is False
    with pytest.raises(Conflict):
        queue.cancel(job.id)

    final = queue.get(job.id)
    assert final.state == "cancelled" and final.result is None and final.error is None
    assert ledger_rows(db, job.id) == [("debit", -3), ("refund", 3)]
    assert accounts.user("alice").balance == CREDITS


def test_cancel_of_a_queued_job_means_it_is_never_leased(db, alice):
    queue = JobQueue(db)
    job = queue.submit(recipe(), owner=alice.id)
    queue.cancel(job.id)
    assert queue.lease("w1") == []
    assert queue.get(job.id).state == "cancelled"


def test_only_the_owner_or_an_admin_cancels(db, alice, bob):
    queue = JobQueue(db)
    job = queue.submit(recipe(), owner=alice.id)
    with pytest.raises(NotFound):  # another's job is invisible, not merely forbidden
        queue.cancel(job.id, viewer=bob.id, admin=False)
    assert queue.get(job.id).state == "queued"


# ------------------------------------------------------------------------------------------ fail, complete
def test_fail_refunds_once_and_a_second_fail_changes_nothing(db, accounts, alice):
    queue = JobQueue(db)
    job = queue.submit(recipe(), owner=alice.id, cost=4)
    queue.lease("w1")
    assert queue.fail(job.id, {"code": "engine", "message": "first"}) is True
    assert queue.fail(job.id, {"code": "engine", "message": "second"}) is False
    assert queue.complete(job.id, {"images": []}) is False

    failed = queue.get(job.id)
    assert failed.state == "failed" and failed.error == {"code": "engine", "message": "first"}
    assert ledger_rows(db, job.id) == [("debit", -4), ("refund", 4)]
    assert accounts.user("alice").balance == CREDITS


def test_complete_is_recorded_once(db, accounts, alice):
    queue = JobQueue(db, lease_seconds=30)
    job = queue.submit(recipe(), owner=alice.id, cost=2)
    queue.lease("w1")
    # w1 stalls, its lease expires and w2 runs the job again and finishes first.
    queue.requeue_expired(now=later(queue))
    queue.lease("w2")
    assert queue.complete(job.id, {"images": ["w2.png"]}) is True
    assert queue.complete(job.id, {"images": ["w1.png"]}) is False
    assert queue.fail(job.id, {"code": "engine", "message": "late"}) is False
    with pytest.raises(Conflict):
        queue.cancel(job.id)

    done = queue.get(job.id)
    assert done.state == "done" and done.result == {"images": ["w2.png"]} and done.progress == 1
    assert ledger_rows(db, job.id) == [("debit", -2)]  # paid, never refunded
    assert accounts.user("alice").balance == CREDITS - 2
    assert queue.counts() == {"queued": 0, "running": 0, "done": 1, "failed": 0, "cancelled": 0}


def test_jobs_without_an_owner_need_no_credits(db):
    queue = JobQueue(db)
    job = queue.submit(recipe(), owner=None)
    queue.lease("w1")
    assert queue.fail(job.id, {"code": "engine", "message": "x"}) is True
    assert ledger_rows(db, job.id) == []


# ---------------------------------------------------------------------------------------------- fairness
def test_lease_is_fair_across_owners(db, alice, bob):
    queue = JobQueue(db)
    alices = [queue.submit(recipe(seed=i), owner=alice.id, cost=1).id for i in range(4)]
    bobs = [queue.submit(recipe(seed=i), owner=bob.id, cost=1).id for i in range(2)]

    order = [queue.lease("w", max_batch=1)[0].id for _ in range(6)]
    # Alice queued first, but Bob's jobs are not stuck behind all of hers: turns alternate while both wait.
    assert order == [alices[0], bobs[0], alices[1], bobs[1], alices[2], alices[3]]
    assert queue.lease("w", max_batch=1) == []


def test_owner_with_fewer_running_jobs_goes_first(db, alice, bob):
    queue = JobQueue(db)
    first = queue.submit(recipe(), owner=alice.id, cost=1)
    assert queue.lease("w1", max_batch=1)[0].id == first.id  # alice now has a job running
    alice_next = queue.submit(recipe(seed=1), owner=alice.id, cost=1)
    bob_job = queue.submit(recipe(seed=2), owner=bob.id, cost=1)
    assert queue.lease("w2", max_batch=1)[0].id == bob_job.id
    assert queue.lease("w3", max_batch=1)[0].id == alice_next.id


# ---------------------------------------------------------------------------------------------- batching
def test_compatible_jobs_lease_together_and_others_wait(db, alice):
    queue = JobQueue(db)
    a = queue.submit(recipe("a red circle", seed=1), owner=alice.id, cost=1)
    b = queue.submit(recipe("a blue square", seed=2), owner=alice.id, cost=1)
    other_size = queue.submit(recipe("a red circle", width=64, height=64), owner=alice.id, cost=1)
    c = queue.submit(recipe("a green star", seed=3), owner=alice.id, cost=1)
    assert a.batch_key and a.batch_key == b.batch_key == c.batch_key != other_size.batch_key

    group = queue.lease("w1")
    assert [j.id for j in group] == [a.id, b.id, c.id]
    assert all(j.state == "running" and j.lease_owner == "w1" for j in group)
    assert [j.id for j in queue.lease("w1")] == [other_size.id]


def test_batch_respects_max_images_and_max_batch(db, alice):
    queue = JobQueue(db)
    fours = [queue.submit(recipe(seed=i, batch_size=4), owner=alice.id, cost=1).id for i in range(3)]
    ones = [queue.submit(recipe(seed=10 + i), owner=alice.id, cost=1).id for i in range(3)]

    # Up to 10 images: 4 + 4, the third 4-image job would overflow and waits, single images fill the rest.
    group = [j.id for j in queue.lease("w1", max_batch=8, max_images=10)]
    assert group == [fours[0], fours[1], ones[0], ones[1]]
    # max_batch caps the number of jobs whatever their size.
    assert [j.id for j in queue.lease("w2", max_batch=2, max_images=100)] == [fours[2], ones[2]]


def test_batches_take_turns_across_owners(db, alice, bob):
    queue = JobQueue(db)
    alices = [queue.submit(recipe(seed=i), owner=alice.id, cost=1).id for i in range(4)]
    bobs = [queue.submit(recipe(seed=i), owner=bob.id, cost=1).id for i in range(2)]
    group = [j.id for j in queue.lease("w1", max_batch=3)]
    # The oldest job leads; the rest of the batch is filled owner by owner, so Bob is not left out of it.
    assert group[0] == alices[0] and len(group) == 3
    assert bobs[0] in group


def test_jobs_that_cannot_share_a_pass_run_alone(db, alice):
    queue = JobQueue(db)
    sde = [queue.submit(recipe(seed=i, sampler="DPM++ SDE"), owner=alice.id, cost=1) for i in range(2)]
    assert all(j.batch_key == "" for j in sde)
    assert [j.id for j in queue.lease("w1")] == [sde[0].id]
    assert [j.id for j in queue.lease("w1")] == [sde[1].id]
