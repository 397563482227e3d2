"""The AUTOMATIC1111-compatible API, /sdapi/v1: the request and response shapes A1111 clients expect.

Jobs go through the same queue as native ones (credits, fairness, batching); these endpoints wait for the
job to finish, as A1111's do. Unsupported A1111 features asked for explicitly (hires fix, face restore,
tiling, variation seeds, scripts) are a 400 naming the field, never silently ignored; their "off" values,
which every client sends, are accepted.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from spellbook import __version__
from spellbook.errors import Conflict, Forbidden, SpellbookError, UserError
from spellbook.infotext import parse_infotext, read_png_text
from spellbook.queue.jobs import Idempotency, Job
from spellbook.recipe import SAMPLERS, SCHEDULES, ImageRequest, Recipe
from spellbook.server.app import Caller, Services, services_of
from spellbook.server.native import IdempotencyKey, submit
from spellbook.server.security import Principal, decode_image

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])


class A1111Request(BaseModel):
    # A1111 clients send many optional fields (styles, eta, s_churn, …); unknown ones are accepted and ignored.
    model_config = ConfigDict(extra="allow")

    prompt: str = Field("", max_length=20_000)
    negative_prompt: str = Field("", max_length=20_000)
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=1000)
    n_iter: int = Field(1, ge=1, le=1000)
    steps: int | None = Field(None, ge=1, le=10_000)
    cfg_scale: float = Field(7.0, ge=0, le=100)
    width: int | None = Field(None, ge=8, le=16_384, description="default: the model's native size")
    height: int | None = Field(None, ge=8, le=16_384, description="default: the model's native size")
    denoising_strength: float | None = Field(None, ge=0, le=1)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    enable_hr: bool = False
    restore_faces: bool | None = False
    tiling: bool | None = False
    subseed_strength: float = 0.0
    script_name: str | None = None
    # img2img
    init_images: list[str] | None = None
    mask: str | None = None
    inpainting_mask_invert: int = 0


def _unsupported(body: A1111Request) -> None:
    for field, value in (
        ("enable_hr", body.enable_hr),
        ("restore_faces", body.restore_faces),
        ("tiling", body.tiling),
        ("subseed_strength", body.subseed_strength),
        ("script_name", body.script_name),
    ):
        if value:
            raise UserError(f"{field} is not supported by Spellbook's A1111-compatible API", field=field)


def _model(services: Services, body: A1111Request) -> str:
    name = body.override_settings.get("sd_model_checkpoint") or services.default_model
    return _title_to_name(str(name))


def _title_to_name(title: str) -> str:
    """A1111 titles are 'name [hash]' (sometimes 'name.safetensors [hash]')."""
    name = title.split(" [")[0].strip()
    for suffix in (".safetensors", ".ckpt"):
        name = name.removesuffix(suffix)
    return name


def to_request(services: Services, body: A1111Request, kind: str) -> ImageRequest:
    """The A1111 adapter: A1111's field names end here (cfg_scale -> guidance, scheduler -> schedule, …)."""
    _unsupported(body)
    max_pixels = services.settings.max_pixels
    request = ImageRequest(
        kind=kind,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        model=_model(services, body),
        sampler=body.sampler_name or body.sampler_index,
        schedule=body.scheduler,
        steps=body.steps,
        guidance=body.cfg_scale,
        seed=None if body.seed == -1 else body.seed,
        batch_size=body.batch_size * body.n_iter,
        width=body.width,
        height=body.height,
        clip_skip=body.override_settings.get("CLIP_stop_at_last_layers"),
    )
    if kind == "txt2img":
        return request
    mask = decode_image(body.mask, "mask", max_pixels) if body.mask else None
    if mask is not None and body.inpainting_mask_invert:
        from PIL import ImageOps

        mask = ImageOps.invert(mask.convert("L"))
    return request.with_(
        init_image=decode_image(body.init_images[0], "init_images", max_pixels),
        mask=mask,
        strength=body.denoising_strength if body.denoising_strength is not None else 0.75,
    )


# Our field names -> A1111's, so an error names the field the client sent.
_A1111_FIELDS = {
    "guidance": "cfg_scale",
    "schedule": "scheduler",
    "sampler": "sampler_name",
    "init_image": "init_images",
    "strength": "denoising_strength",
    "size": "width",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers",
    "model": "override_settings.sd_model_checkpoint",
}


