"""The Milvus store on milvus-lite (real files): the same answers as the FAISS store from the
same staged gradients (filters, deletions, relative influence, both directions), a publish
killed midway leaves the old version serving, and the server serves a Milvus-backed index.

One staging per module is finalized twice: version 1 with the FAISS store, version 2 with the
Milvus store (both stay open: two versions are retained). Results are compared by external id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gradindex_client import Client

from gradindex import BuildConfig, CompressionConfig, Settings, build, open_index
from gradindex.indexer.build import finalize
from gradindex.indexer.build_config import BuildHooks, FinalizePoint
from gradindex.indexer.errors import ConfigError
from gradindex.indexer.query import featurizer_for, query_vectors
from gradindex.indexer.reader import Index
from gradindex.indexer.search import Searcher
from gradindex.indexer.store import IndexVersion, connect
from gradindex.indexer.store.milvus import (
    LITE_FILE,
    MilvusSearcher,
    _client,
    close_clients,
    collection_name,
)
from gradindex.indexer.tasks import DigitsTask

from .conftest import REPO, STORE_TASK, STORE_TASK_ARGS, LiveServer, gradindex_cli, storage_env
from .factories import PAUSED_MARK, PositionMetaTask
from .test_build_process import kill_when_paused

RTOL = 1e-5
ATOL = 1e-6
"""Scores: both stores re-score from the same float32 vectors, in blocks of other shapes; a
score near zero keeps the rounding of the largest terms, so ``ATOL`` is relative to the
largest score of the query."""
K = 6
N = 60
NAME = "meta"

STRANGE = ['a" or id >= 0 or "', "x\\\" ) or (id >= 0", "line\nbreak\ttab", "it's",
           "back\\slash", "ünï 中"]
"""Metadata strings that would break (or widen) a filter expression pasted in unescaped."""


def meta_of(n: int) -> dict[str, Any]:
    """Every JSON type, keys some examples lack, explicit nulls, a key holding both numbers
    and strings, and strings with quotes, backslashes and line breaks."""
    meta: dict[str, Any] = {
        "label": n % 3, "src": STRANGE[n % len(STRANGE)], "flag": n % 4 == 0,
        "weight": [0.5, 1.25, 2.0, -1.0][n % 4], "note": None if n % 5 == 0 else "kept",
        "mixed": [1, "1", 1.5, True, None, [1, 2]][n % 6], "big": 2**40 + n,
    }
    if n % 2 == 0:
        meta["extra"] = n
    return meta


class MetaTask(PositionMetaTask):
    """Sequences whose metadata is :func:`meta_of` their position."""

    meta_of = staticmethod(meta_of)

    def __init__(self, n: int = N) -> None:
        super().__init__(n=n)


FILTERS: list[Any] = [
    {"label": 1},
    {"label": [0, 2]},
    {"label": {"$ne": 1}},
    {"label": {"$nin": [1, 2]}},
    {"weight": {"$gt": 0.5}},
    {"weight": {"$gte": 0.5, "$lt": 2}},
    {"weight": {"$lte": -1}},
    {"extra": {"$exists": False}},
    {"extra": {"$exists": True}, "label": 0},
    {"extra": {"$gt": 20.5}},
    {"extra": {"$lte": 31}},
    {"note": None},
    {"note": {"$ne": None}},
    {"flag": True},
    {"mixed": 1},
    {"mixed": "1"},
    {"mixed": {"$ne": 1}},
    {"mixed": True},
    {"mixed": {"$gte": 1.2}},
    {"big": 2**40 + 7},
    {"big": {"$gt": 2**40 + 50.5}},
    {"$or": [{"label": 2}, {"flag": True}]},
    {"$and": [{"$or": [{"label": 1}, {"extra": {"$exists": True}}]}, {"weight": {"$lt": 1.5}}]},
    *[{"src": s} for s in STRANGE],
    {"src": {"$nin": STRANGE[:3]}},
    {"src": 'a" or id >= 0 or "x'},  # matches nothing: quoted, not an expression
]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("milvus") / "data")
    yield settings
    close_clients()
    from gradindex.indexer.store.db import dispose_engines

    dispose_engines()


@pytest.fixture(scope="module")
def stores(settings: Settings) -> tuple[Index, Index]:
    """(FAISS version 1, Milvus version 2) of one staging."""
    build(BuildConfig(name=NAME, task="tests.test_milvus:MetaTask",
                      compression=CompressionConfig(batch_size=8), window=16), settings)
    faiss = open_index(NAME, settings)
    finalize(settings, NAME, store="milvus")
    milvus = open_index(NAME, settings)
    return faiss, milvus


def queries(index: Index, n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, index.dim)).astype(np.float32)


def assert_same(faiss: Index, milvus: Index, q: np.ndarray, **kw: Any) -> None:
    want = faiss.rank(q, K, **kw)
    got = milvus.rank(q, K, **kw)
    for w, g in zip(want, got, strict=True):
        assert [h.external_id for h in g.hits] == [h.external_id for h in w.hits], kw
        scale = max([abs(h.score) for h in w.hits], default=1.0)
        np.testing.assert_allclose([h.score for h in g.hits], [h.score for h in w.hits],
                                   rtol=RTOL, atol=ATOL * scale)
        assert (g.positives, g.negatives) == (w.positives, w.negatives), kw


def test_versions_record_their_store(stores: tuple[Index, Index]) -> None:
    faiss, milvus = stores
    assert faiss.manifest["store"] == {"kind": "faiss"} and faiss.store is None
    assert isinstance(faiss.searcher, Searcher)
    entry = milvus.manifest["store"]
    assert entry["kind"] == "milvus" and entry["count"] == N and entry["index"] == "FLAT"
    assert entry["collection"] == collection_name(NAME, milvus.version_id, milvus.build_id)
    assert isinstance(milvus.searcher, MilvusSearcher)
    assert milvus.manifest["faiss"]["file"] is None  # no FAISS copy of the vectors
    np.testing.assert_array_equal(np.asarray(milvus.vectors), np.asarray(faiss.vectors))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("direction", ["proponents", "opponents"])
def test_top_k_equals_the_faiss_store(stores: tuple[Index, Index], direction: str,
                                      normalize: bool) -> None:
    faiss, milvus = stores
    assert_same(faiss, milvus, queries(faiss), direction=direction, normalize=normalize)
    # all of them: the whole ranking agrees, not only its head
    want = faiss.rank(queries(faiss), N, direction=direction, normalize=normalize,
                      signed=False)
    got = milvus.rank(queries(faiss), N, direction=direction, normalize=normalize,
                      signed=False)
    for w, g in zip(want, got, strict=True):
        assert [h.external_id for h in g.hits] == [h.external_id for h in w.hits]


@pytest.mark.parametrize("filter", FILTERS, ids=[json.dumps(f) for f in FILTERS])
def test_filters_run_inside_milvus_with_the_sql_meaning(stores: tuple[Index, Index],
                                                        filter: Any) -> None:
    faiss, milvus = stores
    assert milvus.store is not None
    expr = milvus.store.where(filter, milvus.metadata_schema)
    assert expr is not None  # translated, not left to SQL
    # the expression selects exactly the rows the SQL filter does
    found = _client(milvus.store.uri).query(milvus.store.collection, filter=expr,
                                            output_fields=["id"], limit=N)
    sql = milvus.examples.matching(filter)
    assert sql is not None
    assert sorted(r["id"] for r in found) == sql.tolist()
    for normalize in (False, True):
        assert_same(faiss, milvus, queries(faiss, seed=1), filter=filter, normalize=normalize)


def test_injection_like_values_match_only_themselves(stores: tuple[Index, Index]) -> None:
    _, milvus = stores
    for s in STRANGE:
        hits = milvus.search(queries(milvus, 1), N, filter={"src": s}, direction="proponents")
        assert hits[0] and {h.meta["src"] for h in hits[0]} == {s}
    assert milvus.search(queries(milvus, 1), N, filter={"src": 'a" or id >= 0 or "x'}) == [[]]


def test_bad_filter_is_refused_as_for_faiss(stores: tuple[Index, Index]) -> None:
    _, milvus = stores
    with pytest.raises(ConfigError, match="not in this index's metadata"):
        milvus.search(queries(milvus, 1), K, filter={"nope": 1})
    with pytest.raises(ConfigError, match="compares numbers"):
        milvus.search(queries(milvus, 1), K, filter={"label": {"$gt": "a"}})


def test_deleted_examples_never_return(settings: Settings, stores: tuple[Index, Index]) -> None:
    faiss, milvus = stores
    q = queries(faiss, 3, seed=2)
    top = {h.external_id for r in milvus.search(q, K) for h in r}
    gone = sorted(top)[:4]
    for external_id in gone:
        milvus.delete(external_id)  # from every version of the index, the FAISS one too
    assert not set(gone) & {h.external_id for h in faiss.self_influence(N)}
    for kw in ({}, {"direction": "opponents"}, {"normalize": True}, {"filter": {"label": 1}},
               {"filter": {"weight": {"$gt": 0}}}):
        assert_same(faiss, milvus, q, **kw)
        for r in milvus.search(q, K, **kw):  # type: ignore[arg-type]
            assert not {h.external_id for h in r} & set(gone)


def brute_force(index: Index, q: np.ndarray, k: int, filter: Any = None
                ) -> list[list[str]]:
    """The exact top-``k`` external ids, from every live example's exact score."""
    names, scores = index.scores(q)
    keep = np.ones(len(names), bool)
    if filter is not None:
        allowed = {h.external_id for h in index.self_influence(index.count, filter=filter)}
        keep = np.asarray([n in allowed for n in names])
    out = []
    for row in scores:
        order = [j for j in np.argsort(-row, kind="stable") if keep[j]]
        out.append([names[j] for j in order[:k]])
    return out


