"""The AUTOMATIC1111-compatible API, /sdapi/v1: the request and response shapes A1111 clients expect.

Jobs go through the same queue as native ones (credits, fairness, batching); these endpoints wait for the
job to finish, as A1111's do. Unsupported A1111 features asked for explicitly (face restore, tiling, scripts,
a hires pass with another sampler or checkpoint) are a 400 naming the field, never silently ignored; their
"off" values, which every client sends, are accepted.
"""

from __future__ import annotations

import base64
import io
import json
import pathlib
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from spellbook import __version__
from spellbook.errors import Conflict, Forbidden, NotImplemented_, SpellbookError, TooLarge, UserError
from spellbook.infotext import parse_infotext, read_png_text
from spellbook.provenance import hires_params
from spellbook.queue.jobs import Idempotency, Job
from spellbook.recipe import LATENT_UPSCALERS, SAMPLER_ALIASES, SAMPLERS, SCHEDULES, ImageRequest, Recipe
from spellbook.server.app import Caller, Services, services_of
from spellbook.server.native import IdempotencyKey, submit
from spellbook.server.security import Principal, decode_image

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])


class A1111Request(BaseModel):
    """A1111's txt2img/img2img body. Every field A1111 defines is either applied, or accepted only at its "off"
    value (which every client sends) and refused otherwise, naming it (`_ONLY_AT`); a field A1111 does not
    define is refused too (`_check_fields`), so nothing a client asks for is silently dropped."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field("", max_length=20_000)
    negative_prompt: str = Field("", max_length=20_000)
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = Field(0.0, ge=0, le=1, description="variation strength (txt2img)")
    seed_resize_from_w: int = Field(-1, ge=-1, le=16_384, description="resize seed from this width (-1, 0: off)")
    seed_resize_from_h: int = Field(-1, ge=-1, le=16_384, description="resize seed from this height (-1, 0: off)")
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=1000)
    n_iter: int = Field(1, ge=1, le=100, description="batches run one after another (seed + k x batch_size)")
    steps: int | None = Field(None, ge=1, le=10_000)
    cfg_scale: float = Field(7.0, ge=0, le=100)
    width: int | None = Field(None, ge=8, le=16_384, description="default: the model's native size")
    height: int | None = Field(None, ge=8, le=16_384, description="default: the model's native size")
    denoising_strength: float | None = Field(None, ge=0, le=1, description="img2img; txt2img: the hires pass's")
    # txt2img: A1111's hires fix (a second pass at hr_scale x the size, or hr_resize_x x hr_resize_y)
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1, le=8)
    hr_upscaler: str | None = Field(None, max_length=60, description="a latent mode, Lanczos, Nearest or None")
    hr_second_pass_steps: int = Field(0, ge=0, le=10_000, description="0: as many as the first pass")
    hr_resize_x: int = Field(0, ge=0, le=16_384)
    hr_resize_y: int = Field(0, ge=0, le=16_384)
    hr_prompt: str = Field("", max_length=20_000, description="empty: the prompt")
    hr_negative_prompt: str = Field("", max_length=20_000, description="empty: the negative prompt")
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = Field(True, description="false: the response carries no images (they are still kept)")
    save_images: bool = Field(False, description="images are always kept in the gallery here, whatever this says")
    # img2img
    init_images: list[str] | None = None
    mask: str | None = None
    mask_blur: int | None = Field(None, ge=0, le=64, description="Gaussian blur of the mask, in pixels (A1111: 4)")
    mask_blur_x: int | None = Field(None, ge=0, le=64)
    mask_blur_y: int | None = Field(None, ge=0, le=64)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    inpainting_fill: int = Field(1, ge=0, le=3, description="0 fill, 1 original (default here); 2, 3 refused")


# A1111 fields accepted only at the values that mean "off" (what clients send when the user did not ask for
# the feature); any other value is a 400 naming the field and saying what Spellbook lacks.
_OFF = {
    "restore_faces": ((False, None), "face restoration"),
    "tiling": ((False, None), "tiling"),
    "script_name": ((None, ""), "scripts"),
    "script_args": ((None, []), "scripts"),
    "alwayson_scripts": ((None, {}), "always-on scripts (extensions)"),
    "firstphase_width": ((0, None), "A1111's old first-pass size (send width, height and hr_scale)"),
    "firstphase_height": ((0, None), "A1111's old first-pass size (send width, height and hr_scale)"),
    "hr_checkpoint_name": ((None, "", "Use same checkpoint"), "a hires pass on another checkpoint"),
    "hr_sampler_name": ((None, "", "Use same sampler"), "a hires pass with another sampler than the first's"),
    "hr_scheduler": ((None, "", "Use same scheduler"), "a hires pass with another schedule than the first's"),
    "refiner_checkpoint": ((None, ""), "a refiner model"),
    "refiner_switch_at": ((None, 0, 0.0), "a refiner model"),
    "eta": ((None, 1, 1.0), "a sampler eta other than A1111's default 1"),
    "s_churn": ((None, 0, 0.0), "sampler noise settings (s_churn)"),
    "s_tmin": ((None, 0, 0.0), "sampler noise settings (s_tmin)"),
    "s_tmax": ((None, 0, 0.0, "inf"), "sampler noise settings (s_tmax)"),
    "s_noise": ((None, 1, 1.0), "sampler noise settings (s_noise)"),
    "s_min_uncond": ((None, 0, 0.0), "negative guidance minimum sigma"),
    "initial_noise_multiplier": ((None, 1, 1.0), "an initial noise multiplier"),
    "latent_mask": ((None, ""), "a separate latent mask"),
    "inpaint_full_res": ((False, 0, None), "inpainting only the masked area (send false: the whole picture)"),
    "resize_mode": ((0, None), "resize modes other than 'just resize'"),
    "controlnet_units": ((None, []), "ControlNet"),
}
_SAME_AS = {"hr_sampler_name": ("sampler_name", "sampler_index"), "hr_scheduler": ("scheduler",)}
_INPAINT_ONLY = {"inpaint_full_res", "latent_mask", "inpaint_full_res_padding", "mask_round"}
# A1111 fields that change nothing about the image, accepted with any value: options of pix2pix models and of A1111's own output folders, and the seed of
# a variation whose strength is 0.
_NO_EFFECT = {
    "do_not_save_samples", "do_not_save_grid",
    "override_settings_restore_afterwards", "image_cfg_scale", "include_init_images", "inpaint_full_res_padding",
    "mask_round", "disable_extra_networks", "comments", "force_task_id", "infotext", "use_deprecated_controlnet",
    "use_async", "distilled_cfg_scale", "firstpass_image", "sampler_index",
}  # fmt: skip
# override_settings keys that are applied (sd_model_checkpoint, CLIP_stop_at_last_layers, sd_vae), and ones that
# change nothing about the image.
_OVERRIDES_APPLIED = {"sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae"}
_OVERRIDES_NO_EFFECT = {
    "samples_format",
    "save_images_add_number",
    "grid_format",
    "enable_pnginfo",
    "sd_checkpoint_hash",
}


def _check_fields(body: A1111Request) -> None:
    """Refuse, by name, every field that would change the image and that Spellbook cannot apply."""
    for name, value in (body.model_extra or {}).items():
        if name in _INPAINT_ONLY and not body.mask:
            continue  # A1111 reads them only when there is a mask; clients send them with every img2img
        if name in _SAME_AS and value is not None and value in [getattr(body, first) for first in _SAME_AS[name]]:
            continue  # the hires pass's sampler or schedule named as the first pass's: what it uses
        if name in _OFF:
            allowed, feature = _OFF[name]
            if value not in allowed:
                raise UserError(f"{name}={value!r} asks for {feature}, which Spellbook does not have", field=name)
        elif name not in _NO_EFFECT:
            raise UserError(
                f"{name!r} is not a field of A1111's API that Spellbook knows; nothing was run",
                field=name,
                hint="remove it, or see /docs for the fields this API takes",
            )
    for key, value in body.override_settings.items():
        if key not in _OVERRIDES_APPLIED | _OVERRIDES_NO_EFFECT:
            raise UserError(
                f"override setting {key!r} is not one Spellbook applies (it applies "
                f"{', '.join(sorted(_OVERRIDES_APPLIED))})",
                field=f"override_settings.{key}",
            )
    if body.inpainting_fill in (2, 3) and body.mask:
        raise UserError(
            f"inpainting_fill={body.inpainting_fill} (latent noise / latent nothing) is not supported; use 0 (fill) "
            "or 1 (original)",
            field="inpainting_fill",
        )


def _model(services: Services, body: A1111Request) -> str:
    name = body.override_settings.get("sd_model_checkpoint") or services.default_model
    return _title_to_name(str(name))


def _vae(body: A1111Request) -> str | None:
    """override_settings.sd_vae: 'Automatic' / 'None' (the model's own VAE), else a VAE by name."""
    value = body.override_settings.get("sd_vae")
    if value is None or str(value).strip().lower() in ("automatic", "none", ""):
        return None
    return _title_to_name(str(value))


def _title_to_name(title: str) -> str:
    """A1111 titles are 'name [hash]' (sometimes 'name.safetensors [hash]')."""
    name = title.split(" [")[0].strip()
    for suffix in (".safetensors", ".ckpt", ".pt"):
        name = name.removesuffix(suffix)
    return name


def to_request(services: Services, body: A1111Request, kind: str) -> ImageRequest:
    """The A1111 adapter: A1111's field names end here (cfg_scale -> guidance, scheduler -> schedule, …). One
    request is one batch; `n_iter` batches are made by the caller (`_run`)."""
    _check_fields(body)
    max_pixels = services.settings.max_pixels
    request = ImageRequest(
        kind=kind,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        model=_model(services, body),
        vae=_vae(body),
        sampler=body.sampler_name or body.sampler_index,
        schedule=body.scheduler,
        steps=body.steps,
        guidance=body.cfg_scale,
        seed=None if body.seed == -1 else body.seed,
        batch_size=body.batch_size,
        width=body.width,
        height=body.height,
        clip_skip=body.override_settings.get("CLIP_stop_at_last_layers"),
        styles=tuple(body.styles or ()),
        subseed=None if body.subseed == -1 else body.subseed,
        subseed_strength=body.subseed_strength or None,
        seed_resize_from_w=body.seed_resize_from_w if body.seed_resize_from_w > 0 else None,
        seed_resize_from_h=body.seed_resize_from_h if body.seed_resize_from_h > 0 else None,
    )
    if kind == "txt2img":
        return request.with_(hires=_hires(body)) if body.enable_hr else request
    if body.enable_hr:
        raise UserError("enable_hr: the hires fix is a second pass of txt2img; img2img has none", field="enable_hr")
    init = decode_image(body.init_images[0], "init_images", max_pixels)
    mask = _mask(body, max_pixels)
    if mask is not None and body.inpainting_fill == 0:
        init = fill_masked(init, mask)
    return request.with_(
        init_image=init,
        mask=mask,
        strength=body.denoising_strength if body.denoising_strength is not None else 0.75,
    )


def _hires(body: A1111Request) -> dict[str, Any]:
    """A1111's hires fields as a request's `hires` (its defaults: Latent, denoising strength 0.75)."""
    hires: dict[str, Any] = {
        "upscaler": body.hr_upscaler or "Latent",
        "steps": body.hr_second_pass_steps,
        "denoise": body.denoising_strength if body.denoising_strength is not None else 0.75,
        "prompt": body.hr_prompt or None,
        "negative_prompt": body.hr_negative_prompt or None,
    }
    if body.hr_resize_x or body.hr_resize_y:
        hires.update(width=body.hr_resize_x or None, height=body.hr_resize_y or None)
    else:
        hires["scale"] = body.hr_scale
    return hires


def _mask(body: A1111Request, max_pixels: int):
    """The mask as A1111 prepares it: inverted if asked, then blurred by mask_blur (x and y may differ)."""
    if not body.mask:
        return None
    from PIL import ImageFilter, ImageOps

    mask = decode_image(body.mask, "mask", max_pixels).convert("L")
    if body.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blur_x = body.mask_blur_x if body.mask_blur_x is not None else body.mask_blur or 0
    blur_y = body.mask_blur_y if body.mask_blur_y is not None else body.mask_blur or 0
    if blur_x or blur_y:
        mask = mask.filter(ImageFilter.GaussianBlur((blur_x, blur_y)))
    return mask


def fill_masked(image, mask):
    """A1111's 'fill' (inpainting_fill 0): the masked area starts from its surroundings blurred into it, not from
    what was there, so the prompt can change it entirely. Blurs of growing radius of the kept pixels (in
    premultiplied alpha, so the hole does not darken them) are layered, as A1111's modules/masking.py does."""
    from PIL import Image, ImageFilter, ImageOps

    image = image.convert("RGB")
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    filled = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(blurred)
    return filled.convert("RGB")


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
    "vae": "override_settings.sd_vae",
}


