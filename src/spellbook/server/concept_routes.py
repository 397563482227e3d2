"""/api/v1/concepts: the textual-inversion concepts library over HTTP: list, show, download (A1111 or
diffusers layout), upload (safetensors only: the server never unpickles), delete, and training from
uploaded pictures as a queued job (kind `concept`) with SSE progress at /api/v1/jobs/{id}/events.

Each caller sees the shared library plus their own concepts (see concepts.library): what a user uploads or
trains is theirs alone, and means something only as `<name>` unless they give it the bare word; an admin (or
the local user when auth is off) keeps the shared library."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Path, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from spellbook.concepts.formats import DIFFUSERS, concept_bytes
from spellbook.concepts.library import ConceptInfo, ConceptLibrary, check_concept_name
from spellbook.errors import Forbidden, NotFound, TooLarge, UserError
from spellbook.queue.training import CONCEPT_KIND, MAX_PICTURES, MAX_TRAIN_STEPS, ConceptJobSpec, training_cost
from spellbook.server.app import Caller, services_of
from spellbook.server.security import Principal, decode_image_bytes

router = APIRouter(prefix="/api/v1/concepts", tags=["concepts"])
# What check_concept_name accepts, for the schema (documented, not enforced here: pydantic's regex engine has no
# look-ahead, and the library's check gives the better message): optional <>, surrounding spaces, no '..'.
NAME_PATTERN = r"^(?![\s\S]*\.\.)\s*(?:<[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}>|[A-Za-z0-9][A-Za-z0-9_.+-]{0,63})\s*$"
ConceptName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=66,
        description="the concept's name, as written in prompts (<> optional)",
        json_schema_extra={"pattern": NAME_PATTERN},
    ),
]
# The largest concept there is (75 vectors of 1024 floats, SD 2.x) is about 300 KB; one vector of SD 1.x, 3 KB.
UPLOAD_MAX_BYTES = 1 << 20
SAFETENSORS = "application/octet-stream"


def view(info: ConceptInfo, library: ConceptLibrary) -> dict[str, Any]:
    """What `spellbook concept info` shows, with URLs on this server in place of file paths; `yours`: the
    caller may change or delete it (their own concept; for an admin, the shared library)."""
    data = info.to_dict()
    data["yours"] = library.is_own(info.path)
    data.pop("path", None)
    data["size_bytes"] = data.pop("size")
    base = f"/api/v1/concepts/{quote(info.name)}"
    data["sample"] = f"{base}/sample" if info.sample else None
    data["files"] = {"original": f"{base}/file", "a1111": f"{base}/file?format=a1111", "diffusers": f"{base}/file?format=diffusers"}  # fmt: skip
    return data


@router.get("")
def list_concepts(request: Request, who: Caller) -> dict[str, Any]:
    """The concepts the caller's prompts can use: the shared library and their own (`scope`); a file that
    cannot be read is listed with a `note`."""
    library = library_of(request, who)
    return {"concepts": [view(info, library) for info in library.list()]}


def library_of(request: Request, who: Principal) -> ConceptLibrary:
    return services_of(request).studio.concepts.for_owner(who.concepts_of)


@router.get("/{name}")
def show_concept(name: ConceptName, request: Request, who: Caller) -> dict[str, Any]:
    library = library_of(request, who)
    return view(library.info(name), library)


class ConceptChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bare_word: bool = Field(description="true: the plain word means the concept too, not only <name>")


@router.patch("/{name}")
def change_concept(name: ConceptName, change: ConceptChange, request: Request, who: Caller) -> dict[str, Any]:
    """Change one of your concepts (an admin: one in the shared library): whether the bare word means it."""
    library = library_of(request, who)
    return view(library.set_meta(name, bare_word=change.bare_word), library)


@router.get(
    "/{name}/file",
    response_class=Response,
    responses={200: {"content": {SAFETENSORS: {}}, "description": "the .safetensors file, as an attachment"}},
)
def concept_file(
    name: ConceptName,
    request: Request,
    who: Caller,
    fmt: Annotated[
        Literal["a1111", "diffusers"] | None,
        Query(alias="format", description="a1111: {'emb_params': …}; diffusers: {'<name>': …}; unset: as stored"),
    ] = None,
) -> Response:
    """The concept's .safetensors file: as stored (its hash is the TI hash), or rewritten for A1111 or diffusers."""
    library = library_of(request, who)
    path = library.path_of(name)
    bare = path.stem
    if fmt is None and path.suffix.lower() == ".safetensors":
        return FileResponse(path, media_type=SAFETENSORS, filename=f"{bare}.safetensors")
    concept, _ = library.load(bare)  # a pickle dropped in by hand: converted (only when pickles are allowed)
    fmt = fmt or DIFFUSERS
    filename = f"{bare}.safetensors" if fmt == "a1111" else f"{bare}-diffusers.safetensors"
    return Response(
        concept_bytes(concept, fmt),
        media_type=SAFETENSORS,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/{name}/sample", response_class=FileResponse, responses={200: {"content": {"image/png": {}}}})
def concept_sample(name: ConceptName, request: Request, who: Caller):
    """The sample grid made after training ("a <name>", four seeds)."""
    info = library_of(request, who).info(name)
    if info.sample is None:
        raise NotFound(f"concept {info.name!r} has no sample image", field="name")
    return FileResponse(info.sample, media_type="image/png")


@router.post("", status_code=201)
def upload_concept(
    request: Request,
    who: Caller,
    file: Annotated[UploadFile, File(description="a .safetensors embedding (A1111 or diffusers layout)")],
    name: Annotated[str | None, Form(max_length=66, description="default: the file's name")] = None,
    model: Annotated[
        str | None, Form(max_length=200, description="refuse the concept unless it fits this model's text encoder")
    ] = None,
    bare_word: Annotated[bool, Form(description="the plain word means it too (default: only <name>)")] = False,
) -> dict[str, Any]:
    """Add a concept file: to your own concepts (an admin's: to the shared library). Safetensors only: a pickle
    (.pt, .bin, or such bytes under another name) is refused unread."""
    services = services_of(request)
    data = file.file.read(UPLOAD_MAX_BYTES + 1)
    if len(data) > UPLOAD_MAX_BYTES:
        raise TooLarge(
            f"the file is over {UPLOAD_MAX_BYTES} bytes; a concept file is a few KB (is it a model or a LoRA?)",
            field="file",
        )
    check = None
    if model:
        info = services.studio.model_info(model, allow_paths=False)  # metadata only: no weights in the API

        def check(concept) -> None:
            from spellbook.engine.prompts import check_concept_widths

            try:
                check_concept_widths({concept.name: concept.vectors}, info.text_width, info.name)
            except UserError as error:
                raise UserError(error.message, field="file", hint=error.hint) from None

    library = library_of(request, who)
    info = library.import_bytes(
        data, file.filename or "", name or None, check=check, bare_word=bare_word, uploader=who.name
    )
    return view(info, library)


@router.delete("/{name}", status_code=204, response_class=Response)
def delete_concept(name: ConceptName, request: Request, who: Caller) -> Response:
    """Remove one of your concepts (and its sample); only an admin removes from the shared library."""
    library = library_of(request, who)
    if not library.is_own(library.path_of(name)):
        raise Forbidden("only an admin can remove concepts from the shared library", field="name")
    library.remove(name)
    return Response(status_code=204)


@router.post("/train", status_code=202)
def train(
    request: Request,
    who: Caller,
    name: Annotated[
        str,
        Form(
            min_length=1,
            max_length=66,
            description="the new word, used as <name>",
            json_schema_extra={"pattern": NAME_PATTERN},
        ),
    ],
    images: Annotated[list[UploadFile], File(description=f"1 to {MAX_PICTURES} pictures (PNG, JPEG or WebP)")],
    init_word: Annotated[str | None, Form(max_length=100, description="start from this word's embedding")] = None,
    steps: Annotated[int, Form(ge=1, le=MAX_TRAIN_STEPS)] = 400,
    vectors: Annotated[int, Form(ge=1, le=75)] = 1,
    seed: Annotated[int, Form(ge=0, le=2**32 - 1)] = 0,
    batch_size: Annotated[int | None, Form(ge=1, le=64, description="pictures per step (default 8)")] = None,
    model: Annotated[str | None, Form(max_length=200, description="default: the server's default model")] = None,
    bare_word: Annotated[bool, Form(description="the plain word means it too (default: only <name>)")] = False,
) -> dict[str, Any]:
    """Queue the training of a new concept from pictures: a job of kind `concept`, paid in credits by its steps
    (a step counts as three generation steps of its batch), with progress at /api/v1/jobs/{id}/events."""
    from spellbook.concepts.train import TrainConfig
    from spellbook.server.native import job_view

    services = services_of(request)
    services.limiter.check(who.name)
    studio = services.studio
    # 1. Everything that can fail is checked now, not minutes into the queue.
    bare = check_concept_name(name)
    library_of(request, who).check_free(bare, overwrite=False)
    if not 1 <= len(images) <= MAX_PICTURES:
        raise UserError(f"{len(images)} pictures sent; send 1 to {MAX_PICTURES}", field="images")
    info = studio.model_info(model or services.default_model, allow_paths=False)  # metadata only: no weights
    config = TrainConfig(name=bare, vectors=vectors, steps=steps, seed=seed, batch_size=batch_size or 8)
    if init_word is not None and not init_word.strip():  # CLIP's byte-level BPE gives any other text tokens
        raise UserError(f"init word {init_word!r} has no tokens", field="init_word")
    # 2. The pictures, decoded under the pixel cap, kept by hash like init images.
    pictures = []
    for upload in images:
        picture = decode_image_bytes(upload.file.read(), "images", services.settings.max_pixels)
        pictures.append(studio.store_input(picture).sha256)
    # 3. Pay and queue.
    spec = ConceptJobSpec(
        name=bare,
        model=info.name,
        model_sha256=info.sha256,
        init_word=init_word or None,
        vectors=vectors,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        pictures=tuple(pictures),
        scope=who.concepts_of,
        bare_word=bare_word,
    )
    cost = training_cost(steps, config.batch_size, info.native_size)
    job = services.queue.submit_task(CONCEPT_KIND, {"concept": spec.to_dict()}, owner=who.id, cost=cost)
    services.wake()
    return job_view(services, job)
