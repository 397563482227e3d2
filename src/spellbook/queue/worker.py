"""Running jobs: the executor (recipes -> PNGs with their recipe inside) and the embedded worker thread.

The executor is the same in both modes: the embedded worker calls it in-process; a Celery worker
(queue/celery.py) calls it on another machine and sends the PNG bytes back.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from spellbook.engine.pipeline import Progress, can_share_batch, generate_batch, to_pil
from spellbook.errors import Cancelled, SpellbookError
from spellbook.provenance import image_sha256, png_bytes, save_png
from spellbook.queue.jobs import Job, JobQueue
from spellbook.queue.training import CONCEPT_KIND
from spellbook.recipe import Build, Recipe
from spellbook.studio import Studio

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
    """Turns leased jobs into PNG files with their recipes, batching compatible txt2img jobs."""

    def __init__(self, studio: Studio):
        self.studio = studio

    def components_for(self, recipe: Recipe):
        return self.studio.components_for_recipe(recipe)

    def run(
        self,
        jobs: list[tuple[str, Recipe]],
        *,
        on_progress: Callable[[Progress, Any], None] | None = None,
        cancel: threading.Event | None = None,
        batching: bool = True,
    ) -> dict[str, list[Image.Image] | SpellbookError]:
        """Images per job id, or the error that job ended with (bad input is the job's fault, not the worker's)."""
        outcome: dict[str, list[Image.Image] | SpellbookError] = {}
        groups: list[list[tuple[str, Recipe]]] = []
        for job in jobs:
            for group in groups:
                if batching and can_share_batch(group[0][1], job[1]):
                    group.append(job)
                    break
            else:
                groups.append([job])
        build = Build.current(self.studio.settings.device, self.studio.settings.dtype)
        for group in groups:
            try:
                components = self.components_for(group[0][1])
                recipes = [recipe.with_(build=build) for _, recipe in group]
                progress = (lambda p, c=components: on_progress(p, c)) if on_progress else None
                if recipes[0].kind == "txt2img":
                    inputs = self.studio.inputs_for_recipe(recipes[0])  # the concepts' vectors
                    arrays = generate_batch(components, recipes, inputs, progress=progress, cancel=cancel)
                    for (job_id, _), recipe, images in zip(group, recipes, arrays):
                        outcome[job_id] = _with_recipes(to_pil(images), recipe)
                else:
                    job_id, recipe = group[0][0], recipes[0]  # image inputs: never batched
                    inputs = self.studio.inputs_for_recipe(recipe)
                    results = self.studio.run(recipe, inputs, components, progress=progress, cancel=cancel)
                    outcome[job_id] = _with_recipes([r.image for r in results], recipe)
            except Cancelled:
                raise
            except SpellbookError as exc:
                for job_id, _ in group:
                    outcome[job_id] = exc
        return outcome


def _with_recipes(images: list[Image.Image], recipe: Recipe) -> list[Image.Image]:
    for index, image in enumerate(images):
        image.info["spellbook_recipe"] = recipe.for_image(index)
    return images


def save_job_images(home: Path, job_id: str, images: list[Image.Image]) -> list[dict[str, Any]]:
    """Write a job's images under images/YYYY/MM/DD with their recipes; returns the result records."""
    day = datetime.now(UTC).strftime("%Y/%m/%d")
    folder = home / "images" / day
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index, image in enumerate(images):
        recipe: Recipe = image.info["spellbook_recipe"]
        path = folder / f"{job_id}-{index}.png"
        save_png(image, path, recipe)
        records.append(
            {
                "index": index,
                "seed": recipe.image_seed,
                "path": str(path.relative_to(home)),
                "sha256": image_sha256(image),
            }
        )
    return records


def encode_png(image: Image.Image) -> str:
    """Base64 PNG with the recipe chunks, as a remote worker sends it back."""
    return base64.b64encode(png_bytes(image, image.info["spellbook_recipe"])).decode()


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
        on_images: Callable[[Job, list[dict]], None] | None = None,
    ):
        self.studio = studio
        self.queue = queue
        self.executor = Executor(studio)
        self.batching = batching
        self.max_batch = max_batch if batching else 1
        self.on_images = on_images
        self.id = f"embedded:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.live: dict[str, JobProgress] = {}
        super().__init__()

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
            beat_stop.set()
            beater.join()

    def run_jobs(self, jobs: list[Job]) -> None:
        if jobs[0].kind == CONCEPT_KIND:  # never batched: a concept job is leased alone
            self.run_training(jobs[0])
            return
        ids = [job.id for job in jobs]
        last_preview = [0.0]

        def on_progress(progress: Progress, components) -> None:
            now = time.time()
            for job_id in ids:
                live = self.live[job_id]
                live.step, live.total, live.updated = progress.step, progress.total, now
            if now - last_preview[0] > 0.5 or progress.step == progress.total:
                last_preview[0] = now
                preview = preview_png(components, progress.latents)
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
            records = save_job_images(self.studio.settings.home, job.id, result)
            if self.on_images:
                self.on_images(job, records)
            self.queue.complete(job.id, {"images": records, "batched_with": len(jobs)})
        for job_id in ids:
            self.live.pop(job_id, None)

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
                    info = store_trained(self.studio.concepts, trained) if self.queue.is_active(job.id) else None
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
