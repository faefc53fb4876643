"""Reliability and security of the real server, one test (or a few) per finding of issue 14:
bad input never gets a 5xx, budgets, checksums, outages, metrics, and the Host allow-list.

Each test names the finding it covers (``finding5``...). The servers are real (``gradindex
serve`` in a subprocess) over an index built once per backend, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gradindex import BuildConfig, Settings, build, open_index
from gradindex.indexer.errors import StorageError
from gradindex.indexer.store import upgrade
from gradindex.indexer.store.db import dispose_engines
from gradindex.indexer.tasks import DigitsTask

from .conftest import GRADINDEX, REPO, STORE_TASK, STORE_TASK_ARGS, LiveServer, storage_env
from .faults import TcpProxy

NAME = "digits"


class Served:
    """A keyless server on loopback over a fresh index ``digits`` of one backend."""

    def __init__(self, backend: str, settings: Settings, server: LiveServer) -> None:
        self.backend = backend
        self.settings = settings
        self.server = server
        self.url = server.url

    def post(self, route: str, body: Any, **kwargs: Any) -> httpx.Response:
        content = body if isinstance(body, bytes | str) else json.dumps(body)
        return httpx.post(f"{self.url}/v1/indexes/{NAME}/{route}", content=content,
                          headers={"Content-Type": "application/json"}, timeout=60, **kwargs)


def _settings(backend: str, root: Path, pg_databases: Callable[[], str] | None) -> Settings:
    url = pg_databases() if pg_databases is not None and backend == "postgresql" else None
    settings = Settings(data_dir=root / "data", database_url=url)
    if url is not None:
        upgrade(settings)
    return settings


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    """The server over a fresh index, once on SQLite and once on PostgreSQL."""
    backend = str(request.param)
    pg = request.getfixturevalue("pg_databases") if backend == "postgresql" else None
    root = tmp_path_factory.mktemp(f"reliability-{backend}")
    settings = _settings(backend, root, pg)
    build(BuildConfig(name=NAME, task=STORE_TASK, task_args=dict(STORE_TASK_ARGS)), settings)
    # One example per model pass: the batch boundaries where a request whose client is gone
    # stops come after every example.
    server = LiveServer(settings, root / "server.log", auth="off", max_batch="1").wait()
    try:
        yield Served(backend, settings, server)
    finally:
        server.stop()
        dispose_engines()


@pytest.fixture(scope="module")
def payloads(store_task: DigitsTask) -> list[dict[str, Any]]:
    return store_task.test_payloads(4)


def _error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:500])
    message = response.json()["error"]["message"]
    assert all(w in message for w in words), message


def _body(examples: list[dict[str, Any]], rest: str) -> str:
    """A JSON body written by hand: ``examples`` and the raw members ``rest``."""
    return '{"examples": ' + json.dumps(examples) + ", " + rest + "}"


def _no_tracebacks(served: Served) -> None:
    log = served.server.log()
    assert "Traceback" not in log, log[-3000:]
    assert " 500 " not in log, log[-3000:]


# ------------------------------------------------------------------ finding 5: bad input


def test_finding5_unstorable_values_anywhere_in_a_body_are_422_naming_the_place(
    served: Served, payloads: list[dict[str, Any]],
) -> None:
    one = payloads[:1]
    big = 2**63
    cases: list[tuple[str, Any, list[str]]] = [
        ("influence", f'{{"examples": {json.dumps(one)}, "filter": {{"label": {big}}}}}',
         ["`filter.label`", "64-bit"]),
        ("influence", _body(one, '"filter": {"\\ud800": 1}'),
         ["a key of `filter`", "surrogate"]),
        ("influence", _body(one, '"filter": {"label": "\\ud800"}'),
         ["`filter.label`", "surrogate"]),
        ("scores", _body(one, '"ids": ["train-1", "\\udc00"]'),
         ["`ids[1]`", "surrogate"]),
        ("influence", _body(one, '"filter": {"source": "a\\u0000b"}'),
         ["`filter.source`", "NUL"]),
        ("scores", _body(one, '"ids": ["train-1\\u0000"]'),
         ["`ids[0]`", "NUL"]),
        ("influence", _body(one, '"filter": {"label": NaN}'),
         ["`filter.label`", "NaN"]),
        ("influence", _body(one, '"filter": {"label": [1, -Infinity]}'),
         ["`filter.label[1]`", "-Infinity"]),
        ("influence", '{"examples": [{"x": [1e400' + ", 0" * 63 + '], "y": 1}]}',
         ["`examples[0].x[0]`", "1e400", "infinity"]),
        ("select", '{"examples": [' + json.dumps(one[0]) + ', {"x": [0, 1e400], "y": 1}]}',
         ["`examples[1].x[1]`", "infinity"]),
        ("influence", b'{"examples": ' + b"[" * 200 + b"]" * 200 + b"}", ["nested", "64"]),
    ]
    for route, body, words in cases:
        _error(served.post(route, body), 422, *words)
    strict = served.post("influence", {"examples": one, "k": True})
    _error(strict, 422, "`k`")
    nul_path = httpx.get(f"{served.url}/v1/indexes/{NAME}/examples/train-1%00x")
    _error(nul_path, 422, "NUL")
    assert httpx.head(f"{served.url}/v1/health").status_code == 200
    assert served.post("influence", {"examples": one, "k": 3}).status_code == 200
    _no_tracebacks(served)


def test_finding5_scores_ids_are_bounded_below_the_driver_limit(
    served: Served, payloads: list[dict[str, Any]],
) -> None:
    many = [f"train-{i}" for i in range(70_000)]
    _error(served.post("scores", {"examples": payloads[:1], "ids": many}), 413,
           "at most 10,000", "GRADINDEX_MAX_IDS", "70,000")
    ids = [f"train-{i}" for i in range(300)]
    ok = served.post("scores", {"examples": payloads[:1], "ids": ids})
    assert ok.status_code == 200 and ok.json()["ids"] == ids
    _no_tracebacks(served)


def test_finding5_a_bad_request_keeps_the_connection_for_the_next(
    served: Served, payloads: list[dict[str, Any]],
) -> None:
    """Two pipelined requests on one connection: the bad first one does not drop the second."""
    host, port = served.url.removeprefix("http://").split(":")
    bad = _body(payloads[:1], f'"filter": {{"label": {2**64}}}')
    good = json.dumps({"examples": payloads[:1], "k": 2})

    def request(body: str) -> bytes:
        data = body.encode()
        return (f"POST /v1/indexes/{NAME}/influence HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                ).encode() + data

    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request(bad) + request(good))
        received = b""
        while received.count(b"HTTP/1.1 ") < 2 or not received.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", received)
    assert statuses == [b"422", b"200"], received[:2000]


# ------------------------------------------------------------------ finding 7: budgets


def test_finding7_a_response_beyond_the_budget_is_413_naming_the_limit(
    served: Served, payloads: list[dict[str, Any]],
) -> None:
    body = {"examples": (payloads * 64)[:256], "k": 1000, "direction": "both", "render": True}
    _error(served.post("influence", body), 413, "512,000", "20,000", "GRADINDEX_MAX_RESULTS")
    assert served.post("influence", {**body, "examples": payloads[:4], "k": 50}
                       ).status_code == 200
    reference = open_index(NAME, served.settings)
    assert reference.count == 300


def test_finding7_work_for_a_disconnected_client_stops_at_the_next_batch(
    served: Served, payloads: list[dict[str, Any]],
) -> None:
    host, port = served.url.removeprefix("http://").split(":")
    total = 256
    data = json.dumps({"examples": (payloads * 64)[:total], "k": 20, "direction": "both",
                       "render": True}).encode()
    head = (f"POST /v1/indexes/{NAME}/influence HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head.encode() + data)
    # The client is gone before the first model pass ends: the server stops at the next one,
    # answering 499 to nobody and counting the examples it left.
    route = "/v1/indexes/{name}/influence"

    def abandoned() -> float:
        found = re.search(rf'^gradindex_abandoned_examples_total{{route="{re.escape(route)}"}} '
                          r"(\S+)$", httpx.get(f"{served.url}/metrics").text, re.M)
        return float(found.group(1)) if found else 0.0

    _wait_for(lambda: abandoned() > 0, "the cancellation")
    answered = re.compile(rf'^gradindex_requests_total{{method="POST",route="{re.escape(route)}",'
                          r'status="499"} 1\.0$', re.M)
    _wait_for(lambda: answered.search(httpx.get(f"{served.url}/metrics").text) is not None,
              "the 499 in the metrics")
    assert 0 < abandoned() <= total
    assert served.post("influence", {"examples": payloads[:1], "k": 2}).status_code == 200
    _no_tracebacks(served)


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ------------------------------------------------------------------ finding 3: checksums


def _verify(settings: Settings) -> subprocess.CompletedProcess[str]:
    """``gradindex verify digits`` in a new process."""
    return subprocess.run([*GRADINDEX, "verify", NAME], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **storage_env(settings)})


def test_finding3_checksums_are_verified_at_load_and_by_gradindex_verify(
    served: Served, tmp_path: Path,
) -> None:
    if served.backend == "sqlite":
        dispose_engines()
    settings = Settings(data_dir=tmp_path / "data", database_url=served.settings.database_url)
    shutil.copytree(served.settings.data_dir, settings.data_dir)
    folder = open_index(NAME, settings).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    published = {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert manifest["format_version"] == 2 and set(manifest["checksums"]) == published

    ok = _verify(settings)
    assert ok.returncode == 0, ok.stderr
    assert f"{len(published)} files match their checksums" in ok.stderr

    # One byte of one vector changed in place: a valid file of the same size.
    vectors = folder / "vectors.npy"
    original = vectors.read_bytes()
    damaged = bytearray(original)
    damaged[-3] ^= 0x40
    vectors.write_bytes(bytes(damaged))
    bad = _verify(settings)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "vectors.npy does not match its checksum" in lines[0], lines
    assert str(tmp_path) not in bad.stderr
    with pytest.raises(StorageError, match="vectors.npy does not match its checksum"):
        open_index(NAME, settings)

    # A manifest of format 1 (before checksums) still loads, unchecked.
    vectors.write_bytes(original)
    old = {k: v for k, v in manifest.items() if k != "checksums"} | {"format_version": 1}
    (folder / "manifest.json").write_text(json.dumps(old))
    assert open_index(NAME, settings).count == 300
    legacy = _verify(settings)
    assert legacy.returncode == 0 and "written before checksums" in legacy.stderr


# ------------------------------------------------------------------ finding 6: outages


@pytest.fixture(scope="module")
def pg_behind_proxy(pg_databases: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[tuple[Settings, TcpProxy, LiveServer]]:
    """A keyless server whose PostgreSQL is reached through a proxy the test can stop."""
    root = tmp_path_factory.mktemp("outage")
    direct = _settings("postgresql", root, pg_databases)
    build(BuildConfig(name=NAME, task=STORE_TASK, task_args=dict(STORE_TASK_ARGS)), direct)
    proxy = TcpProxy(("127.0.0.1", 5432)).start()
    url = str(direct.database_url).replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    settings = Settings(data_dir=direct.data_dir, database_url=url)
    server = LiveServer(settings, root / "server.log", auth="off").wait()
    try:
        yield direct, proxy, server
    finally:
        proxy.start() if not proxy.running else None
        server.stop()
        proxy.stop()
        dispose_engines()


def test_finding6_a_database_outage_is_503_with_retry_after_and_recovers(
    pg_behind_proxy: tuple[Settings, TcpProxy, LiveServer], payloads: list[dict[str, Any]],
) -> None:
    _, proxy, server = pg_behind_proxy
    url = f"{server.url}/v1/indexes/{NAME}"
    body = {"examples": payloads[:2], "k": 3}
    calls: list[Callable[[], httpx.Response]] = [
        lambda: httpx.post(f"{url}/influence", json=body, timeout=30),
        lambda: httpx.post(f"{url}/scores", json={"examples": payloads[:2], "ids": ["train-1"]},
                           timeout=30),
        lambda: httpx.post(f"{url}/select", json=body, timeout=30),
        lambda: httpx.get(f"{url}/self-influence", timeout=30),
        lambda: httpx.get(f"{url}/examples/train-1", timeout=30),
        lambda: httpx.delete(f"{url}/examples/train-2", timeout=30),
        lambda: httpx.get(f"{server.url}/v1/indexes", timeout=30),
    ]
    assert [c().status_code for c in calls[:5]] == [200] * 5
    assert httpx.get(f"{server.url}/v1/health/ready").json() == {
        "status": "ready", "database": "ok", "indexes": {NAME: "serving"}}

    proxy.stop()
    for _ in range(3):
        for call in calls:
            response = call()
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"] == "5"
            assert response.json()["error"]["type"] == "DatabaseUnavailable"
    assert httpx.get(f"{server.url}/v1/health").status_code == 200  # alive
    not_ready = httpx.get(f"{server.url}/v1/health/ready")
    assert not_ready.status_code == 503 and not_ready.headers["Retry-After"] == "5"
    assert not_ready.json()["database"] == "unavailable"
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert 1 <= log.count("database unavailable:") <= 3, log[-3000:]  # not one per request

    proxy.start()  # the database is back: served again, without a restart
    _wait_for(lambda: calls[0]().status_code == 200, "the service to come back", timeout=30)
    assert [c().status_code for c in calls] == [200] * len(calls)
    assert httpx.get(f"{server.url}/v1/health/ready").status_code == 200


# ------------------------------------------------------------------ findings 8 and 9


@pytest.fixture(scope="module")
def guarded(served: Served) -> Iterator[LiveServer]:
    """A second keyless server over the same data: `/metrics` behind a key, a 1 s header
    timeout, and serving only an index that is not ``digits``."""
    root = served.settings.data_dir.parent
    server = LiveServer(served.settings, root / "guarded.log", auth="off",
                        metrics_key="m-secret", header_timeout_s="1",
                        serve_only="another-index").wait()
    yield server
    server.stop()


def test_finding8_made_up_methods_and_paths_do_not_grow_the_metrics(served: Served) -> None:
    def series() -> set[str]:
        text = httpx.get(f"{served.url}/metrics").text
        return {line.rsplit(" ", 1)[0] for line in text.splitlines()
                if not line.startswith("#")}

    with httpx.Client(base_url=served.url, timeout=30) as client:
        client.request("BREW", "/v1/x")  # the series of unknown methods, and of /metrics,
        series()  # exist before counting
        before = series()
        for i in range(1000):
            client.request(f"M{i:04d}X", f"/made/up/{i}")
    assert series() == before  # counts change, series do not
    assert 'method="other",route="unmatched"' in httpx.get(f"{served.url}/metrics").text


def test_finding8_metrics_key_and_slow_headers(guarded: LiveServer) -> None:
    assert httpx.get(f"{guarded.url}/metrics").status_code == 401
    wrong = httpx.get(f"{guarded.url}/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    right = httpx.get(f"{guarded.url}/metrics", headers={"Authorization": "Bearer m-secret"})
    assert right.status_code == 200 and "gradindex_requests_total" in right.text

    # Slowloris: headers trickled a byte at a time are cut off by the header timeout (1 s),
    # long before they end.
    host, port = guarded.url.removeprefix("http://").split(":")
    trickle = f"GET /v1/health HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow: {'a' * 200}\r\n\r\n"
    closed = False
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for byte in trickle.encode():
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.05)
        if not closed:
            try:
                closed = sock.recv(1024) == b""
            except OSError:
                closed = True
    assert closed, "the server waited 10 s for a request's headers"
    assert httpx.get(f"{guarded.url}/v1/health").status_code == 200


def test_finding9_keyless_server_answers_loopback_hosts_only(served: Served,
                                                              guarded: LiveServer) -> None:
    url = f"{served.url}/v1/indexes/{NAME}/examples/train-7"
    rebind = httpx.delete(url, headers={"Host": "rebind.attacker.example"})
    _error(rebind, 421, "rebind.attacker.example", "GRADINDEX_ALLOWED_HOSTS")
    assert httpx.get(url).status_code == 200  # not deleted
    port = served.url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert httpx.get(f"{served.url}/v1/health", headers={"Host": host}).status_code == 200
    for host in ("127.0.0.1.nip.io", "localhost.attacker.example", "", "10.0.0.1"):
        assert httpx.get(f"{served.url}/v1/health", headers={"Host": host}).status_code == 421
    # No redirect built from the Host header (a trailing slash is a 404, not a 307).
    slash = httpx.get(f"{served.url}/v1/indexes/", headers={"Host": f"localhost:{port}"})
    assert slash.status_code == 404 and "location" not in slash.headers
    # A server told to serve one index answers for no other (the keyless demo: its own).
    listing = httpx.get(f"{guarded.url}/v1/indexes").json()["indexes"]
    assert listing == []
    _error(httpx.get(f"{guarded.url}/v1/indexes/{NAME}"), 404, "no index named")
    assert httpx.post(f"{guarded.url}/v1/indexes/{NAME}/influence",
                      json={"examples": [{"x": [0] * 64, "y": 1}]}).status_code == 404


def test_finding9_the_keyless_demo_serves_only_its_index(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    from gradindex.cli import demo_settings

    for name in ("GRADINDEX_AUTH", "GRADINDEX_SERVE_ONLY", "GRADINDEX_HOST"):
        monkeypatch.delenv(name, raising=False)
    keyless = demo_settings()
    assert (keyless.auth_required, keyless.served_names) == (False, {"digits"})
    assert keyless.host_allow_list == ["localhost", "127.0.0.1", "::1"]
    monkeypatch.setenv("GRADINDEX_AUTH", "on")
    assert demo_settings().served_names is None  # with keys: every index, as `serve`


# ------------------------------------------------------------------ findings 1 and 10 (last:
# they replace the module's index)


def _scores(url: str, payloads: list[dict[str, Any]], ids: list[str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/indexes/{NAME}/scores",
                      json={"examples": payloads, "ids": ids}, timeout=60)


def test_finding10_two_publishes_within_the_reload_window_are_503_never_empty(
    served: Served, payloads: list[dict[str, Any]],
) -> None:
    from gradindex import refinalize

    root = served.settings.data_dir.parent
    server = LiveServer(served.settings, root / "slow-reload.log", auth="off",
                        reload_ttl_s="600").wait()
    try:
        url = f"{server.url}/v1/indexes/{NAME}"
        first = _scores(server.url, payloads[:1], ["train-1"])
        assert first.status_code == 200
        refinalize(served.settings, NAME, damping=0.3)
        newest = refinalize(served.settings, NAME, damping=0.4)  # the served one is retired
        answers = {
            "influence": httpx.post(f"{url}/influence", json={"examples": payloads[:1]}),
            "scores": _scores(server.url, payloads[:1], ["train-1"]),
            "all scores": httpx.post(f"{url}/scores", json={"examples": payloads[:1]}),
            "self-influence": httpx.get(f"{url}/self-influence"),
            "example": httpx.get(f"{url}/examples/train-1"),
        }
        for what, response in answers.items():
            if response.status_code != 503:  # the first 503 already reopened the index
                assert response.status_code == 200, (what, response.text[:300])
                assert response.json().get("version", newest) == newest, what
        assert answers["influence"].status_code == 503 or answers["scores"].status_code == 503
        after = _scores(server.url, payloads[:1], ["train-1"])
        assert after.status_code == 200 and after.json()["version"] == newest
        reference = open_index(NAME, served.settings)
        from gradindex.indexer.query import featurizer_for, query_vectors

        want = reference.scores(query_vectors(featurizer_for(reference), payloads[:1]),
                                ["train-1"])[1]
        np.testing.assert_allclose(after.json()["scores"], want, rtol=1e-4, atol=1e-4)
    finally:
        server.stop()


def test_finding1_delete_and_rebuild_serve_the_new_build(
    served: Served, payloads: list[dict[str, Any]],
) -> None:
    from gradindex import PreconditionerConfig
    from gradindex.indexer.admin import delete_index
    from gradindex.indexer.query import featurizer_for, query_vectors

    ids = ["train-1", "train-2", "train-3"]
    before = _scores(served.url, payloads[:2], ids)
    assert before.status_code == 200
    delete_index(served.settings, NAME)  # no request in between: only identities tell
    build(BuildConfig(name=NAME, task=STORE_TASK, task_args=dict(STORE_TASK_ARGS),
                      preconditioner=PreconditionerConfig(damping=0.05)), served.settings)
    reference = open_index(NAME, served.settings)
    want = reference.scores(query_vectors(featurizer_for(reference), payloads[:2]), ids)[1]
    assert not np.allclose(want, before.json()["scores"], rtol=1e-3)  # another build indeed
    after = _scores(served.url, payloads[:2], ids)
    for _ in range(3):  # a request that read the deleted build's rows may be told to retry
        if after.status_code != 503:
            break
        assert "Retry-After" in after.headers
        after = _scores(served.url, payloads[:2], ids)
    assert after.status_code == 200 and after.json()["version"] == reference.version == 1
    np.testing.assert_allclose(after.json()["scores"], want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ finding 6: a full disk

FULL_DISK = r'''
import json, os, shutil, subprocess, sys
from pathlib import Path

import httpx

from gradindex import Settings
from tests.conftest import GRADINDEX, LiveServer

source, mount, log = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
size = sum(f.stat().st_size for f in source.rglob("*") if f.is_file()) + (4 << 20)
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
data = mount / "data"
shutil.copytree(source, data)
server = LiveServer(Settings(data_dir=data), log, auth="off").wait()
url = f"{server.url}/v1/indexes/digits/examples"
out = {"before": httpx.get(f"{url}/train-7").status_code}
with open(mount / "filler", "wb") as filler:  # the disk fills up
    try:
        while True:
            filler.write(b"\0" * 65536)
            filler.flush()
    except OSError:
        pass
response = httpx.delete(f"{url}/train-7", timeout=60)
out["delete"] = [response.status_code, response.headers.get("retry-after"), response.json()]
keys = subprocess.run([*GRADINDEX, "keys", "create", "--scope", "read"], capture_output=True,
                      text=True, env={**os.environ, "GRADINDEX_DATA_DIR": str(data),
                                      "GRADINDEX_DATABASE_URL": ""}, timeout=120)
out["keys"] = [keys.returncode, keys.stderr]
out["ready"] = httpx.get(f"{server.url}/v1/health").status_code
(mount / "filler").unlink()  # space again
out["after"] = httpx.delete(f"{url}/train-7", timeout=60).status_code
server.stop()
print(json.dumps(out))
'''


def test_finding6_a_full_disk_is_503_for_admin_delete_and_one_line_for_the_cli(
    served: Served, tmp_path: Path,
) -> None:
    """On a real full file system (a small tmpfs, in a mount namespace of its own)."""
    if served.backend != "sqlite":  # the disk that fills is SQLite's; PostgreSQL's is shared
        return
    if shutil.which("unshare") is None:
        pytest.fail("this test needs util-linux `unshare` (a private tmpfs mount)")
    dispose_engines()
    source = tmp_path / "source"
    shutil.copytree(served.settings.data_dir, source)
    (tmp_path / "mnt").mkdir()
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", *GRADINDEX[:2], FULL_DISK,
         str(source), str(tmp_path / "mnt"), str(tmp_path / "server.log")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["before"] == 200
    status, retry_after, error = out["delete"]
    assert (status, retry_after) == (503, "5"), error
    assert error["error"]["type"] == "StorageFull", error
    assert "disk is full" in error["error"]["message"]
    code, stderr = out["keys"]
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "full" in lines[0], stderr
    assert "Traceback" not in stderr
    assert out["ready"] == 200 and out["after"] == 200  # served again once there is room
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]
