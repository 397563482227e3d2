"""Spellbook's native API, /api/v1: jobs (submit, status, cancel, results, SSE progress), models, me."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path as Path_
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from spellbook import __version__
from spellbook.errors import NotFound, SpellbookError, UserError
from spellbook.models.info import DEFAULTS_FILE
from spellbook.models.registry import ModelEntry
from spellbook.queue.jobs import FINAL, Idempotency, Job
from spellbook.recipe import SAMPLERS, SCHEDULES, ImageRequest, Recipe
from spellbook.server.app import Caller, Services, services_of
from spellbook.server.security import Principal, authenticate, decode_image

router = APIRouter(prefix="/api/v1", tags=["native"])
JobId = Annotated[str, Path(min_length=1, max_length=64, description="job id")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="any unique string (e.g. a UUID): a retry with the same key and body gets the same job, paid once",
    ),
]
ImageIndex = Annotated[int, Path(ge=0, le=100_000)]


class HiresRequest(BaseModel):
    """A1111's hires fix: txt2img at the job's size, upscaled (`scale`, or `width`/`height`) and drawn again."""

    model_config = ConfigDict(extra="forbid")

    scale: float | None = Field(None, ge=1, le=8, description="e.g. 2: twice the width and height")
    width: int | None = Field(None, ge=8, le=16_384, description="instead of scale (one side alone keeps the ratio)")
    height: int | None = Field(None, ge=8, le=16_384)
    upscaler: str | None = Field(None, max_length=60, description="'Latent' (default), another latent mode, 'Lanczos'")
    steps: int | None = Field(None, ge=0, le=10_000, description="second-pass steps; 0 or unset: the job's")
    denoise: float | None = Field(None, gt=0, le=1, description="how much the second pass changes (default 0.7)")
    prompt: str | None = Field(None, max_length=20_000, description="unset: the job's prompt")
    negative_prompt: str | None = Field(None, max_length=20_000)


class JobRequest(BaseModel):
    """A generation job. Unset fields take the model's defaults (spellbook.json of the model)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["txt2img", "img2img", "inpaint"] = "txt2img"
    prompt: str = Field(max_length=20_000, description="A1111 prompt syntax: (word:1.2), [word], BREAK")
    negative_prompt: str = Field("", max_length=20_000)
    model: str | None = Field(None, max_length=200, description="a model name from GET /api/v1/models")
    vae: str | None = Field(None, max_length=200)
    sampler: str | None = Field(None, max_length=60, description="an A1111 sampler name, e.g. 'DPM++ 2M Karras'")
    schedule: str | None = Field(None, max_length=30)
    steps: int | None = Field(None, ge=1, le=10_000)
    guidance: float | None = Field(None, ge=0, le=100, description="CFG scale")
    seed: int | None = Field(None, ge=-1, le=2**32 - 1, description="-1 or unset: random, recorded")
    batch_size: int | None = Field(None, ge=1, le=1000)
    width: int | None = Field(None, ge=8, le=16_384)
    height: int | None = Field(None, ge=8, le=16_384)
    strength: float | None = Field(None, ge=0, le=1)
    clip_skip: int | None = Field(None, ge=1, le=12)
    styles: list[str] = Field(default_factory=list, max_length=20, description="styles from the library, in order")
    subseed: int | None = Field(None, ge=-1, le=2**32 - 1, description="variation seed (-1/unset: random)")
    subseed_strength: float | None = Field(None, ge=0, le=1, description="variation strength (txt2img)")
    seed_resize_from_w: int | None = Field(None, ge=-1, le=16_384, description="A1111's resize seed from (txt2img)")
    seed_resize_from_h: int | None = Field(None, ge=-1, le=16_384)
    hires: HiresRequest | None = Field(None, description="txt2img: a hires-fix second pass at a larger size")
    init_image: str | None = Field(None, description="img2img/inpaint: base64 PNG/JPEG (or a data: URL)")
    mask: str | None = Field(None, description="inpaint: base64 mask, white = repaint")

    def to_request(self, max_pixels: int) -> ImageRequest:
        """The native API's adapter: this body as an ImageRequest (images decoded under the pixel cap)."""
        fields = self.model_dump(exclude={"init_image", "mask"})
        return ImageRequest.from_dict(fields).with_(
            init_image=decode_image(self.init_image, "init_image", max_pixels) if self.init_image else None,
            mask=decode_image(self.mask, "mask", max_pixels) if self.mask else None,
        )


