"""The server's registry of indexes against damaged data: one index that cannot load never
stops the server or the others, says why (without the server's paths), and is served again once
a new version is published; device workers of models no index uses any more are stopped."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from gradindex import (
    BuildConfig,
    CompressionConfig,
    FaissConfig,
    Featurizer,
    Settings,
    build,
    open_index,
)
from gradindex.indexer.admin import delete_index
from gradindex.indexer.errors import StorageError
from gradindex.indexer.query import featurizer_for, query_vectors
from gradindex.indexer.store.db import dispose_engines
from gradindex.indexer.tasks import DigitsTask
from gradindex.server.errors import Overloaded
from gradindex.server.indexes import failure_reason
from gradindex.server.metrics import Metrics
from gradindex.server.worker import DeviceWorker

from .conftest import STORE_TASK, STORE_TASK_ARGS, LiveServer

RTOL = ATOL = 1e-4
"""Score tolerance: the server batches queries differently than the reference does."""
K = 5
HEALTHY, BROKEN = "healthy", "broken"
FLAKY_TASK = '''
from pathlib import Path

from gradindex.indexer.tasks import DigitsTask
from gradindex.server.errors import Overloaded
from gradindex.server.metrics import Metrics
from gradindex.server.worker import DeviceWorker


class FlakyTask(DigitsTask):
    """The digits task, whose constructor raises once the file ``fail_if`` exists."""

    def __init__(self, fail_if: str, **kwargs):
        if Path(fail_if).exists():
            raise RuntimeError(f"the licence in {fail_if} has expired")
        super().__init__(**kwargs)
'''


class Template:
    """A data directory holding ``healthy`` (the store task) and ``broken`` (the same model
    through a task file whose constructor raises once ``marker`` exists), built once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.task_file = root / "tasks" / "flaky_task.py"
        self.marker = root / "licence-expired"
        self.data = root / "data"

    def broken_config(self, **args: Any) -> BuildConfig:
        # float16 codes: an exact index keeps no FAISS file, this one does, to be damaged
        return BuildConfig(name=BROKEN, task=f"{self.task_file}:FlakyTask",
                           task_args={"fail_if": str(self.marker), **STORE_TASK_ARGS, **args},
                           faiss=FaissConfig(fp16=True))

    def copy(self, to: Path) -> Settings:
        """A fresh copy of the data directory (the database is SQLite inside it)."""
        shutil.copytree(self.data, to)
        return Settings(data_dir=to)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    made = Template(tmp_path_factory.mktemp("registry"))
    made.task_file.parent.mkdir()
    made.task_file.write_text(FLAKY_TASK)
    settings = Settings(data_dir=made.data)
    build(BuildConfig(name=HEALTHY, task=STORE_TASK, task_args=dict(STORE_TASK_ARGS)), settings)
    build(made.broken_config(), settings)
    dispose_engines()  # closes SQLite, so that copies of the folder are whole
    return made


@pytest.fixture()
def payloads(store_task: DigitsTask) -> list[dict[str, Any]]:
    return store_task.test_payloads(4)


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _scale_a_faiss_vector(folder: Path) -> None:
    """Multiply one stored FAISS vector by 50, in place: a valid file of the same size."""
    import faiss

    index = faiss.read_index(str(folder / "index.faiss"))
    flat = faiss.downcast_index(index.index)
    codes = faiss.vector_to_array(flat.codes).view(np.float32).copy()
    codes[: flat.d] *= 50
    faiss.copy_array_to_vector(codes.view(np.uint8), flat.codes)
    size = (folder / "index.faiss").stat().st_size
    faiss.write_index(index, str(folder / "index.faiss"))
    assert (folder / "index.faiss").stat().st_size == size


def _expire_licence(folder: Path, template: Template) -> None:
    template.marker.write_text("expired")


DAMAGE: dict[str, tuple[Callable[[Path, Template], None], list[str]]] = {
    "truncated index.faiss": (lambda f, t: _truncate(f / "index.faiss"),
                              ["index.faiss", "truncated"]),
    "empty vectors.npy": (lambda f, t: os.truncate(f / "vectors.npy", 0),
                          ["vectors.npy", "is empty"]),
    "truncated ids.npy": (lambda f, t: _truncate(f / "ids.npy"), ["ids.npy", "truncated"]),
    "deleted manifest.json": (lambda f, t: (f / "manifest.json").unlink(),
                              ["manifest.json", "missing"]),
    "invalid manifest JSON": (lambda f, t: (f / "manifest.json").write_text('{"task": '),
                              ["manifest.json", "not valid JSON"]),
    "task constructor raises": (_expire_licence, ["RuntimeError", "licence", "has expired"]),
    "truncated relative.faiss": (lambda f, t: _truncate(f / "relative.faiss"),
                                 ["relative.faiss", "truncated"]),
    # Finding 3: a valid FAISS file of the same size, one vector scaled ×50.
    "FAISS vector scaled x50": (lambda f, t: _scale_a_faiss_vector(f),
                                ["index.faiss", "does not match its checksum"]),
}


