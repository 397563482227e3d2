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
from spellbook.recipe import HIRES_UPSCALERS
from spellbook.server.app import services_of

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(tags=["pages"], include_in_schema=False)


def mount(app: FastAPI) -> None:
    """Serve the pages and their static files (CSS, JS modules) from this server: no CDN, no build step."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


def _page(request: Request, template: str, title: str, **extra) -> HTMLResponse:
    services = services_of(request)
    context = {"title": title, "version": __version__, "auth": services.auth, "page": template.removesuffix(".html"),
               "hires_upscalers": HIRES_UPSCALERS}  # fmt: skip
    context.update(extra)
    return templates.TemplateResponse(request, template, context)


@router.get("/", response_class=HTMLResponse)
def create_page(request: Request) -> HTMLResponse:
    """Create: prompt, settings, Generate with live progress, results with their recipes."""
    return _page(request, "create.html", "Create", mode="txt2img")


@router.get("/sketch", response_class=HTMLResponse)
def sketch_page(request: Request) -> HTMLResponse:
    """Create, sketch mode: draw (or upload) a start picture; it is the init image of an img2img job."""
    return _page(request, "create.html", "Sketch", mode="img2img")


@router.get("/inpaint", response_class=HTMLResponse)
def inpaint_page(request: Request) -> HTMLResponse:
    """Create, inpaint mode: paint a mask over a picture; only the masked area is drawn again."""
    return _page(request, "create.html", "Inpaint", mode="inpaint")


@router.get("/gallery", response_class=HTMLResponse)
def gallery_page(request: Request) -> HTMLResponse:
    """Gallery: search by words and meaning, the public feed, each image's recipe."""
    return _page(request, "gallery.html", "Gallery")


@router.get("/concepts", response_class=HTMLResponse)
def concepts_page(request: Request) -> HTMLResponse:
    """Concepts: the library (download, upload, remove) and training a new one from pictures, with progress."""
    return _page(request, "concepts.html", "Concepts")


@router.get("/account", response_class=HTMLResponse)
def account_page(request: Request) -> HTMLResponse:
    """Account: sign in (user name and password, or a token), sign out, credits and the ledger."""
    return _page(request, "account.html", "Account")