def submit(
    services: Services,
    who: Principal,
    request: ImageRequest | None,
    idempotency: Idempotency | None = None,
    *,
    extra: dict[str, Any] | None = None,
    recipe: Recipe | None = None,
) -> Job:
    """Validate (model metadata only: the API process never loads weights), pay, queue: every API's jobs. A
    retry with the same Idempotency-Key gets the job it already paid for, in whatever state it is. `extra` is
    kept beside the recipe in the job's request (the ComfyUI API keeps its graph there). `recipe` instead of a
    request: one made otherwise (a blend, from two gallery images' recipes)."""
    services.limiter.check(who.name)
    if idempotency is not None and (earlier := services.queue.find_idempotent(who.id, idempotency)) is not None:
        return earlier
    if recipe is None:
        if request.model is None:
            request = request.with_(model=services.default_model)
        recipe = services.studio.plan(request, allow_paths=False, concepts_of=who.concepts_of)
    job = services.queue.submit(recipe, owner=who.id, idempotency=idempotency, extra=extra)
    services.wake()
    return job


def job_view(services: Services, job: Job) -> dict[str, Any]:
    view = job.public()
    live = services.live(job.id)
    if live is not None and job.state == "running":
        view["step"], view["total_steps"] = live.step, live.total
    if job.result and job.result.get("images"):
        view["images"] = [f"/api/v1/jobs/{job.id}/images/{img['index']}" for img in job.result["images"]]
        # Gallery ids once the outbox has filed the images (null until then: filing runs after completion).
        filed = dict(services.db.execute("SELECT path, id FROM images WHERE job_id = ?", (job.id,)).fetchall())
        view["result"] = {
            **job.result,
            "images": [{**img, "image_id": filed.get(img["path"])} for img in job.result["images"]],
        }
    return view


@router.get("", tags=["meta"])
def index(request: Request) -> dict[str, Any]:
    """What this API offers: each resource with its URL, the OpenAPI schema and its interactive docs."""
    routes = sorted(path for path in request.app.openapi()["paths"] if path.startswith(("/api/v1/", "/sdapi/v1/")))
    return {
        "name": "Spellbook",
        "version": __version__,
        "docs": "/docs",
        "openapi": "/openapi.json",
        "resources": {
            "health": "/api/v1/health",
            "jobs": "/api/v1/jobs",
            "grids": "/api/v1/grids",
            "models": "/api/v1/models",
            "samplers": "/api/v1/samplers",
            "me": "/api/v1/me",
            "gallery": "/api/v1/gallery/search",
            "feed": "/api/v1/gallery/feed",
            "concepts": "/api/v1/concepts",
            "a1111": "/sdapi/v1/txt2img",
        },
        "routes": routes,
    }


@router.get("/health", tags=["meta"])
def health(request: Request) -> dict[str, Any]:
    """Liveness for anyone; with auth on, the mode and the queue's counts only for a caller with a valid token."""
    services = services_of(request)
    if services.auth:
        # Tokens only: a password here would be one more place to guess it.
        bearer = request.headers.get("authorization", "").lower().startswith("bearer ")
        try:
            if not (bearer or request.cookies.get("spellbook_token")):
                return {"ok": True, "version": __version__}
            authenticate(request, services.accounts, required=True)
        except SpellbookError:
            return {"ok": True, "version": __version__}
    mode = "scale-out" if services.dispatcher else "embedded"
    return {"ok": True, "version": __version__, "mode": mode, "auth": services.auth, "jobs": services.queue.counts()}


