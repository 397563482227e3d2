"""The FastAPI application: services wired once in `create_app`, routes in native.py and a1111.py.

Embedded mode (no broker): jobs are rows in the store, run by a worker thread in this process.
Scale-out mode (`broker`): the same rows, dispatched in compatible groups to Celery workers.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware

from spellbook import __version__
from spellbook.errors import Forbidden, SpellbookError, TooLarge, Unavailable, UserError
from spellbook.queue.filer import GalleryFiler
from spellbook.queue.grids import GridStore
from spellbook.queue.jobs import FINAL, Job, JobQueue
from spellbook.queue.worker import EmbeddedWorker
from spellbook.server.security import (
    LOCAL,
    SIGNIN_PER_MINUTE,
    Principal,
    RateLimiter,
    allowed_host,
    auth_required,
    authenticate,
    check_origin,
    host_name,
    is_loopback,
)
from spellbook.settings import Settings
from spellbook.store.accounts import Accounts
from spellbook.store.db import Database
from spellbook.studio import Studio


@dataclass
class Services:
    settings: Settings
    db: Database
    accounts: Accounts
    queue: JobQueue
    studio: Studio
    auth: bool
    limiter: RateLimiter
    filer: GalleryFiler | None = None  # files finished jobs' images in the gallery (the outbox)
    worker: EmbeddedWorker | None = None
    dispatcher: object | None = None  # queue.celery.Dispatcher in scale-out mode
    default_model: str = "shapes"
    started: float = field(default_factory=time.time)
    # Set when shutdown begins (SIGTERM, Ctrl-C): requests that wait for a job stop waiting, so the server exits in
    # seconds; their jobs stay in the store and run after a restart.
    stopping: threading.Event = field(default_factory=threading.Event)
    # Password sign-ins per user name and per client address: slow enough that guessing passwords is hopeless.
    signin_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(SIGNIN_PER_MINUTE, "sign-in attempts"))

    def set_default_model(self, name: str) -> None:
        """The model jobs use when they name none; kept in the store, so a restart keeps it."""
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO server_options (name, value) VALUES ('default_model', ?) "
                "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (json.dumps(name),),
            )
        self.default_model = name

    @property
    def grids(self) -> GridStore:
        """X/Y/Z plots: rows beside the jobs of their cells (nothing of their own to keep in memory)."""
        return GridStore(self.db, self.queue)

    def wake(self) -> None:
        if self.worker:
            self.worker.wake.set()
        if self.dispatcher:
            self.dispatcher.wake.set()

    def live(self, job_id: str):
        if self.worker:
            return self.worker.live.get(job_id)
        return None

    def wait_final(self, job_id: str, timeout: float = 3600) -> Job:
        """Block until the job ends (for the A1111 API's synchronous calls; they run in FastAPI's thread pool,
        never on the event loop). A shutdown ends the wait with a 503: the job stays queued and runs after the
        restart (its owner finds it at /api/v1/jobs/{id})."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.queue.get(job_id)
            if job.state in FINAL or time.monotonic() > deadline:
                return job
            if self.stopping.wait(0.1):
                raise Unavailable(
                    f"the server is shutting down; job {job_id} was not finished and runs again when it is back",
                    field="job_id",
                    hint=f"fetch it later from /api/v1/jobs/{job_id}",
                )


