"""The real server over HTTP, driven by the client: every endpoint against the indexer's own
answers in process, bad input, batching under concurrency, and new versions picked up."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from gradindex_client import (
    Client,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)

from gradindex import BuildConfig, Settings, build, open_index, refinalize
from gradindex.indexer.featurize import Featurizer
from gradindex.indexer.query import featurizer_for, query_vectors
from gradindex.indexer.reader import Index
from gradindex.indexer.tasks import DigitsTask

from .conftest import SERVED_INDEX, STORE_TASK, STORE_TASK_ARGS, LiveServer

RTOL = 1e-4
ATOL = 1e-4
"""Score tolerance: the server batches queries differently than the reference does."""
K = 8
THREADS = 32


@pytest.fixture(scope="module")
def api(live_server: LiveServer, server_keys: dict[str, str]) -> Iterator[Client]:
    with Client(live_server.url, api_key=server_keys["admin"], retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def reference(server_settings: Settings) -> Index:
    """The served index, opened in this process (the version served at first)."""
    return open_index(SERVED_INDEX, server_settings)


@pytest.fixture(scope="module")
def featurizer(reference: Index) -> Featurizer:
    """The query side of the served index, rebuilt from its manifest as the server does."""
    return featurizer_for(reference)


@pytest.fixture(scope="module")
def payloads(store_task: DigitsTask) -> list[dict[str, Any]]:
    return store_task.test_payloads(40)


def assert_same_hits(got: list[Any], want: list[Any]) -> None:
    assert [h.id for h in got] == [h.external_id for h in want]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want],
                               rtol=RTOL, atol=ATOL)
    for g, w in zip(got, want, strict=True):
        assert g.payload == w.payload and g.meta == w.meta
        assert g.self_influence == pytest.approx(w.self_influence, rel=1e-6)


def test_health_and_listing(api: Client, reference: Index) -> None:
    health = api.health()
    assert health.status == "ok" and health.contract == 1 and health.auth
    assert health.devices and health.indexes == 1 and health.workers == 1
    listing = {i.name: i for i in api.indexes()}
    assert listing[SERVED_INDEX].status == "serving"
    assert listing[SERVED_INDEX].version == reference.version
    assert listing[SERVED_INDEX].count == reference.count
    detail = api.index(SERVED_INDEX)
    assert detail.dim == reference.dim and detail.relative
    assert detail.task["spec"] == reference.manifest["task"]["spec"]


def test_index_with_changed_weights_is_refused_and_others_served(
    api: Client, live_server: LiveServer
) -> None:
    listing = {i.name: i for i in api.indexes()}
    assert listing["stale"].status == "unavailable"
    assert "other model weights" in (listing["stale"].reason or "")
    with pytest.raises(ServiceUnavailable, match="other model weights"):
        api.influence("stale", [{"x": [0.0] * 64, "y": 0}])
    detail = api.index("stale")  # described, not refused
    assert detail.status == "unavailable" and "other model weights" in (detail.reason or "")
    assert detail.version == listing["stale"].version and detail.device is None
    log = " ".join(live_server.log().split())  # the log wraps long lines
    assert re.search(r"index 'stale' is not served: .*other model weights", log)


@pytest.mark.parametrize("direction", ["proponents", "opponents", "both"])
def test_influence_equals_the_indexer(api: Client, reference: Index, featurizer: Featurizer,
                                      payloads: list[dict[str, Any]], direction: str) -> None:
    got = api.influence(SERVED_INDEX, payloads[:6], K, direction=direction)
    assert got.version == reference.version and len(got.results) == 6
    q = query_vectors(featurizer, payloads[:6])
    for d in ("proponents", "opponents"):
        want = reference.search(q, K, direction=d)
        for i, result in enumerate(got.results):
            hits = getattr(result, d)
            if direction in (d, "both"):
                assert_same_hits(hits, want[i])
            else:
                assert hits == []


def test_influence_filter_and_relative_influence(api: Client, reference: Index,
                                                 featurizer: Featurizer,
                                                 payloads: list[dict[str, Any]]) -> None:
    q = query_vectors(featurizer, payloads[:4])
    got = api.influence(SERVED_INDEX, payloads[:4], K, filter={"label": [3, 5]})
    for i, result in enumerate(got.results):
        assert {h.meta["label"] for h in result.proponents} <= {3, 5}
        assert_same_hits(result.proponents, reference.search(q, K, filter={"label": [3, 5]})[i])
    # Relative influence: the top-k of score / sqrt(self-influence), checked by brute force.
    got = api.influence(SERVED_INDEX, payloads[:4], K, normalize=True, direction="both")
    ids, scores = reference.scores(q)
    si = {h.external_id: h.self_influence for h in reference.self_influence(reference.count)}
    eps = reference.manifest["relative"]["eps"]
    relative = scores / np.sqrt(np.maximum([si[i] for i in ids], eps))
    for i, result in enumerate(got.results):
        order = np.argsort(-relative[i], kind="stable")
        assert [h.id for h in result.proponents] == [ids[j] for j in order[:K]]
        np.testing.assert_allclose([h.score for h in result.proponents],
                                   relative[i][order[:K]], rtol=RTOL, atol=ATOL)
        assert [h.id for h in result.opponents] == [ids[j] for j in order[::-1][:K]]


def test_scores_and_select_equal_the_indexer(api: Client, reference: Index,
                                             featurizer: Featurizer,
                                             payloads: list[dict[str, Any]]) -> None:
    q = query_vectors(featurizer, payloads[:5])
    some = ["train-7", "train-0", "train-123"]
    got = api.scores(SERVED_INDEX, payloads[:5], some)
    ids, want = reference.scores(q, some)
    assert got.ids == ids == some
    np.testing.assert_allclose(got.scores, want, rtol=RTOL, atol=ATOL)
    everything = api.scores(SERVED_INDEX, payloads[:2])
    ids, want = reference.scores(q[:2])
    assert everything.ids == ids
    np.testing.assert_allclose(everything.scores, want, rtol=RTOL, atol=ATOL)
    frame = everything.to_pandas()
    assert frame.shape == (2, len(ids)) and list(frame.columns) == ids

    selected = api.select(SERVED_INDEX, payloads[:5], K)
    assert_same_hits(selected.results, reference.select(q, K))
    assert selected.ids == [h.id for h in selected.results]


def test_self_influence_pages_and_examples(api: Client, reference: Index) -> None:
    want = reference.self_influence(25)
    first = api.self_influence(SERVED_INDEX, limit=10)
    second = api.self_influence(SERVED_INDEX, limit=15, offset=first.next_offset or 0)
    assert first.next_offset == 10
    assert [h.id for h in first.results + second.results] == [h.external_id for h in want]
    last = api.self_influence(SERVED_INDEX, limit=10, offset=reference.count - 3)
    assert len(last.results) == 3 and last.next_offset is None
    lowest = api.self_influence(SERVED_INDEX, limit=3, ascending=True)
    assert [h.id for h in lowest.results] == [
        h.external_id for h in reference.self_influence(3, descending=False)]
    assert list(first.to_pandas()["id"]) == [h.id for h in first.results]

    example = api.example(SERVED_INDEX, "train-5")
    assert example.payload == reference.example("train-5").payload
    with pytest.raises(NotFound, match="no example 'train-nope'"):
        api.example(SERVED_INDEX, "train-nope")


def test_bad_input_is_a_4xx_that_names_the_problem(
    api: Client, live_server: LiveServer, server_keys: dict[str, str],
    payloads: list[dict[str, Any]],
) -> None:
    url = f"{live_server.url}/v1/indexes/{SERVED_INDEX}/influence"
    headers = {"Authorization": f"Bearer {server_keys['read']}",
               "Content-Type": "application/json"}

    def post(body: bytes | str) -> httpx.Response:
        return httpx.post(url, content=body, headers=headers, timeout=30)

    nan = json.dumps({"examples": [{"x": [0.5] * 64, "y": 1}]}).replace("0.5", "NaN", 1)
    cases = [
        (post(b'{"examples": ['), 400, "MalformedJSON", "not valid JSON"),
        (post('{"examples": [{"x": [1, 2], "y": 1}]}'), 422, "TaskError", "64 numbers"),
        (post('{"examples": [{"x": "abc"}]}'), 422, "TaskError", "'x' (features) and 'y'"),
        (post(nan), 422, "ValidationError", "`examples[0].x[0]`: NaN"),
        (post(json.dumps({"examples": payloads[:1], "k": 0})), 422, "ValidationError", "`k`"),
        (post(json.dumps({"examples": payloads[:1], "k": 1001})), 422, "ValidationError",
         "`k`"),
        (post(json.dumps({"examples": payloads[:1], "k": "ten"})), 422, "ValidationError",
         "`k`"),
        (post(json.dumps({"examples": payloads[:1], "direction": "up"})), 422,
         "ValidationError", "`direction`"),
        (post(json.dumps({"examples": payloads[:1], "filter": {"label": []}})), 422,
         "ConfigError", "empty list"),
        (post(json.dumps({"examples": payloads[:1], "kk": 3})), 422, "ValidationError",
         "`kk`"),
        (post(json.dumps({"examples": []})), 422, "ValidationError", "`examples`"),
        (post(json.dumps({"examples": payloads[:1] * 300})), 422, "ConfigError", "at most"),
        (post(b"[" + b"1," * 3_000_000 + b"1]"), 413, "BodyTooLarge", "larger than"),
        (httpx.post(url.replace(SERVED_INDEX, "nope"), json={"examples": payloads[:1]},
                    headers=headers), 404, "IndexNotFound", "no index named 'nope'"),
        (httpx.get(live_server.url + "/v1/nothing", headers=headers), 404, "NotFound",
         "/docs"),
    ]
    for response, status, kind, message in cases:
        error = response.json()["error"]
        assert (response.status_code, error["type"]) == (status, kind), error
        assert message in error["message"], error
    with pytest.raises(InvalidRequest, match="64 numbers"):
        api.influence(SERVED_INDEX, [{"x": [1], "y": 0}])
    with pytest.raises(PayloadTooLarge):
        api.scores(SERVED_INDEX, [{"x": [0.0] * 64, "y": 0}] * 256, ["x" * 100_000] * 50)
    assert api.influence(SERVED_INDEX, payloads[:1], 3).results[0].proponents  # still serving


def test_32_concurrent_clients_are_answered_correctly_and_batched(
    api: Client, live_server: LiveServer, server_keys: dict[str, str], reference: Index,
    featurizer: Featurizer, payloads: list[dict[str, Any]],
) -> None:
    q = query_vectors(featurizer, payloads[:THREADS])
    want = reference.search(q, K)
    before = _batched_passes(api.metrics())
    got: dict[int, Any] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def one(i: int) -> None:
        try:
            with Client(live_server.url, api_key=server_keys["read"]) as c:
                barrier.wait()
                bad = i % 8 == 7  # a bad payload fails only its own request
                example = {"x": [1.0], "y": 0} if bad else payloads[i]
                try:
                    got[i] = c.influence(SERVED_INDEX, [example], K).results[0].proponents
                except InvalidRequest as exc:
                    got[i] = exc if bad else None
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(THREADS):
        if i % 8 == 7:
            assert isinstance(got[i], InvalidRequest) and "64 numbers" in got[i].message
        else:
            assert_same_hits(got[i], want[i])
    assert _batched_passes(api.metrics()) > before, "no model pass served several requests"


def _batched_passes(metrics: str) -> float:
    """Model passes that served more than one request, from the Prometheus histogram."""
    total = le1 = 0.0
    for line in metrics.splitlines():
        if line.startswith("gradindex_batch_requests_count"):
            total += float(line.split()[-1])
        elif line.startswith("gradindex_batch_requests_bucket") and 'le="1.0"' in line:
            le1 += float(line.split()[-1])
    return total - le1


def test_metrics_are_prometheus(api: Client) -> None:
    text = api.metrics()
    for name in ("gradindex_requests_total", "gradindex_request_seconds_bucket",
                 "gradindex_queue_depth", "gradindex_batch_examples_bucket"):
        assert name in text
    page = httpx.get(api.base_url + "/")
    assert page.status_code == 200 and "<h1>gradindex</h1>" in page.text
    docs = httpx.get(api.base_url + "/docs")
    assert docs.status_code == 200
    spec = httpx.get(api.base_url + "/openapi.json").json()
    assert "/v1/indexes/{name}/influence" in spec["paths"]


def test_delete_then_new_version_is_picked_up(
    tmp_path: Path, payloads: list[dict[str, Any]]
) -> None:
    """On an index and a server of its own: it deletes an example and publishes a new
    version, which the other tests' shared index must not see."""
    server_settings = Settings(data_dir=tmp_path / "data")
    build(BuildConfig(name=SERVED_INDEX, task=STORE_TASK, task_args=dict(STORE_TASK_ARGS)),
          server_settings)
    server = LiveServer(server_settings, tmp_path / "server.log", auth="off").wait()
    try:
        with Client(server.url, retries=0) as api:
            _delete_then_refinalize(api, server_settings, payloads)
    finally:
        server.stop()


