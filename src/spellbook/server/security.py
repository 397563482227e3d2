"""Who is calling, and what a request may carry: tokens, passwords, Origin checks, caps, rate limits."""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from PIL import Image

from spellbook.errors import Forbidden, RateLimited, TooLarge, Unauthorized, UserError
from spellbook.store.accounts import Accounts, User


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_required(mode: str, host: str) -> bool:
    """Auth is on when asked for, and always off loopback; `off` on a public bind is refused at start."""
    if mode == "on":
        return True
    if mode == "off":
        if not is_loopback(host):
            raise UserError(
                f"auth cannot be off when binding {host}: anyone on the network could use the server; "
                "bind 127.0.0.1 or leave SPELLBOOK_AUTH=auto",
                field="auth",
            )
        return False
    if mode != "auto":
        raise UserError(f"auth {mode!r} is not one of auto, on, off", field="auth")
    return not is_loopback(host)


@dataclass(frozen=True)
class Principal:
    """The caller: a user, or the local user (auth off) who owns nothing and pays nothing."""

    user: User | None

    @property
    def id(self) -> int | None:
        return self.user.id if self.user else None

    @property
    def admin(self) -> bool:
        return self.user is None or self.user.is_admin

    @property
    def name(self) -> str:
        return self.user.name if self.user else "local"

    @property
    def concepts_of(self) -> int | None:
        """Whose concepts this caller's prompts see beside the shared library: their own (a user), none (an
        admin or the local user, who keep the shared library itself)."""
        return None if self.admin else self.id


LOCAL = Principal(None)


def authenticate(request: Request, accounts: Accounts, required: bool, limiter: RateLimiter | None = None) -> Principal:
    """The caller, from a Bearer token, the session cookie or HTTP Basic. Wrong Basic passwords count against
    `limiter` per user name and per client address, as password sign-ins do (a client that sends the right
    password with every request, as A1111 clients do, is never slowed)."""
    header = request.headers.get("authorization", "")
    token = request.cookies.get("spellbook_token", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        token = value.strip()
    if token:
        user = accounts.user_for_token(token)
        if user is None:
            raise Unauthorized(
                "the token is not valid (revoked, or mistyped); create one with `spellbook token create`"
            )
        return Principal(user)
    if scheme.lower() == "basic" and value:
        try:
            name, _, password = base64.b64decode(value).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("malformed Basic authorization header") from None
        address = request.client.host if request.client else "unknown"
        keys = (f"address:{address}", f"user:{name}")
        if limiter is not None:
            for key in keys:
                limiter.check(key, spend=False)
        user = accounts.check_password(name, password)
        if user is None:
            if limiter is not None:
                for key in keys:
                    limiter.spend(key)
            raise Unauthorized("wrong user name or password")
        return Principal(user)
    if required:
        raise Unauthorized(
            "this server requires a token: send 'Authorization: Bearer TOKEN' (create one with "
            "`spellbook token create USER`)"
        )
    return LOCAL


def check_origin(request: Request) -> None:
    """A browser POST from another site (CSRF) is refused: its Origin must be this server."""
    origin = request.headers.get("origin")
    if not origin or request.method in ("GET", "HEAD", "OPTIONS"):
        return
    if origin == "null" or urlsplit(origin).netloc != request.headers.get("host", ""):
        raise Forbidden(f"requests from origin {origin} are not accepted; use the server's own pages or an API client")


def host_name(header: str) -> str:
    """The name in a Host header, without its port: 'localhost:7860' -> 'localhost', '[::1]:7860' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_host(header: str, bound: str, extra: tuple[str, ...] = ()) -> bool:
    """Is `header` (a request's Host) a name of this server? Loopback addresses and `localhost`, the address it
    is bound to, and the names an operator configured (SPELLBOOK_ALLOWED_HOSTS). Without auth this is what
    stops DNS rebinding: a page on rebind.evil that resolves to 127.0.0.1 still sends Host: rebind.evil."""
    name = host_name(header)
    if not name:
        return False
    return is_loopback(name) or name == bound.lower() or name in {e.strip().lower() for e in extra if e.strip()}


SIGNIN_PER_MINUTE = 10  # password sign-ins per user name and per client address
SESSION_COOKIE = "spellbook_token"
SESSION_LABEL = "web session"  # the label of tokens made by a password sign-in (revoked by signing out)


class RateLimiter:
    """A token bucket per key (a user, a client address): `per_minute` requests, refilled continuously."""

    def __init__(self, per_minute: int, what: str = "jobs"):
        self.what = what
        self.rate = per_minute / 60.0
        self.capacity = float(max(1, per_minute))
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def check(self, key: str, *, spend: bool = True) -> None:
        """Raise RateLimited when `key`'s bucket is empty; otherwise take one token (or, spend=False, none)."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self.lock:
            tokens = self._refilled(key, now)
            if tokens < 1:
                self.buckets[key] = (tokens, now)
                raise RateLimited(f"too many {self.what}: at most {int(self.capacity)} per minute; try again shortly")
            self.buckets[key] = (tokens - 1 if spend else tokens, now)

    def spend(self, key: str) -> None:
        """Take a token without raising (a failure already happened; the next check will tell)."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self.lock:
            self.buckets[key] = (max(0.0, self._refilled(key, now) - 1), now)

    def _refilled(self, key: str, now: float) -> float:
        """The tokens in `key`'s bucket now (call with the lock held)."""
        tokens, last = self.buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - last) * self.rate)


def decode_image(data: str, field: str, max_pixels: int) -> Image.Image:
    """A base64 image (optionally a data: URL), size-checked from its header before any pixel is decoded."""
    if not isinstance(data, str) or not data:
        raise UserError("expected a base64-encoded PNG or JPEG", field=field)
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise UserError("is not valid base64", field=field) from None
    return decode_image_bytes(raw, field, max_pixels)


def decode_image_bytes(raw: bytes, field: str, max_pixels: int) -> Image.Image:
    """An image file's bytes (an upload), size-checked from its header before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only: the size is known before any decoding
    except Image.DecompressionBombError as exc:
        raise TooLarge(
            f"image is far too large ({exc}); at most {max_pixels} pixels are allowed", field=field
        ) from None
    except (OSError, ValueError, SyntaxError):  # PIL's ways of saying 'not an image I can read'
        raise UserError("is not an image (PNG, JPEG or WebP expected)", field=field) from None
    if image.width * image.height > max_pixels:
        raise TooLarge(f"image is {image.width}x{image.height}, more than the {max_pixels} pixels allowed", field=field)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError):
        raise UserError("the image data is truncated or corrupt", field=field) from None
    return image
