"""The demo's build path in a temporary data directory: trained, indexed, queried, reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradindex import Settings, open_index
from gradindex.indexer.demo import demo_weights, prepare_demo
from gradindex.indexer.query import featurizer_for, query_vectors
from gradindex.indexer.tasks import DigitsTask


def test_demo_builds_once_and_answers_queries(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    assert prepare_demo(settings) is True
    weights = demo_weights(settings)
    assert weights.is_file()
    stamp = weights.stat().st_mtime_ns

    index = open_index("digits", settings)
    assert index.count == 1000
    assert index.manifest["task"]["args"]["weights"] == str(weights)
    featurizer = featurizer_for(index)
    task = featurizer.task
    assert isinstance(task.task, DigitsTask)
    gallery = task.queries()
    assert len(gallery) == 797 and gallery[0][0] == "test-0"

    queries = query_vectors(featurizer, [p for _, p in gallery[:3]])
    hits = index.search(queries, k=10)
    assert [len(h) for h in hits] == [10, 10, 10]
    for per_query in hits:
        scores = [h.score for h in per_query]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0
    # the strongest proponents of a digit mostly share its label
    same = np.mean([[h.meta.get("label") == p["y"] for h in per_query]
                    for (_, p), per_query in zip(gallery[:3], hits, strict=True)])
    assert same > 0.5

    assert prepare_demo(settings) is False  # a second run reuses weights and index
    assert weights.stat().st_mtime_ns == stamp
