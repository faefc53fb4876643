"""Errors the client raises: one per status class, each with the server's message, and
:class:`ConnectionFailed` when no answer came at all."""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BadRequest",
    "ConnectionFailed",
    "GradindexHTTPError",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ServiceUnavailable",
    "error_for",
]


class GradindexHTTPError(Exception):
    """A request failed: the server answered with an error, or (:class:`ConnectionFailed`)
    did not answer. Catch this one class to handle every failure of the client.

    Attributes:
        status: the HTTP status code (0 when no response came).
        type: the server's error type (``IndexNotFound``, ``TaskError``, ...).
        message: the server's message, which says what was wrong.
        retry_after: seconds the server asked to wait (503), if it said.
    """

    def __init__(self, status: int, type: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.retry_after = retry_after


class ConnectionFailed(GradindexHTTPError):
    """No response came: the connection was refused or dropped, or the request timed out.

    Raised at once, not retried (only a 503 is). ``status`` is 0, ``type`` the transport's
    exception (``ConnectError``, ``ReadTimeout``, ...) and ``url`` the URL the request went to.
    """

    def __init__(self, url: str, type: str, message: str) -> None:
        super().__init__(0, type, message)
        self.args = (f"{type}: {message}",)  # no status to show
        self.url = url


class BadRequest(GradindexHTTPError):
    """400: the body is not valid JSON."""


class AuthenticationError(GradindexHTTPError):
    """401: no API key, or an unknown or revoked one."""


class PermissionDenied(GradindexHTTPError):
    """403: the key's scope does not allow this (deletes need ``admin``)."""


class NotFound(GradindexHTTPError):
    """404: no such index, example or endpoint."""


class PayloadTooLarge(GradindexHTTPError):
    """413: the request body is above the server's limit; send fewer examples."""


class InvalidRequest(GradindexHTTPError):
    """422: a field is out of range, or the task rejected an example."""


class ServiceUnavailable(GradindexHTTPError):
    """503: the server is busy (retried with back-off first) or cannot serve the index."""


_BY_STATUS: dict[int, type[GradindexHTTPError]] = {
    400: BadRequest, 401: AuthenticationError, 403: PermissionDenied, 404: NotFound,
    413: PayloadTooLarge, 422: InvalidRequest, 503: ServiceUnavailable,
}


def error_for(status: int, type: str, message: str,
              retry_after: float | None = None) -> GradindexHTTPError:
    """The exception for an error response."""
    return _BY_STATUS.get(status, GradindexHTTPError)(status, type, message, retry_after)