MORE_DAMAGE: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "empty index.faiss": (lambda f: os.truncate(f / "index.faiss", 0), ["index.faiss", "empty"]),
    "empty relative.faiss": (lambda f: os.truncate(f / "relative.faiss", 0),
                             ["relative.faiss", "empty"]),
    "truncated vectors.npy": (lambda f: _truncate(f / "vectors.npy"),
                              ["vectors.npy", "truncated"]),
    "empty ids.npy": (lambda f: os.truncate(f / "ids.npy", 0), ["ids.npy", "empty"]),
    "manifest not an object": (lambda f: (f / "manifest.json").write_text("[1, 2]"),
                               ["manifest.json"]),
}
"""More damage, checked where the server's registry meets it (opening the version) without a
server each: :data:`DAMAGE` shows the server's side of the same errors."""


@pytest.mark.parametrize("damage", list(MORE_DAMAGE))
def test_more_damage_is_a_storage_error_without_paths(damage: str, template: Template,
                                                     tmp_path: Path) -> None:
    settings = template.copy(tmp_path / "data")
    template.marker.unlink(missing_ok=True)
    folder = open_index(BROKEN, settings).folder  # the index with FAISS files
    hurt, words = MORE_DAMAGE[damage]
    hurt(folder)
    with pytest.raises(StorageError) as caught:
        open_index(BROKEN, settings)
    reason = failure_reason(caught.value, settings.data_dir)
    assert all(w in reason for w in words), reason
    assert not _absolute_paths(reason) and str(tmp_path) not in reason, reason
    dispose_engines()


@pytest.fixture()
def damaged(request: pytest.FixtureRequest, template: Template, tmp_path: Path
            ) -> Iterator[tuple[Settings, list[str]]]:
    """A copy of the template whose ``broken`` index is damaged one way, and the words its
    reason must hold."""
    damage, words = DAMAGE[request.param]
    settings = template.copy(tmp_path / "data")
    folder = open_index(BROKEN, settings).folder
    dispose_engines()
    damage(folder, template)
    try:
        yield settings, words
    finally:
        template.marker.unlink(missing_ok=True)
        dispose_engines()


def _absolute_paths(text: str) -> list[str]:
    return re.findall(r"(?:^|[\s'\"(=])(/[^\s'\"]+)", text)


def _check_healthy(url: str, settings: Settings, payloads: list[dict[str, Any]]) -> None:
    """The healthy index answers ``/influence`` as the indexer does in process."""
    response = httpx.post(f"{url}/v1/indexes/{HEALTHY}/influence",
                          json={"examples": payloads, "k": K}, timeout=60)
    assert response.status_code == 200, response.text
    reference = open_index(HEALTHY, settings)
    want = reference.search(query_vectors(featurizer_for(reference), payloads), K)
    for got, hits in zip(response.json()["results"], want, strict=True):
        assert [h["id"] for h in got["proponents"]] == [h.external_id for h in hits]
        np.testing.assert_allclose([h["score"] for h in got["proponents"]],
                                   [h.score for h in hits], rtol=RTOL, atol=ATOL)


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_a_damaged_index_is_unavailable_and_the_others_are_served(
    damaged: tuple[Settings, list[str]], template: Template, tmp_path: Path,
    payloads: list[dict[str, Any]],
) -> None:
    settings, words = damaged
    server = LiveServer(settings, tmp_path / "server.log", auth="off").wait()
    try:
        url = server.url
        health = httpx.get(f"{url}/v1/health").json()
        assert (health["indexes"], health["workers"]) == (1, 1)
        listing = httpx.get(f"{url}/v1/indexes")
        assert listing.status_code == 200
        status = {i["name"]: i for i in listing.json()["indexes"]}
        assert status[HEALTHY]["status"] == "serving" and status[HEALTHY]["reason"] is None
        assert status[BROKEN]["status"] == "unavailable"
        reason = status[BROKEN]["reason"]
        assert all(w in reason for w in words), reason
        assert not _absolute_paths(reason), reason
        assert str(tmp_path) not in reason and str(template.root) not in reason

        detail = httpx.get(f"{url}/v1/indexes/{BROKEN}")
        assert detail.status_code == 200
        assert (detail.json()["status"], detail.json()["reason"]) == ("unavailable", reason)
        refused = httpx.post(f"{url}/v1/indexes/{BROKEN}/influence",
                             json={"examples": payloads[:1]})
        assert refused.status_code == 503
        assert refused.json()["error"] == {"type": "IndexUnavailable", "message": reason}
        _check_healthy(url, settings, payloads)
        log = " ".join(server.log().split())  # the log wraps long lines
        assert log.count(f"index '{BROKEN}' is not served:") == 1

        # Repaired: a new version is published (its staged gradients reused); served at once.
        template.marker.unlink(missing_ok=True)
        version = build(template.broken_config(), settings)

        def repaired() -> bool:
            r = httpx.post(f"{url}/v1/indexes/{BROKEN}/influence",
                           json={"examples": payloads, "k": K}, timeout=60)
            return r.status_code == 200 and r.json()["version"] == version

        _wait_for(repaired, "the repaired index")
        listing = {i["name"]: i for i in httpx.get(f"{url}/v1/indexes").json()["indexes"]}
        assert listing[BROKEN]["status"] == "serving" and listing[BROKEN]["reason"] is None
        _check_healthy(url, settings, payloads)
    finally:
        server.stop()