def test_add_to_a_milvus_backed_index_publishes_to_milvus(tmp_path: Path) -> None:
    from gradindex.indexer.append import add
    from gradindex.indexer.task import TaskSpec

    settings = Settings(data_dir=tmp_path / "data")
    build(BuildConfig(name="grow", task="tests.test_milvus:MetaTask", store="milvus",
                      compression=CompressionConfig(batch_size=8)), settings)
    done = add(settings, "grow", TaskSpec("tests.test_milvus:MetaTask", {"n": N + 10}))
    assert done.added == 10
    index = open_index("grow", settings)
    assert index.store is not None and index.manifest["store"]["count"] == N + 10
    q = queries(index, 3)
    new = {"$and": [{"extra": {"$gte": N}}, {"label": {"$in": [0, 1]}}]}
    hits = index.search(q, K, filter=new, direction="proponents")
    assert all({int(h.meta["extra"]) for h in r} <= set(range(N, N + 10, 2)) for r in hits)
    assert ([[h.external_id for h in r.hits] for r in index.rank(q, K, signed=False)]
            == brute_force(index, q, K))
    assert ([[h.external_id for h in r.hits] for r in index.rank(q, K, filter=new,
                                                                 signed=False)]
            == brute_force(index, q, K, filter=new))
    close_clients()