@router.post("/jobs", status_code=202)
def create_job(
    body: JobRequest, request: Request, who: Caller, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    """Queue a job; pays its cost in credits now (refunded if it fails or is cancelled). Send an
    Idempotency-Key to retry safely: the same key and body give the same job, paid once."""
    services = services_of(request)
    idempotency = Idempotency.of(idempotency_key, body.model_dump_json())
    return job_view(services, submit(services, who, body.to_request(services.settings.max_pixels), idempotency))


class BlendRequest(BaseModel):
    """A picture between two gallery images, made from their recipes (see `spellbook blend`)."""

    model_config = ConfigDict(extra="forbid")

    a: int = Field(ge=1, le=2**62, description="the gallery image id of picture A (t = 0)")
    b: int = Field(ge=1, le=2**62, description="the gallery image id of picture B (t = 1)")
    t: float = Field(0.5, ge=0, le=1, description="where between them: 0 is A, 1 is B")
    # Given a prompt, the pictures themselves are blended (their latents slerped, drawn again as img2img): for
    # pictures whose recipes cannot be blended, or that have none.
    prompt: str | None = Field(None, max_length=20_000, description="blend the pictures themselves, under this")
    negative_prompt: str | None = Field(None, max_length=20_000)
    strength: float | None = Field(None, gt=0, le=1, description="with prompt: how much is drawn again (0.6)")
    seed: int | None = Field(None, ge=-1, le=2**32 - 1)
    steps: int | None = Field(None, ge=1, le=10_000)
    guidance: float | None = Field(None, ge=0, le=100)
    model: str | None = Field(None, max_length=200)


@router.post("/blends", status_code=202)
def create_blend(
    body: BlendRequest, request: Request, who: Caller, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    """Queue a blend: one job whose picture lies at `t` between two gallery images the caller may see, their
    noises slerped and their prompts' encodings interpolated (t 0 and 1 draw them again). Both must carry
    Spellbook recipes of one model, size, sampler and step count. Paid and followed like any job."""
    from spellbook import gallery
    from spellbook.recipe import make_blend

    services = services_of(request)
    idempotency = Idempotency.of(idempotency_key, body.model_dump_json())
    settings = body.model_dump(exclude={"a", "b", "t", "prompt"}, exclude_none=True)
    if body.prompt is None:
        if settings:
            name = next(iter(settings))
            raise UserError(f"{name} needs prompt (a blend of the pictures themselves); a blend by their recipes "
                            "takes every setting from them", field=name)  # fmt: skip
    else:
        from spellbook.provenance import open_image

        pictures = []
        for key in ("a", "b"):
            try:
                details = gallery.show(services.db, getattr(body, key), viewer=who.id)
            except NotFound as error:
                raise NotFound(error.message, field=key) from None
            pictures.append(open_image(Path_(details.image.path), key, services.settings.max_pixels))
        picture_request = ImageRequest.from_dict({**settings, "prompt": body.prompt}).with_(
            model=body.model or services.default_model
        )
        [recipe] = services.studio.plan_blend_pictures(
            *pictures, [body.t], picture_request, allow_paths=False, concepts_of=who.concepts_of
        )
        return job_view(services, submit(services, who, None, idempotency, recipe=recipe))
    parents = []
    for key in ("a", "b"):
        image_id = getattr(body, key)
        try:
            details = gallery.show(services.db, image_id, viewer=who.id)
            row = services.db.execute("SELECT sha256 FROM images WHERE id = ?", (image_id,)).fetchone()
            parents.append((Recipe.from_dict(details.recipe), row[0] or ""))
        except NotFound as error:
            raise NotFound(error.message, field=key) from None
        except SpellbookError as error:
            raise UserError(
                f"image {image_id} has no Spellbook recipe to blend from: {error.message}", field=key
            ) from None
    (recipe_a, sha_a), (recipe_b, sha_b) = parents
    recipe = make_blend(recipe_a, recipe_b, body.t, a_sha256=sha_a, b_sha256=sha_b, build=services.studio.build())
    services.studio.model_info(recipe.model.name, allow_paths=False)  # a model this server has
    return job_view(services, submit(services, who, None, idempotency, recipe=recipe))


class UpscaleRequest(BaseModel):
    """A picture enlarged by a resampler or an ESRGAN-family model (see `spellbook upscale`)."""

    model_config = ConfigDict(extra="forbid")

    image_id: int | None = Field(None, ge=1, le=2**62, description="a gallery image the caller may see")
    image: str | None = Field(None, description="or a base64 PNG/JPEG (or a data: URL)")
    scale: float = Field(2.0, ge=1, le=8, description="how many times larger")
    upscaler: str = Field("Lanczos", max_length=200, description="a name from GET /api/v1/upscalers")
    tile: int = Field(256, ge=0, le=4096, description="a model's tile side in input pixels (0: whole)")


@router.get("/upscalers")
def list_upscalers(request: Request, _who: Caller) -> list[dict[str, Any]]:
    """The resamplers and the ESRGAN-family models in SPELLBOOK_HOME/upscalers (by name; not loaded here)."""
    from spellbook.upscale import RESAMPLERS, installed_models

    models = installed_models(services_of(request).settings.upscalers_dir)
    return [{"name": name, "kind": "resampler"} for name in RESAMPLERS] + [
        {"name": name, "kind": "model"} for name in models
    ]


@router.post("/upscales", status_code=202)
def create_upscale(body: UpscaleRequest, request: Request, who: Caller) -> dict[str, Any]:
    """Queue an upscale of a gallery image or an uploaded picture: a job (followed, cancelled and paid like any:
    one credit per 2^20 output pixels), whose PNG keeps the picture's A1111 parameters with A1111's
    Postprocess keys and a spellbook-upscale chunk (source pixels, upscaler and its hash, scale, tile)."""
    from spellbook import gallery
    from spellbook.infotext import read_png_text
    from spellbook.provenance import open_image
    from spellbook.upscale import UPSCALE_KIND, upscale_cost, upscaler_record

    services = services_of(request)
    services.limiter.check(who.name)
    if services.dispatcher is not None:
        raise UserError("upscaling runs on the server's own worker; this server sends jobs to Celery workers",
                        field="upscaler", hint="run it with `spellbook upscale` on a worker machine")  # fmt: skip
    if (body.image_id is None) == (body.image is None):
        raise UserError("give image_id (a gallery image) or image (base64), one of them", field="image_id")
    max_pixels = services.settings.max_pixels
    if body.image_id is not None:
        try:
            details = gallery.show(services.db, body.image_id, viewer=who.id)
        except NotFound as error:
            raise NotFound(error.message, field="image_id") from None
        picture = open_image(Path_(details.image.path), "image_id", max_pixels)
    else:
        picture = decode_image(body.image, "image", max_pixels)
    parameters = read_png_text(picture).get("parameters")  # kept in the upscaled PNG, as A1111's extras do
    size = (round(picture.width * body.scale), round(picture.height * body.scale))
    if size[0] * size[1] > max_pixels:
        raise UserError(f"{size[0]}x{size[1]} is over this server's limit of {max_pixels} pixels", field="scale")
    upscaler = upscaler_record(body.upscaler, services.settings.upscalers_dir)
    source = services.studio.store_input(picture)
    spec = {"source": source.sha256, "scale": body.scale, "tile": body.tile, **upscaler}
    if parameters:
        spec["parameters"] = parameters
    job = services.queue.submit_task(UPSCALE_KIND, {"upscale": spec}, owner=who.id, cost=upscale_cost(*size))
    services.wake()
    return job_view(services, job)


@router.get("/jobs")
def list_jobs(request: Request, who: Caller, limit: int = Query(50, ge=1, le=500)) -> list[dict[str, Any]]:
    services = services_of(request)
    jobs = services.queue.list(owner=who.id, all_users=who.user is None, limit=limit)
    return [job_view(services, job) for job in jobs]


@router.get("/jobs/{job_id}")
def get_job(job_id: JobId, request: Request, who: Caller) -> dict[str, Any]:
    services = services_of(request)
    return job_view(services, services.queue.get(job_id, viewer=who.id, admin=who.admin))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: JobId, request: Request, who: Caller) -> dict[str, Any]:
    services = services_of(request)
    return job_view(services, services.queue.cancel(job_id, viewer=who.id, admin=who.admin))


@router.get("/jobs/{job_id}/images/{index}", response_class=FileResponse)
def job_image(job_id: JobId, index: ImageIndex, request: Request, who: Caller):
    """The PNG (with its recipe and A1111 parameters inside)."""
    services = services_of(request)
    job = services.queue.get(job_id, viewer=who.id, admin=who.admin)
    images = (job.result or {}).get("images", [])
    if not 0 <= index < len(images):
        raise NotFound(f"job {job_id} has no image {index}", field="index")
    return FileResponse(services.settings.home / images[index]["path"], media_type="image/png")


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: JobId, request: Request, who: Caller) -> StreamingResponse:
    """Server-sent events: `progress` (step, total, preview PNG as a data URL) until `done`/`failed`/`cancelled`."""
    services = services_of(request)
    services.queue.get(job_id, viewer=who.id, admin=who.admin)  # 404 for another's job

    async def stream():
        last_sent = None
        while True:
            job = services.queue.get(job_id)
            live = services.live(job_id)
            event = {"state": job.state, "progress": round(job.progress, 4)}
            if live is not None:
                event.update(step=live.step, total=live.total, progress=live.step / live.total if live.total else 0)
                if live.preview:
                    event["preview"] = "data:image/png;base64," + base64.b64encode(live.preview).decode()
            if job.state in FINAL:
                yield f"event: {job.state}\ndata: {json.dumps(job_view(services, job))}\n\n"
                return
            if event != last_sent:
                yield f"event: progress\ndata: {json.dumps(event)}\n\n"
                last_sent = event
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.2)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def declared_size(entry: ModelEntry) -> list[int] | None:
    """[width, height] from a model folder's spellbook.json, read without loading the model; None if unsaid.

    The web page sizes a new sketch canvas by it."""
    try:
        defaults = json.loads((entry.path / DEFAULTS_FILE).read_text()).get("defaults", {})
        size = [int(defaults["width"]), int(defaults["height"])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return size if min(size) >= 8 else None


@router.get("/models")
def models(request: Request, _who: Caller) -> list[dict[str, Any]]:
    """The models this server can run; `size` is the model's default [width, height] when its folder says."""
    services = services_of(request)
    registry = services.studio.cache.registry
    return [
        {
            "name": e.name,
            "format": e.format,
            "builtin": e.builtin,
            "default": e.name == services.default_model,
            "size": declared_size(e),
        }
        for e in registry.list()
    ]


@router.get("/samplers")
def samplers(_who: Caller) -> dict[str, Any]:
    return {"samplers": list(SAMPLERS), "schedules": list(SCHEDULES)}


@router.get("/me")
def me(request: Request, who: Caller) -> dict[str, Any]:
    services = services_of(request)
    if who.user is None:
        return {"user": None, "role": "admin", "balance": None, "ledger": [], "auth": services.auth}
    user = services.accounts.user(who.user.id)
    return {
        "user": user.name,
        "role": user.role,
        "balance": user.balance,
        "ledger": services.accounts.ledger(user.name),
        "auth": services.auth,
    }