def _model_series(metrics: str) -> set[str]:
    """The models with a queue-depth series in ``/metrics``: the running device workers."""
    return set(re.findall(r'^gradindex_queue_depth\{model="([^"]+)"\}', metrics, re.M))


def test_workers_of_models_no_index_uses_are_stopped(
    template: Template, tmp_path: Path, payloads: list[dict[str, Any]],
) -> None:
    settings = template.copy(tmp_path / "data")
    server = LiveServer(settings, tmp_path / "server.log", auth="off").wait()
    try:
        url = server.url

        def workers() -> int:
            return int(httpx.get(f"{url}/v1/health").json()["workers"])

        def influence(name: str) -> httpx.Response:
            return httpx.post(f"{url}/v1/indexes/{name}/influence",
                              json={"examples": payloads[:1], "k": K}, timeout=60)

        first = {n: influence(n).json()["version"] for n in (HEALTHY, BROKEN)}
        assert workers() == 2  # two tasks, two models
        assert _model_series(httpx.get(f"{url}/metrics").text) == {
            f"{n}-v{v}" for n, v in first.items()}

        # A rebuild with other weights (trained on fewer digits): a new model replaces the old.
        version = build(template.broken_config(train_size=200), settings)
        _wait_for(lambda: influence(BROKEN).json()["version"] == version, "the new version")
        assert workers() == 2
        _wait_for(lambda: _model_series(httpx.get(f"{url}/metrics").text) == {
            f"{HEALTHY}-v{first[HEALTHY]}", f"{BROKEN}-v{version}"}, "the old worker to stop")

        # A deleted index: its model's worker goes too.
        delete_index(settings, HEALTHY)
        _wait_for(lambda: influence(HEALTHY).status_code == 404, "the deletion")
        assert workers() == 1
        _wait_for(lambda: _model_series(httpx.get(f"{url}/metrics").text) == {
            f"{BROKEN}-v{version}"}, "the deleted index's worker to stop")
        assert influence(BROKEN).status_code == 200
    finally:
        server.stop()


def test_a_retired_worker_finishes_its_waiting_requests_then_refuses(
    store_task: DigitsTask,
) -> None:
    featurizer = Featurizer(store_task, CompressionConfig(batch_size=32), device="cpu")
    payloads = store_task.test_payloads(8)
    metrics = Metrics()
    series: list[set[str]] = []

    async def main() -> tuple[list[Any], BaseException | None]:
        worker = DeviceWorker("old", featurizer, max_batch=2, max_wait_s=0.0, metrics=metrics)
        worker.start()
        waiting = [asyncio.ensure_future(worker.query([p])) for p in payloads]
        await asyncio.sleep(0)  # every request queued: most wait behind the first pass
        series.append(_model_series(metrics.render().decode()))
        closing = asyncio.ensure_future(worker.close())
        await asyncio.sleep(0)
        late = None
        try:
            await worker.query(payloads[:1])
        except Overloaded as exc:
            late = exc
        await closing
        series.append(_model_series(metrics.render().decode()))
        return await asyncio.gather(*waiting), late

    got, late = asyncio.run(main())
    want = featurizer.query(payloads)
    for i, rows in enumerate(got):  # none of the waiting requests was dropped
        torch.testing.assert_close(rows, want[i : i + 1], atol=1e-5, rtol=1e-4)
    assert isinstance(late, Overloaded) and "not running" in str(late)
    assert series == [{"old"}, set()]
