"""The one place where errors become HTTP responses: ``{"error": {"type", "message"}}``.

Library code raises the indexer's error hierarchy (or the few server errors below) and never
``HTTPException``; :data:`STATUS` maps each class to a status code, most specific first.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gradindex.indexer.errors import (
    ConfigError,
    ExampleNotFound,
    GradindexError,
    IndexNotFound,
    NonFiniteLoss,
    StorageError,
    TaskError,
)
from gradindex.indexer.store import KeyNotFound

__all__ = [
    "STATUS",
    "BodyTooLarge",
    "ClientGone",
    "Forbidden",
    "IndexUnavailable",
    "LimitExceeded",
    "Overloaded",
    "ServerError",
    "Unauthorized",
    "error_response",
    "install_error_handlers",
    "is_outage",
    "outage_response",
    "status_of",
]

log = logging.getLogger(__name__)


class ServerError(GradindexError):
    """Base of the errors only the server raises."""


class Unauthorized(ServerError):
    """No API key, or one that is unknown or revoked."""


class Forbidden(ServerError):
    """The API key's scope does not allow this request."""


class BodyTooLarge(ServerError):
    """The request body is above ``GRADINDEX_MAX_BODY_BYTES``."""


class LimitExceeded(ServerError):
    """A request asks for more than a server limit allows (ids, hits); the message names it."""


class ClientGone(ServerError):
    """The client disconnected; its request's work stopped at the next batch boundary."""


class Overloaded(ServerError):
    """A device worker's queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IndexUnavailable(ServerError):
    """The index exists but this server cannot serve it (say, its model weights changed)."""


STATUS: list[tuple[type[BaseException], int]] = [
    (Unauthorized, 401),
    (Forbidden, 403),
    (IndexNotFound, 404),
    (ExampleNotFound, 404),
    (KeyNotFound, 404),
    (BodyTooLarge, 413),
    (LimitExceeded, 413),
    (NonFiniteLoss, 422),
    (TaskError, 422),
    (ConfigError, 422),
    (ClientGone, 499),
    (Overloaded, 503),
    (IndexUnavailable, 503),
    (StorageError, 503),
    (GradindexError, 500),
]


def status_of(exc: BaseException) -> int:
    """The HTTP status of an error of the hierarchy (500 for anything unexpected)."""
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(status: int, kind: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status,
                        headers=headers)


OUTAGE_RETRY_AFTER_S = 5
"""``Retry-After`` of a 503 for a database or storage failure (restarts take seconds)."""


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database or the disk failed, not the request: a connection
    refused or lost, a database that is down or full, an OS error (no space left, I/O)."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OSError)


class _OutageLog:
    """One log line per failure, never a traceback; the same failure repeated within
    ``every_s`` seconds is counted and summed up in the next line instead."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.last: dict[str, float] = {}
        self.quiet: dict[str, int] = {}

    def __call__(self, what: str, detail: str) -> None:
        now = time.monotonic()
        if now - self.last.get(what, -1e9) < self.every_s:
            self.quiet[what] = self.quiet.get(what, 0) + 1
            return
        self.last[what] = now
        more = self.quiet.pop(what, 0)
        tail = f" ({more} more since the last line)" if more else ""
        log.error("%s: %s%s", what, detail, tail)


_outage_log = _OutageLog()


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk (ENOSPC, SQLite's SQLITE_FULL, PostgreSQL's 53100)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    orig = getattr(exc, "orig", None)
    text = str(orig or exc).lower()
    return ("disk is full" in text or "no space left" in text
            or getattr(orig, "sqlstate", None) == "53100")


def outage_response(exc: BaseException) -> JSONResponse:
    """The 503 of a database or storage failure, logged in one line (no traceback)."""
    if isinstance(exc, OSError):
        kind, what = "StorageUnavailable", "storage failed"
        detail = f"{type(exc).__name__}: {exc.strerror or exc}"
        message = (f"the server's storage failed ({exc.strerror or type(exc).__name__}); "
                   "try again later")
    else:
        kind, what = "DatabaseUnavailable", "database unavailable"
        orig = getattr(exc, "orig", None) or exc
        detail = " ".join(f"{type(orig).__name__}: {orig}".split())[:300]
        message = "the database is unavailable; try again later"
    if _disk_full(exc):
        kind, what = "StorageFull", "disk full"
        message = "the server's disk is full; try again once space is freed"
    _outage_log(what, detail)
    return error_response(503, kind, message,
                          headers={"Retry-After": str(OUTAGE_RETRY_AFTER_S)})


def _headers(exc: BaseException) -> dict[str, str] | None:
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, StorageError):
        return {"Retry-After": str(OUTAGE_RETRY_AFTER_S)}
    if isinstance(exc, IndexUnavailable):  # retired mid-request, or not loadable yet
        return {"Retry-After": "1"}
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    return None


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


async def _gradindex_error(_request: Request, exc: Exception) -> JSONResponse:
    status = status_of(exc)
    if status >= 500 and not isinstance(exc, Overloaded | IndexUnavailable | StorageError):
        log.error("request failed: %s", exc, exc_info=exc)
    message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    return error_response(status, type(exc).__name__, message, _headers(exc))


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "not valid JSON")
        return error_response(400, "MalformedJSON", f"the request body is not valid JSON: {reason}")
    parts = [f"`{_field(e.get('loc', ()))}`: {e.get('msg', 'invalid')}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return error_response(422, "ValidationError", "; ".join(parts) + more)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kinds = {404: "NotFound", 405: "MethodNotAllowed", 413: "BodyTooLarge"}
    message = str(exc.detail) if exc.detail else "error"
    if exc.status_code == 404 and message == "Not Found":
        message = "no such endpoint; the API is described at /docs"
    return error_response(exc.status_code, kinds.get(exc.status_code, "HTTPError"), message,
                          dict(exc.headers) if exc.headers else None)


async def _outage(request: Request, exc: Exception) -> JSONResponse:
    if is_outage(exc):
        return outage_response(exc)
    return await _unexpected(request, exc)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error", exc_info=exc)
    return error_response(500, "InternalError", "the server failed; see its log")


def install_error_handlers(app: FastAPI) -> None:
    """Render every error as ``{"error": {"type", "message"}}`` with its status code."""
    app.add_exception_handler(GradindexError, _gradindex_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # Handled by class, not by the catch-all below: Starlette re-raises what reaches that one
    # (to the server, which logs a traceback per request).
    app.add_exception_handler(DBAPIError, _outage)
    app.add_exception_handler(OSError, _outage)
    app.add_exception_handler(Exception, _unexpected)
