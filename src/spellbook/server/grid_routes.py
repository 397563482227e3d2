"""/api/v1/grids: X/Y/Z plots over HTTP, as `spellbook grid` makes them on the command line.

A grid is one job request varied along up to three axes written in the CLI's syntax (`seed=1,2,3`,
`cfg=3-9 [4]`, `sampler="Euler a",DDIM`). Every cell is planned before anything is queued, so a bad axis or value
is a 400 naming it and nothing is paid; then every cell is queued and paid in one transaction (queue/grids.py).
The grid follows its cells' jobs: its state, progress and SSE stream are theirs, and once every cell is done its
labelled picture per Z value is drawn by the CLI's grid writer (a `spellbook-grid` chunk inside, so
`spellbook reproduce GRID.png` runs it again), kept under SPELLBOOK_HOME/grids/.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from spellbook.errors import Conflict, NotFound, SpellbookError, StorageFailed, UserError
from spellbook.grid import Cell, axes_record, grid_png, parse_axis, plan_cells
from spellbook.provenance import open_image, write_png_bytes
from spellbook.queue.grids import Grid
from spellbook.queue.jobs import FINAL, Idempotency
from spellbook.server.app import Caller, Services, services_of
from spellbook.server.native import IdempotencyKey, JobRequest

router = APIRouter(prefix="/api/v1", tags=["grids"])
GridId = Annotated[str, Path(min_length=1, max_length=64, description="grid id")]
ZIndex = Annotated[int, Path(ge=0, le=100_000, description="which Z value, from 0 (0 when there is no z axis)")]
AXIS_HELP = (
    'FIELD=VALUES, as `spellbook grid --x` takes it: comma-separated values (CSV quoting: "Euler a"), or ranges '
    "`10-30 (+10)` (a step), `3-9 [4]` (a count), `1-4`. Fields: seed, steps, cfg, sampler, schedule, size (WxH), "
    "width, height, clip_skip, strength, negative_prompt, model, variation_seed, variation_strength, prompt_sr "
    "(the first value is searched in the prompt, each value replaces it)"
)


class GridRequest(BaseModel):
    """An X/Y/Z plot: `request` varied along the axes (at least one); one image per cell."""

    model_config = ConfigDict(extra="forbid")

    request: JobRequest = Field(description="the job every cell starts from (as POST /api/v1/jobs takes it)")
    x: str | None = Field(None, max_length=20_000, description=f"the columns: {AXIS_HELP}")
    y: str | None = Field(None, max_length=20_000, description="the rows, as `x`")
    z: str | None = Field(None, max_length=20_000, description="one grid picture per value, as `x`")


def grid_view(services: Services, grid: Grid, *, recipes: bool = True) -> dict[str, Any]:
    """The grid as the API shows it: its axes, each cell's job state (and image once done), progress (finished
    cells, the running ones by their live step), and once every cell is done its pictures, one per Z value."""
    cells, progress, finished = [], 0.0, 0
    for cell in grid.cells:
        job = cell.job
        fraction = 1.0 if job.state in FINAL else job.progress
        live = services.live(job.id)
        if job.state == "running" and live is not None and live.total:
            fraction = live.step / live.total
        progress += fraction
        finished += job.state in FINAL
        view = {
            "x": cell.x,
            "y": cell.y,
            "z": cell.z,
            "job": job.id,
            "state": job.state,
            "progress": round(fraction, 4),
            "image": f"/api/v1/jobs/{job.id}/images/0" if job.state == "done" and _cell_file(job) else None,
        }
        if job.error:
            view["error"] = job.error
        if recipes:
            view["recipe"] = job.request.get("recipe")
        cells.append(view)
    state = grid.state
    return {
        "id": grid.id,
        "state": state,
        "created": grid.created,
        "cost": grid.cost,
        "total": len(cells),
        "finished": finished,
        "progress": round(progress / len(cells), 4) if cells else 1.0,
        "axes": axes_record(grid.axes),
        "cells": cells,
        "images": [f"/api/v1/grids/{grid.id}/images/{z}" for z in range(grid.z_count)] if state == "done" else [],
        "events": f"/api/v1/grids/{grid.id}/events",
    }


def _cell_file(job) -> str | None:
    images = (job.result or {}).get("images") or []
    return images[0]["path"] if images else None


@router.post("/grids", status_code=202)
def create_grid(
    body: GridRequest, request: Request, who: Caller, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    """Plan every cell (a bad axis, value or too many cells is a 400 naming it, and nothing is queued or paid), then
    queue and pay them all in one transaction: the cost is the cells' costs summed (402 if the balance is short,
    and nothing is queued). Send an Idempotency-Key to retry safely: the same key and body give the same grid."""
    services = services_of(request)
    # 1. One submission for the rate limit, however many cells; a retry gets the grid it already paid for
    services.limiter.check(who.name)
    idempotency = Idempotency.of(idempotency_key, body.model_dump_json())
    if idempotency is not None and (earlier := services.grids.find_idempotent(who.id, idempotency)) is not None:
        return grid_view(services, earlier)
    # 2. The axes, in the CLI's syntax; errors name them (x, y, z)
    axes = [parse_axis(text, key) if text else None for key, text in (("x", body.x), ("y", body.y), ("z", body.z))]
    if not any(axes):
        raise UserError('give at least one axis, e.g. "x": "seed=1,2,3"', field="x")
    # 3. The request every cell starts from: one image per cell, the server's default model
    try:
        base = body.request.to_request(services.settings.max_pixels)
    except SpellbookError as error:  # an init image or mask that does not decode: a field of `request`
        error.field = f"request.{error.field}" if error.field else "request"
        raise
    if (base.batch_size or 1) != 1:
        raise UserError(
            f"a grid makes one image per cell; batch_size is {base.batch_size}: leave it out",
            field="request.batch_size",
        )
    base = base.with_(batch_size=1, model=base.model or services.default_model)
    # 4. Every cell planned before anything is queued (errors name the cell, and the axis or request field)
    cells = plan_cells(
        base,
        axes,
        lambda cell: services.studio.plan(cell, allow_paths=False, concepts_of=who.concepts_of),
        services.settings.max_grid_cells,
        request_field="request.",
    )
    # 5. Queue and pay every cell, all or nothing
    grid = services.grids.submit(axes, cells, owner=who.id, idempotency=idempotency)
    services.wake()
    return grid_view(services, grid)


@router.get("/grids")
def list_grids(request: Request, who: Caller, limit: int = Query(20, ge=1, le=200)) -> list[dict[str, Any]]:
    """The caller's grids, newest first (for the local user, auth off: everyone's), without the cells' recipes."""
    services = services_of(request)
    grids = services.grids.list(owner=who.id, all_users=who.user is None, limit=limit)
    return [grid_view(services, grid, recipes=False) for grid in grids]


