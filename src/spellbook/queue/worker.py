"""Running jobs: the executor (recipes -> PNGs with their recipe inside) and the embedded worker thread.

The executor is the same in both modes: the embedded worker calls it in-process; a Celery worker
(queue/celery.py) calls it on another machine and sends the PNG bytes back.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from spellbook.engine.pipeline import can_share_batch, generate, to_pil
from spellbook.errors import Cancelled, SpellbookError, StorageFailed, UserError
from spellbook.provenance import Result, write_result
from spellbook.queue.jobs import Job, JobQueue
from spellbook.queue.training import CONCEPT_KIND
from spellbook.recipe import Recipe
from spellbook.settings import Settings
from spellbook.studio import Studio
from spellbook.upscale import UPSCALE_KIND

if TYPE_CHECKING:
    from spellbook.queue.filer import GalleryFiler

log = logging.getLogger("spellbook.worker")


@dataclass
class JobProgress:
    """Live state of a running job, for SSE: step counts and the latest preview (PNG bytes)."""

    step: int = 0
    total: int = 0
    preview: bytes | None = None
    updated: float = field(default_factory=time.time)


def preview_png(components, latents, max_side: int = 64) -> bytes:
    """A small picture of the current latents: the VAE decode for small latents, else a linear approximation."""
    import numpy as np
    import torch

    with torch.inference_mode():
        latent = latents[:1].float()
        if latent.shape[-1] * latent.shape[-2] <= 32 * 32:
            decoded = components.vae.decode(latent / components.vae.config.scaling_factor).sample
            array = ((decoded[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        else:  # SD 1.x latent -> RGB factors (the widely used cheap approximation)
            factors = torch.tensor(
                [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
            )
            rgb = torch.einsum("chw,cr->hwr", latent[0, :4], factors)
            array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    image = Image.fromarray(np.ascontiguousarray(array))
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Executor:
    """Turns leased jobs' recipes into Results (pixels + recipe), batching compatible txt2img jobs into one
    forward pass. The same in both modes: the embedded worker writes the results here, a Celery worker sends
    them back as PNG bytes."""

    def __init__(self, studio: Studio):
        self.studio = studio

    def run(
        self,
        jobs: list[tuple[str, Recipe]],
        *,
        on_progress: Callable[[int, int, Any, Any], None] | None = None,  # (step, total, latents, components)
        cancel: threading.Event | None = None,
        batching: bool = True,
    ) -> dict[str, list[Result] | SpellbookError]:
        """Results per job id, or the error that job ended with (bad input is the job's fault, not the worker's)."""
        outcome: dict[str, list[Result] | SpellbookError] = {}
        groups: list[list[tuple[str, Recipe]]] = []
        for job in jobs:
            for group in groups:
                if batching and can_share_batch(group[0][1], job[1]):
                    group.append(job)
                    break
            else:
                groups.append([job])
        build = self.studio.build()
        for group in groups:
            try:
                components = self.studio.components_for_recipe(group[0][1])
                recipes = [recipe.with_(build=build) for _, recipe in group]
                on_step = None
                if on_progress is not None:

                    def on_step(step: int, total: int, latents, c=components) -> None:
                        on_progress(step, total, latents, c)

                inputs = self.studio.inputs_for_recipe(recipes[0])  # image inputs and concept vectors
                arrays = generate(components, recipes, inputs, on_step=on_step, cancel=cancel)
                for (job_id, _), recipe, images in zip(group, recipes, arrays, strict=True):
                    outcome[job_id] = [
                        Result(image, recipe.for_image(i), job_id=job_id) for i, image in enumerate(to_pil(images))
                    ]
            except Cancelled:
                raise
            except SpellbookError as exc:
                for job_id, _ in group:
                    outcome[job_id] = exc
        return outcome


def image_record(settings: Settings, index: int, recipe: Recipe, path: Path, sha256: str) -> dict[str, Any]:
    """How a job's result lists one written image (the embedded worker's and the Celery dispatcher's alike)."""
    return {
        "index": index,
        "seed": recipe.image_seed,
        "path": path.relative_to(settings.home).as_posix(),
        "sha256": sha256,
    }


def write_job_results(settings: Settings, job: Job, results: list[Result]) -> list[Result]:
    """A job's images, written by the one writer to the one image path, owned by the job's owner."""
    return [
        write_result(replace(result, owner=job.owner, job_id=job.id), settings.image_path(f"{job.id}-{i}.png"))
        for i, result in enumerate(results)
    ]