def test_approximate_milvus_index_reranks_to_exact_scores(tmp_path: Path) -> None:
    """HNSW in Milvus: candidates re-ranked from the matrix; recall@k against exact search."""
    from gradindex.indexer.store import FaissConfig

    settings = Settings(data_dir=tmp_path / "data")
    build(BuildConfig(name="ann", task="tests.test_milvus:MetaTask", store="milvus",
                      faiss=FaissConfig(kind="hnsw"),
                      compression=CompressionConfig(batch_size=8)), settings)
    index = open_index("ann", settings)
    assert index.manifest["store"]["index"] == "HNSW" and index.store is not None
    assert not index.store.exact
    for field in ("vectors", "relative"):
        described = _client(index.store.uri).describe_index(index.store.collection, field)
        assert described["index_type"] == "HNSW" and described["metric_type"] == "IP"
    q = queries(index, 8, seed=3)
    got = index.rank(q, K, signed=False)
    want = brute_force(index, q, K)
    found = sum(len({h.external_id for h in g.hits} & set(w)) for g, w in zip(got, want,
                                                                               strict=True))
    assert found / (K * len(q)) >= 0.95  # recall@6 on 60 vectors (ef 256: exact in practice)
    names, scores = index.scores(q)
    where = {n: j for j, n in enumerate(names)}
    for i, r in enumerate(got):  # every score is the exact inner product
        np.testing.assert_allclose([h.score for h in r.hits],
                                   [scores[i, where[h.external_id]] for h in r.hits],
                                   rtol=RTOL, atol=ATOL * float(np.abs(scores[i]).max()))
    close_clients()


