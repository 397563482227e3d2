"""Errors a user can act on. Each says what was given, what is accepted, and (optionally) what to do.

The CLI prints them as one line and exits 2; the HTTP API returns {"error": {"code", "message", "field"}}
with the error's status. Anything that is not a SpellbookError is a bug and keeps its traceback.
"""

from __future__ import annotations


class SpellbookError(Exception):
    code = "error"
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.hint = hint

    def __str__(self) -> str:
        prefix = f"{self.field}: " if self.field and not self.message.startswith(self.field) else ""
        suffix = f" ({self.hint})" if self.hint else ""
        return f"{prefix}{self.message}{suffix}"

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": str(self), "field": self.field}}


class UserError(SpellbookError):
    """The input is wrong: a bad value, a missing file, a malformed image."""

    code = "invalid"
    http_status = 400


class NotFound(SpellbookError):
    code = "not_found"
    http_status = 404


class Refused(SpellbookError):
    """Valid input that we will not act on, for safety (a pickle file, a path outside the home)."""

    code = "refused"
    http_status = 400


class Conflict(SpellbookError):
    code = "conflict"
    http_status = 409


class Cancelled(SpellbookError):
    """A running generation was cancelled by its owner."""

    code = "cancelled"
    http_status = 409


class Unauthorized(SpellbookError):
    """No valid token or password (HTTP 401)."""

    code = "unauthorized"
    http_status = 401


class Forbidden(SpellbookError):
    """Authenticated, but not allowed: another user's job, an admin-only action, a foreign Origin."""

    code = "forbidden"
    http_status = 403


class InsufficientCredits(SpellbookError):
    code = "insufficient_credits"
    http_status = 402


class TooLarge(SpellbookError):
    """A request body or an image beyond the configured caps (HTTP 413)."""

    code = "too_large"
    http_status = 413


class RateLimited(SpellbookError):
    code = "rate_limited"
    http_status = 429


class StorageFailed(SpellbookError):
    """The server could not write what it made (a folder it may not write to, a full disk): not the request's
    fault, and not worth a retry; the job fails once and is refunded."""

    code = "storage_failed"
    http_status = 500

    @classmethod
    def of(cls, exc: OSError, what: str = "") -> StorageFailed:
        where = exc.filename or what or "the home folder"
        reason = (exc.strerror or str(exc)).lower()
        return cls(
            f"cannot write {where}: {reason}",
            field=None,
            hint="give the server's user write access to SPELLBOOK_HOME, or free disk space",
        )


class NotImplemented_(SpellbookError):
    """A feature this build does not have (HTTP 501): said by name, never faked."""

    code = "not_implemented"
    http_status = 501


class Unavailable(SpellbookError):
    """The server is shutting down: the request was not finished here (a queued job stays queued)."""

    code = "unavailable"
    http_status = 503


class GenerationFailed(SpellbookError):
    """The engine made no usable image (NaN/inf values, one flat colour): a sampler that broke down on this model,
    not a bad request. The job fails with this message (HTTP 500 where it is answered directly)."""

    code = "generation_failed"
    http_status = 500
