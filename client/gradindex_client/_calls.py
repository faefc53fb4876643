"""What ``Client`` and ``AsyncClient`` share: settings from the environment, the endpoints'
paths and bodies, the errors of a failed request and the back-off between retries."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from ._errors import ConnectionFailed, GradindexHTTPError, error_for

__all__ = ["API_KEY_ENV", "DEFAULT_URL", "URL_ENV", "Calls", "M", "Payload", "segment"]

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "GRADINDEX_API_KEY"
URL_ENV = "GRADINDEX_URL"
M = TypeVar("M", bound=BaseModel)
Payload = dict[str, Any]


def segment(value: str) -> str:
    """``value`` as one URL path segment (a ``/`` in an example id is encoded too)."""
    return quote(str(value), safe="")


class Calls:
    """What the two clients share: the endpoints as (method, path, body), errors, back-off."""

    def __init__(self, base_url: str | None, api_key: str | None, retries: int,
                 backoff: float, max_backoff: float) -> None:
        self.base_url = (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        if retries < 0 or backoff < 0:
            raise ValueError("`retries` and `backoff` must be non-negative")
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    def _url(self, path: str) -> str:
        return self.base_url + path

    @staticmethod
    def _unreachable(method: str, url: str, exc: httpx.TransportError) -> ConnectionFailed:
        """The client's error for a request that got no response, saying what to check."""
        kind = type(exc).__name__
        detail = str(exc) or kind
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            message = (f"could not connect to {url} ({detail}); is the server running there? "
                       f"Point the client at it with `base_url` or {URL_ENV}")
        elif isinstance(exc, httpx.TimeoutException):
            message = (f"{method} {url} got no answer in time ({kind}); raise the client's "
                       "`timeout` (seconds per request) or send fewer examples per request")
        else:
            message = f"{method} {url} failed before the server answered ({kind}: {detail})"
        return ConnectionFailed(url, kind, message)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _delay(self, attempt: int, error: GradindexHTTPError) -> float:
        if error.retry_after is not None:
            return min(error.retry_after, self.max_backoff)
        return min(self.backoff * 2**attempt, self.max_backoff)

    @staticmethod
    def _error(response: httpx.Response) -> GradindexHTTPError:
        kind, message = "HTTPError", response.text[:500] or response.reason_phrase
        try:
            body = response.json()
            kind = str(body["error"]["type"])
            message = str(body["error"]["message"])
        except (ValueError, KeyError, TypeError):
            pass
        retry: float | None = None
        header = response.headers.get("Retry-After")
        if header is not None:
            try:
                retry = float(header)
            except ValueError:
                retry = None
        return error_for(response.status_code, kind, message, retry)

    @staticmethod
    def _index(name: str, *rest: str) -> str:
        return "/v1/indexes/" + "/".join([segment(name), *rest])

    # Optional fields are sent only when set, so that a server from before they existed
    # (its requests forbid unknown fields) still answers the calls that do not use them.

    @staticmethod
    def _influence_body(examples: Sequence[Payload] | None, k: int, direction: str,
                        filter: dict[str, Any] | None, normalize: bool,
                        render: bool, ids: Sequence[str] | None = None,
                        include_self: bool = False) -> dict[str, Any]:
        if (examples is None) == (ids is None):
            raise ValueError("give exactly one of `examples` (payloads) and `ids` (training "
                             "example ids)")
        body: dict[str, Any] = {"k": k, "direction": direction, "normalize": normalize}
        if ids is not None:
            if isinstance(ids, str):
                raise TypeError("`ids` is a list of ids, got one string")
            body["ids"] = [str(i) for i in ids]
            if include_self:
                body["include_self"] = True
        else:
            assert examples is not None
            body["examples"] = list(examples)
        if filter is not None:
            body["filter"] = filter
        if render:
            body["render"] = True
        return body

    @staticmethod
    def _scores_body(examples: Sequence[Payload], ids: Sequence[str] | None,
                     strict: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"examples": list(examples),
                                "ids": None if ids is None else [str(i) for i in ids]}
        if ids is not None and not strict:
            body["missing"] = "skip"
        return body

    @staticmethod
    def _select_body(examples: Sequence[Payload], k: int, filter: dict[str, Any] | None,
                     normalize: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"examples": list(examples), "k": k, "normalize": normalize}
        if filter is not None:
            body["filter"] = filter
        return body

    @staticmethod
    def _page_params(limit: int, offset: int, ascending: bool, render: bool,
                     filter: dict[str, Any] | None = None,
                     min_self_influence: float | None = None,
                     max_self_influence: float | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset,
                                  "ascending": str(ascending).lower()}
        if render:
            params["render"] = "true"
        if filter is not None:
            params["filter"] = json.dumps(filter)
        if min_self_influence is not None:
            params["min_self_influence"] = repr(float(min_self_influence))
        if max_self_influence is not None:
            params["max_self_influence"] = repr(float(max_self_influence))
        return params

    @staticmethod
    def _examples_params(limit: int, offset: int, filter: dict[str, Any] | None,
                         render: bool, misclassified: bool = False,
                         predict: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if misclassified:
            params["misclassified"] = "true"
        if predict:
            params["predict"] = "true"
        if filter is not None:
            params["filter"] = json.dumps(filter)
        if render:
            params["render"] = "true"
        return params

    @staticmethod
    def _check_page_size(page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"`page_size` must be at least 1, got {page_size}")
