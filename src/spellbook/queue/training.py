"""Concept training as a queued job (kind `concept`): queued, paid, leased, shown with progress, cancelled and
recovered like a generation job, by the embedded worker and by Celery workers alike.

The job's request keeps the training settings and the pictures by hash (stored under inputs/ as init images
are). A run trains in a scratch home of its own (`concepts/.jobs/<job id>` under the running worker's home),
sharing the worker's loaded models: a run that stopped (crash, restart, redelivery to the same worker) resumes
from the checkpoint it left there, and the library only ever receives a finished concept, under a name that
was checked free when the job was queued and is checked again when the concept arrives.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from spellbook.concepts.library import ConceptInfo, ConceptLibrary
from spellbook.errors import UserError

CONCEPT_KIND = "concept"
MAX_PICTURES = 20
MAX_TRAIN_STEPS = 5000
SCRATCH = ".jobs"  # under the concepts folder, hidden from the library (it lists files only)


@dataclass(frozen=True)
class ConceptJobSpec:
    """What a `concept` job trains: stored in the job's request as JSON."""

    name: str
    model: str
    model_sha256: str
    init_word: str | None
    vectors: int
    steps: int
    seed: int
    batch_size: int | None
    pictures: tuple[str, ...]  # sha256 of each picture's pixels: SPELLBOOK_HOME/inputs/<sha256>.png
    scope: int | None = None  # whose library it joins: a user's own (their id), or the shared one (None)
    bare_word: bool = False  # whether the plain word means it too, or only `<name>`

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pictures"] = list(self.pictures)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConceptJobSpec:
        return cls(**{**data, "pictures": tuple(data["pictures"])})


def training_cost(steps: int, batch_size: int, side: int) -> int:
    """Credits, in generation's unit (2^16 pixel-steps): a training step (forward and backward over its batch
    at the model's native size) counts as three generation steps of that batch. At least 1."""
    work = 3 * steps * batch_size * side * side
    return max(1, -(-work // 65536))


@dataclass(frozen=True)
class TrainedConcept:
    name: str
    data: bytes  # the .safetensors file, as the library keeps it
    sample: bytes | None  # PNG: "a <name>", four seeds
    steps: int
    seconds: float
    final_loss: float

    def to_payload(self) -> dict[str, Any]:
        """JSON for a Celery result (bytes as base64)."""
        return {
            "name": self.name,
            "concept": base64.b64encode(self.data).decode(),
            "sample": base64.b64encode(self.sample).decode() if self.sample else None,
            "steps": self.steps,
            "seconds": self.seconds,
            "final_loss": self.final_loss,
        }

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> TrainedConcept:
        return cls(
            name=data["name"],
            data=base64.b64decode(data["concept"]),
            sample=base64.b64decode(data["sample"]) if data.get("sample") else None,
            steps=data["steps"],
            seconds=data["seconds"],
            final_loss=data["final_loss"],
        )


def scratch_dir(home_concepts: Path, job_id: str) -> Path:
    return home_concepts / SCRATCH / job_id


def run_concept_job(
    studio,
    spec: ConceptJobSpec,
    pictures: list[Image.Image],
    scratch: Path,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainedConcept:
    """Train `spec` in `scratch` (resuming the checkpoint an earlier run left there); returns the file's bytes.
    `progress(step, total, loss)` may raise (e.g. Cancelled) to stop; the checkpoint stays for a later run."""
    from spellbook.concepts.train import CHECKPOINT, TrainRequest, train_concept, training_dir
    from spellbook.studio import Studio

    # 1. The same model the job was queued for (a worker may hold another file under that name).
    components = studio.components_for(spec.model, allow_paths=False)
    if spec.model_sha256 and components.ref.sha256 != spec.model_sha256:
        raise UserError(
            f"model {spec.model!r} here (sha256 {components.ref.sha256[:12]}) is not the one this training was "
            f"queued for ({spec.model_sha256[:12]})",
            field="model",
        )
    # 2. The pictures, in order, in the scratch folder (kept there, so a resumed run checks they are the same).
    folder = scratch / "pictures"
    folder.mkdir(parents=True, exist_ok=True)
    for index, picture in enumerate(pictures):
        target = folder / f"{index:02d}.png"
        if not target.exists():
            picture.convert("RGB").save(target)
    # 3. A studio on the scratch home that shares this worker's loaded models.
    scratch_studio = Studio(studio.settings.with_(home=scratch), cache=studio.cache)
    resume = (training_dir(scratch_studio.concepts, spec.name) / CHECKPOINT).is_file()
    request = TrainRequest(
        name=spec.name,
        images=folder,
        model=spec.model,
        init_word=None if resume else spec.init_word,
        vectors=spec.vectors,
        steps=None if resume else spec.steps,
        batch_size=None if resume else spec.batch_size,
        seed=spec.seed,
        resume=resume,
        overwrite=True,  # a run that stopped after saving its concept (before it was delivered) saves it again
    )
    result = train_concept(scratch_studio, request, progress=progress)
    assert result is not None  # no stop_after: it trains to the end or raises
    path = result.info.path
    sample = path.with_suffix(".png")
    return TrainedConcept(
        name=spec.name,
        data=path.read_bytes(),
        sample=sample.read_bytes() if sample.is_file() else None,
        steps=result.steps,
        seconds=round(result.minutes * 60, 3),
        final_loss=result.final_loss,
    )


def store_trained(library: ConceptLibrary, trained: TrainedConcept, spec: ConceptJobSpec) -> ConceptInfo:
    """Put a trained concept into the library the job named (the shared one, or its owner's own) byte for byte
    (its hash is the one the worker computed); a name taken meanwhile is a Conflict."""
    from spellbook.concepts.library import upload_meta

    library = library.for_owner(spec.scope)
    with tempfile.TemporaryDirectory(prefix="spellbook-trained-") as folder:
        path = Path(folder) / f"{trained.name}.safetensors"
        path.write_bytes(trained.data)
        info = library.import_file(path, trained.name, meta=upload_meta(spec.bare_word))
    if trained.sample:
        library.sample_path(trained.name).write_bytes(trained.sample)
        info = library.info(trained.name)
    return info


def job_result(info: ConceptInfo, trained: TrainedConcept) -> dict[str, Any]:
    """What a finished `concept` job records: the concept (no server paths), the steps, time and final loss."""
    return {
        "concept": {
            "name": info.name,
            "hash": info.short_hash,
            "sha256": info.sha256,
            "vectors": info.vectors,
            "dims": info.dims,
            "trained_for": info.trained_for,
        },
        "steps": trained.steps,
        "seconds": trained.seconds,
        "final_loss": trained.final_loss,
    }


def remove_scratch(scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
