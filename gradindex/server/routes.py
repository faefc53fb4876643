"""The ``/v1`` endpoints of contract version 1: indexes, influence, scores, selection,
self-influence and examples.

Routes stay thin: query vectors come from the index's device worker (whose featurizer also
holds the task that renders examples), everything else from the indexer's
:class:`~gradindex.indexer.reader.Index`, run on the thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.orm import Session

from gradindex import __version__
from gradindex.indexer.admin import index_info, list_indexes
from gradindex.indexer.errors import ConfigError, ExampleNotFound, StorageError, TaskError
from gradindex.indexer.examples import Hit
from gradindex.indexer.predict import NONE, Prediction
from gradindex.indexer.reader import Index
from gradindex.indexer.store import IndexVersion, connect

from .auth import AdminKey, ReadKey
from .errors import (
    OUTAGE_RETRY_AFTER_S,
    ClientGone,
    IndexUnavailable,
    LimitExceeded,
    is_outage,
)
from .indexes import IndexRegistry, Served
from .predicted import (
    MAX_PREDICTED,
    check_can_tell,
    is_misclassified,
    predict_many,
    training_cache,
)
from .schemas import (
    CONTRACT_VERSION,
    DeleteResult,
    ErrorResponse,
    Example,
    ExamplePage,
    Health,
    IndexDetail,
    IndexList,
    IndexSummary,
    InfluenceRequest,
    InfluenceResponse,
    InfluenceResult,
    Readiness,
    ScoresRequest,
    ScoresResponse,
    SelectRequest,
    SelectResponse,
    SelfInfluencePage,
    TrainingExample,
    Whoami,
)
from .settings import ServerSettings

__all__ = ["FilterParam", "IndexDep", "health_router", "parse_filter_param", "render_payload",
           "router"]

log = logging.getLogger(__name__)

MAX_SCORES = 5_000_000
"""Scores one ``/scores`` request may return (examples × ids)."""

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [(401, "No valid API key"), (403, "The key's scope is too narrow"),
                         (404, "No such index or example"), (413, "Body too large"),
                         (422, "Invalid request or payload"), (503, "Busy or unavailable")]
}


INLINE_HITS = 256
"""An influence answer of at most this many hits (not rendered) is built on the event loop."""


def _json(model: BaseModel) -> Response:
    """``model`` as the response body, serialised by pydantic in one step: FastAPI's own path
    for a ``response_model`` (validate, dump to Python objects, ``json.dumps``) took 5× as
    long for a 10-hit influence answer (0.36 against 0.07 ms of the event loop's time). The
    route's ``response_model`` still documents the body."""
    return Response(model.model_dump_json(), media_type="application/json")


# Dependencies that do no I/O are async: FastAPI runs a plain `def` one on a worker thread,
# a hop that costs more than the work.
async def get_registry(request: Request) -> IndexRegistry:
    registry: IndexRegistry = request.app.state.registry
    return registry


async def get_settings(request: Request) -> ServerSettings:
    settings: ServerSettings = request.app.state.settings
    return settings


Registry = Annotated[IndexRegistry, Depends(get_registry)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
IndexName = Annotated[str, Path(description="Index name.", max_length=128)]


async def get_served(name: IndexName, registry: Registry) -> Served:
    return await registry.get(name)


IndexDep = Annotated[Served, Depends(get_served)]

health_router = APIRouter(tags=["health"])
router = APIRouter(prefix="/v1/indexes", tags=["indexes"], responses=ERRORS)


# ------------------------------------------------------------------ helpers


def render_payload(served: Served, payload: Any) -> dict[str, Any] | None:
    """The task's ``render(payload)``, or None for a task without one (or that fails on it)."""
    return served.task.render(payload)


def _training(hit: Hit, served: Served | None = None) -> TrainingExample:
    return TrainingExample(id=hit.external_id, payload=hit.payload, meta=hit.meta,
                           self_influence=hit.self_influence,
                           render=render_payload(served, hit.payload) if served else None)


def _example(hit: Hit, served: Served | None = None) -> Example:
    return Example(id=hit.external_id, payload=hit.payload, meta=hit.meta,
                   self_influence=hit.self_influence, score=_finite(hit.score),
                   render=render_payload(served, hit.payload) if served else None)


def _finite(score: float) -> float:
    if not math.isfinite(score):
        raise TaskError("a score overflowed (a test example's gradient is too large to score); "
                        "check the example's features")
    return score


def _check_examples(examples: Sequence[Any], settings: ServerSettings) -> None:
    if len(examples) > settings.max_examples:
        raise ConfigError(f"`examples` may hold at most {settings.max_examples} examples per "
                          f"request, got {len(examples)}; split the request")


def _retired(index: Index) -> bool:
    """Whether ``index``'s version was dropped from the database (beyond retention)."""
    with Session(index.engine) as session:
        return session.get(IndexVersion, index.version_id) is None


async def _unless_replaced(served: Served, registry: IndexRegistry) -> None:
    """Raise 503 if ``served``'s version was retired (its rows dropped) while a request read
    it: an empty or missing answer is then the rows already gone, never the truth about the
    index. The next request opens the current version. A version replaced but still retained
    answers for itself, as every reader of it does until it reloads.

    Raises:
        IndexUnavailable: the version was retired (retry).
    """
    if await run_in_threadpool(_retired, served.index):
        registry.expire(served.index.name)
        raise IndexUnavailable(f"index {served.index.name!r} version {served.index.version} was "
                               "retired while this request read it; retry")


def _check_budget(hits: int, settings: ServerSettings, what: str) -> None:
    """Refuse (413) a request whose response would hold more than ``max_results`` hits."""
    if hits > settings.max_results:
        raise LimitExceeded(f"this request asks for {hits:,} results ({what}), more than "
                            f"{settings.max_results:,} (GRADINDEX_MAX_RESULTS); lower `k` or "
                            "send fewer examples per request")


def _batches(examples: Sequence[dict[str, Any]], settings: ServerSettings
             ) -> Iterator[tuple[int, Sequence[dict[str, Any]]]]:
    """``(start, examples)`` of one model pass each: the points where a request whose client
    has gone stops."""
    step = settings.max_batch
    for start in range(0, len(examples), step):
        yield start, examples[start : start + step]


async def _stop_if_gone(request: Request, done: int, total: int) -> None:
    """Stop a request whose client disconnected (at a batch boundary), in one log line.

    Raises:
        ClientGone: the client is gone; nobody reads the answer.
    """
    if await request.is_disconnected():
        route = getattr(request.scope.get("route"), "path", "unmatched")
        request.app.state.metrics.abandoned.labels(route).inc(total - done)
        log.info("client gone: %s %s stopped after %d of %d examples", request.method,
                 request.url.path, done, total)
        raise ClientGone(f"the client disconnected after {done} of {total} examples")


async def _queries(served: Served, examples: Sequence[dict[str, Any]],
                   settings: ServerSettings, request: Request) -> torch.Tensor:
    """The query vectors ``[Q, dim]`` of ``examples``, one model pass per batch; a request
    whose client has gone stops at the next batch."""
    return (await _queries_and_predictions(served, examples, settings, request, False))[0]


async def _queries_and_predictions(
    served: Served, examples: Sequence[dict[str, Any]], settings: ServerSettings,
    request: Request, predict: bool = True,
) -> tuple[torch.Tensor, list[Prediction]]:
    """:func:`_queries`, and with ``predict`` the model's view of each example, made on the
    same visits to the device worker."""
    _check_examples(examples, settings)
    parts, predicted = [], []
    for start, chunk in _batches(examples, settings):
        await _stop_if_gone(request, start, len(examples))
        if predict:
            vectors, views = await served.worker.query_and_predict(chunk)
            predicted.extend(views)
        else:
            vectors = await served.worker.query(chunk)
        parts.append(vectors)
    return torch.cat(parts), predicted


def _relative_ranks_exactly(manifest: dict[str, Any]) -> bool:
    """What :attr:`Index.has_relative_index` says, from a manifest alone."""
    stored_once = (manifest.get("faiss") or {}).get("file", "index.faiss") is None
    return stored_once or bool((manifest.get("relative") or {}).get("file"))


def _summary(row: dict[str, Any], registry: IndexRegistry) -> dict[str, Any]:
    manifest = row["manifest"] or {}
    refused = registry.refused().get(row["name"])
    status = ("unpublished" if row["version"] is None else
              "unavailable" if refused is not None else "serving")
    return {"name": row["name"], "status": status, "version": row["version"],
            "count": row["count"], "deleted": row["deleted"], "dim": manifest.get("dim"),
            "published_at": row["published_at"], "reason": refused}


# ------------------------------------------------------------------ health


@health_router.head("/v1/health", include_in_schema=False)
@health_router.get("/v1/health", response_model=Health)
async def health(registry: Registry, settings: SettingsDep) -> Health:
    """Liveness: the server answers and its device workers run (no key needed)."""
    workers = registry.workers
    return Health(status="ok", contract=CONTRACT_VERSION, version=__version__,
                  auth=settings.auth_required, indexes=len(registry.served),
                  devices=sorted({w.device for w in workers}), workers=len(workers))


@health_router.get("/v1/whoami", response_model=Whoami,
                   responses={401: ERRORS[401]})
async def whoami(key: ReadKey, settings: SettingsDep) -> Whoami:
    """What the caller's key may do: `admin`, `read`, or `keyless` when the server needs no
    key (a page hides what the key may not do). An unknown or missing key, where keys are
    required, gets 401."""
    if key is None:
        return Whoami(scope="keyless", auth=settings.auth_required, key=None)
    if key.allows("admin"):
        return Whoami(scope="admin", auth=True, key=key.name or None)
    return Whoami(scope="read", auth=True, key=key.name or None)


READY_TIMEOUT_S = 3.0
"""How long the readiness probe waits for the database."""


def _ping(registry: IndexRegistry) -> None:
    with connect(registry.storage).connect() as conn:
        conn.execute(text("SELECT 1"))


@health_router.get("/v1/health/ready", response_model=Readiness,
                   responses={503: {"model": Readiness, "description": "Not ready"}})
async def ready(registry: Registry, response: Response) -> Readiness:
    """Readiness: the database answers (else 503 with `Retry-After`), and each index's state.
    ``/v1/health`` is liveness: the process answers."""
    try:
        await asyncio.wait_for(asyncio.to_thread(_ping, registry), READY_TIMEOUT_S)
        database: Literal["ok", "unavailable"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure to answer means: not ready
        if not (is_outage(exc) or isinstance(exc, TimeoutError | StorageError)):
            raise
        database = "unavailable"
        response.status_code = 503
        response.headers["Retry-After"] = str(OUTAGE_RETRY_AFTER_S)
    indexes: dict[str, Literal["serving", "unavailable"]] = {
        name: "serving" for name in registry.served}
    indexes.update({name: "unavailable" for name in registry.refused()})
    return Readiness(status="ready" if database == "ok" else "unavailable",
                     database=database, indexes=dict(sorted(indexes.items())))


# ------------------------------------------------------------------ indexes


@router.get("", response_model=IndexList)
async def get_indexes(_key: ReadKey, registry: Registry) -> IndexList:
    """Every index, with its current version and whether this server serves it."""
    rows = await run_in_threadpool(list_indexes, registry.storage)
    registry.sync({r["name"] for r in rows})
    rows = [r for r in rows if registry.serves(r["name"])]
    return IndexList(indexes=[IndexSummary(**_summary(r, registry)) for r in rows])


@router.get("/{name}", response_model=IndexDetail)
async def get_index(_key: ReadKey, name: IndexName, registry: Registry) -> IndexDetail:
    """One index: its size, task, compression, preconditioner and FAISS settings; for an index
    this server cannot serve, its status ``unavailable`` and the reason."""
    try:
        served: Served | None = await registry.get(name)
    except IndexUnavailable:
        served = None
    row = await run_in_threadpool(index_info, registry.storage, name)
    if served is None:  # described from the database's copy of its manifest
        m = row["manifest"] or {}
        return IndexDetail(
            **_summary(row, registry), task=m.get("task") or {},
            compression=m.get("compression") or {}, preconditioner=m.get("preconditioner") or {},
            faiss=m.get("faiss") or {}, relative=_relative_ranks_exactly(m),
            device=None, metadata_schema=m.get("metadata_schema"))
    index = served.index
    m = index.manifest
    return IndexDetail(
        **{**_summary(row, registry), "version": index.version, "dim": index.dim},
        task=m.get("task", {}), compression=m.get("compression", {}),
        preconditioner=m.get("preconditioner", {}), faiss=m.get("faiss", {}),
        relative=index.has_relative_index, device=served.worker.device,
        metadata_schema=m.get("metadata_schema"))


async def _predict(served: Served, payloads: Sequence[Any]) -> list[Prediction]:
    """The model's view of each query; None values when the worker cannot tell."""
    try:
        return await served.worker.predict(payloads)
    except Exception as exc:  # noqa: BLE001 - results stand without predictions
        log.info("no predictions for index %r: %s", served.index.name, exc)
        return [NONE] * len(payloads)


@router.post("/{name}/influence", response_model=InfluenceResponse)
async def influence(_key: ReadKey, body: InfluenceRequest, served: IndexDep,
                    settings: SettingsDep, request: Request) -> Response:
    """The top-k proponents (score > 0) and/or opponents (score < 0) of each test example
    (`examples`), or of stored training examples (`ids`, train-to-train, no model pass), with
    how many examples score on each side of zero and the model's prediction, confidence and
    loss for each query."""
    index = served.index
    directions = ["proponents", "opponents"] if body.direction == "both" else [body.direction]
    asked = len(body.ids) if body.ids is not None else len(body.examples or [])
    _check_budget(asked * body.k * len(directions), settings, "examples × k × directions")
    skip: list[int | None] | None = None
    if body.ids is not None:
        if len(body.ids) > settings.max_examples:
            raise ConfigError(f"`ids` may hold at most {settings.max_examples} ids per "
                              f"request, got {len(body.ids)}; split the request")
        rows, q = await run_in_threadpool(index.stored_queries, body.ids)
        stored = await run_in_threadpool(index.examples.by_id, body.ids)
        skip = None if body.include_self else [int(r) for r in rows]
        names: list[str | None] = list(body.ids)
        predicted, found = await asyncio.gather(  # the model's view beside the search
            _predict(served, [stored[i].payload for i in body.ids]),
            served.searches.rank(q, body.k, directions=directions, filter=body.filter,
                                 normalize=body.normalize, skip=skip))
    else:
        examples = body.examples or []
        vectors, predicted = await _queries_and_predictions(served, examples, settings,
                                                            request)
        q = vectors.numpy()
        names = [None] * len(examples)
        found = await served.searches.rank(q, body.k, directions=directions,
                                           filter=body.filter, normalize=body.normalize)

    def respond() -> list[InfluenceResult]:
        shown = served if body.render else None
        results = []
        for i in range(len(q)):
            ranked = [found[d][i] for d in directions]
            positives = next((r.positives for r in ranked if r.positives is not None), None)
            negatives = next((r.negatives for r in ranked if r.negatives is not None), None)
            p = predicted[i]
            results.append(InfluenceResult(
                id=names[i], positives=positives, negatives=negatives,
                prediction=p.prediction, confidence=p.confidence, loss=p.loss,
                **{d: [_example(h, shown) for h in found[d][i].hits] for d in directions}))
        return results

    # a small answer without the task's own code (render) is built on the event loop: a hop
    # to a thread would cost more than the work
    small = not body.render and len(q) * body.k * len(directions) <= INLINE_HITS

    def answer() -> Response:
        return _json(InfluenceResponse(index=index.name, version=index.version,
                                       results=respond()))

    return answer() if small else await run_in_threadpool(answer)


@router.post("/{name}/scores", response_model=ScoresResponse)
async def scores(_key: ReadKey, body: ScoresRequest, served: IndexDep,
                 settings: SettingsDep, request: Request, registry: Registry
                 ) -> Response:
    """Exact scores ``[example][id]`` against the given (or every live) training id."""
    _check_examples(body.examples, settings)
    if body.ids is not None and len(body.ids) > settings.max_ids:
        raise LimitExceeded(f"`ids` may name at most {settings.max_ids:,} training examples per "
                            f"request (GRADINDEX_MAX_IDS), got {len(body.ids):,}; split the "
                            "request")
    wanted = len(body.ids) if body.ids is not None else served.index.count
    if wanted * len(body.examples) > MAX_SCORES:
        raise ConfigError(f"this request asks for {wanted * len(body.examples):,} scores, more "
                          f"than {MAX_SCORES:,}; pass `ids`, or fewer examples")
    q = await _queries(served, body.examples, settings, request)
    wanted_ids, missing = body.ids, []
    if body.ids is not None and body.missing == "skip":
        live = await run_in_threadpool(served.index.examples.live_ids, body.ids)
        wanted_ids = [i for i in body.ids if i in live]
        missing = [i for i in body.ids if i not in live]
    try:
        ids, matrix = await run_in_threadpool(served.index.scores, q, wanted_ids)
    except ExampleNotFound:
        await _unless_replaced(served, registry)
        raise
    if not ids:
        await _unless_replaced(served, registry)
    if not np.isfinite(matrix).all():
        _finite(float("inf"))
    return await run_in_threadpool(lambda: _json(ScoresResponse(
        index=served.index.name, version=served.index.version, ids=ids,
        scores=matrix.tolist(), missing=missing)))


@router.post("/{name}/select", response_model=SelectResponse)
async def select(_key: ReadKey, body: SelectRequest, served: IndexDep,
                 settings: SettingsDep, request: Request) -> Response:
    """Training examples ranked by mean influence over the examples (data selection)."""
    q = await _queries(served, body.examples, settings, request)
    hits = await run_in_threadpool(lambda: served.index.select(
        q, body.k, filter=body.filter, normalize=body.normalize))
    results = [_example(h) for h in hits]
    return _json(SelectResponse(index=served.index.name, version=served.index.version,
                                ids=[r.id for r in results], results=results))


FILTER_PARAM = ("A metadata filter as JSON (the language of `filter` in /influence), e.g. "
                '`{"label": 3}`.')


def parse_filter_param(text: str | None) -> Any:
    """A filter passed as a JSON query parameter, decoded (checked by the index later).

    Raises:
        ConfigError: it is not JSON.
    """
    if text is None or not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"`filter` is not valid JSON ({exc}); pass an object such as "
                          '{"label": 3}') from None


FilterParam = Annotated[str | None, Query(description=FILTER_PARAM, max_length=16384)]


@router.get("/{name}/self-influence", response_model=SelfInfluencePage)
async def self_influence(
    _key: ReadKey, served: IndexDep, registry: Registry,
    limit: Annotated[int, Query(ge=1, le=1000, description="Examples per page.")] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62, description="Examples to skip.")] = 0,
    ascending: Annotated[bool, Query(description="Lowest self-influence first.")] = False,
    render: Annotated[bool, Query(description="Add each example's `render`.")] = False,
    filter: FilterParam = None,
    min_self_influence: Annotated[float | None, Query(
        description="Only self-influence >= this (a histogram bin's left edge; omit it for "
                    "the first bin).")] = None,
    max_self_influence: Annotated[float | None, Query(
        description="Only self-influence < this (a histogram bin's right edge; omit it for "
                    "the last bin).")] = None,
) -> Response:
    """Training examples ranked by self-influence: outlier and mislabel candidates first."""
    flt = parse_filter_param(filter)
    for bound in (min_self_influence, max_self_influence):
        if bound is not None and not math.isfinite(bound):
            raise ConfigError(f"self-influence bounds must be finite numbers, got {bound}")
    index = served.index

    def page() -> tuple[list[Hit], int]:
        hits = index.self_influence(limit, offset=offset, descending=not ascending,
                                    filter=flt, low=min_self_influence,
                                    high=max_self_influence)
        total = index.examples.count(flt, low=min_self_influence, high=max_self_influence)
        return hits, total

    hits, total = await run_in_threadpool(page)
    if not hits:
        await _unless_replaced(served, registry)
    return _json(SelfInfluencePage(
        index=index.name, version=index.version, limit=limit, offset=offset,
        next_offset=offset + limit if offset + len(hits) < total else None,
        results=[_training(h, served if render else None) for h in hits], total=total))


