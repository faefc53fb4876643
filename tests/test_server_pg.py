"""The server against the real PostgreSQL: index built by the CLI, driven by the client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gradindex_client import Client, NotFound
from typer.testing import CliRunner

from gradindex import Settings, open_index
from gradindex.cli import app
from gradindex.indexer.query import featurizer_for, query_vectors
from gradindex.indexer.store import upgrade
from gradindex.indexer.store.db import dispose_engines
from gradindex.indexer.tasks import DigitsTask

from .conftest import CLI_BUILD, SERVED_INDEX, LiveServer, make_key, storage_env

RTOL = ATOL = 1e-4


def test_server_on_postgresql(pg_databases: Callable[[], str], tmp_path: Path,
                              store_task: DigitsTask) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=pg_databases())
    upgrade(settings)  # PostgreSQL is migrated on purpose, never behind the user's back
    result = CliRunner().invoke(app, CLI_BUILD, env=storage_env(settings))  # the CLI, in process
    assert result.exit_code == 0, result.output
    _, admin = make_key(settings, "admin")
    server = LiveServer(settings, tmp_path / "server.log").wait()
    try:
        payloads = store_task.test_payloads(6)
        reference = open_index(SERVED_INDEX, settings)
        q = query_vectors(featurizer_for(reference), payloads)
        with Client(server.url, api_key=admin, retries=0) as c:
            assert [i.name for i in c.indexes()] == [SERVED_INDEX]
            got = c.influence(SERVED_INDEX, payloads, 10, direction="both",
                              filter={"label": [1, 7]})
            for d in ("proponents", "opponents"):
                want = reference.search(q, 10, direction=d, filter={"label": [1, 7]})
                for i, result in enumerate(got.results):
                    hits = getattr(result, d)
                    assert [h.id for h in hits] == [h.external_id for h in want[i]]
                    np.testing.assert_allclose([h.score for h in hits],
                                               [h.score for h in want[i]], rtol=RTOL, atol=ATOL)
            scores = c.scores(SERVED_INDEX, payloads, ["train-3", "train-4"])
            np.testing.assert_allclose(scores.scores,
                                       reference.scores(q, ["train-3", "train-4"])[1],
                                       rtol=RTOL, atol=ATOL)
            top = got.results[0].proponents[0].id
            assert c.delete(SERVED_INDEX, top).id == top
            with pytest.raises(NotFound):
                c.example(SERVED_INDEX, top)
            again = c.influence(SERVED_INDEX, payloads[:1], 10, filter={"label": [1, 7]})
            assert top not in [h.id for h in again.results[0].proponents]
    finally:
        server.stop()
        dispose_engines()