class BackgroundLoop:
    """A daemon thread running `_loop` after `recover()`; `wake` cuts its idle wait short, `stop` ends it."""

    thread_name = "spellbook-loop"

    def __init__(self) -> None:
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def recover(self) -> object:
        return None

    def _loop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread:
            self._thread.join(timeout)


class EmbeddedWorker(BackgroundLoop):
    """A thread in the server process that leases jobs from the store and runs them."""

    thread_name = "spellbook-worker"

    def __init__(
        self,
        studio: Studio,
        queue: JobQueue,
        *,
        batching: bool = True,
        max_batch: int = 8,
        filer: GalleryFiler | None = None,
    ):
        self.studio = studio
        self.queue = queue
        self.executor = Executor(studio)
        self.batching = batching
        self.max_batch = max_batch if batching else 1
        self.filer = filer
        self.id = f"embedded:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.live: dict[str, JobProgress] = {}
        self._running: set[threading.Event] = set()  # the cancel events of the jobs running now
        super().__init__()

    def stop(self, timeout: float = 10) -> None:
        """Stop taking jobs and stop the running ones at their next step: they keep their lease in the store and
        run again after a restart (recover), and the process never exits with a thread inside torch (which
        aborts the interpreter)."""
        self._stop.set()
        for cancel in list(self._running):
            cancel.set()
        super().stop(timeout)

    def recover(self) -> int:
        """Jobs an earlier embedded worker was running when its process died go back to the queue now."""
        with self.queue.db.transaction() as conn:
            moved = conn.execute(
                "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires = NULL, progress = 0 "
                "WHERE state = 'running' AND lease_owner LIKE 'embedded:%' AND lease_owner != ?",
                (self.id,),
            )
        return moved.rowcount

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.queue.requeue_expired()
                jobs = self.queue.lease(self.id, max_batch=self.max_batch)
                if not jobs:
                    self.wake.wait(0.5)
                    self.wake.clear()
                    continue
                self.run_jobs(jobs)
            except Exception:  # a bug must not stop the queue; the job's lease expiry retries it
                log.exception("worker loop error")
                time.sleep(1)

    @contextmanager
    def _leased(self, ids: list[str]) -> Iterator[threading.Event]:
        """While the jobs run: their live progress, and a heartbeat that renews their lease (with the progress)
        and sets the yielded event once every one of them was cancelled."""
        cancel = threading.Event()
        if self._stop.is_set():
            cancel.set()
        self._running.add(cancel)
        for job_id in ids:
            self.live[job_id] = JobProgress()
        beat_stop = threading.Event()

        def beat() -> None:
            while not beat_stop.wait(max(0.5, self.queue.lease_seconds / 4)):
                live = self.live.get(ids[0])
                fraction = live.step / live.total if live and live.total else None
                stopped = self.queue.heartbeat(self.id, ids, fraction)
                if stopped and len(stopped) == len(ids):
                    cancel.set()  # every job of the group was cancelled: stop computing

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        try:
            yield cancel
        finally:
            self._running.discard(cancel)
            beat_stop.set()
            beater.join()

    def run_jobs(self, jobs: list[Job]) -> None:
        if jobs[0].kind == CONCEPT_KIND:  # never batched: a concept job is leased alone
            self.run_training(jobs[0])
            return
        if jobs[0].kind == UPSCALE_KIND:  # likewise
            self.run_upscale(jobs[0])
            return
        ids = [job.id for job in jobs]
        last_preview = [0.0]

        def on_progress(step: int, total: int, latents, components) -> None:
            now = time.time()
            for job_id in ids:
                live = self.live[job_id]
                live.step, live.total, live.updated = step, total, now
            if now - last_preview[0] > 0.5 or step == total:
                last_preview[0] = now
                preview = preview_png(components, latents)
                for job_id in ids:
                    self.live[job_id].preview = preview

        with self._leased(ids) as cancel:
            try:
                outcome = self.executor.run(
                    [(job.id, job.recipe) for job in jobs],
                    on_progress=on_progress,
                    cancel=cancel,
                    batching=self.batching,
                )
            except Cancelled:
                outcome = {}
        for job in jobs:
            result = outcome.get(job.id)
            if result is None:
                continue  # cancelled: the cancel already recorded the state and the refund
            if isinstance(result, SpellbookError):
                self.queue.fail(job.id, result.to_dict()["error"])
                continue
            if not self.queue.is_active(job.id):
                continue  # cancelled while running
            settings = self.studio.settings
            try:
                written = write_job_results(settings, job, result)
            except OSError as exc:  # an unwritable images folder, a full disk: fail once (refunded), say where
                self.queue.fail(job.id, StorageFailed.of(exc, str(settings.images_dir)).to_dict()["error"])
                continue
            records = [image_record(settings, i, r.recipe, r.path, r.sha256) for i, r in enumerate(written)]
            # Done as soon as the PNGs are durable; the gallery files them after (the outbox).
            if self.queue.complete(job.id, {"images": records, "batched_with": len(jobs)}) and self.filer:
                self.filer.hand_over(job.id, written)
        for job_id in ids:
            self.live.pop(job_id, None)

    def run_upscale(self, job: Job) -> None:
        """An `upscale` job: the stored source picture enlarged by a resampler or a model from the upscalers
        folder (the file the job was planned with: its hash is checked), written as one PNG."""
        from spellbook.provenance import image_sha256, write_png_bytes
        from spellbook.recipe import InputRef
        from spellbook.upscale import resolve_upscaler, upscale_image, upscaled_png

        spec = job.request["upscale"]
        settings = self.studio.settings
        with self._leased([job.id]):
            try:
                picture = self.studio.load_input(InputRef(spec["source"], ""), "image")
                upscaler = resolve_upscaler(spec["upscaler"], settings.upscalers_dir, allow_paths=False)
                if spec.get("upscaler_sha256") and getattr(upscaler, "sha256", None) != spec["upscaler_sha256"]:
                    raise UserError(f"upscaler {spec['upscaler']!r} has changed since the job was queued",
                                    field="upscaler")  # fmt: skip
                result = upscale_image(picture, spec["scale"], upscaler, tile=spec.get("tile", 256))
            except SpellbookError as exc:
                self.queue.fail(job.id, exc.to_dict()["error"])
                return
        if not self.queue.is_active(job.id):
            return  # cancelled meanwhile
        path = settings.image_path(f"{job.id}-0.png")
        try:
            record = {key: value for key, value in spec.items() if key != "parameters"}
            write_png_bytes(upscaled_png(result, {"parameters": spec.get("parameters")}, record), path)
        except OSError as exc:
            self.queue.fail(job.id, StorageFailed.of(exc, str(settings.images_dir)).to_dict()["error"])
            return
        written = {"index": 0, "seed": None, "path": path.relative_to(settings.home).as_posix(),
                   "sha256": image_sha256(result)}  # fmt: skip
        self.queue.complete(job.id, {"images": [written], "batched_with": 1})  # the outbox files it from disk

    def run_training(self, job: Job) -> None:
        """A `concept` job: train in the job's scratch folder (resuming a checkpoint an earlier run of this job
        left), then put the concept into the library. Cancel stops it at the next step."""
        from spellbook.queue.training import (
            ConceptJobSpec,
            job_result,
            remove_scratch,
            run_concept_job,
            scratch_dir,
            store_trained,
        )
        from spellbook.recipe import InputRef

        spec = ConceptJobSpec.from_dict(job.request["concept"])
        scratch = scratch_dir(self.studio.settings.concepts_dir, job.id)
        try:
            with self._leased([job.id]) as cancel:
                live = self.live[job.id]
                live.total = spec.steps  # step 0 of N while the model loads

                def on_step(step: int, total: int, _loss: float) -> None:
                    live.step, live.total, live.updated = step, total, time.time()
                    if cancel.is_set():
                        raise Cancelled("the training was cancelled", field="job_id")

                try:
                    pictures = [self.studio.load_input(InputRef(digest, ""), "images") for digest in spec.pictures]
                    trained = run_concept_job(self.studio, spec, pictures, scratch, progress=on_step)
                    info = store_trained(self.studio.concepts, trained, spec) if self.queue.is_active(job.id) else None
                except Cancelled:
                    return  # the cancel recorded the state and the refund
                except SpellbookError as exc:
                    self.queue.fail(job.id, exc.to_dict()["error"])
                    return
            if info is not None:
                self.queue.complete(job.id, job_result(info, trained))
        finally:
            self.live.pop(job.id, None)
            if not self.queue.is_active(job.id):  # ended (done, failed, cancelled): the checkpoint is of no use
                remove_scratch(scratch)
