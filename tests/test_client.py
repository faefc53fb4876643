"""The client: no heavy imports, typed results, errors with the server's message, retries on
503 that honour Retry-After, a URL in the error when no answer comes, an injectable transport,
tables with payloads, paging, and the async twin against the server."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import gradindex_client as client
import httpx
import pytest
from gradindex_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConnectionFailed,
    GradindexHTTPError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    SelfInfluencePage,
    ServiceUnavailable,
)

from gradindex.indexer.tasks import DigitsTask

from .conftest import REPO, SERVED_INDEX, LiveServer, free_port


def test_importing_client_imports_neither_torch_nor_faiss_nor_numpy() -> None:
    code = ("import sys, gradindex_client; heavy = {'torch', 'faiss', 'numpy', 'gradindex'} & "
            "set(sys.modules); assert not heavy, heavy; print(len(gradindex_client.__all__))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert all(hasattr(client, name) for name in client.__all__)


def _error(status: int, kind: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": kind, "message": message}},
                          headers=headers)


@pytest.mark.parametrize("status,cls", [(401, AuthenticationError), (403, PermissionDenied),
                                        (404, NotFound), (422, InvalidRequest),
                                        (503, ServiceUnavailable), (500, GradindexHTTPError)])
def test_errors_carry_status_type_and_message(status: int,
                                              cls: type[GradindexHTTPError]) -> None:
    transport = httpx.MockTransport(lambda _req: _error(status, "Kind", "what went wrong"))
    with Client("http://gradindex.test", transport=transport, retries=0) as c:
        with pytest.raises(cls) as info:
            c.index("digits")
    assert type(info.value) is cls
    assert (info.value.status, info.value.type, info.value.message) == (
        status, "Kind", "what went wrong")


def test_503_is_retried_with_back_off_honouring_retry_after() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) < 3:
            return _error(503, "Overloaded", "queue full", **{"Retry-After": "0"})
        return httpx.Response(200, json={"status": "ok", "contract": 1, "version": "0.1.0",
                                         "auth": True, "indexes": 1, "devices": ["cpu"]})

    with Client("http://gradindex.test", api_key="gik_secret",
                transport=httpx.MockTransport(answer), retries=3, backoff=5.0) as c:
        assert c.health().devices == ["cpu"]  # Retry-After 0 wins over the 5 s back-off
    assert len(seen) == 3
    assert seen[0].headers["Authorization"] == "Bearer gik_secret"
    seen.clear()
    with Client("http://gradindex.test", transport=httpx.MockTransport(answer),
                retries=1) as c, pytest.raises(ServiceUnavailable) as info:
        c.health()
    assert info.value.retry_after == 0 and len(seen) == 2


def test_requests_say_what_they_send() -> None:
    bodies: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.raw_path == b"/v1/indexes/my%20index/influence"
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"index": "my index", "version": 3, "results": [
            {"proponents": [{"id": "a", "score": 2.0, "payload": {}, "meta": {"label": 1},
                             "self_influence": 4.0, "added_later": True}], "opponents": []}]})

    with Client("http://gradindex.test/", transport=httpx.MockTransport(answer)) as c:
        got = c.influence("my index", [{"x": 1}], 5, direction="both", filter={"label": 1},
                          normalize=True)
    assert bodies == [{"examples": [{"x": 1}], "k": 5, "direction": "both", "normalize": True,
                       "filter": {"label": 1}}]
    assert got.results[0].proponents[0].score == 2.0
    frame = got.to_pandas()
    assert list(frame[["example", "direction", "rank", "id"]].iloc[0]) == [
        0, "proponents", 0, "a"]
    assert frame["meta.label"].iloc[0] == 1


def test_async_client_against_the_server(live_server: LiveServer,
                                         server_keys: dict[str, str],
                                         store_task: DigitsTask) -> None:
    payloads = store_task.test_payloads(4)
    with Client(live_server.url, api_key=server_keys["read"]) as sync:
        want = sync.influence(SERVED_INDEX, payloads, 5, direction="both")

    async def run() -> list[Any]:
        async with AsyncClient(live_server.url, api_key=server_keys["read"]) as c:
            health = await c.health()
            assert health.status == "ok"
            many = await asyncio.gather(*[c.influence(SERVED_INDEX, [p], 5, direction="both")
                                          for p in payloads])
            with pytest.raises(NotFound, match="no index named 'nope'"):
                await c.index("nope")
            page = await c.self_influence(SERVED_INDEX, limit=3)
            assert len(page.results) == 3
            return [m.results[0] for m in many]

    got = asyncio.run(run())
    for g, w in zip(got, want.results, strict=True):
        assert [h.id for h in g.proponents] == [h.id for h in w.proponents]
        assert [h.id for h in g.opponents] == [h.id for h in w.opponents]
        assert [h.score for h in g.proponents] == pytest.approx(
            [h.score for h in w.proponents], rel=1e-4, abs=1e-4)


# ------------------------------------------------------------------ no answer at all


@pytest.fixture()
def silent_server() -> Iterator[str]:
    """The URL of a socket that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def _call(cls: type[Client] | type[AsyncClient], base_url: str, **options: Any) -> None:
    """``health()`` on a new client of ``cls``, awaited when it is the async one."""
    if cls is Client:
        with Client(base_url, **options) as c:
            c.health()
        return

    async def run() -> None:
        async with AsyncClient(base_url, **options) as c:
            await c.health()

    asyncio.run(run())


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_a_refused_connection_raises_connection_failed_naming_the_url(
        cls: type[Client] | type[AsyncClient]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more
    with pytest.raises(ConnectionFailed) as info:
        _call(cls, url, retries=3)
    error = info.value
    assert isinstance(error, GradindexHTTPError)
    assert (error.status, error.type, error.url) == (0, "ConnectError", url + "/v1/health")
    assert str(error).startswith(f"ConnectError: could not connect to {url}/v1/health (")
    assert "GRADINDEX_URL" in str(error)
    assert isinstance(error.__cause__, httpx.ConnectError)


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_a_timeout_raises_connection_failed_naming_the_url(
        cls: type[Client] | type[AsyncClient], silent_server: str) -> None:
    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as info:
        _call(cls, silent_server, timeout=0.3)
    assert time.monotonic() - started < 5
    error = info.value
    assert (error.status, error.type, error.url) == (0, "ReadTimeout",
                                                     silent_server + "/v1/health")
    assert str(error) == (f"ReadTimeout: GET {silent_server}/v1/health got no answer in time "
                          "(ReadTimeout); raise the client's `timeout` (seconds per request) "
                          "or send fewer examples per request")
    assert isinstance(error.__cause__, httpx.ReadTimeout)


def test_a_failed_connection_is_not_retried() -> None:
    tries: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        tries.append(request)
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with Client("http://gradindex.test", transport=httpx.MockTransport(refuse), retries=3,
                backoff=0) as c, pytest.raises(ConnectionFailed, match="Connection refused"):
        c.index("digits")
    assert len(tries) == 1


# ------------------------------------------------------------------ tables with payloads


def test_to_pandas_adds_payload_columns_on_request(live_server: LiveServer,
                                                  server_keys: dict[str, str],
                                                  store_task: DigitsTask) -> None:
    payloads = store_task.test_payloads(2)
    with Client(live_server.url, api_key=server_keys["read"]) as c:
        got = c.influence(SERVED_INDEX, payloads, 3, direction="both")
        plain, full = got.to_pandas(), got.to_pandas(payloads=True)
        assert [col for col in plain.columns if col.startswith("payload")] == []
        assert list(full.columns) == [*plain.columns, "payload.x", "payload.y"]
        assert len(full) == 2 * 2 * 3
        last = full.iloc[-1]  # the second example's weakest opponent
        assert (last["example"], last["direction"], last["rank"]) == (1, "opponents", 2)
        stored = c.example(SERVED_INDEX, last["id"]).payload
        assert (last["payload.x"], last["payload.y"]) == (stored["x"], stored["y"])
        assert full["payload.y"].tolist() == [h.payload["y"] for r in got.results
                                              for h in [*r.proponents, *r.opponents]]

        chosen = c.select(SERVED_INDEX, payloads, 4)
        frame = chosen.to_pandas(payloads=True)
        assert frame["id"].tolist() == chosen.ids
        assert frame["payload.y"].tolist() == [h.payload["y"] for h in chosen.results]

        page = c.self_influence(SERVED_INDEX, limit=4)
        frame = page.to_pandas(payloads=True)
        assert "score" not in frame.columns
        assert frame["payload.x"].tolist() == [e.payload["x"] for e in page.results]


def test_a_payload_that_is_not_an_object_is_one_payload_column() -> None:
    page = SelfInfluencePage.model_validate({
        "index": "texts", "version": 1, "limit": 2, "offset": 0, "next_offset": None,
        "results": [{"id": "a", "payload": "the cat sat", "meta": {"lang": "en"},
                     "self_influence": 2.0},
                    {"id": "b", "payload": "le chat", "meta": {"lang": "fr"},
                     "self_influence": 1.0}]})
    frame = page.to_pandas(payloads=True)
    assert list(frame.columns) == ["rank", "id", "self_influence", "meta.lang", "payload"]
    assert frame["payload"].tolist() == ["the cat sat", "le chat"]


# ------------------------------------------------------------------ render


def test_render_asks_the_server_for_each_hits_rendering(live_server: LiveServer,
                                                       server_keys: dict[str, str],
                                                       store_task: DigitsTask) -> None:
    with Client(live_server.url, api_key=server_keys["read"]) as c:
        plain = c.influence(SERVED_INDEX, store_task.test_payloads(1), 2)
        shown = c.influence(SERVED_INDEX, store_task.test_payloads(1), 2, render=True)
        page = c.self_influence(SERVED_INDEX, limit=2, render=True)
    assert [h.render for h in plain.results[0].proponents] == [None, None]
    for hit in [*shown.results[0].proponents, *page.results]:
        assert hit.render == {"kind": "image", "shape": [8, 8], "pixels": hit.payload["x"],
                              "label": hit.payload["y"]}


# ------------------------------------------------------------------ paging


def test_iter_self_influence_pages_through_every_example(live_server: LiveServer,
                                                        server_keys: dict[str, str]) -> None:
    requests: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [requests.append]})
    with http, Client(live_server.url, api_key=server_keys["read"], http_client=http) as c:
        count = c.index(SERVED_INDEX).count
        everything = c.self_influence(SERVED_INDEX, limit=1000).results
        assert len(everything) == count
        for page_size in (7, count):  # a last page part full; a last page full
            requests.clear()
            got = list(c.iter_self_influence(SERVED_INDEX, page_size=page_size))
            assert [e.id for e in got] == [e.id for e in everything]
            pages = -(-count // page_size)  # the page's `total` spares an empty last request
            assert len(requests) == pages
            assert requests[-1].url.params["offset"] == str((pages - 1) * page_size)
        values = [e.self_influence for e in everything]
        assert values == sorted(values, reverse=True)

        lowest = c.self_influence(SERVED_INDEX, limit=1000, ascending=True).results
        got = list(c.iter_self_influence(SERVED_INDEX, page_size=50, ascending=True))
        assert [e.id for e in got] == [e.id for e in lowest]

        requests.clear()
        first = list(itertools.islice(c.iter_self_influence(SERVED_INDEX, page_size=5), 3))
        assert [e.id for e in first] == [e.id for e in everything[:3]]
        assert len(requests) == 1  # pages are fetched as the loop reaches them

        with pytest.raises(ValueError, match="`page_size` must be at least 1, got 0"):
            next(c.iter_self_influence(SERVED_INDEX, page_size=0))


def test_async_iter_self_influence_pages_through_every_example(
        live_server: LiveServer, server_keys: dict[str, str]) -> None:
    with Client(live_server.url, api_key=server_keys["read"]) as sync:
        want = [e.id for e in sync.self_influence(SERVED_INDEX, limit=1000).results]

    async def run() -> list[str]:
        async with AsyncClient(live_server.url, api_key=server_keys["read"]) as c:
            return [e.id async for e in c.iter_self_influence(SERVED_INDEX, page_size=40)]

    assert asyncio.run(run()) == want
