"""The web UI: server-rendered pages (Jinja2) that call the native API from small vanilla JS modules.

The pages themselves need no credentials: their HTML is the same for everyone, and every piece of data
comes from /api/v1 with the caller's token (the `spellbook_token` cookie), so each page's JSON twin is the API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from spellbook import __version__
from spellbook.server.app import services_of

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(tags=["pages"], include_in_schema=False)


def mount(app: FastAPI) -> None:
    """Serve the pages and their static files (CSS, JS modules) from this server: no CDN, no build step."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


def _page(request: Request, template: str, title: str) -> HTMLResponse:
    services = services_of(request)
    context = {"title": title, "version": __version__, "auth": services.auth, "page": template.removesuffix(".html")}
    return templates.TemplateResponse(request, template, context)


@router.get("/", response_class=HTMLResponse)
def create_page(request: Request) -> HTMLResponse:
    """Create: prompt, settings, Generate with live progress, results with their recipes."""
    return _page(request, "create.html", "Create")


@router.get("/gallery", response_class=HTMLResponse)
def gallery_page(request: Request) -> HTMLResponse:
    """Gallery: search by words and meaning, the public feed, each image's recipe."""
    return _page(request, "gallery.html", "Gallery")