def _delete_then_refinalize(api: Client, server_settings: Settings,
                            payloads: list[dict[str, Any]]) -> None:
    top = api.influence(SERVED_INDEX, payloads[:1], 3).results[0].proponents[0]
    deleted = api.delete(SERVED_INDEX, top.id)
    assert deleted.id == top.id
    with pytest.raises(NotFound):
        api.example(SERVED_INDEX, top.id)
    with pytest.raises(NotFound):
        api.delete(SERVED_INDEX, top.id)
    after = api.influence(SERVED_INDEX, payloads[:1], 3).results[0].proponents
    assert top.id not in [h.id for h in after]

    old = api.index(SERVED_INDEX).version
    new = refinalize(server_settings, SERVED_INDEX, damping=0.5)
    deadline = time.monotonic() + 10
    while api.index(SERVED_INDEX).version != new and time.monotonic() < deadline:
        time.sleep(0.2)
    assert api.index(SERVED_INDEX).version == new != old
    reference = open_index(SERVED_INDEX, server_settings)
    got = api.influence(SERVED_INDEX, payloads[:3], K)
    want = reference.search(query_vectors(featurizer_for(reference), payloads[:3]), K)
    for i in range(3):
        assert_same_hits(got.results[i].proponents, want[i])
        assert top.id not in [h.id for h in got.results[i].proponents]
