"""The persistent index against the in-memory reference, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gradindex import (
    BuildConfig,
    CompressionConfig,
    FaissConfig,
    Featurizer,
    InMemoryIndex,
    PreconditionerConfig,
    Settings,
    build,
    open_index,
    refinalize,
)
from gradindex.indexer.admin import delete_index, index_info, list_indexes
from gradindex.indexer.build import finalize, stage
from gradindex.indexer.errors import ConfigError, ExampleNotFound, IndexNotFound, TaskError
from gradindex.indexer.stage import check_json, shard_size
from gradindex.indexer.store import ExampleRow, IndexVersion, connect, current_version
from gradindex.indexer.tasks import DigitsTask

from .conftest import STORE_TASK, STORE_TASK_ARGS
from .factories import (
    DuplicateIdsTask,
    NumpyPayloadTask,
    RecordingHooks,
    StreamedTask,
)

RTOL = 1e-4
ATOL_REL = 1e-5
"""Score tolerance, relative to the largest score magnitude of the query."""
K = 10
BATCH = 16
QUERIES = 12


@pytest.fixture(scope="module")
def featurizer(store_task: DigitsTask) -> Featurizer:
    return Featurizer(store_task, CompressionConfig(batch_size=BATCH))


@pytest.fixture(scope="module")
def reference(store_task: DigitsTask, featurizer: Featurizer) -> InMemoryIndex:
    return InMemoryIndex.fit(store_task, featurizer.config, PreconditionerConfig(),
                             featurizer=featurizer)


@pytest.fixture(scope="module")
def queries(store_task: DigitsTask, featurizer: Featurizer) -> torch.Tensor:
    return featurizer.query(store_task.test_payloads(QUERIES))


def make_config(name: str = "digits", **kwargs: object) -> BuildConfig:
    base: dict[str, object] = {
        "name": name, "task": STORE_TASK, "task_args": dict(STORE_TASK_ARGS),
        "compression": CompressionConfig(batch_size=BATCH), "chunk_size": 64, "window": 128,
    }
    base.update(kwargs)
    return BuildConfig(**base)  # type: ignore[arg-type]


def assert_topk(hits: Sequence[object], ref_scores: np.ndarray, ids: list[str], k: int,
                sign: float = 1.0, allowed: np.ndarray | None = None) -> None:
    """Hits are the true top-k of ``sign · ref_scores`` (over ``allowed``) with exact scores."""
    scale = float(np.abs(ref_scores).max())
    by_id = dict(zip(ids, ref_scores, strict=True))
    mask = np.ones(len(ids), bool) if allowed is None else allowed
    expected = np.sort(sign * ref_scores[mask])[::-1][:k] * sign
    got = np.array([h.score for h in hits])  # type: ignore[attr-defined]
    assert len(hits) == min(k, int(mask.sum()))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL_REL * scale)
    for h in hits:
        np.testing.assert_allclose(h.score, by_id[h.external_id],  # type: ignore[attr-defined]
                                   rtol=RTOL, atol=ATOL_REL * scale)


def test_search_matches_in_memory(
    settings: Settings, featurizer: Featurizer, reference: InMemoryIndex, queries: torch.Tensor
) -> None:
    version = build(make_config(), settings, featurizer=featurizer)
    assert version is not None
    index = open_index("digits", settings)
    assert index.count == len(reference.ids) and index.dim == featurizer.dim
    ref = (queries @ reference.vectors.T).numpy()
    for direction, sign in (("proponents", 1.0), ("opponents", -1.0)):
        results = index.search(queries, K, direction=direction)
        assert len(results) == QUERIES
        for q, hits in enumerate(results):
            assert_topk(hits, ref[q], reference.ids, K, sign)
    ids, scores = index.scores(queries)
    assert ids == reference.ids
    np.testing.assert_allclose(scores, ref, rtol=RTOL, atol=ATOL_REL * np.abs(ref).max())
    names, some = index.scores(queries[:2], ids=["train-7", "train-3"])
    np.testing.assert_allclose(some, ref[:2, [7, 3]], rtol=RTOL, atol=1e-6)
    mean = index.select(queries, K)
    assert_topk(mean, ref.mean(axis=0), reference.ids, K)
    top = index.self_influence(5)
    expected_si = np.sort(reference.self_influence.numpy())[::-1][:5]
    np.testing.assert_allclose([h.score for h in top], expected_si, rtol=RTOL)
    assert index.example("train-5").payload == featurizer.task.task.payload(5)
    assert index.example("train-5").meta == {"label": int(featurizer.task.task.y[5])}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=False)
def test_vectors_are_stored_once_and_the_old_layout_still_serves(
    settings: Settings, featurizer: Featurizer, reference: InMemoryIndex, queries: torch.Tensor
) -> None:
    import faiss

    build(make_config(), settings, featurizer=featurizer)
    index = open_index("digits", settings)
    folder = index.folder
    assert not list(folder.glob("*.faiss"))  # an exact index is vectors.npy alone
    n, dim = index.count, index.dim
    per_example = sum(f.stat().st_size for f in folder.iterdir()
                      if f.name in ("vectors.npy", "ids.npy", "self_influence.npy")) / n
    assert per_example <= 1.1 * dim * 4 + 16  # the float32 vector, its id and self-influence
    index.delete("train-3")
    new = [[h.external_id for h in hits] for hits in index.search(queries, K)]
    rel = [[h.external_id for h in hits] for hits in index.search(queries, K, normalize=True)]
    assert "train-3" not in {i for hits in new for i in hits}

    # the layout written before: flat FAISS copies of the vectors
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry, name, scale in (("faiss", "index.faiss", None),
                               ("relative", "relative.faiss", manifest["relative"]["eps"])):
        vectors = np.load(folder / "vectors.npy")
        if scale is not None:
            si = np.load(folder / "self_influence.npy")
            vectors = vectors / np.sqrt(np.maximum(si, scale))[:, None].astype(np.float32)
        flat = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        flat.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.load(folder / "ids.npy"))
        faiss.write_index(flat, str(folder / name))
        manifest[entry]["file"] = name  # as written then (the FAISS entry had no file key)
    manifest["faiss"].pop("file")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    old = open_index("digits", settings)
    assert old.files.faiss is not None and old.has_relative_index
    assert [[h.external_id for h in hits] for hits in old.search(queries, K)] == new
    assert [[h.external_id for h in hits]
            for hits in old.search(queries, K, normalize=True)] == rel


def test_filter_delete_and_refinalize(
    settings: Settings, featurizer: Featurizer, reference: InMemoryIndex, queries: torch.Tensor,
    store_task: DigitsTask,
) -> None:
    build(make_config(), settings, featurizer=featurizer)
    index = open_index("digits", settings)
    ref = (queries @ reference.vectors.T).numpy()
    labels = store_task.y
    for flt, allowed in (({"label": 3}, labels == 3), ({"label": [1, 2]}, np.isin(labels, [1, 2])),
                         ({"label": 3, "$or": [{"label": 4}]}, np.zeros_like(labels, bool))):
        for q, hits in enumerate(index.search(queries, K, filter=flt)):
            assert all(h.meta["label"] in np.unique(labels[allowed]) for h in hits)
            assert_topk(hits, ref[q], reference.ids, K, allowed=allowed)
    with pytest.raises(ConfigError, match="filter"):
        index.search(queries, K, filter={"label": {"nested": 1}})
    with pytest.raises(ConfigError, match=r"'missing' is not in this index's metadata; known "
                                          r"keys: \['label'\]"):
        index.search(queries, K, filter={"label": 3, "missing": "x"})

    top = index.search(queries[:1], 1)[0][0]
    index.delete(top.external_id)
    with pytest.raises(ExampleNotFound):
        index.example(top.external_id)
    with pytest.raises(ExampleNotFound):
        index.scores(queries, ids=[top.external_id])
    for flt in (None, {"label": top.meta["label"]}):
        hits = index.search(queries, index.count, filter=flt)
        assert all(h.external_id != top.external_id for row in hits for h in row)
    assert all(h.external_id != top.external_id for h in index.self_influence(300))
    assert len(index.scores(queries)[0]) == index.count - 1

    # Refinalize: another damping gives the in-memory index's with_damping scores; the
    # deletion carries over to the new version.
    version = refinalize(settings, "digits", damping=0.5)
    fresh = open_index("digits", settings)
    assert fresh.version == version != index.version
    assert fresh.manifest["preconditioner"]["damping"] == 0.5
    ref5 = (queries @ reference.with_damping(0.5).vectors.T).numpy()
    keep = np.array([i != top.external_id for i in reference.ids])
    for q, hits in enumerate(fresh.search(queries, K)):
        assert_topk(hits, ref5[q], reference.ids, K, allowed=keep)
    with pytest.raises(ExampleNotFound):
        fresh.example(top.external_id)
    assert not index.is_current() and fresh.is_current()

    # the default `auto` Fisher resolved to `expected` (the task defines logits); its rows are
    # what was staged, so another kind needs a rebuild
    assert fresh.manifest["preconditioner"]["fisher"] == "expected"
    with pytest.raises(ConfigError, match="staged with the 'expected' Fisher"):
        refinalize(settings, "digits", fisher="sampled")

    full = InMemoryIndex.fit(store_task, featurizer.config,
                             PreconditionerConfig(shape="full", damping=0.1),
                             featurizer=featurizer)
    refinalize(settings, "digits", shape="full", damping=0.1)
    reff = (queries @ full.vectors.T).numpy()
    for q, hits in enumerate(open_index("digits", settings).search(queries, K)):
        assert_topk(hits, reff[q], reference.ids, K, allowed=keep)
    # Retention: the current version and the one before it.
    assert len(list((settings.index_dir("digits") / "versions").iterdir())) == 2


def test_list_info_delete(settings: Settings, featurizer: Featurizer) -> None:
    build(make_config("a"), settings, featurizer=featurizer)
    build(make_config("b", faiss=FaissConfig(kind="hnsw", fp16=True)), settings,
          featurizer=featurizer)
    rows = {r["name"]: r for r in list_indexes(settings)}
    assert set(rows) == {"a", "b"} and rows["a"]["count"] == 300
    info = index_info(settings, "b")
    faiss = info["manifest"]["faiss"]
    assert faiss["kind"] == "hnsw" and faiss["fp16"] and 0.5 <= faiss["recall_at_10"] <= 1.0
    assert info["manifest"]["model_fingerprint"] and info["manifest"]["libraries"]["faiss"]
    delete_index(settings, "a")
    assert [r["name"] for r in list_indexes(settings)] == ["b"]
    assert not settings.index_dir("a").exists()
    with pytest.raises(IndexNotFound):
        open_index("a", settings)
    with pytest.raises(IndexNotFound):
        delete_index(settings, "a")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=False)
@pytest.mark.parametrize("kind,fp16,pq", [("hnsw", True, False), ("ivf", False, False),
                                           ("ivf", False, True), ("flat", True, False)])
def test_approximate_index_returns_exact_scores(
    settings: Settings, featurizer: Featurizer, reference: InMemoryIndex, queries: torch.Tensor,
    kind: str, fp16: bool, pq: bool,
) -> None:
    dim = reference.vectors.shape[1]
    codes = next(p for p in (8, 4, 2, 1) if dim % p == 0) if pq else None  # bytes per vector
    build(make_config(faiss=FaissConfig(kind=kind, fp16=fp16, nprobe=4, pq=codes)), settings,
          featurizer=featurizer)
    index = open_index("digits", settings)
    assert 0.0 < index.manifest["faiss"]["recall_at_10_reranked"] <= 1.0
    if pq:  # FAISS holds `codes` bytes per vector, not a float copy of the vectors
        import faiss

        folder = next((settings.data_dir / "indexes" / "digits" / "versions").glob("v*"))
        outer = faiss.read_index(str(folder / "index.faiss"))  # owns the inner index
        stored = faiss.downcast_index(outer.index)
        assert isinstance(stored, faiss.IndexIVFPQ) and stored.code_size == codes
    ref = (queries @ reference.vectors.T).numpy()
    by_id = {i: n for n, i in enumerate(reference.ids)}
    top1 = []
    for q, hits in enumerate(index.search(queries, K)):
        got = np.array([h.score for h in hits])
        exact = ref[q, [by_id[h.external_id] for h in hits]]
        np.testing.assert_allclose(got, exact, rtol=RTOL, atol=ATOL_REL * np.abs(ref[q]).max())
        assert np.all(np.diff(got) <= 1e-6)
        top1.append(hits[0].external_id == reference.ids[int(np.argmax(ref[q]))])
    # flat search finds every query's best example; IVF probing 4 of its 7 lists may miss it
    # (its recall is measured and stored in the manifest), but what it returns is exact
    if kind == "flat":
        assert all(top1), top1


@pytest.mark.parametrize("backend", ["sqlite"], indirect=False)
def test_expected_fisher_is_staged(
    settings: Settings, featurizer: Featurizer, store_task: DigitsTask, queries: torch.Tensor,
) -> None:
    pcfg = PreconditionerConfig(fisher="expected")
    build(make_config(preconditioner=pcfg), settings, featurizer=featurizer)
    reference = InMemoryIndex.fit(store_task, featurizer.config, pcfg, featurizer=featurizer)
    ref = (queries @ reference.vectors.T).numpy()
    index = open_index("digits", settings)
    for q, hits in enumerate(index.search(queries, K)):
        assert_topk(hits, ref[q], reference.ids, K)
    refinalize(settings, "digits", damping=1.0)  # no model pass: the Fisher rows are staged
    ref1 = (queries @ reference.with_damping(1.0).vectors.T).numpy()
    for q, hits in enumerate(open_index("digits", settings).search(queries, K)):
        assert_topk(hits, ref1[q], reference.ids, K)


def test_reader_sees_one_version_while_publishing(
    settings: Settings, featurizer: Featurizer, reference: InMemoryIndex, queries: torch.Tensor,
) -> None:
    """Open the index over and over while another thread publishes new versions."""
    build(make_config(), settings, featurizer=featurizer)
    dampings = [PreconditionerConfig().damping, 1.0]
    expected = {d: (queries[:2] @ reference.with_damping(d).vectors.T).numpy() for d in dampings}
    errors: list[BaseException] = []
    stop = threading.Event()

    def publish() -> None:
        try:
            for i in range(4):
                refinalize(settings, "digits", damping=dampings[(i + 1) % 2])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=publish)
    thread.start()
    seen = set()
    opened = 0
    while not stop.is_set() or opened == 0:
        index = open_index("digits", settings)  # checks FAISS ids against SQL rows
        damping = index.manifest["preconditioner"]["damping"]
        seen.add(index.version)
        ref = expected[damping]
        for q, hits in enumerate(index.search(queries[:2], 3)):
            assert_topk(hits, ref[q], reference.ids, 3)
        opened += 1
    thread.join()
    assert not errors, errors
    assert opened >= 2 and len(seen) >= 1


def example_ids(settings: Settings) -> list[int]:
    with Session(connect(settings)) as session:
        return list(session.scalars(select(ExampleRow.id)))


def test_versions_are_numbered_per_index_and_ids_never_reused(
    settings: Settings, featurizer: Featurizer
) -> None:
    first = build(make_config("a"), settings, featurizer=featurizer)
    build(make_config("b"), settings, featurizer=featurizer)
    second = refinalize(settings, "a", damping=0.5)
    assert (first, second) == (1, 2)  # what build and refinalize return: the numbers
    used_rows = max(example_ids(settings))
    with Session(connect(settings)) as session:
        a = current_version(session=session, name="a")
        b = current_version(session=session, name="b")
        assert (a.number, b.number) == (2, 1)  # per index, whatever the global ids
        a_id = a.id
        build_ids = set(session.scalars(select(IndexVersion.build_id)))
    manifest = open_index("a", settings).manifest
    assert (manifest["number"], manifest["build_id"], manifest["version"]) == \
        (a.number, a.build_id, a.id)
    assert len(build_ids) == 3 and all(len(i) == 32 and int(i, 16) >= 0 for i in build_ids)
    info = index_info(settings, "a")
    assert (info["version"], info["version_id"]) == (2, a_id)
    assert open_index("a", settings).version == 2

    # Deleted and rebuilt: a new index numbered from 1, under ids never handed out before
    # (a plain SQLite INTEGER PRIMARY KEY would give the freed ones back).
    delete_index(settings, "a")
    delete_index(settings, "b")
    third = build(make_config("a"), settings, featurizer=featurizer)
    assert third == 1
    assert min(example_ids(settings)) > used_rows
    with Session(connect(settings)) as session:
        again = current_version(session=session, name="a")
        assert again.number == 1 and again.build_id not in build_ids and again.id > a_id


@pytest.mark.parametrize("backend", ["sqlite"])
def test_finalize_after_refinalize_keeps_its_settings(
    settings: Settings, featurizer: Featurizer
) -> None:
    build(make_config(), settings, featurizer=featurizer)
    refinalize(settings, "digits", damping=0.3, faiss=FaissConfig(kind="hnsw"))
    refinalized = open_index("digits", settings).manifest
    finalize(settings, "digits")  # as `gradindex finalize digits` does
    manifest = open_index("digits", settings).manifest
    assert manifest["number"] == 3
    assert manifest["preconditioner"] == refinalized["preconditioner"]
    assert manifest["preconditioner"]["damping"] == 0.3
    assert manifest["faiss"]["kind"] == "hnsw"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_hooks_are_called_at_named_points(settings: Settings, featurizer: Featurizer) -> None:
    hooks = RecordingHooks()
    build(make_config(), settings, featurizer=featurizer, hooks=hooks)
    chunks = -(-300 // 64)
    windows = -(-300 // 128)
    assert hooks.calls == [
        *[("chunk", n) for n in range(1, chunks + 1)],
        ("finalize", "fitted"),
        *[("finalize", "rows")] * windows,
        ("finalize", "faiss"), ("finalize", "before_publish"), ("finalize", "published"),
    ]


def sequence_config(name: str, **kwargs: object) -> BuildConfig:
    base: dict[str, object] = {"name": name, "task": "tests.factories:SequenceTask",
                               "compression": CompressionConfig(batch_size=4), "chunk_size": 8}
    return BuildConfig(**{**base, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_duplicate_ids_are_refused_within_and_across_shards(settings: Settings) -> None:
    config = CompressionConfig(batch_size=4)
    task = DuplicateIdsTask({9: 1, 20: 2, 22: 2})
    with pytest.raises(TaskError, match=r"duplicate ids: 's1' at positions 1, 9; "
                                        r"'s2' at positions 2, 20, 22\. .*unique"):
        build(sequence_config("dups"), settings, featurizer=Featurizer(task, config))
    with pytest.raises(IndexNotFound):
        open_index("dups", settings)

    # Positions 1 and 5 fall in batches 0 and 1, i.e. in shards 0 and 1 of 2: each shard
    # stages fine, and finalize refuses before creating a version.
    across = Featurizer(DuplicateIdsTask({5: 1}), config)
    for shard in range(2):
        stage(sequence_config("split", shard=shard, shards=2), settings, featurizer=across)
    with pytest.raises(TaskError, match=r"duplicate ids: 's1' at positions 1, 5\."):
        finalize(settings, "split")
    with Session(connect(settings)) as session:
        assert session.scalar(select(func.count()).select_from(IndexVersion)) == 0


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("value,found,advice", [
    (np.float32(0.5), "numpy.float32", r"float\(\.\.\.\)"),
    (np.int64(3), "numpy.int64", r"int\(\.\.\.\)"),
    (np.arange(3), "numpy.ndarray", r"\.tolist\(\)"),
    (torch.zeros(2), "torch.Tensor", r"\.tolist\(\)"),
])
def test_payload_that_is_not_json_names_example_field_and_type(
    settings: Settings, value: object, found: str, advice: str
) -> None:
    task = NumpyPayloadTask(bad=6, field="w", value={"deep": [1.0, value]})
    with pytest.raises(TaskError, match=rf"example 's6': payload\['w'\]\['deep'\]\[1\] is a "
                                        rf"{found}, which is not JSON; .*{advice}"):
        build(sequence_config("np"), settings,
              featurizer=Featurizer(task, CompressionConfig(batch_size=4)))


def test_check_json_refuses_what_json_cannot_hold() -> None:
    check_json({"a": [1, 2.5, None, True, "x", (1, 2)], "b": {"c": -3}}, example_id="e",
               field="payload")
    with pytest.raises(TaskError, match=r"payload\['y'\] is nan, which JSON cannot hold"):
        check_json({"y": float("nan")}, example_id="e", field="payload")
    with pytest.raises(TaskError, match=r"meta has the key 3 of type int; .*str\(\.\.\.\)"):
        check_json({3: "x"}, example_id="e", field="meta")


@pytest.mark.parametrize("backend", ["sqlite"])
def test_generator_task_with_len_reports_totals(settings: Settings) -> None:
    calls: list[tuple[str, int, int | None]] = []
    task = StreamedTask(n=24)
    build(sequence_config("streamed"), settings,
          featurizer=Featurizer(task, CompressionConfig(batch_size=4)),
          progress=lambda phase, done, total: calls.append((phase, done, total)))
    featurize = [c for c in calls if c[0] == "featurize"]
    assert featurize[0] == ("featurize", 0, 24)  # known before the first example is read
    assert [c[2] for c in featurize] == [24] * len(featurize)
    assert featurize[-1] == ("featurize", 24, 24) and len(featurize) >= 4


def test_shard_size_counts_whole_batches() -> None:
    for total in (0, 1, 15, 16, 17, 300):
        for shards in (1, 2, 3):
            for shard in range(shards):
                mine = sum(1 for p in range(total) if (p // 16) % shards == shard)
                assert shard_size(total, 16, shard, shards) == mine