class FailAt(BuildHooks):
    """Fails the finalize at ``point``: the build dies there, like a crash."""

    def __init__(self, point: FinalizePoint) -> None:
        self.point = point

    def in_finalize(self, point: FinalizePoint) -> None:
        if point == self.point:
            raise RuntimeError(f"injected failure at {point}")


def _collections(settings: Settings) -> set[str]:
    from gradindex.indexer.store.milvus import milvus_uri

    return set(_client(milvus_uri(settings.vector_store, settings.data_dir)).list_collections())


def _versions(settings: Settings, name: str) -> dict[int, str]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    with Session(connect(settings)) as session:
        return {int(v.id): str(v.status) for v in session.scalars(select(IndexVersion))}


@pytest.mark.parametrize("point", ["store", "faiss", "before_publish"])
def test_failed_publish_keeps_the_old_version_and_the_next_one_cleans_up(
        tmp_path: Path, point: FinalizePoint) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    build(BuildConfig(name="m", task="tests.test_milvus:MetaTask", store="milvus",
                      compression=CompressionConfig(batch_size=8)), settings)
    old = open_index("m", settings)
    q = queries(old, 2)
    before = [[(h.external_id, h.score) for h in r] for r in old.search(q, K)]
    with pytest.raises(RuntimeError, match="injected"):
        finalize(settings, "m", hooks=FailAt(point))  # keeps the index's store: milvus
    # a half-written (or complete but unpublished) collection exists, and is not served
    assert len(_collections(settings)) == 2
    served = open_index("m", settings)
    assert served.identity == old.identity and served.store is not None
    assert [[(h.external_id, h.score) for h in r] for r in served.search(q, K)] == before
    # the next publish drops it and serves the same answers from a new collection
    finalize(settings, "m")
    new = open_index("m", settings)
    assert new.version == 2 and new.store is not None
    assert _collections(settings) == {old.store.collection, new.store.collection}
    got = [[(h.external_id, h.score) for h in r] for r in new.search(q, K)]
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in before]
    close_clients()