@router.get("/{name}/examples", response_model=ExamplePage)
async def list_examples(
    _key: ReadKey, served: IndexDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Examples per page.")] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62, description="Examples to skip.")] = 0,
    filter: FilterParam = None,
    render: Annotated[bool, Query(description="Add each example's `render`.")] = False,
    misclassified: Annotated[bool, Query(
        description="Only examples whose predicted class differs from their `label` metadata "
                    "(tasks with `logits`; a model pass over every match, at most "
                    f"{MAX_PREDICTED:,}).")] = False,
    predict: Annotated[bool, Query(
        description="Add each example's `prediction`, `confidence` and `loss`.")] = False,
) -> Response:
    """The live training examples in build order, a page at a time, optionally filtered on
    their metadata or to the misclassified ones; `total` says how many match."""
    flt = parse_filter_param(filter)
    index = served.index
    cache = training_cache(served)
    if misclassified:
        check_can_tell(served)
        total_live = await run_in_threadpool(index.examples.count, flt)
        if total_live > MAX_PREDICTED:
            raise ConfigError(f"`misclassified` needs the model's prediction of {total_live:,} "
                              f"examples, more than {MAX_PREDICTED:,}; narrow it with a "
                              "`filter`")
        every = await run_in_threadpool(lambda: index.examples.page(
            limit=max(total_live, 1), offset=0, filter=flt))
        found = await predict_many(served, [(h.external_id, h.payload) for h in every], cache)
        wrong = [h for h in every if is_misclassified(h.meta, found[h.external_id])]
        hits, total = wrong[offset : offset + limit], len(wrong)
    else:
        def page() -> tuple[list[Hit], int]:
            return (index.examples.page(limit=limit, offset=offset, filter=flt),
                    index.examples.count(flt))

        hits, total = await run_in_threadpool(page)
    results = [_training(h, served if render else None) for h in hits]
    if predict or misclassified:
        found = await predict_many(served, [(h.external_id, h.payload) for h in hits], cache)
        for r in results:
            view = found[r.id]
            r.prediction, r.confidence, r.loss = view.prediction, view.confidence, view.loss
    return _json(ExamplePage(
        index=index.name, version=index.version, total=total, limit=limit, offset=offset,
        next_offset=offset + limit if offset + len(hits) < total else None, results=results))


ExampleId = Annotated[str, Path(description="The example's id.", max_length=512)]


@router.get("/{name}/examples/{example_id:path}", response_model=TrainingExample)
async def get_example(_key: ReadKey, served: IndexDep, example_id: ExampleId,
                      registry: Registry) -> TrainingExample:
    """One live training example."""
    try:
        return _training(await run_in_threadpool(served.index.example, example_id))
    except ExampleNotFound:
        await _unless_replaced(served, registry)
        raise


@router.delete("/{name}/examples/{example_id:path}", response_model=DeleteResult)
async def delete_example(_key: AdminKey, served: IndexDep, example_id: ExampleId,
                         registry: Registry) -> DeleteResult:
    """Remove a training example from every result, for good (needs an admin key)."""
    try:
        hit = await run_in_threadpool(served.index.delete, example_id)
    except ExampleNotFound:
        await _unless_replaced(served, registry)
        raise
    return DeleteResult(deleted=_training(hit))

