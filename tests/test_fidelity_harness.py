"""The fidelity benchmark's harness (``bench/fidelity.py``) on a tiny digits configuration: it
runs end to end, ranks exact influence far above random scores, and reuses its cache."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

HARNESS = Path(__file__).resolve().parents[1] / "bench" / "fidelity.py"

EXACT_FLOOR = 0.6
"""Exact influence on converged logistic regression scores ≈ 0.9 here; random ≈ 0."""
RANDOM_CEILING = 0.3
OTHER_DAMPING = 0.05
"""A damping scored from the same Fisher as the default one (no library default is this)."""


@pytest.fixture(scope="module")
def fidelity() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_fidelity", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def tiny(fidelity: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    cache = fidelity.Cache(tmp_path_factory.mktemp("fidelity-cache"))
    settings = fidelity.DigitsSettings("logreg", train_size=200, subsets=16, queries=30)
    bench = fidelity.digits_benchmark(settings, cache)
    base = fidelity.Method("default", "k")
    methods = [
        fidelity.Method("exact influence", "reference", kind="exact"),
        fidelity.Method("random scores", "reference", kind="random"),
        fidelity.index_method("k", base, keep=0.5, dampings=(OTHER_DAMPING,)),
    ]
    return cache, bench, methods, fidelity.run_benchmark(bench, methods, cache)


def test_exact_influence_is_far_above_random(tiny: tuple) -> None:
    _, bench, _, rows = tiny
    by_kind = {r["kind"]: r for r in rows}
    exact, rand = by_kind["exact"], by_kind["random"]
    assert bench.subsets.shape == (16, 200) and bench.losses.shape == (16, 30)
    assert exact["lds"] > EXACT_FLOOR
    assert abs(rand["lds"]) < RANDOM_CEILING
    assert exact["lds"] - rand["lds"] > 3 * (exact["lds_se"] + rand["lds_se"])
    assert exact["top10"] == 1.0


def test_index_rows_and_cache(fidelity: ModuleType, tiny: tuple) -> None:
    cache, bench, methods, rows = tiny
    index_rows = [r for r in rows if r["kind"] == "index"]
    default = fidelity.PreconditionerConfig().damping
    assert [r["damping"] for r in index_rows] == [default, OTHER_DAMPING]
    assert all(0 < r["lds"] < 1 and r["featurize_s"] > 0 and not r["cached"]
               for r in index_rows)
    again = fidelity.run_benchmark(bench, methods, cache)
    assert all(r["cached"] for r in again if r["kind"] == "index")
    assert np.allclose([r["lds"] for r in again], [r["lds"] for r in rows])
    table = fidelity.markdown_tables(rows)
    assert "exact influence" in table and "LDS ± s.e." in table