def test_retention_drops_the_collections_of_removed_versions(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")  # two versions retained
    build(BuildConfig(name="m", task="tests.test_milvus:MetaTask", store="milvus",
                      compression=CompressionConfig(batch_size=8)), settings)
    first = open_index("m", settings).store
    finalize(settings, "m")
    second = open_index("m", settings).store
    finalize(settings, "m")
    third = open_index("m", settings).store
    assert first is not None and second is not None and third is not None
    assert _collections(settings) == {second.collection, third.collection}
    finalize(settings, "m", store="faiss")  # back to FAISS: the Milvus ones go by retention
    assert _collections(settings) == {third.collection}
    finalize(settings, "m")
    assert _collections(settings) == set() and open_index("m", settings).store is None
    close_clients()


KILLED_FINALIZE = """
import sys
from gradindex import Settings
from gradindex.indexer.build import finalize
from tests.factories import PausingHooks

finalize(Settings.from_env(), "m", hooks=PausingHooks(at=sys.argv[1]))
"""


def test_killed_publish_leaves_the_old_version_serving(tmp_path: Path) -> None:
    """SIGKILL while the collection is half-written: no cleanup code runs at all."""
    settings = Settings(data_dir=tmp_path / "data")
    build(BuildConfig(name="m", task="tests.test_milvus:MetaTask", store="milvus",
                      compression=CompressionConfig(batch_size=8)), settings)
    old = open_index("m", settings)
    q = queries(old, 2)
    before = [[h.external_id for h in r] for r in old.search(q, K, filter={"label": 1})]
    close_clients()  # milvus-lite: one process holds the file at a time
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADINDEX_")}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_FINALIZE, "store"], cwd=REPO,
                            env={**env, **storage_env(settings)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert PAUSED_MARK in kill_when_paused(proc)
    # `gradindex verify` finds the collection every row in place and drops the half-written one
    out = _cli(settings, "verify", "m")
    assert "dropped 1 Milvus collection(s)" in out and f"holds its {N} rows" in out
    assert _collections(settings) == {old.store.collection}  # type: ignore[union-attr]
    served = open_index("m", settings)
    assert served.identity == old.identity
    assert [[h.external_id for h in r]
            for r in served.search(q, K, filter={"label": 1})] == before
    finalize(settings, "m")
    new = open_index("m", settings)
    assert new.version == 2 and len(_collections(settings)) == 2
    assert [[h.external_id for h in r] for r in new.search(q, K, filter={"label": 1})] == before
    close_clients()
    _cli(settings, "delete", "m")  # and deleting the index drops its collections
    assert _collections(settings) == set()
    close_clients()


def _cli(settings: Settings, *args: str) -> str:
    """``gradindex ARGS`` in a process of its own (milvus-lite: this one lets go first);
    what it printed, stdout and stderr."""
    close_clients()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADINDEX_")}
    done = subprocess.run([sys.executable, "-c", "from gradindex.cli import main; main()",
                           *args], cwd=REPO, env={**env, **storage_env(settings),
                                                  "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_index_without_store_entry_serves_from_faiss(tmp_path: Path) -> None:
    """Versions written before stores existed have no ``store`` entry: FAISS, as before."""
    settings = Settings(data_dir=tmp_path / "data")
    build(BuildConfig(name="old", task="tests.test_milvus:MetaTask",
                      compression=CompressionConfig(batch_size=8)), settings)
    index = open_index("old", settings)
    manifest = {k: v for k, v in index.manifest.items() if k != "store"}
    (index.folder / "manifest.json").write_text(json.dumps(manifest))
    from sqlalchemy.orm import Session

    with Session(connect(settings)) as session, session.begin():
        row = session.get(IndexVersion, index.version_id)
        assert row is not None
        row.manifest = manifest
    reopened = open_index("old", settings)
    assert "store" not in reopened.manifest and reopened.store is None
    q = queries(index, 2)
    assert ([[h.external_id for h in r] for r in reopened.search(q, K)]
            == [[h.external_id for h in r] for r in index.search(q, K)])
    assert not (settings.data_dir / LITE_FILE).exists()  # Milvus never touched
    finalize(settings, "old")  # and a refinalize keeps FAISS
    assert open_index("old", settings).manifest["store"] == {"kind": "faiss"}


def test_server_serves_a_milvus_backed_index(tmp_path: Path, store_task: DigitsTask) -> None:
    """The CLI builds with --store milvus in a process of its own; the server (another) serves
    it; answers equal a FAISS-backed build of the same task."""
    settings = Settings(data_dir=tmp_path / "data")
    args = [a for k, v in STORE_TASK_ARGS.items() for a in ("--task-arg", f"{k}={v}")]
    gradindex_cli(settings, "build", "--task", STORE_TASK, "--name", "digits-milvus",
                  "--batch-size", "32", "--store", "milvus", *args)
    build(BuildConfig(name="digits", task=STORE_TASK, task_args=dict(STORE_TASK_ARGS),
                      compression=CompressionConfig(batch_size=32)), settings)
    reference = open_index("digits", settings)
    assert (settings.data_dir / LITE_FILE).exists()
    payloads = store_task.test_payloads(3)
    q = query_vectors(featurizer_for(reference), payloads)
    server = LiveServer(settings, tmp_path / "server.log", auth="off").wait()
    try:
        with Client(server.url, retries=0) as api:
            listed = {i.name for i in api.indexes()}
            assert {"digits", "digits-milvus"} <= listed
            for kw in ({}, {"filter": {"label": [3, 5]}}, {"normalize": True},
                       {"direction": "opponents"}):
                got = api.influence("digits-milvus", payloads, K, **kw)
                direction = str(kw.get("direction", "proponents"))
                want = reference.search(q, K, **kw)  # type: ignore[arg-type]
                for result, w in zip(got.results, want, strict=True):
                    hits = getattr(result, direction)
                    assert [h.id for h in hits] == [h.external_id for h in w]
                    np.testing.assert_allclose([h.score for h in hits],
                                               [h.score for h in w], rtol=1e-4, atol=1e-4)
    finally:
        server.stop()
    assert "milvus" in json.dumps(open_index("digits-milvus", settings).manifest["store"])
    close_clients()
