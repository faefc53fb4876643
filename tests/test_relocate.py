"""Self-contained indexes: built in one folder, served from another, after the project folder
and the data directory moved; an index recorded by absolute path re-pointed by `repair`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gradindex import Settings
from gradindex.indexer.tasks import DigitsTask

from .conftest import LiveServer, storage_env

TASK_FILE = '''
from helper_size import TRAIN_SIZE  # a module beside the task file
from gradindex.indexer.tasks import DigitsTask


class Relocatable(DigitsTask):
    def __init__(self, weights: str) -> None:
        super().__init__("logreg", train_size=TRAIN_SIZE, weights=weights)
'''
TRAIN_SIZE = 120


def _weights(path: Path, train_size: int = TRAIN_SIZE) -> None:
    from safetensors.torch import save_file

    model = DigitsTask("logreg", train_size=train_size).model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _cli(settings: Settings, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, **storage_env(settings)}
    return subprocess.run([sys.executable, "-m", "gradindex", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _query(server: LiveServer, name: str) -> httpx.Response:
    payloads = DigitsTask("logreg", train_size=TRAIN_SIZE).test_payloads(3)
    return httpx.post(f"{server.url}/v1/indexes/{name}/influence",
                      json={"examples": payloads, "k": 5, "direction": "both"}, timeout=60)


def _wait_for(check: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A user's project folder: a task file, a module beside it, and trained weights."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "task.py").write_text(TASK_FILE)
    (folder / "helper_size.py").write_text(f"TRAIN_SIZE = {TRAIN_SIZE}\n")
    _weights(folder / "model.safetensors")
    return folder


def test_an_index_serves_from_anywhere_after_its_project_and_data_move(
    project: Path, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    built = _cli(settings, project, "build", "--task", "task.py:Relocatable",
                 "--task-arg", "weights=model.safetensors", "--name", "moving")
    assert built.returncode == 0, built.stderr
    shutil.rmtree(project)  # the task file, its neighbour and the weights are gone
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    server = LiveServer(settings, tmp_path / "one.log", cwd=elsewhere, auth="off").wait()
    try:
        first = _query(server, "moving")
        assert first.status_code == 200, first.text
        listing = httpx.get(server.url + "/v1/indexes", timeout=10).json()["indexes"]
        assert [(i["name"], i["status"]) for i in listing] == [("moving", "serving")]
    finally:
        server.stop()

    moved = Settings(data_dir=tmp_path / "moved-data")
    shutil.move(settings.data_dir, moved.data_dir)  # the SQLite file moves with it
    server = LiveServer(moved, tmp_path / "two.log", cwd=elsewhere, auth="off").wait()
    try:
        again = _query(server, "moving")
        assert again.status_code == 200, again.text
        assert again.json()["results"] == first.json()["results"]
    finally:
        server.stop()


def test_repair_repoints_an_index_recorded_by_absolute_path(project: Path, tmp_path: Path
                                                           ) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    assert _cli(settings, project, "build", "--task", "task.py:Relocatable", "--task-arg",
                "weights=model.safetensors", "--name", "old").returncode == 0
    # As an index built before tasks were recorded: the manifest names the files where they
    # were, and then the project moves.
    (manifest_path,) = (settings.data_dir / "indexes" / "old" / "versions").glob("v*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["task"] = {"spec": f"{project / 'task.py'}:Relocatable",
                        "args": {"weights": str(project / "model.safetensors")}}
    manifest_path.write_text(json.dumps(manifest))
    moved = tmp_path / "moved-project"
    shutil.move(project, moved)

    server = LiveServer(settings, tmp_path / "server.log", cwd=tmp_path, auth="off").wait()
    try:
        refused = _query(server, "old")
        assert refused.status_code == 503, refused.text
        listing = httpx.get(server.url + "/v1/indexes", timeout=10).json()["indexes"]
        assert listing[0]["status"] == "unavailable" and "task.py" in listing[0]["reason"]

        _weights(tmp_path / "other.safetensors", train_size=100)
        wrong = _cli(settings, tmp_path, "repair", "old", "--task",
                     f"{moved / 'task.py'}:Relocatable", "--task-arg",
                     f"weights={tmp_path / 'other.safetensors'}")
        assert wrong.returncode == 1 and "other model weights" in wrong.stderr
        assert len(wrong.stderr.strip().splitlines()) == 1

        fixed = _cli(settings, tmp_path, "repair", "old", "--task",
                     f"{moved / 'task.py'}:Relocatable", "--task-arg",
                     f"weights={moved / 'model.safetensors'}")
        assert fixed.returncode == 0, fixed.stderr
        assert "version 1 now loads its task" in fixed.stderr
        _wait_for(lambda: _query(server, "old").status_code == 200, "the repaired index")
    finally:
        server.stop()
    shutil.rmtree(moved)  # recorded now: the index no longer needs the project
    server = LiveServer(settings, tmp_path / "after.log", cwd=tmp_path, auth="off").wait()
    try:
        assert _query(server, "old").status_code == 200
    finally:
        server.stop()
