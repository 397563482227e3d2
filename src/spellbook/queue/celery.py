"""Scale-out mode: the server dispatches groups of compatible jobs to Celery workers over Redis.

The store stays the record of every job (state, credits, result). The server's dispatcher leases a group
of queued jobs, sends it as one task (`spellbook.run_jobs`), renews the lease while the task is pending or
running, and records the outcome once when the task's result arrives; PNGs travel back inside the result
and are written to the server's home. Workers need only the models (by name, checked by hash) and the
broker: no shared disk, no database.

Delivery: acks late + reject on worker lost + prefetch 1, so a task whose worker is killed is not lost:
Redis redelivers it to another worker after `visibility_timeout` seconds. A task can therefore run twice
(a slow worker past the timeout, or a kill during the final write); completion is recorded once.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import time
import uuid
from typing import Any

from spellbook.queue.jobs import Job, JobQueue
from spellbook.queue.training import CONCEPT_KIND
from spellbook.queue.worker import BackgroundLoop
from spellbook.settings import Settings
from spellbook.upscale import UPSCALE_KIND

log = logging.getLogger("spellbook.dispatcher")
TASK = "spellbook.run_jobs"


def make_celery(settings: Settings):
    from celery import Celery

    app = Celery("spellbook", broker=settings.broker, backend=settings.broker)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # kombu sweeps for unacknowledged tasks every unacked_restore_interval x unacked_restore_throttle seconds
        # (10 x 10 by default), so a killed worker's task would wait up to 100 s beyond visibility_timeout;
        # sweep every few seconds instead (one cheap ZRANGE per worker), so redelivery follows the setting.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 3)),
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        result_expires=24 * 3600,
        task_track_started=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    return app


# --------------------------------------------------------------------------------------------- worker side
class _WorkerRuntime:
    """One per worker process: the studio (models stay loaded between tasks) and its executor."""

    def __init__(self, settings: Settings):
        from spellbook.queue.worker import Executor
        from spellbook.studio import Studio

        self.settings = settings
        self.studio = Studio(settings)
        self.executor = Executor(self.studio)


def register_task(app, settings: Settings) -> None:
    runtime: dict[str, _WorkerRuntime] = {}

    @app.task(name=TASK, bind=True)
    def run_jobs(self, payload: dict[str, Any]) -> dict[str, Any]:
        from spellbook.errors import SpellbookError
        from spellbook.provenance import image_sha256, png_bytes
        from spellbook.recipe import Recipe

        if "studio" not in runtime:
            runtime["studio"] = _WorkerRuntime(settings)
        rt = runtime["studio"]
        # Inputs (init images, masks) travel by value and are kept by hash, as the studio expects them.
        for digest, data in payload.get("inputs", {}).items():
            target = rt.settings.inputs_dir / f"{digest}.png"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(data))
        last = [0.0]

        def report(step: int, total: int) -> None:
            now = time.time()
            if now - last[0] > 0.5 or step == total:
                last[0] = now
                self.update_state(state="PROGRESS", meta={"step": step, "total": total})

        if payload["jobs"][0].get("kind") == CONCEPT_KIND:  # leased alone, like in the embedded worker
            job = payload["jobs"][0]
            return {
                "results": {job["id"]: _train(rt, job, lambda step, total, _loss: report(step, total))},
                "worker": self.request.hostname,
                "batched_with": 1,
            }

        def on_progress(step, total, _latents, _components) -> None:
            report(step, total)

        # Validated against the server's limits at submit; the worker enforces its own device's limits.
        jobs = [(j["id"], Recipe.from_dict(j["recipe"], rt.studio.limits)) for j in payload["jobs"]]

        outcome = rt.executor.run(jobs, on_progress=on_progress, batching=payload.get("batching", True))
        results: dict[str, Any] = {}
        for job_id, value in outcome.items():
            if isinstance(value, SpellbookError):
                results[job_id] = {"error": value.to_dict()["error"]}
            else:
                # PNG bytes made by the one writer, and the pixels' hash, so the server decodes nothing.
                results[job_id] = {
                    "images": [
                        {
                            "png": base64.b64encode(png_bytes(r.image, r.recipe)).decode(),
                            "sha256": image_sha256(r.image),
                        }
                        for r in value
                    ]
                }
        return {"results": results, "worker": self.request.hostname, "batched_with": len(jobs)}


def _train(rt: _WorkerRuntime, job: dict[str, Any], progress) -> dict[str, Any]:
    """A `concept` job on this worker. Its scratch folder is under this worker's home, kept while the task may
    be redelivered here (a killed worker's rerun continues from the checkpoint), removed once it has a result."""
    from spellbook.errors import SpellbookError
    from spellbook.queue.training import ConceptJobSpec, remove_scratch, run_concept_job, scratch_dir
    from spellbook.recipe import InputRef

    spec = ConceptJobSpec.from_dict(job["concept"])
    scratch = scratch_dir(rt.settings.concepts_dir, job["id"])
    try:
        pictures = [rt.studio.load_input(InputRef(digest, ""), "images") for digest in spec.pictures]
        trained = run_concept_job(rt.studio, spec, pictures, scratch, progress=progress)
    except SpellbookError as exc:
        remove_scratch(scratch)
        return {"error": exc.to_dict()["error"]}
    remove_scratch(scratch)
    return {"trained": trained.to_payload()}


def run_worker(settings: Settings, name: str | None = None) -> None:
    app = make_celery(settings)
    register_task(app, settings)
    hostname = name or f"spellbook-{socket.gethostname()}-{os.getpid()}"
    app.worker_main(
        argv=[
            "worker",
            "--pool=solo",  # one job group at a time, models loaded once in this process
            "--concurrency=1",
            f"--hostname={hostname}",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
        ]
    )


# --------------------------------------------------------------------------------------------- server side
def save_pngs(settings: Settings, job: Job, images: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Write the PNG bytes a worker sent back (recipe chunks included, written by provenance there) to the one
    image path; the records come from the job's own recipe, so nothing is decoded here."""
    from spellbook.provenance import write_png_bytes
    from spellbook.queue.worker import image_record

    recipe = job.recipe
    records = []
    for index, image in enumerate(images):
        path = write_png_bytes(base64.b64decode(image["png"]), settings.image_path(f"{job.id}-{index}.png"))
        records.append(image_record(settings, index, recipe.for_image(index), path, image["sha256"]))
    return records


class Dispatcher(BackgroundLoop):
    """In the server: leases job groups from the store and sends each to Celery; records results once."""

    thread_name = "spellbook-dispatcher"

    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        *,
        max_in_flight: int = 16,
    ):
        self.settings = settings
        self.queue = queue
        self.max_in_flight = max_in_flight
        self.celery = make_celery(settings)
        self.in_flight: dict[str, list[str]] = {}  # task id -> job ids
        super().__init__()

    @staticmethod
    def lease_owner(task_id: str) -> str:
        return f"celery:{task_id}"

    def recover(self) -> None:
        """After a restart: tasks sent before it are still tracked (their results are still coming)."""
        rows = self.queue.db.execute(
            "SELECT id, lease_owner FROM jobs WHERE state = 'running' AND lease_owner LIKE 'celery:%'"
        ).fetchall()
        for row in rows:
            self.in_flight.setdefault(row["lease_owner"].removeprefix("celery:"), []).append(row["id"])

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.queue.requeue_expired()
                sent = self._dispatch()
                self._collect()
            except Exception:  # the loop must survive a broker hiccup; leases make retries safe
                log.exception("dispatcher loop error")
                sent = 0
            if not sent:
                self.wake.wait(0.2)
                self.wake.clear()

    def _dispatch(self) -> int:
        sent = 0
        max_batch = self.settings.max_jobs_batch if self.settings.batching else 1
        while len(self.in_flight) < self.max_in_flight:
            task_id = uuid.uuid4().hex
            jobs = self.queue.lease(self.lease_owner(task_id), max_batch=max_batch)
            if not jobs:
                break
            if jobs[0].kind == UPSCALE_KIND:  # queued while the server ran its own worker: Celery has no such task
                message = "upscales run on the server's own worker; this server now sends jobs to Celery workers"
                self.queue.fail(jobs[0].id, {"code": "not_supported", "message": message, "field": "upscaler"})
                continue
            if jobs[0].kind == CONCEPT_KIND:
                described = [{"id": jobs[0].id, "kind": CONCEPT_KIND, "concept": jobs[0].request["concept"]}]
            else:
                described = [{"id": job.id, "recipe": job.request["recipe"]} for job in jobs]
            payload = {"jobs": described, "inputs": self._inputs(jobs), "batching": self.settings.batching}
            self.in_flight[task_id] = [job.id for job in jobs]
            self.celery.send_task(TASK, args=[payload], task_id=task_id)
            sent += 1
        return sent

    def _inputs(self, jobs: list[Job]) -> dict[str, str]:
        digests = []
        for job in jobs:
            if "concept" in job.request:  # a concept job's pictures
                digests += job.request["concept"]["pictures"]
                continue
            for key in ("init_image", "mask"):
                ref = job.request["recipe"].get(key)
                if ref:
                    digests.append(ref["sha256"])
            blend = job.request["recipe"].get("blend") or {}
            if blend.get("a") is None and blend.get("b_sha256"):  # a blend of pictures: picture B too
                digests.append(blend["b_sha256"])
        return {
            digest: base64.b64encode((self.settings.inputs_dir / f"{digest}.png").read_bytes()).decode()
            for digest in digests
        }

    def _collect(self) -> None:
        for task_id, job_ids in list(self.in_flight.items()):
            result = self.celery.AsyncResult(task_id)
            state = result.state
            if state == "SUCCESS":
                self._record(task_id, job_ids, result.result)
                result.forget()
            elif state in ("FAILURE", "REVOKED"):
                for job_id in job_ids:
                    self.queue.fail(job_id, {"code": "worker_error", "message": f"the worker failed: {result.result}"})
                del self.in_flight[task_id]
                result.forget()
            else:  # PENDING, STARTED, PROGRESS, RETRY: the task lives; keep its jobs leased
                info = result.info if state == "PROGRESS" and isinstance(result.info, dict) else {}
                fraction = info["step"] / info["total"] if info.get("total") else None
                stopped = self.queue.heartbeat(self.lease_owner(task_id), job_ids, fraction)
                if len(stopped) == len(job_ids):  # every job cancelled (or taken over): stop tracking
                    self.celery.control.revoke(task_id)
                    del self.in_flight[task_id]

    def _record(self, task_id: str, job_ids: list[str], value: dict[str, Any]) -> None:
        for job_id in job_ids:
            outcome = value["results"].get(job_id)
            if outcome is None or not self.queue.is_active(job_id):
                continue  # cancelled meanwhile, or already recorded
            if "error" in outcome:
                self.queue.fail(job_id, outcome["error"])
                continue
            if "trained" in outcome:
                self._record_concept(job_id, outcome["trained"])
                continue
            try:
                records = save_pngs(self.settings, self.queue.get(job_id), outcome["images"])
            except OSError as exc:  # an unwritable images folder, a full disk: fail once (refunded), say where
                from spellbook.errors import StorageFailed

                self.queue.fail(job_id, StorageFailed.of(exc, str(self.settings.images_dir)).to_dict()["error"])
                continue
            self.queue.complete(  # done now; the gallery outbox files the images after
                job_id, {"images": records, "batched_with": value.get("batched_with", 1), "worker": value.get("worker")}
            )
        del self.in_flight[task_id]

    def _record_concept(self, job_id: str, payload: dict[str, Any]) -> None:
        from spellbook.concepts.library import ConceptLibrary
        from spellbook.errors import SpellbookError
        from spellbook.queue.training import ConceptJobSpec, TrainedConcept, job_result, store_trained

        trained = TrainedConcept.from_payload(payload)
        spec = ConceptJobSpec.from_dict(self.queue.get(job_id).request["concept"])
        try:
            info = store_trained(ConceptLibrary(self.settings), trained, spec)
        except SpellbookError as exc:  # the name was taken meanwhile
            self.queue.fail(job_id, exc.to_dict()["error"])
            return
        self.queue.complete(job_id, job_result(info, trained))
