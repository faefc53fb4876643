"""Searches of concurrent requests on one index version, run as one ranking per micro-batch.

Each ``/influence`` request used to scan the vectors on its own thread: at 32 clients, 32 small
matrix products fought over the cores, each with its own SQL reads. A :class:`SearchBatcher`
queues the requests' query vectors instead; while one ranking runs, the next requests wait,
and the next ranking takes all of them at once (no timer: a lone request starts at once,
concurrent ones batch themselves). Requests with the same filter and the same mode
(``normalize``) share one :meth:`~gradindex.indexer.reader.Index.rank_many` call: one pass of
matrix products over the stored vectors for every query and direction, and one SQL read of
their hits. Each request then takes its own queries, directions and ``k`` from the result.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradindex.indexer.reader import Index, Ranked

from .metrics import Metrics

__all__ = ["SearchBatcher"]

log = logging.getLogger(__name__)


@dataclass
class _Search:
    queries: np.ndarray
    """``[Q, dim]`` float32."""
    k: int
    directions: tuple[str, ...]
    skip: list[int | None]
    future: asyncio.Future[dict[str, list[Ranked]]]
    key: tuple[str, bool] = field(default=("", False))
    """What requests must share to be ranked together: the filter (as canonical JSON) and
    ``normalize``."""


class SearchBatcher:
    """Ranks the queries of concurrent requests on ``index`` together.

    Args:
        index: the served version.
        max_queries: query vectors per ranking at most (bounds the score block's memory).
        metrics: where the rankings' sizes are recorded.
    """

    def __init__(self, index: Index, *, max_queries: int = 256,
                 metrics: Metrics | None = None) -> None:
        self.index = index
        self.max_queries = max_queries
        self.metrics = metrics or Metrics()
        self._waiting: list[_Search] = []
        self._busy = False
        self._draining: asyncio.Task[None] | None = None

    async def rank(
        self, queries: np.ndarray, k: int, *, directions: Sequence[str],
        filter: Any = None, normalize: bool = False,
        skip: Sequence[int | None] | None = None,
    ) -> dict[str, list[Ranked]]:
        """:meth:`Index.rank_many` of ``queries``, ranked together with the other requests
        waiting meanwhile.

        Raises:
            whatever :meth:`Index.rank_many` raises on this request's arguments.
        """
        loop = asyncio.get_running_loop()
        search = _Search(np.asarray(queries, dtype=np.float32), k, tuple(directions),
                         list(skip) if skip is not None else [None] * len(queries),
                         loop.create_future(),
                         (json.dumps(filter, sort_keys=True, default=str), bool(normalize)))
        self._waiting.append(search)
        if not self._busy:
            self._busy = True
            self._draining = loop.create_task(self._drain())  # held: the loop keeps weak refs
        return await search.future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                group = self._take()
                live = [s for s in group if not s.future.done()]  # callers that left
                if live:
                    await self._run(live)
        finally:
            self._busy = False

    def _take(self) -> list[_Search]:
        """The first waiting search and those after it with its key, up to ``max_queries``
        query vectors (a single larger request goes alone)."""
        first = self._waiting.pop(0)
        group, size, rest = [first], len(first.queries), []
        for search in self._waiting:
            if search.key == first.key and size + len(search.queries) <= self.max_queries:
                group.append(search)
                size += len(search.queries)
            else:
                rest.append(search)
        self._waiting = rest
        return group

    async def _run(self, group: list[_Search]) -> None:
        filter_json, normalize = group[0].key
        queries = np.concatenate([s.queries for s in group])
        directions = tuple(d for d in ("proponents", "opponents")
                           if any(d in s.directions for s in group))
        k = max(s.k for s in group)
        skip = [x for s in group for x in s.skip]
        self.metrics.search_queries.labels(self.index.name).observe(len(queries))
        try:
            ranked = await asyncio.to_thread(
                self.index.rank_many, queries, k, directions=directions,
                filter=json.loads(filter_json), normalize=normalize, skip=skip)
        except Exception as exc:  # noqa: BLE001 - sorted out request by request below
            if len(group) == 1:
                if not group[0].future.done():
                    group[0].future.set_exception(exc)
                return
            log.info("a ranking of %d requests on %r failed (%s); ranking them one by one",
                     len(group), self.index.name, exc)
            for search in group:
                await self._run([search])
            return
        lo = 0
        for search in group:
            span = slice(lo, lo + len(search.queries))
            lo += len(search.queries)
            if search.future.done():
                continue
            search.future.set_result({
                d: [Ranked(r.hits[: search.k], r.positives, r.negatives)
                    for r in ranked[d][span]]
                for d in search.directions})
