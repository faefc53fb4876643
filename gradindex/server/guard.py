"""What every request passes before a route sees it: a body whose values the database, FAISS and
torch can all take, and a ``Host`` this server answers to.

:class:`RequestGuard` reads a JSON body once (after :class:`~.app.BodyLimit` bounded it) and
answers 422, naming the place (``examples[0].x[3]``), to anything the rest of the service would
fail on in its own way: an integer beyond int64 (SQL drivers overflow), a non-finite number
(``NaN``, ``Infinity``, or ``1e400``, which Python reads as infinity and which silently empties
a search), a lone UTF-16 surrogate (not encodable as UTF-8: drivers raise), a NUL character
(PostgreSQL refuses it in text) and nesting deeper than :data:`MAX_DEPTH`. The path and query
string get the same NUL and surrogate checks. A body that is not JSON at all is left to the
route, which answers 400.

In keyless mode, or whenever ``GRADINDEX_ALLOWED_HOSTS`` is set, a request whose ``Host`` is
not allowed is answered 421 before anything else: a web page served by some domain that
resolves to 127.0.0.1 (DNS rebinding) cannot reach a keyless server with its own name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

__all__ = ["INT64", "MAX_DEPTH", "RequestGuard", "body_problem", "host_allowed", "replaying",
           "text_problem"]

INT64 = (-(2**63), 2**63 - 1)
"""The integers a body may hold (what SQL, numpy and torch all take)."""

MAX_DEPTH = 64
"""Nesting of arrays and objects a body may have (task payloads need a handful)."""

class _Bad:
    """A number the JSON parser read that no later layer could take, and what is wrong."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def _parse_int(text: str) -> int | _Bad:
    value = int(text)
    if not INT64[0] <= value <= INT64[1]:
        shown = text if len(text) <= 24 else text[:21] + "..."
        return _Bad(f"the integer {shown} is beyond the 64-bit range")
    return value


def _parse_float(text: str) -> float | _Bad:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 24 else text[:21] + "..."
        return _Bad(f"the number {shown} is too large (it would be read as infinity)")
    return value


def _parse_constant(text: str) -> _Bad:
    return _Bad(f"{text} is not a number JSON allows; send finite numbers only")


def text_problem(text: str) -> str | None:
    """What makes ``text`` unstorable (a NUL, a lone surrogate), or None."""
    if "\x00" in text:
        return "holds a NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone UTF-16 surrogate (not valid Unicode)"
    return None


def _place(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "the body"


def body_problem(raw: bytes) -> str | None:
    """What in a JSON body no later layer could take, naming its place; None when the body is
    fine or is not JSON at all (the route says so)."""
    try:
        data = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_parse_constant)
    except RecursionError:
        return f"the body is nested more than {MAX_DEPTH} levels deep"
    except ValueError:
        return None  # not JSON (or not UTF-8): the route answers 400
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_DEPTH:
            return f"the body is nested more than {MAX_DEPTH} levels deep"
        if isinstance(value, _Bad):
            return f"`{_place(path)}`: {value.why}"
        if isinstance(value, str):
            problem = text_problem(value)
            if problem:
                return f"`{_place(path)}` {problem}"
        elif isinstance(value, list):
            stack.extend((v, (*path, i)) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key, v in reversed(list(value.items())):
                problem = text_problem(key)
                if problem:
                    where = f"of `{_place(path)}`" if path else "at the top level"
                    return f"a key {where} {problem}"
                stack.append((v, (*path, key)))
    return None


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether a ``Host`` header (``name`` or ``name:port``, IPv6 in brackets) names one of
    ``allowed`` (``*`` allows any; ``.example.org`` allows its subdomains too)."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.rstrip(".")
    for pattern in allowed:
        pattern = pattern.strip().lower().strip("[]")
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith(".") and (name.endswith(pattern) or name == pattern[1:]):
            return True
    return False


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the already-read ``body`` once, then the client's
    further messages (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class RequestGuard:
    """Refuses, before any route runs, a request with a ``Host`` this server does not answer
    to (421), a NUL or lone surrogate in its path or query (422) or a JSON body holding a value
    no later layer could take (422).

    Args:
        app: the app.
        allowed_hosts: the ``Host`` names answered to; None answers any.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: list[str] | None) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.allowed_hosts is not None:
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not host_allowed(host, self.allowed_hosts):
                shown = host if len(host) <= 80 else host[:77] + "..."
                await error_response(
                    421, "MisdirectedRequest",
                    f"this server does not answer to the host {shown!r}; allowed: "
                    f"{', '.join(self.allowed_hosts)} (GRADINDEX_ALLOWED_HOSTS)",
                )(scope, receive, send)
                return
        problem = self._url_problem(scope)
        if problem is not None:
            await error_response(422, "ValidationError", problem)(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = body_problem(body) if body else None
        if problem is not None:
            await error_response(422, "ValidationError", problem)(scope, receive, send)
            return
        await self.app(scope, replaying(body, receive), send)

    @staticmethod
    def _url_problem(scope: Scope) -> str | None:
        path = str(scope.get("path", ""))
        problem = text_problem(path)
        if problem:
            return f"the path {problem}"
        query = scope.get("query_string", b"")
        if b"%00" in query or b"\x00" in query:
            return "the query string holds a NUL character"
        return None
