"""/api/v1/gallery: Lexica-like search, similar images, the public feed, image pages, remix, visibility."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from spellbook import gallery
from spellbook.server.app import Caller, services_of
from spellbook.server.security import Principal

router = APIRouter(prefix="/api/v1/gallery", tags=["gallery"])
ImageId = Annotated[int, Path(ge=1, le=2**62, description="gallery image id")]


def view(image: gallery.GalleryImage) -> dict[str, Any]:
    """Lexica's fields; `src` is a URL on this server (the file path on disk is not shown)."""
    data = image.to_dict()
    data.pop("path", None)
    data["src"] = f"/api/v1/gallery/images/{image.id}/file"
    return data


def viewer(who: Principal) -> int | None:
    return who.id


@router.get("/search")
def search(
    request: Request,
    who: Caller,
    q: str = Query("", max_length=1000, description="words and/or meaning; any punctuation is fine"),
    mode: Literal["hybrid", "words", "meaning"] = "hybrid",
    model: str | None = Query(None, max_length=200),
    sampler: str | None = Query(None, max_length=60),
    since: str | None = Query(None, max_length=40, description="ISO date, e.g. 2026-11-01"),
    limit: int = Query(20, ge=1, le=200),
    offset: int = Query(0, ge=0, le=1_000_000, description="skip this many results: the next page"),
) -> dict[str, Any]:
    services = services_of(request)
    found = gallery.search(
        services.db,
        q,
        mode=mode,
        model=model,
        sampler=sampler,
        since=since,
        viewer=viewer(who),
        limit=limit,
        offset=offset,
    )
    return {"images": [view(image) for image in found]}


@router.get("/feed")
def feed(
    request: Request,
    _who: Caller,
    order: Literal["newest", "remixed"] = "newest",
    limit: int = Query(20, ge=1, le=200),
    offset: int = Query(0, ge=0, le=1_000_000),
) -> dict[str, Any]:
    """Public images, newest or most remixed first."""
    found = gallery.feed(services_of(request).db, order=order, limit=limit, offset=offset)
    return {"images": [view(image) for image in found]}


@router.get("/images/{image_id}")
def show(image_id: ImageId, request: Request, who: Caller) -> dict[str, Any]:
    details = gallery.show(services_of(request).db, image_id, viewer=viewer(who))
    data = details.to_dict()
    data.pop("path", None)  # where the file lies on the server's disk is not the caller's business
    data.update(view(details.image))
    data["parent"] = view(details.parent) if details.parent else None
    # Whether the caller may publish or hide it (the owner; everyone when auth is off).
    data["yours"] = who.id is None or details.image.owner == who.id
    return data


@router.get("/images/{image_id}/file", response_class=FileResponse)
def image_file(image_id: ImageId, request: Request, who: Caller):
    image = gallery.get_image(services_of(request).db, image_id, viewer=viewer(who))
    return FileResponse(image.path, media_type="image/png")


@router.get("/images/{image_id}/similar")
def similar(image_id: ImageId, request: Request, who: Caller, limit: int = Query(20, ge=1, le=200)) -> dict[str, Any]:
    found = gallery.similar(services_of(request).db, image_id, viewer=viewer(who), limit=limit)
    return {"images": [view(image) for image in found]}


@router.post("/images/{image_id}/remix")
def remix(image_id: ImageId, request: Request, who: Caller) -> dict[str, Any]:
    """The image's recipe as a job request to edit and POST to /api/v1/jobs."""
    return gallery.remix(services_of(request).db, image_id, viewer=viewer(who)).to_dict()


class Visibility(BaseModel):
    visibility: Literal["public", "private"]


@router.post("/images/{image_id}/visibility")
def set_visibility(image_id: ImageId, body: Visibility, request: Request, who: Caller) -> dict[str, Any]:
    db = services_of(request).db
    gallery.set_visibility(db, image_id, body.visibility, viewer=viewer(who))
    return view(gallery.get_image(db, image_id, viewer=viewer(who)))
