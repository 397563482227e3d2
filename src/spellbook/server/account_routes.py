"""/api/v1/session and /api/v1/me/ledger: sign in with a user name and password, sign out, the credits ledger.

A password sign-in makes a fresh API token (labelled "web session") and sets it as the `spellbook_token`
cookie: HttpOnly (page scripts cannot read it), SameSite=Strict (other sites' pages cannot send it), Secure
over https. Signing out revokes that token and clears the cookie. Sign-ins are rate-limited per user name and
per client address, and a wrong user name and a wrong password get the same answer, in the same time.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from spellbook.errors import Unauthorized
from spellbook.server.app import Caller, services_of
from spellbook.server.security import SESSION_COOKIE, SESSION_LABEL, check_origin

router = APIRouter(prefix="/api/v1", tags=["account"])


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class Session(BaseModel):
    user: str
    role: str


def _cookie_options(request: Request) -> dict[str, Any]:
    return {"path": "/", "httponly": True, "samesite": "strict", "secure": request.url.scheme == "https"}


@router.post(
    "/session",
    responses={401: {"description": "wrong user name or password"}, 429: {"description": "too many attempts"}},
)
def sign_in(body: SignIn, request: Request, response: Response) -> Session:
    """Sign in with a user name and password: sets the `spellbook_token` cookie (a new token, HttpOnly)."""
    services = services_of(request)
    check_origin(request)  # no credentials needed here, so the Caller dependency (which checks it) is not used
    address = request.client.host if request.client else "unknown"
    services.signin_limiter.check(f"address:{address}")
    services.signin_limiter.check(f"user:{body.username}")
    user = services.accounts.check_password(body.username, body.password)
    if user is None:
        raise Unauthorized("wrong user name or password")
    token = services.accounts.create_token(user.name, label=SESSION_LABEL)
    response.set_cookie(SESSION_COOKIE, token, **_cookie_options(request))
    return Session(user=user.name, role=user.role)


@router.delete("/session", status_code=204, response_class=Response)
def sign_out(request: Request) -> Response:
    """Sign out: revokes the session's token (a token made by a password sign-in) and clears the cookie.
    A pasted API token is only forgotten by this browser, not revoked (`spellbook token revoke` does that)."""
    services = services_of(request)
    check_origin(request)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        services.accounts.revoke_token_value(token, label=SESSION_LABEL)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, **_cookie_options(request))
    return response


@router.get("/me/ledger")
def my_ledger(
    request: Request,
    who: Caller,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[int | None, Query(ge=1, le=2**62, description="a row id: rows older than it")] = None,
) -> dict[str, Any]:
    """The caller's credits ledger, newest first; `next_before` pages to older rows (null on the last page)."""
    services = services_of(request)
    if who.user is None:  # the local user (auth off) pays nothing
        return {"entries": [], "next_before": None}
    rows = services.accounts.ledger(who.user.name, limit=limit + 1, before=before)
    more = len(rows) > limit
    rows = rows[:limit]
    return {"entries": rows, "next_before": rows[-1]["id"] if more else None}