@router.get("/grids/{grid_id}")
def get_grid(grid_id: GridId, request: Request, who: Caller) -> dict[str, Any]:
    services = services_of(request)
    return grid_view(services, services.grids.get(grid_id, viewer=who.id, admin=who.admin))


@router.post("/grids/{grid_id}/cancel")
def cancel_grid(grid_id: GridId, request: Request, who: Caller) -> dict[str, Any]:
    """Cancel every cell that has not ended (each refunded); the cells already done keep their images."""
    services = services_of(request)
    return grid_view(services, services.grids.cancel(grid_id, viewer=who.id, admin=who.admin))


@router.get(
    "/grids/{grid_id}/images/{z}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "the labelled grid, a spellbook-grid chunk inside"}},
)
def grid_image(grid_id: GridId, z: ZIndex, request: Request, who: Caller):
    """The labelled grid PNG of Z value `z`, once every cell is done (409 before). It carries a `spellbook-grid`
    chunk listing every cell's recipe: `spellbook reproduce GRID.png` runs the grid again."""
    services = services_of(request)
    grid = services.grids.get(grid_id, viewer=who.id, admin=who.admin)
    if z >= grid.z_count:
        raise NotFound(f"grid {grid_id} has {grid.z_count} Z value(s), numbered from 0; no {z}", field="z")
    if grid.state != "done":
        done = sum(cell.job.state == "done" for cell in grid.cells)
        raise Conflict(
            f"grid {grid_id} is {grid.state} ({done} of {len(grid.cells)} cells done): its picture is drawn once "
            "every cell is done",
            field="grid_id",
        )
    # Drawn once: the cells of a done grid never change.
    path = services.settings.home / "grids" / f"{grid.id}-{z}.png"
    if not path.exists():
        members = [cell for cell in grid.cells if cell.z == z]
        files = [services.settings.home / (_cell_file(cell.job) or "") for cell in members]
        for cell, file in zip(members, files, strict=True):
            if not file.is_file():
                raise NotFound(f"the image of cell ({cell.x}, {cell.y}) is gone from the server", field="z")
        png = grid_png(
            grid.axes,
            z,
            [Cell(cell.x, cell.y, cell.z, cell.job.recipe) for cell in members],
            [open_image(file) for file in files],
            [file.name for file in files],
        )
        try:
            write_png_bytes(png, path)
        except OSError as exc:
            raise StorageFailed.of(exc, str(path)) from None
    return FileResponse(
        path, media_type="image/png", filename=f"spellbook-grid-{grid.id}-{z}.png", content_disposition_type="inline"
    )


@router.get("/grids/{grid_id}/events")
async def grid_events(grid_id: GridId, request: Request, who: Caller) -> StreamingResponse:
    """Server-sent events: `progress` (the grid's state and progress, and each cell's state, progress and image
    URL once done) whenever something changed, then one `done`/`failed`/`cancelled` with the whole grid."""
    services = services_of(request)
    services.grids.get(grid_id, viewer=who.id, admin=who.admin)  # 404 for another's grid

    async def stream():
        last_sent = None
        while True:
            grid = services.grids.get(grid_id)
            if grid.state in FINAL:
                yield f"event: {grid.state}\ndata: {json.dumps(grid_view(services, grid))}\n\n"
                return
            event = grid_view(services, grid, recipes=False)
            if event != last_sent:
                yield f"event: progress\ndata: {json.dumps(event)}\n\n"
                last_sent = event
            if await request.is_disconnected() or services.stopping.is_set():
                return
            await asyncio.sleep(0.2)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