def _run(
    services: Services, who: Principal, body: A1111Request, kind: str, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Queue the job(s) and wait, as A1111's endpoints do (in the thread pool: the event loop stays free): `n_iter`
    batches, batch k from seed + k x batch_size, as A1111 numbers them. An interrupt (or a cancel) ends the call
    with 200 and the batches finished so far, as A1111 answers. A client that retries with the same
    Idempotency-Key waits for the jobs it already paid for."""
    jobs: list[Job] = []
    try:
        request = to_request(services, body, kind)
        for k in range(body.n_iter):
            batch = request
            if k:
                if request.seed is None:  # a random seed, drawn for the first batch: the others follow it
                    batch = request.with_(seed=jobs[0].recipe.seed + k * request.batch_size)
                else:
                    batch = request.with_(seed=request.seed + k * request.batch_size)
                if request.subseed_strength:  # the variation seeds follow too (A1111's all_subseeds)
                    batch = batch.with_(subseed=jobs[0].recipe.subseed + k * request.batch_size)
            key = None if idempotency_key is None else (idempotency_key if k == 0 else f"{idempotency_key}#{k}")
            jobs.append(submit(services, who, batch, Idempotency.of(key, body.model_dump_json())))
    except SpellbookError as error:
        for job in jobs:  # batch k could not be queued (e.g. credits ran out): the call does nothing, refunded
            try:
                services.queue.cancel(job.id, viewer=who.id, admin=who.admin)
            except SpellbookError:
                pass  # it ended meanwhile
        error.field = _A1111_FIELDS.get(error.field or "", error.field)
        raise
    finished = []
    for job in jobs:
        job = services.wait_final(job.id)
        if job.state == "failed":
            error = job.error or {"message": "the job failed"}
            raise SpellbookError(error.get("message", job.state), field=error.get("field"))
        finished.append(job)
    return _response(services, finished, body)


def _response(services: Services, jobs: list[Job], body: A1111Request) -> dict[str, Any]:
    images, infotexts, seeds, subseeds = [], [], [], []
    done = [job for job in jobs if job.state == "done"]
    for job in done:
        for record in job.result["images"]:
            path = services.settings.home / record["path"]
            if body.send_images:
                images.append(base64.b64encode(path.read_bytes()).decode())
            infotexts.append(read_png_text(path).get("parameters", ""))
            seeds.append(record["seed"])
            subseeds.append(job.recipe.subseed + record["index"] if job.recipe.subseed is not None else -1)
    recipe: Recipe = jobs[0].recipe
    count = len(seeds)
    info = {
        "prompt": recipe.prompt,
        "all_prompts": [recipe.prompt] * count,
        "negative_prompt": recipe.negative_prompt,
        "all_negative_prompts": [recipe.negative_prompt] * count,
        "seed": recipe.seed,
        "all_seeds": seeds,
        "subseed": recipe.subseed if recipe.subseed is not None else -1,
        "all_subseeds": subseeds,
        "subseed_strength": recipe.subseed_strength,
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
        "sd_vae_name": recipe.vae.name if recipe.vae else None,
        "denoising_strength": recipe.strength,
        "clip_skip": recipe.clip_skip,
        "extra_generation_params": hires_params(recipe),
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": list(recipe.styles),
        "job_timestamp": str(int(jobs[0].created)),
        "version": f"spellbook {__version__}",
        "spellbook_job": jobs[0].id,
        "spellbook_jobs": [job.id for job in jobs],
        # Interrupted: the batches that finished are here; the one that was stopped has no image (Spellbook
        # keeps no half-denoised picture: it could not be reproduced from its recipe).
        "interrupted": len(done) < len(jobs),
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
        "sd_checkpoint_hash": _hash(services, services.default_model),
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
        "samples_format": "png",
    }


# A1111 options that would change every image, with the value at which they change nothing here. A client that
# sends A1111's whole options dict back passes these at their defaults; another value is refused by name.
_OPTION_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "sd_vae": ("Automatic", "None", None, ""),
    "CLIP_stop_at_last_layers": (1, None),
    "eta_noise_seed_delta": (0, None),
    "eta_ancestral": (1, 1.0, None),
    "eta_ddim": (0, 0.0, None),
    "s_churn": (0, 0.0, None),
    "s_tmin": (0, 0.0, None),
    "s_noise": (1, 1.0, None),
    "s_min_uncond": (0, 0.0, None),
    "sigma_min": (0, 0.0, None),
    "sigma_max": (0, 0.0, None),
    "rho": (0, 0.0, None),
    "initial_noise_multiplier": (1, 1.0, None),
    "token_merging_ratio": (0, 0.0, None),
    "emphasis": ("Original", None),
    "sd_noise_schedule": ("Default", None),
    "img2img_color_correction": (False, None),
    "samples_format": ("png", None),
}


@router.post("/options")
def set_options(options: dict[str, Any], request: Request, response: Response, who: Caller) -> dict[str, Any]:
    """A1111's options, as clients send them (often the whole dict from GET, with one key changed). Applied:
    `sd_model_checkpoint` (the server's default model, kept across restarts; admin only when auth is on).
    Options that would change images are accepted at their A1111 defaults and refused otherwise; read-only and
    unknown ones change nothing and are listed in the `X-Spellbook-Ignored-Options` header. Everything is
    checked before anything changes: all or nothing."""
    services = services_of(request)
    ignored = []
    for key, value in options.items():
        if key == "sd_model_checkpoint":
            continue
        if key in _OPTION_DEFAULTS:
            if value not in _OPTION_DEFAULTS[key]:
                raise UserError(
                    f"option {key}={value!r} would change every image and Spellbook does not apply it server-wide",
                    field=key,
                    hint="per request, send it in override_settings where supported (sd_vae, CLIP_stop_at_last_layers)",
                )
        else:
            ignored.append(key)  # read-only (sd_checkpoint_hash) or an option with no effect here
    name = None
    if "sd_model_checkpoint" in options:
        name = _title_to_name(str(options["sd_model_checkpoint"]))
        if name != services.default_model:
            if not who.admin:
                raise Forbidden("only an admin can change the server's default model", field="sd_model_checkpoint")
            try:
                services.studio.model_info(name, allow_paths=False)
            except SpellbookError as error:
                error.field = "sd_model_checkpoint"
                raise
    if name is not None and name != services.default_model:
        services.set_default_model(name)
    if ignored:
        # Printable ASCII only: a header is latin-1 at most (anything else was a 500), and a control character
        # in it made the server drop the connection.
        names = ", ".join(sorted(ignored)).encode("ascii", "backslashreplace").decode()
        safe = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in names)
        response.headers["X-Spellbook-Ignored-Options"] = safe[:2000].strip()  # no space at either end (h11)
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
    return [{"name": name, "aliases": list(SAMPLER_ALIASES.get(name, ())), "options": {}} for name in SAMPLERS]


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
    current, fraction, eta = None, 0.0, 0.0
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
        if job.started and fraction > 0:  # as A1111 estimates it: elapsed / progress - elapsed
            elapsed = max(0.0, time.time() - job.started)
            eta = elapsed / fraction - elapsed
    return {
        "progress": round(fraction, 4),
        "eta_relative": round(eta, 2),
        "state": state,
        "current_image": current,
        "textinfo": None,
    }


@router.post("/interrupt")
def interrupt(request: Request, who: Caller) -> dict[str, Any]:
    """Stop the caller's generation (all of the local user's when auth is off): the running batch and the
    queued ones. The waiting txt2img/img2img call answers 200 with the batches already finished."""
    _cancel(services_of(request), who, ("running", "queued"))
    return {}


def _cancel(services: Services, who: Principal, states: tuple[str, ...]) -> None:
    for job in services.queue.list(owner=who.id, all_users=who.user is None, limit=200):
        if job.state in states:
            try:
                services.queue.cancel(job.id, viewer=who.id, admin=who.admin)
            except Conflict:
                pass  # it finished meanwhile


# --- the rest of A1111's API surface that clients call: lists in A1111's shape (empty where Spellbook has none of
# that kind), refreshes (nothing is cached here that a refresh would renew), and clear 501s for actions
# Spellbook does not have.


@router.get("/sd-vae")
def sd_vae(request: Request, _who: Caller) -> list[dict[str, Any]]:
    """The VAEs in SPELLBOOK_HOME/vae (a folder with config.json, or a .safetensors), usable as
    override_settings.sd_vae."""
    folder = services_of(request).settings.home / "vae"
    found = []
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if (path.is_dir() and (path / "config.json").is_file()) or path.suffix == ".safetensors":
                found.append({"model_name": path.stem if path.is_file() else path.name, "filename": path.name})
    return found


@router.get("/upscalers")
def upscalers(_who: Caller) -> list[dict[str, Any]]:
    """The plain resamplers A1111 always has (no AI upscaler is installed here)."""
    return [
        {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for name in _RESAMPLERS
    ]


_RESAMPLERS = {"None": None, "Lanczos": "LANCZOS", "Nearest": "NEAREST"}


@router.get("/latent-upscale-modes")
def latent_upscale_modes(_who: Caller) -> list[dict[str, Any]]:
    return [{"name": name} for name in LATENT_UPSCALERS]


@router.get("/loras")
def loras(_who: Caller) -> list[dict[str, Any]]:
    return []  # LoRA is not supported yet (a <lora:…> tag is refused by name)


@router.get("/hypernetworks")
def hypernetworks(_who: Caller) -> list[dict[str, Any]]:
    return []


@router.get("/face-restorers")
def face_restorers(_who: Caller) -> list[dict[str, Any]]:
    return []


@router.get("/realesrgan-models")
def realesrgan_models(_who: Caller) -> list[dict[str, Any]]:
    return []


@router.get("/prompt-styles")
def prompt_styles(request: Request, _who: Caller) -> list[dict[str, Any]]:
    """The style library (SPELLBOOK_HOME/styles.csv), usable as `styles` in txt2img/img2img."""
    from spellbook.styles import StyleLibrary

    return [style.to_dict() for style in StyleLibrary(services_of(request).settings).list()]


@router.post("/refresh-checkpoints")
@router.post("/refresh-vae")
@router.post("/refresh-loras")
@router.post("/refresh-embeddings")
@router.post("/unload-checkpoint")
@router.post("/reload-checkpoint")
def refresh(_who: Caller) -> dict[str, Any]:
    """Nothing to do: models, VAEs and concepts are read from their folders on every request, and weights are
    loaded by the worker when a job needs them (the API process holds none)."""
    return {}


@router.post("/skip")
def skip(request: Request, who: Caller) -> dict[str, Any]:
    """Stop the caller's running batch; an A1111 request with n_iter goes on with its next batch."""
    _cancel(services_of(request), who, ("running",))
    return {}


@router.get("/memory")
def memory(_who: Caller) -> dict[str, Any]:
    ram: dict[str, Any] = {}
    try:
        text = pathlib.Path("/proc/meminfo").read_text(encoding="ascii")
        info = dict(line.split(":", 1) for line in text.splitlines())
        total = int(info["MemTotal"].split()[0]) * 1024
        free = int(info["MemAvailable"].split()[0]) * 1024
        ram = {"free": free, "used": total - free, "total": total}
    except (OSError, KeyError, ValueError):
        ram = {"error": "memory figures are not available on this system"}
    return {"ram": ram, "cuda": {"error": "no CUDA device in the API process (the worker runs the models)"}}


@router.get("/cmd-flags")
def cmd_flags(request: Request, _who: Caller) -> dict[str, Any]:
    settings = services_of(request).settings
    return {"api": True, "nowebui": False, "listen": settings.host not in ("127.0.0.1", "localhost", "::1"),
            "port": settings.port, "api_auth": services_of(request).auth, "medvram": False, "lowvram": False}  # fmt: skip


@router.post("/interrogate", status_code=501)
def interrogate(_who: Caller) -> dict[str, Any]:
    raise NotImplemented_("interrogate needs a captioning model (CLIP or BLIP interrogator), and none is installed")


class ExtrasRequest(BaseModel):
    # strict: a value of another type than the schema says (0 for a boolean, false for a number) is a 400
    model_config = ConfigDict(extra="allow", strict=True)

    image: str = ""
    resize_mode: int = Field(0, ge=0, le=1, description="0: by upscaling_resize; 1: to upscaling_resize_w x _h")
    upscaling_resize: float = Field(2, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1, le=16_384)
    upscaling_resize_h: int = Field(512, ge=1, le=16_384)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0
    gfpgan_visibility: float = 0
    codeformer_visibility: float = 0
    codeformer_weight: float = 0
    show_extras_results: bool = True


class ExtrasBatchRequest(ExtrasRequest):
    imageList: list[dict[str, str]] = Field(default_factory=list)


def _extras_image(services: Services, body: ExtrasRequest, data: str) -> str:
    """A1111's extras with the plain resamplers it always has: resize by a factor or to a size."""
    from PIL import Image

    for name in ("gfpgan_visibility", "codeformer_visibility", "extras_upscaler_2_visibility"):
        if getattr(body, name):
            raise UserError(f"{name}: face restoration and a second upscaler are not available here", field=name)
    for name in ("upscaler_1", "upscaler_2"):
        if getattr(body, name) not in _RESAMPLERS:
            raise UserError(
                f"upscaler {getattr(body, name)!r} is not installed; available: {', '.join(_RESAMPLERS)}", field=name
            )
    image = decode_image(data, "image", services.settings.max_pixels).convert("RGB")
    if body.resize_mode == 1:
        size = (body.upscaling_resize_w, body.upscaling_resize_h)
    else:
        size = (round(image.width * body.upscaling_resize), round(image.height * body.upscaling_resize))
    if size[0] * size[1] > services.settings.max_pixels:
        raise TooLarge(f"{size[0]}x{size[1]} is over the pixel cap", field="upscaling_resize")
    resample = _RESAMPLERS[body.upscaler_1]
    if resample is not None and size != image.size:
        image = image.resize(size, getattr(Image.Resampling, resample))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@router.post("/extra-single-image")
def extra_single_image(body: ExtrasRequest, request: Request, _who: Caller) -> dict[str, Any]:
    return {"html_info": "", "image": _extras_image(services_of(request), body, body.image)}


@router.post("/extra-batch-images")
def extra_batch_images(body: ExtrasBatchRequest, request: Request, _who: Caller) -> dict[str, Any]:
    services = services_of(request)
    return {"html_info": "", "images": [_extras_image(services, body, item.get("data", "")) for item in body.imageList]}


class PngInfoRequest(BaseModel):
    image: str


@router.post("/png-info")
def png_info(body: PngInfoRequest, request: Request, _who: Caller) -> dict[str, Any]:
    """The text chunks of a PNG and its A1111 parameters, parsed (ours, A1111's and ComfyUI's images)."""
    image = decode_image(body.image, "image", services_of(request).settings.max_pixels)
    chunks = read_png_text(image)
    text = chunks.pop("parameters", "")  # A1111 shows it as `info`, not among the other items
    parameters: dict[str, Any] = {}
    if text:
        prompt, negative, params = parse_infotext(text)
        parameters = {"Prompt": prompt, "Negative prompt": negative, **params}
    return {"info": text, "items": chunks, "parameters": parameters}
