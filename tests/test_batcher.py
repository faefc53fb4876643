"""The server's search batcher: the searches of concurrent requests are ranked together, and
each request gets exactly what it would get ranked alone (its own k, directions, filter, mode
and skipped example); a bad request fails alone."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from gradindex import Settings, open_index
from gradindex.indexer.errors import ConfigError
from gradindex.indexer.reader import Index, Ranked
from gradindex.server.batcher import SearchBatcher
from gradindex.server.metrics import Metrics

from .conftest import SERVED_INDEX

RTOL = 1e-5


@pytest.fixture(scope="module")
def index(server_settings: Settings) -> Index:
    return open_index(SERVED_INDEX, server_settings)


def _asks(index: Index) -> list[dict[str, Any]]:
    """Twelve requests unlike each other: one or two queries, k 3 or 10, one or both
    directions, with and without a filter, raw and relative, some skipping an example."""
    rows, q = index.stored_queries([f"train-{i}" for i in range(40, 58)])
    asks = []
    for n in range(12):
        width = 1 + n % 2
        asks.append({
            "queries": q[n : n + width], "k": (3, 10)[n % 2],
            "directions": [("proponents",), ("opponents",), ("proponents", "opponents")][n % 3],
            "filter": {"label": [3, 5]} if n % 4 == 1 else None,
            "normalize": n % 5 == 2,
            "skip": [int(r) for r in rows[n : n + width]] if n % 3 == 0 else None,
        })
    return asks


def _same(got: dict[str, list[Ranked]], want: dict[str, list[Ranked]]) -> None:
    assert set(got) == set(want)
    for d in want:
        assert len(got[d]) == len(want[d])
        for g, w in zip(got[d], want[d], strict=True):
            assert [h.id for h in g.hits] == [h.id for h in w.hits]
            np.testing.assert_allclose([h.score for h in g.hits], [h.score for h in w.hits],
                                       rtol=RTOL)
            assert (g.positives, g.negatives) == (w.positives, w.negatives)


def test_concurrent_searches_are_ranked_together_and_each_gets_its_own_answer(
        index: Index) -> None:
    metrics = Metrics()
    batcher = SearchBatcher(index, metrics=metrics)
    asks = _asks(index)

    async def together() -> list[dict[str, list[Ranked]]]:
        return await asyncio.gather(*(batcher.rank(**a) for a in asks))

    got = asyncio.run(together())
    for ask, answer in zip(asks, got, strict=True):
        want = index.rank_many(ask["queries"], ask["k"], directions=ask["directions"],
                               filter=ask["filter"], normalize=ask["normalize"],
                               skip=ask["skip"])
        _same(answer, want)
        assert all(len(r.hits) <= ask["k"] for rs in answer.values() for r in rs)
    rankings = metrics.registry.get_sample_value("gradindex_search_queries_count",
                                                 {"index": SERVED_INDEX})
    queries = metrics.registry.get_sample_value("gradindex_search_queries_sum",
                                                {"index": SERVED_INDEX})
    assert queries == sum(len(a["queries"]) for a in asks)
    # all twelve waited together: one ranking per filter and mode
    assert rankings == len({(str(a["filter"]), a["normalize"]) for a in asks}) == 3


def test_a_bad_filter_fails_its_own_request_only(index: Index) -> None:
    batcher = SearchBatcher(index)
    _, q = index.stored_queries(["train-60", "train-61"])

    async def together() -> list[Any]:
        return await asyncio.gather(
            batcher.rank(q[:1], 5, directions=("proponents",)),
            batcher.rank(q[1:], 5, directions=("proponents",), filter={"nope": 1}),
            batcher.rank(q[1:], 5, directions=("opponents",)),
            return_exceptions=True)

    first, bad, last = asyncio.run(together())
    assert isinstance(bad, ConfigError) and "nope" in str(bad)
    _same(first, index.rank_many(q[:1], 5, directions=("proponents",)))
    _same(last, index.rank_many(q[1:], 5, directions=("opponents",)))
