"""Builds as real processes: killed with SIGKILL and resumed, and split into two shards.

A killable build runs :data:`PAUSED_BUILD` in a subprocess: it passes a
:class:`~tests.factories.PausingHooks` to ``build``, which stops at the named point and says so
on stderr; the test then kills it there with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gradindex import BuildConfig, CompressionConfig, Settings, build, open_index
from gradindex.indexer.build import finalize
from gradindex.indexer.errors import IndexNotFound
from gradindex.indexer.staging import Staging
from gradindex.indexer.store import ExampleRow, IndexVersion, connect

from .conftest import REPO, STORE_TASK, STORE_TASK_ARGS, storage_env
from .factories import PAUSED_MARK

BATCH = 16
CHUNK = 64
WINDOW = 128
KILL_TIMEOUT_S = 120


def cli_args(*extra: str) -> list[str]:
    args = ["build", "--task", STORE_TASK, "--name", "digits", "--batch-size", str(BATCH),
            "--chunk-size", str(CHUNK), "--window", str(WINDOW)]
    for key, value in STORE_TASK_ARGS.items():
        args += ["--task-arg", f"{key}={value}"]
    return args + list(extra)


PAUSED_BUILD = """
import json, sys
from gradindex import BuildConfig, CompressionConfig, Settings, build
from tests.factories import PausingHooks

spec = json.loads(sys.argv[1])
config = BuildConfig(name="digits", task=spec["task"], task_args=spec["task_args"],
                     compression=CompressionConfig(batch_size=spec["batch"]),
                     chunk_size=spec["chunk"], window=spec["window"])
build(config, Settings.from_env(), hooks=PausingHooks(**spec["pause"]))
"""
"""The same build as :func:`cli_args`, stopped by the hook object at ``spec["pause"]``."""


def env_for(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADINDEX_")}
    return {**env, **storage_env(settings), "COLUMNS": "120"}


def run_cli(settings: Settings, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from gradindex.cli import main; main()", *args],
        cwd=REPO, env=env_for(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


def run_paused(settings: Settings, **pause: object) -> subprocess.Popen[str]:
    """The build in a subprocess, with hooks that stop it at ``pause``."""
    spec = {"task": STORE_TASK, "task_args": STORE_TASK_ARGS, "batch": BATCH, "chunk": CHUNK,
            "window": WINDOW, "pause": pause}
    return subprocess.Popen(
        [sys.executable, "-c", PAUSED_BUILD, json.dumps(spec)], cwd=REPO,
        env=env_for(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def kill_when_paused(proc: subprocess.Popen[str]) -> str:
    """Wait for the pause hook's mark, then SIGKILL the process; returns what it printed."""
    timer = threading.Timer(KILL_TIMEOUT_S, proc.kill)
    timer.start()
    lines = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if PAUSED_MARK in line:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        timer.cancel()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    return "".join(lines)


def finish(proc: subprocess.Popen[str]) -> None:
    out, err = proc.communicate(timeout=KILL_TIMEOUT_S)
    assert proc.returncode == 0, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The reference: the same build, in one process, never interrupted."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("reference"))
    build(BuildConfig(name="digits", task=STORE_TASK, task_args=dict(STORE_TASK_ARGS),
                      compression=CompressionConfig(batch_size=BATCH), chunk_size=CHUNK,
                      window=WINDOW), settings)
    return settings


def vectors(settings: Settings) -> tuple[list[str], np.ndarray]:
    index = open_index("digits", settings)
    names, _ = index.scores(np.zeros((1, index.dim), np.float32))
    return names, np.asarray(index.vectors)


def test_killed_build_resumes_to_the_same_index(tmp_path: Path, uninterrupted: Settings) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data)
    # 1. Killed mid-featurize, after its second chunk.
    kill_when_paused(run_paused(settings, after_chunks=2))
    (staging_root,) = (data / "indexes" / "digits" / "staging").iterdir()
    staging = Staging(staging_root)
    assert sorted(staging.positions().tolist()) == list(range(2 * CHUNK))
    assert staging.total() is None

    # 2. Resumed, then killed mid-finalize with some SQL rows written.
    kill_when_paused(run_paused(settings, at="rows"))
    positions = staging.positions()
    assert len(positions) == len(set(positions.tolist())) == 300
    engine = connect(settings)
    with Session(engine) as session:
        statuses = session.scalars(select(IndexVersion.status)).all()
        assert statuses == ["building"]
        assert session.scalar(select(func.count()).select_from(ExampleRow)) == WINDOW

    # 3. Resumed to the end: nothing featurized again, nothing stored twice.
    finish(run_cli(settings, cli_args()))
    assert len(staging.chunk_dirs()) == -(-300 // CHUNK)
    assert len(staging.positions()) == 300
    with Session(engine) as session:
        assert session.scalars(select(IndexVersion.status)).all() == ["ready"]
        rows = session.scalars(select(ExampleRow.external_id)).all()
        assert len(rows) == len(set(rows)) == 300
    names, got = vectors(settings)
    ref_names, ref = vectors(uninterrupted)
    assert names == ref_names
    np.testing.assert_array_equal(got, ref)
    ref_manifest = open_index("digits", uninterrupted).manifest
    assert open_index("digits", settings).manifest["model_fingerprint"] == \
        ref_manifest["model_fingerprint"]


def test_two_shards_equal_one_process(tmp_path: Path, uninterrupted: Settings) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data)
    connect(settings)  # create the SQLite schema before two processes race to
    procs = [run_cli(settings, cli_args("--shard", f"{i}/2")) for i in range(2)]
    for proc in procs:
        finish(proc)
    (staging_root,) = (data / "indexes" / "digits" / "staging").iterdir()
    staging = Staging(staging_root)
    prefixes = {p.name.split("-")[0] for p in staging.chunk_dirs()}
    assert prefixes == {"s0of2", "s1of2"} and staging.complete()
    with pytest.raises(IndexNotFound):  # staged, not finalized: nothing to read yet
        open_index("digits", settings)
    finalize(settings, "digits", window=WINDOW)
    names, got = vectors(settings)
    ref_names, ref = vectors(uninterrupted)
    assert names == ref_names
    # shards take whole batches, so every batch is the one-process build's: identical bits
    np.testing.assert_array_equal(got, ref)


def test_kill_between_rename_and_publish_is_recovered(settings: Settings) -> None:
    """Killed after ``.tmp-v<id>`` became ``v<id>`` but before the publishing commit: the next
    run publishes a new version under a new id and removes the orphaned folder."""
    kill_when_paused(run_paused(settings, at="before_publish"))
    versions = settings.index_dir("digits") / "versions"
    engine = connect(settings)
    with Session(engine) as session:
        (killed,) = session.scalars(select(IndexVersion)).all()
        assert killed.status == "building" and not killed.current
        killed_id = killed.id
        killed_rows = session.scalar(select(func.max(ExampleRow.id)))
    assert [p.name for p in versions.iterdir()] == [f"v{killed_id}"]

    finish(run_cli(settings, cli_args()))
    with Session(engine) as session:
        (version,) = session.scalars(select(IndexVersion)).all()
        assert version.status == "ready" and version.current
        assert version.id > killed_id and version.number == 1
        ids = session.scalars(select(ExampleRow.id)).all()
    assert len(ids) == 300 and min(ids) > killed_rows  # no id of the killed build comes back
    assert [p.name for p in versions.iterdir()] == [f"v{version.id}"]
    index = open_index("digits", settings)
    assert index.count == 300 and index.manifest["build_id"] == version.build_id
