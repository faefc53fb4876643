"""Shared fixtures: small trained models on scikit-learn's bundled digits, built once."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from indexer.settings import Settings
from indexer.store import upgrade
from indexer.tasks import DigitsTask

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
STORE_TASK = "indexer.tasks:DigitsTask"
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
    from indexer.store.db import dispose_engines

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
    from indexer.store.db import dispose_engines

    dispose_engines()


@pytest.fixture(scope="session")
def store_task() -> DigitsTask:
    """The task the storage tests index: logistic regression on 300 digits."""
    return DigitsTask(**STORE_TASK_ARGS)
