"""The app factory: settings → storage → indexes and device workers → routes.

``create_app(settings)`` builds a FastAPI app whose start-up checks the database (a new SQLite
file is migrated, PostgreSQL never: ``gradindex db upgrade`` does that), opens every published
index (reporting those it cannot serve as unavailable) and starts one device worker per model;
``gradindex serve`` runs it with uvicorn.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from threadpoolctl import threadpool_limits

from gradindex import __version__
from gradindex.indexer.store import connect

from .browse import browse_router
from .errors import error_response, install_error_handlers
from .guard import RequestGuard, replaying
from .indexes import IndexRegistry
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .page import page_router
from .routes import health_router, router
from .serving import SETTINGS_VARIABLE, WORKER_PROTOCOL
from .serving import uvicorn_options as uvicorn_limits
from .settings import ServerSettings

__all__ = ["create_app"]

log = logging.getLogger(__name__)

DESCRIPTION = """Training-data attribution over a persistent gradient index (contract version 1).

A positive score means the training example is a *proponent* of the test example (up-weighting
it lowers the test loss); negative, an *opponent*. Send an API key as `Authorization: Bearer`.
"""


class BodyLimit:
    """Answers 413 to a request whose body is above ``limit`` bytes, before the app reads it.

    A declared ``Content-Length`` is checked at once; a chunked body is read (up to the limit)
    before the app sees it.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        await self.app(scope, replaying(body, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, "BodyTooLarge",
            f"the request body is larger than {self.limit:,} bytes (GRADINDEX_MAX_BODY_BYTES); "
            "send fewer examples per request",
            headers={"Connection": "close"})
        await response(scope, receive, send)


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods counted under their own name; any other is counted as ``other``."""


class RequestMetrics:
    """Counts requests and times them, by route template (bounded label values: an unmatched
    path is ``unmatched``, an unknown method ``other``)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            method = method if method in KNOWN_METHODS else "other"
            self.metrics.requests.labels(path, method, str(status)).inc()
            self.metrics.latency.labels(path, method).observe(time.perf_counter() - started)


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """The gradindex server app.

    Args:
        settings: server settings (default: read from ``GRADINDEX_*``).
    """
    settings = settings or ServerSettings()
    metrics = Metrics()
    registry = IndexRegistry(settings, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # A fresh SQLite file is migrated; PostgreSQL never is (several replicas would race
        # their upgrades): an unmigrated one is refused, naming `gradindex db upgrade`.
        await asyncio.to_thread(connect, settings.storage())
        if settings.search_threads:
            # Process-wide, for numpy's BLAS only (torch's model passes keep their threads).
            threadpool_limits(settings.search_threads, user_api="blas")
        await registry.start()
        if not settings.auth_required:
            log.warning("API keys are off (GRADINDEX_AUTH=off): anyone on this machine can "
                        "query and delete")
        try:
            yield
        finally:
            await registry.stop()

    # /docs and /redoc are the page router's: served with local assets, they work offline.
    # No redirects (`/v1/indexes/` → `/v1/indexes`): Starlette builds them from the Host
    # header, which a client chooses.
    app = FastAPI(title="gradindex", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False)
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(router)
    app.include_router(browse_router)
    app.include_router(page_router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        if settings.metrics_key is not None:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {settings.metrics_key}".encode()):
                return error_response(401, "Unauthorized",
                                      "/metrics needs `Authorization: Bearer <key>` with the "
                                      "metrics key (GRADINDEX_METRICS_KEY)",
                                      headers={"WWW-Authenticate": "Bearer"})
        for worker in registry.workers:
            metrics.queue_depth.labels(worker.name).set(worker.depth)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestGuard, allowed_hosts=settings.host_allow_list)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def app_for_worker() -> FastAPI:
    """The app of one worker process of ``gradindex serve --workers N`` (uvicorn's factory):
    the settings ``run`` was given, handed over as JSON in the environment. Each process's
    model passes get an N-th of the cores (``torch.set_num_threads``), so N processes do not
    run N times as many threads as there are cores."""
    settings = ServerSettings.model_validate_json(os.environ[SETTINGS_VARIABLE])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.workers))
    return create_app(settings)


def run(settings: ServerSettings, **uvicorn_options: Any) -> None:
    """Serve ``create_app(settings)`` with uvicorn on ``settings.host:settings.port``, in
    ``settings.workers`` processes.

    Raises:
        StorageError: the database is unreachable or not migrated (checked before serving, so
            the command line can say so in one line).
    """
    import uvicorn

    connect(settings.storage())

    options = {**uvicorn_limits(settings), **uvicorn_options}
    if settings.workers == 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                    log_level="info", **options)
        return
    os.environ[SETTINGS_VARIABLE] = settings.model_dump_json()
    options["http"] = WORKER_PROTOCOL
    uvicorn.run(f"{__name__}:app_for_worker", factory=True, workers=settings.workers,
                host=settings.host, port=settings.port, log_level="info", **options)
