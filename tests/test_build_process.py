"""Builds as real processes: killed with SIGKILL and resumed, and split into two shards."""

from __future__ import annotations

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
from gradindex.indexer.build import PAUSE_CHUNKS_ENV, PAUSE_FINALIZE_ENV, PAUSED_MARK, finalize
from gradindex.indexer.errors import IndexNotFound
from gradindex.indexer.staging import Staging
from gradindex.indexer.store import ExampleRow, IndexVersion, connect

from .conftest import STORE_TASK, STORE_TASK_ARGS

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


def run_cli(data_dir: Path, args: list[str], pause: dict[str, str] | None = None
            ) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADINDEX_")}
    env.update({"GRADINDEX_DATA_DIR": str(data_dir), "COLUMNS": "120", **(pause or {})})
    return subprocess.Popen(
        [sys.executable, "-c", "from gradindex.cli import main; main()", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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
    kill_when_paused(run_cli(data, cli_args(), {PAUSE_CHUNKS_ENV: "2"}))
    (staging_root,) = (data / "indexes" / "digits" / "staging").iterdir()
    staging = Staging(staging_root)
    assert sorted(staging.positions().tolist()) == list(range(2 * CHUNK))
    assert staging.total() is None

    # 2. Resumed, then killed mid-finalize with some SQL rows written.
    kill_when_paused(run_cli(data, cli_args(), {PAUSE_FINALIZE_ENV: "rows"}))
    positions = staging.positions()
    assert len(positions) == len(set(positions.tolist())) == 300
    engine = connect(settings)
    with Session(engine) as session:
        statuses = session.scalars(select(IndexVersion.status)).all()
        assert statuses == ["building"]
        assert session.scalar(select(func.count()).select_from(ExampleRow)) == WINDOW

    # 3. Resumed to the end: nothing featurized again, nothing stored twice.
    finish(run_cli(data, cli_args()))
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
    procs = [run_cli(data, cli_args("--shard", f"{i}/2")) for i in range(2)]
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
