"""``Client`` and ``AsyncClient``: one method per endpoint, typed results, retries on 503.

Both take an injectable ``httpx.Client``/``httpx.AsyncClient`` or transport, so tests can hand
them an app in process or point them at a real server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import httpx

from ._calls import DEFAULT_URL, Calls, M, Payload, segment
from ._models import (
    Health,
    IndexDetail,
    IndexSummary,
    InfluenceResponse,
    ScoresResponse,
    SelectResponse,
    SelfInfluencePage,
    TrainingExample,
)

__all__ = ["DEFAULT_URL", "AsyncClient", "Client"]


class Client(Calls):
    """A synchronous gradindex client.

    Args:
        base_url: the server (default: ``GRADINDEX_URL`` or ``http://127.0.0.1:8000``).
        api_key: sent as ``Authorization: Bearer`` (default: ``GRADINDEX_API_KEY``).
        timeout: seconds per request.
        retries: how often a 503 (busy) is retried, waiting ``Retry-After`` or backing off.
        backoff: first back-off in seconds, doubled each retry (capped at ``max_backoff``).
        transport: an httpx transport (say, a mock or a test app).
        http_client: an ``httpx.Client`` to send with (its own settings are kept).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.25,
                 max_backoff: float = 10.0, transport: httpx.BaseTransport | None = None,
                 http_client: httpx.Client | None = None) -> None:
        super().__init__(base_url, api_key, retries, backoff, max_backoff)
        self._own = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout, transport=transport)

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, *, json: Any = None,
                 params: dict[str, Any] | None = None) -> httpx.Response:
        attempt = 0
        while True:
            response = self._http.request(method, self._url(path), json=json, params=params,
                                          headers=self._headers())
            if response.is_success:
                return response
            error = self._error(response)
            if response.status_code != 503 or attempt >= self.retries:
                raise error
            time.sleep(self._delay(attempt, error))
            attempt += 1

    def _get(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate(self._request(method, path, **kwargs).json())

    # ------------------------------------------------------------------ endpoints

    def health(self) -> Health:
        """The server's status, contract version and devices."""
        return self._get(Health, "GET", "/v1/health")

    def indexes(self) -> list[IndexSummary]:
        """Every index and whether the server serves it."""
        data = self._request("GET", "/v1/indexes").json()
        return [IndexSummary.model_validate(row) for row in data["indexes"]]

    def index(self, name: str) -> IndexDetail:
        """One index's size and settings."""
        return self._get(IndexDetail, "GET", self._index(name))

    def influence(self, name: str, examples: Sequence[Payload], k: int = 10, *,
                  direction: str = "proponents", filter: dict[str, Any] | None = None,
                  normalize: bool = False) -> InfluenceResponse:
        """The top-``k`` proponents and/or opponents (``direction="both"``) of each example.

        Args:
            filter: search only training examples whose metadata match
                (``{"label": 3}``, ``{"source": ["wiki", "books"]}``).
            normalize: rank by relative influence (score / sqrt(self-influence)).
        """
        body = self._influence_body(examples, k, direction, filter, normalize)
        return self._get(InfluenceResponse, "POST", self._index(name, "influence"), json=body)

    def scores(self, name: str, examples: Sequence[Payload],
               ids: Sequence[str] | None = None) -> ScoresResponse:
        """Exact scores ``[example][id]`` against ``ids`` (default: every live example)."""
        body = {"examples": list(examples), "ids": None if ids is None else list(ids)}
        return self._get(ScoresResponse, "POST", self._index(name, "scores"), json=body)

    def select(self, name: str, examples: Sequence[Payload], k: int = 10, *,
               filter: dict[str, Any] | None = None, normalize: bool = False
               ) -> SelectResponse:
        """Training examples ranked by mean influence over ``examples`` (data selection)."""
        body: dict[str, Any] = {"examples": list(examples), "k": k, "normalize": normalize}
        if filter is not None:
            body["filter"] = filter
        return self._get(SelectResponse, "POST", self._index(name, "select"), json=body)

    def self_influence(self, name: str, limit: int = 100, offset: int = 0, *,
                       ascending: bool = False) -> SelfInfluencePage:
        """One page of training examples by self-influence (highest first)."""
        params = {"limit": limit, "offset": offset, "ascending": str(ascending).lower()}
        return self._get(SelfInfluencePage, "GET", self._index(name, "self-influence"),
                         params=params)

    def example(self, name: str, example_id: str) -> TrainingExample:
        """A live training example by its id."""
        return self._get(TrainingExample, "GET", self._index(name, "examples",
                                                             segment(example_id)))

    def delete(self, name: str, example_id: str) -> TrainingExample:
        """Remove a training example from every result, for good (needs an admin key)."""
        data = self._request("DELETE", self._index(name, "examples", segment(example_id)))
        return TrainingExample.model_validate(data.json()["deleted"])

    def metrics(self) -> str:
        """The server's Prometheus metrics, as text."""
        return self._request("GET", "/metrics").text


class AsyncClient(Calls):
    """An asynchronous gradindex client; the same methods as :class:`Client`, awaited."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.25,
                 max_backoff: float = 10.0, transport: httpx.AsyncBaseTransport | None = None,
                 http_client: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, api_key, retries, backoff, max_backoff)
        self._own = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, *, json: Any = None,
                       params: dict[str, Any] | None = None) -> httpx.Response:
        attempt = 0
        while True:
            response = await self._http.request(method, self._url(path), json=json,
                                                params=params, headers=self._headers())
            if response.is_success:
                return response
            error = self._error(response)
            if response.status_code != 503 or attempt >= self.retries:
                raise error
            await asyncio.sleep(self._delay(attempt, error))
            attempt += 1

    async def _get(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate((await self._request(method, path, **kwargs)).json())

    async def health(self) -> Health:
        return await self._get(Health, "GET", "/v1/health")

    async def indexes(self) -> list[IndexSummary]:
        data = (await self._request("GET", "/v1/indexes")).json()
        return [IndexSummary.model_validate(row) for row in data["indexes"]]

    async def index(self, name: str) -> IndexDetail:
        return await self._get(IndexDetail, "GET", self._index(name))

    async def influence(self, name: str, examples: Sequence[Payload], k: int = 10, *,
                        direction: str = "proponents", filter: dict[str, Any] | None = None,
                        normalize: bool = False) -> InfluenceResponse:
        body = self._influence_body(examples, k, direction, filter, normalize)
        return await self._get(InfluenceResponse, "POST", self._index(name, "influence"),
                               json=body)

    async def scores(self, name: str, examples: Sequence[Payload],
                     ids: Sequence[str] | None = None) -> ScoresResponse:
        body = {"examples": list(examples), "ids": None if ids is None else list(ids)}
        return await self._get(ScoresResponse, "POST", self._index(name, "scores"), json=body)

    async def select(self, name: str, examples: Sequence[Payload], k: int = 10, *,
                     filter: dict[str, Any] | None = None, normalize: bool = False
                     ) -> SelectResponse:
        body: dict[str, Any] = {"examples": list(examples), "k": k, "normalize": normalize}
        if filter is not None:
            body["filter"] = filter
        return await self._get(SelectResponse, "POST", self._index(name, "select"), json=body)

    async def self_influence(self, name: str, limit: int = 100, offset: int = 0, *,
                             ascending: bool = False) -> SelfInfluencePage:
        params = {"limit": limit, "offset": offset, "ascending": str(ascending).lower()}
        return await self._get(SelfInfluencePage, "GET", self._index(name, "self-influence"),
                               params=params)

    async def example(self, name: str, example_id: str) -> TrainingExample:
        return await self._get(TrainingExample, "GET",
                               self._index(name, "examples", segment(example_id)))

    async def delete(self, name: str, example_id: str) -> TrainingExample:
        data = await self._request("DELETE", self._index(name, "examples", segment(example_id)))
        return TrainingExample.model_validate(data.json()["deleted"])

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text