def check_writable(folder: Path) -> None:
    """A folder the server writes to must be writable now, not found out job by job (exit 2 at start)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise UserError(
            f"cannot write {folder}: {(exc.strerror or str(exc)).lower()}",
            field="home",
            hint="give this user write access to SPELLBOOK_HOME, or set it to another folder",
        ) from None


def build_services(settings: Settings, *, start_worker: bool = True) -> Services:
    db = Database(settings.db_path)  # a database this process cannot write is refused here, in one line
    for folder in (settings.images_dir, settings.inputs_dir):
        check_writable(folder)
    accounts = Accounts(db)
    required = auth_required(settings.auth, settings.host)
    if required and not is_loopback(settings.host) and not accounts.has_admin():
        raise UserError(
            f"serving on {settings.host} requires authentication, and there is no admin user yet: create one with "
            "`spellbook users add NAME --admin` and `spellbook token create NAME`",
            field="auth",
        )
    queue = JobQueue(db, lease_seconds=settings.lease_seconds)
    studio = Studio(settings)
    services = Services(settings, db, accounts, queue, studio, required, RateLimiter(settings.rate_limit))
    saved = db.execute("SELECT value FROM server_options WHERE name = 'default_model'").fetchone()
    if saved is not None:
        services.default_model = json.loads(saved[0])
    if start_worker:
        # Each finished job's images go into the gallery, owned by the job's owner (private until published).
        services.filer = GalleryFiler(settings, queue)
        if settings.broker:
            from spellbook.queue.celery import Dispatcher

            services.dispatcher = Dispatcher(settings, queue)
        else:
            services.worker = EmbeddedWorker(
                studio,
                queue,
                batching=settings.batching,
                max_batch=settings.max_jobs_batch,
                filer=services.filer,
            )
    return services


class BodyLimit(BaseHTTPMiddleware):
    """Refuse bodies over the cap from Content-Length, before reading them."""

    def __init__(self, app, max_bytes: int):
        super().__init__(app)
        self.max_bytes = max_bytes

    async def dispatch(self, request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            error = TooLarge(
                f"request body is {int(length)} bytes; at most {self.max_bytes} are accepted", field="body"
            )
            return JSONResponse(error.to_dict(), status_code=error.http_status)
        if request.headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.max_bytes:
                    error = TooLarge(f"request body exceeds {self.max_bytes} bytes", field="body")
                    return JSONResponse(error.to_dict(), status_code=error.http_status)
            request._body = body
        return await call_next(request)


class HostCheck(BaseHTTPMiddleware):
    """Without auth (a loopback bind), answer only requests that name this server in their Host header."""

    def __init__(self, app, services: Services):
        super().__init__(app)
        self.services = services
        self.extra = tuple(services.settings.allowed_hosts.split(","))

    async def dispatch(self, request: Request, call_next):
        host = request.headers.get("host", "")
        if not self.services.auth and not allowed_host(host, self.services.settings.host, self.extra):
            error = Forbidden(
                f"this server does not answer to the name {host_name(host) or '(none)'!r}: without authentication "
                "it answers only to its loopback address (a page elsewhere could otherwise drive it)",
                field="host",
                hint="browse to http://127.0.0.1, or add the name to SPELLBOOK_ALLOWED_HOSTS",
            )
            return JSONResponse(error.to_dict(), status_code=error.http_status)
        return await call_next(request)


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    services = services or build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loops = [loop for loop in (services.filer, services.worker, services.dispatcher) if loop is not None]
        for loop in loops:
            loop.start()
        yield
        services.stopping.set()
        for loop in reversed(loops):
            loop.stop(timeout=3)  # a generation in flight keeps its lease and runs again after a restart

    app = FastAPI(
        title="Spellbook",
        version=__version__,
        description="Self-hosted Stable Diffusion: native API (/api/v1) and an A1111-compatible API (/sdapi/v1).",
        lifespan=lifespan,
        docs_url=None,  # served below from this server's own copies of Swagger UI and ReDoc: no CDN, works offline
        redoc_url=None,
    )
    app.state.services = services
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_mb * 1024 * 1024)
    app.add_middleware(HostCheck, services=services)

    @app.exception_handler(SpellbookError)
    async def spellbook_error(_request: Request, exc: SpellbookError):
        # A 401 says how to authenticate (RFC 9110). Bearer only: a Basic challenge would make browsers pop up a
        # password dialog over the web UI's own sign-in (A1111 clients send Basic credentials unasked anyway).
        headers = {"WWW-Authenticate": 'Bearer realm="spellbook"'} if exc.http_status == 401 else None
        return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """Routing's own errors (no such path, method not allowed) in the same error shape as ours. A 405 says
        every method the path takes (Starlette's names only the first route that matched the path)."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        message, headers = str(exc.detail), dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            allowed = allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed on {request.url.path}; it takes {', '.join(allowed)}"
        body = {"error": {"code": code, "message": message, "field": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        path = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{path}: {first.get('msg')}" if path else str(first.get("msg"))
        return JSONResponse({"error": {"code": "invalid", "message": message, "field": path}}, status_code=400)

    def openapi() -> dict:
        """FastAPI's schema, saying what the API really answers: a bad request is a 400 in our error shape (not
        FastAPI's 422), and any other error status comes in that shape too (`default`)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            schemas["Error"] = ERROR_SCHEMA
            error = {"$ref": "#/components/schemas/Error"}
            for operation in (op for item in schema.get("paths", {}).values() for op in item.values()):
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if "400" not in responses:  # a route that answers 400 in another shape (ComfyUI's) declares it
                    responses["400"] = {"description": "Bad request: the field named and what to do", "content": {"application/json": {"schema": error}}}  # fmt: skip
                responses["default"] = {"description": "Any other error (401, 403, 404, 409, 413, 429, 503 …)", "content": {"application/json": {"schema": error}}}  # fmt: skip
            if not services.auth:  # auth off (loopback): credentials are optional, and checked when sent
                for operation in (op for item in schema["paths"].values() for op in item.values()):
                    if "security" in operation:
                        operation["security"].insert(0, {})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    vendor = "/static/vendor"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Spellbook API",
            swagger_js_url=f"{vendor}/swagger-ui-bundle.js",
            swagger_css_url=f"{vendor}/swagger-ui.css",
            swagger_favicon_url=f"{vendor}/favicon-32x32.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="Spellbook API",
            redoc_js_url=f"{vendor}/redoc.standalone.js",
            redoc_favicon_url=f"{vendor}/favicon-32x32.png",
            with_google_fonts=False,
        )

    from spellbook.server import (
        a1111,
        account_routes,
        comfy,
        concept_routes,
        gallery_routes,
        grid_routes,
        native,
        pages,
    )

    app.include_router(native.router)
    app.include_router(grid_routes.router)
    app.include_router(account_routes.router)
    app.include_router(gallery_routes.router)
    app.include_router(concept_routes.router)
    app.include_router(a1111.router)
    app.include_router(comfy.router)
    pages.mount(app)
    return app


# Every error the API returns: {"error": {"code", "message", "field"}} (errors.SpellbookError.to_dict).
ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "field"],
            "properties": {
                "code": {"type": "string", "description": "e.g. invalid, not_found, forbidden, insufficient_credits"},
                "message": {"type": "string", "description": "what was wrong and what to do"},
                "field": {"type": ["string", "null"], "description": "the request field, as a dotted path"},
            },
        }
    },
}


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this request's path."""
    from starlette.routing import Match

    methods = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            methods.append(method)
    return methods


# How a caller proves who it is, declared in the schema of every operation that takes a `Caller` (FastAPI lists
# a dependency's security schemes); `authenticate` does the checking. HTTP Basic (a user name and password, for
# A1111 clients) is accepted too, undeclared: wrong passwords are rate-limited (429 after a few), which is not
# what a client probing each declared scheme with bad credentials expects.
TOKEN = HTTPBearer(auto_error=False, scheme_name="token", description="an API token: `spellbook token create USER`")
SESSION = APIKeyCookie(
    name="spellbook_token", auto_error=False, scheme_name="session", description="set by POST /api/v1/session"
)


def principal(
    request: Request,
    _token: Annotated[HTTPAuthorizationCredentials | None, Depends(TOKEN)] = None,
    _session: Annotated[str | None, Depends(SESSION)] = None,
) -> Principal:
    """FastAPI dependency: the authenticated caller (and the Origin check for writes)."""
    services: Services = request.app.state.services
    check_origin(request)
    limiter = services.signin_limiter  # one limit for every way a password is presented
    if not services.auth:
        if not _has_credentials(request):
            return LOCAL
        return authenticate(request, services.accounts, required=False, limiter=limiter)
    return authenticate(request, services.accounts, required=True, limiter=limiter)


Caller = Annotated[Principal, Depends(principal)]


def _has_credentials(request: Request) -> bool:
    return bool(request.headers.get("authorization") or request.cookies.get("spellbook_token"))


def services_of(request: Request) -> Services:
    return request.app.state.services
