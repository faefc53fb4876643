"""Shared fixtures: small trained models on scikit-learn's bundled digits, built once."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gradindex.indexer.settings import Settings
from gradindex.indexer.store import upgrade
from gradindex.indexer.tasks import DigitsTask

from .factories import SequenceTask

WEIGHT_DECAY = 1e-3


@pytest.fixture(scope="session")
def logreg_task() -> DigitsTask:
    """Multinomial logistic regression on 1,000 digits, trained to convergence."""
    return DigitsTask("logreg", train_size=1000, weight_decay=WEIGHT_DECAY)


@pytest.fixture(scope="session")
def mlp_task() -> DigitsTask:
    """A 64-16-10 tanh MLP on 300 digits (small enough for an exact Hessian)."""
    return DigitsTask("mlp", train_size=300, hidden=16, weight_decay=WEIGHT_DECAY)


@pytest.fixture()
def seq_task() -> SequenceTask:
    return SequenceTask()


# ----------------------------------------------------------------------------- storage

PG_HOST = "127.0.0.1"
PG_ADMIN_URL = f"postgresql+psycopg://postgres@{PG_HOST}:5432/postgres"
STORE_TASK = "gradindex.indexer.tasks:DigitsTask"
STORE_TASK_ARGS = {"model": "logreg", "train_size": 300}


def _pg_available() -> str | None:
    """None when the PostgreSQL server answers, else why not."""
    try:
        import psycopg

        with psycopg.connect(host=PG_HOST, port=5432, user="postgres", dbname="postgres",
                             connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001 - any failure means: no server to test against
        return f"no PostgreSQL server answers at {PG_HOST}:5432 ({exc.__class__.__name__})"


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[Callable[[], str]]:
    """A factory of scratch PostgreSQL databases, all dropped at the end of the session."""
    reason = _pg_available()
    if reason is not None:
        pytest.skip(reason)
    import psycopg

    prefix = f"gradindex_test_{secrets.token_hex(4)}"
    made: list[str] = []

    def make() -> str:
        name = f"{prefix}_{len(made)}"
        with psycopg.connect(host=PG_HOST, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"postgresql+psycopg://postgres@{PG_HOST}:5432/{name}"

    yield make
    from gradindex.indexer.store.db import dispose_engines

    dispose_engines()
    with psycopg.connect(host=PG_HOST, user="postgres", dbname="postgres",
                         autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each storage test runs on SQLite and on the real PostgreSQL."""
    return str(request.param)


@pytest.fixture()
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Settings]:
    """Storage settings on a fresh data directory and a fresh database of ``backend``."""
    url = None
    if backend == "postgresql":
        url = request.getfixturevalue("pg_databases")()
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    if url is not None:
        upgrade(settings)
    yield settings
    from gradindex.indexer.store.db import dispose_engines

    dispose_engines()


@pytest.fixture(scope="session")
def store_task() -> DigitsTask:
    """The task the storage tests index: logistic regression on 300 digits."""
    return DigitsTask(**STORE_TASK_ARGS)


# ----------------------------------------------------------------------------- server

REPO = Path(__file__).resolve().parents[1]
SERVED_INDEX = "digits"
"""The index the server tests query (built by the CLI from :data:`STORE_TASK`)."""
CLI_BUILD = ["build", "--task", STORE_TASK, "--name", SERVED_INDEX, "--batch-size", "32",
             *[a for k, v in STORE_TASK_ARGS.items() for a in ("--task-arg", f"{k}={v}")]]


GRADINDEX = [sys.executable, "-c", "from gradindex.cli import main; main()"]
"""The ``gradindex`` command, run by this interpreter."""


def storage_env(settings: Settings) -> dict[str, str]:
    """The ``GRADINDEX_*`` variables that point a process at ``settings``."""
    return {"GRADINDEX_DATA_DIR": str(settings.data_dir),
            "GRADINDEX_DATABASE_URL": settings.database_url or ""}


def gradindex_cli(settings: Settings, *args: str, timeout: float = 300) -> str:
    """Run the real ``gradindex`` command in a new process; its stdout (fails on non-zero)."""
    import os
    import subprocess

    env = {**os.environ, **storage_env(settings)}
    done = subprocess.run([*GRADINDEX, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"gradindex {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """``gradindex serve`` in a subprocess on a free loopback port, until :meth:`stop`."""

    def __init__(self, settings: Settings, log_path: Path, *, cwd: Path = REPO,
                 **env: str) -> None:
        import os
        import subprocess

        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, **storage_env(settings), "GRADINDEX_RELOAD_TTL_S": "0.5",
                    **{f"GRADINDEX_{k.upper()}": v for k, v in env.items()}}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*GRADINDEX, "serve", "--port", str(self.port)],
            cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 120) -> LiveServer:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log()}")
            try:
                if httpx.get(self.url + "/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        import subprocess

        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def make_key(settings: Settings, scope: str, name: str = "") -> tuple[int, str]:
    """A new API key (id, secret) in the database of ``settings``."""
    from gradindex.indexer.store import connect, create_key

    key, secret = create_key(engine=connect(settings), scope=scope, name=name)
    return key.id, secret


def corrupt_fingerprint(settings: Settings, name: str) -> None:
    """Make index ``name`` look built from other weights than its task now loads."""
    import json

    from gradindex import open_index

    folder = open_index(name, settings).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["model_fingerprint"] = ["0" * 64]
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="session")
def server_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A SQLite data directory holding :data:`SERVED_INDEX`, built by ``gradindex build``, and
    ``stale``, an index whose model weights no longer match (the server must refuse it)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("served") / "data")
    gradindex_cli(settings, *CLI_BUILD)
    from gradindex import BuildConfig, CompressionConfig, build

    build(BuildConfig(name="stale", task=STORE_TASK, task_args=dict(STORE_TASK_ARGS),
                      compression=CompressionConfig(batch_size=64)), settings)
    corrupt_fingerprint(settings, "stale")
    return settings


@pytest.fixture(scope="session")
def server_keys(server_settings: Settings) -> dict[str, str]:
    """Secrets of a read key and an admin key of the live server."""
    return {"read": make_key(server_settings, "read", "tests")[1],
            "admin": make_key(server_settings, "admin", "tests")[1]}


@pytest.fixture(scope="session")
def live_server(server_settings: Settings, server_keys: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The real server (auth on) over :func:`server_settings`, for the whole session."""
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    server = LiveServer(server_settings, log, max_wait_ms="10").wait()
    yield server
    server.stop()
