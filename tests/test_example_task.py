"""The README's worked task file, end to end: trained, built by the CLI from its file path,
and queried."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gradindex import Settings, open_index
from gradindex.indexer.query import featurizer_for, query_vectors

from .conftest import REPO, gradindex_cli

TASK_FILE = REPO / "examples" / "wine_task.py"


def test_worked_task_file_builds_and_answers(tmp_path: Path) -> None:
    weights = tmp_path / "wine.safetensors"
    subprocess.run([sys.executable, str(TASK_FILE), "train", str(weights)], check=True,
                   cwd=tmp_path, timeout=300)
    settings = Settings(data_dir=tmp_path / "data")
    gradindex_cli(settings, "build", "--task", f"{TASK_FILE}:WineTask", "--task-arg",
                  f"weights={weights}", "--name", "wine", "--fisher", "expected")
    index = open_index("wine", settings)
    assert index.count == 150
    assert index.manifest["task"]["spec"] == f"{TASK_FILE}:WineTask"
    featurizer = featurizer_for(index)
    queries = featurizer.task.queries()
    assert len(queries) == 28
    hits = index.search(query_vectors(featurizer, [p for _, p in queries]), k=10)
    agree = [h.meta["label"] == p["y"] for (_, p), per in zip(queries, hits, strict=True)
             for h in per]
    assert sum(agree) / len(agree) > 0.5, agree  # proponents mostly share the class (chance: ⅓)