def _run(
    services: Services, who: Principal, body: A1111Request, kind: str, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Queue the job and wait for it, as A1111's endpoints do (in the thread pool: the event loop stays free).
    A client that retries with the same Idempotency-Key waits for the job it already paid for."""
    try:
        idempotency = Idempotency.of(idempotency_key, body.model_dump_json())
        job = submit(services, who, to_request(services, body, kind), idempotency)
    except SpellbookError as error:
        error.field = _A1111_FIELDS.get(error.field or "", error.field)
        raise
    job = services.wait_final(job.id)
    if job.state != "done":
        error = job.error or {"code": job.state, "message": f"the job was {job.state}"}
        raise SpellbookError(error.get("message", job.state), field=error.get("field"))
    return _response(services, job, body)


def _response(services: Services, job: Job, body: A1111Request) -> dict[str, Any]:
    images, infotexts, seeds = [], [], []
    for record in job.result["images"]:
        path = services.settings.home / record["path"]
        images.append(base64.b64encode(path.read_bytes()).decode())
        infotexts.append(read_png_text(path).get("parameters", ""))
        seeds.append(record["seed"])
    recipe: Recipe = job.recipe
    info = {
        "prompt": recipe.prompt,
        "all_prompts": [recipe.prompt] * len(images),
        "negative_prompt": recipe.negative_prompt,
        "all_negative_prompts": [recipe.negative_prompt] * len(images),
        "seed": recipe.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(images),
        "subseed_strength": 0,
        "width": recipe.width,
        "height": recipe.height,
        "sampler_name": recipe.sampler,
        "scheduler": recipe.schedule,
        "cfg_scale": recipe.guidance,
        "steps": recipe.steps,
        "batch_size": recipe.batch_size,
        "restore_faces": False,
        "sd_model_name": recipe.model.name,
        "sd_model_hash": recipe.model.sha256[:10],
        "denoising_strength": recipe.strength,
        "clip_skip": recipe.clip_skip,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": str(int(job.created)),
        "version": f"spellbook {__version__}",
        "spellbook_job": job.id,
    }
    return {"images": images, "parameters": body.model_dump(exclude={"init_images", "mask"}), "info": json.dumps(info)}


@router.post("/txt2img")
def txt2img(
    body: A1111Request, request: Request, who: Caller, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    return _run(services_of(request), who, body, "txt2img", idempotency_key)


@router.post("/img2img")
def img2img(
    body: A1111Request, request: Request, who: Caller, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    if not body.init_images:
        raise UserError("img2img needs init_images: a list with one base64 image", field="init_images")
    return _run(services_of(request), who, body, "inpaint" if body.mask else "img2img", idempotency_key)


@router.get("/options")
def get_options(request: Request, _who: Caller) -> dict[str, Any]:
    services = services_of(request)
    return {
        "sd_model_checkpoint": _title(services, services.default_model),
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "sd_checkpoint_hash": _hash(services, services.default_model),
    }


@router.post("/options")
def set_options(options: dict[str, Any], request: Request, who: Caller) -> dict[str, Any]:
    """Only `sd_model_checkpoint` (the server's default model, kept across restarts; admin only when auth is on)
    can be set. Everything is checked before anything changes."""
    services = services_of(request)
    unknown = sorted(set(options) - {"sd_model_checkpoint", "CLIP_stop_at_last_layers", "samples_format"})
    if unknown:
        raise UserError(f"option {unknown[0]!r} cannot be set on Spellbook", field=unknown[0])
    if "sd_model_checkpoint" in options:
        if not who.admin:
            raise Forbidden("only an admin can change the server's default model", field="sd_model_checkpoint")
        name = _title_to_name(str(options["sd_model_checkpoint"]))
        try:
            services.studio.model_info(name, allow_paths=False)
        except SpellbookError as error:
            error.field = "sd_model_checkpoint"
            raise
        services.set_default_model(name)
    return {}


def _hash(services: Services, name: str) -> str:
    registry = services.studio.cache.registry
    try:
        return registry.sha256(registry.resolve(name, allow_paths=False))
    except SpellbookError:
        return ""


def _title(services: Services, name: str) -> str:
    digest = _hash(services, name)
    return f"{name} [{digest[:10]}]" if digest else name


@router.get("/sd-models")
def sd_models(request: Request, _who: Caller) -> list[dict[str, Any]]:
    services = services_of(request)
    registry = services.studio.cache.registry
    out = []
    for entry in registry.list():
        digest = registry.sha256(entry)
        out.append(
            {
                "title": f"{entry.name} [{digest[:10]}]",
                "model_name": entry.name,
                "hash": digest[:10],
                "sha256": digest,
                "filename": entry.name,
                "config": None,
            }
        )
    return out


@router.get("/samplers")
def samplers(_who: Caller) -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [], "options": {}} for name in SAMPLERS]


@router.get("/schedulers")
def schedulers(_who: Caller) -> list[dict[str, Any]]:
    return [{"name": s.lower(), "label": s, "aliases": None} for s in SCHEDULES]


@router.get("/scripts")
def scripts(_who: Caller) -> dict[str, list]:
    return {"txt2img": [], "img2img": []}


@router.get("/embeddings")
def embeddings(request: Request, who: Caller) -> dict[str, Any]:
    """The concept library in A1111's shape: `loaded` are the concepts the default model can use (their width
    matches its text encoder), `skipped` the others (made for another model family, or unreadable)."""
    services = services_of(request)
    width = _text_width(services)
    loaded: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    for info in services.studio.concepts.for_owner(who.concepts_of).list():
        step = info.metadata.get("step")
        entry = {
            "step": int(step) if step and step.isdigit() else None,
            "sd_checkpoint": info.metadata.get("sd_checkpoint") or None,
            "sd_checkpoint_name": info.trained_for,
            "shape": info.dims,
            "vectors": info.vectors,
        }
        usable = info.dims is not None and (width is None or info.dims == width)
        (loaded if usable else skipped)[info.name] = entry
    return {"loaded": loaded, "skipped": skipped}


def _text_width(services: Services) -> int | None:
    """The default model's token-embedding width from its folder's text-encoder config; None if not a folder."""
    try:
        entry = services.studio.cache.registry.resolve(services.default_model, allow_paths=False)
        config = json.loads((entry.path / "text_encoder" / "config.json").read_text())
        return int(config["hidden_size"])
    except (SpellbookError, OSError, ValueError, KeyError, TypeError):
        return None


@router.get("/progress")
def progress(request: Request, who: Caller) -> dict[str, Any]:
    services = services_of(request)
    running = [
        j for j in services.queue.list(owner=who.id, all_users=who.user is None, limit=50) if j.state == "running"
    ]
    queued = [j for j in services.queue.list(owner=who.id, all_users=who.user is None, limit=50) if j.state == "queued"]
    state = {
        "skipped": False,
        "interrupted": False,
        "job": "",
        "job_count": len(running) + len(queued),
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    current, fraction = None, 0.0
    if running:
        job = running[0]
        live = services.live(job.id)
        fraction = job.progress
        state["job"] = job.id
        if live is not None and live.total:
            fraction = live.step / live.total
            state.update(sampling_step=live.step, sampling_steps=live.total)
            if live.preview:
                current = base64.b64encode(live.preview).decode()
    return {
        "progress": round(fraction, 4),
        "eta_relative": 0.0,
        "state": state,
        "current_image": current,
        "textinfo": None,
    }


@router.post("/interrupt")
def interrupt(request: Request, who: Caller) -> dict[str, Any]:
    """Cancel the caller's running jobs (all running jobs for the local user)."""
    services = services_of(request)
    for job in services.queue.list(owner=who.id, all_users=who.user is None, limit=200):
        if job.state == "running":
            try:
                services.queue.cancel(job.id, viewer=who.id, admin=who.admin)
            except Conflict:
                pass  # it finished meanwhile
    return {}


class PngInfoRequest(BaseModel):
    image: str


@router.post("/png-info")
def png_info(body: PngInfoRequest, request: Request, _who: Caller) -> dict[str, Any]:
    """The text chunks of a PNG and its A1111 parameters, parsed (ours, A1111's and ComfyUI's images)."""
    image = decode_image(body.image, "image", services_of(request).settings.max_pixels)
    chunks = read_png_text(image)
    text = chunks.get("parameters", "")
    parameters: dict[str, Any] = {}
    if text:
        prompt, negative, params = parse_infotext(text)
        parameters = {"Prompt": prompt, "Negative prompt": negative, **params}
    return {"info": text, "items": chunks, "parameters": parameters}
