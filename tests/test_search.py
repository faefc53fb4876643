"""The pure searcher against brute force: exact scans, FAISS (exact and approximate, re-ranked),
include and exclude sets, both directions, and the histogram."""

from __future__ import annotations

import numpy as np
import pytest

from gradindex.indexer import search
from gradindex.indexer.errors import ConfigError, ExampleNotFound
from gradindex.indexer.search import IdRows, Searcher, as_queries, histogram, relative_vectors
from gradindex.indexer.store import FaissConfig, build_faiss

N, DIM, Q, K = 500, 24, 6, 10
RTOL = 1e-5
ATOL = 1e-5


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)
    ids = rng.permutation(np.arange(1000, 1000 + 3 * N, 3))  # not in row order on purpose
    queries = rng.standard_normal((Q, DIM)).astype(np.float32)
    return vectors, ids.astype(np.int64), queries


def brute(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, sign: float,
          allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = sign * (queries @ vectors.T)
    scores[:, ~allowed] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return sign * np.take_along_axis(scores, order, axis=1), ids[order]


@pytest.mark.parametrize("kind", ["scan", "flat", "hnsw", "ivf"])
@pytest.mark.parametrize("direction", ["proponents", "opponents"])
@pytest.mark.parametrize("restrict", ["none", "include", "include-in-faiss", "exclude"])
def test_top_k_equals_brute_force(data: tuple[np.ndarray, np.ndarray, np.ndarray], kind: str,
                                  direction: str, restrict: str) -> None:
    vectors, ids, queries = data
    scan_limit = search.EXACT_SCAN_LIMIT
    if restrict == "include-in-faiss":  # a filter too large to scan: FAISS selects the ids
        scan_limit, restrict = 0, "include"
    config = FaissConfig(kind="flat" if kind == "scan" else kind, oversample=8)
    index = None if kind == "scan" else build_faiss(config, vectors, ids)
    searcher = Searcher(vectors, IdRows(ids), index=index, config=config,
                        scan_limit=scan_limit)
    rng = np.random.default_rng(1)
    chosen = rng.choice(ids, size=N // 5, replace=False)
    include = chosen if restrict == "include" else None
    exclude = chosen if restrict == "exclude" else None
    allowed = np.isin(ids, chosen) if restrict == "include" else ~np.isin(ids, chosen) \
        if restrict == "exclude" else np.ones(N, dtype=bool)
    sign = 1.0 if direction == "proponents" else -1.0
    scores, got = searcher.top_k(queries, K, direction=direction, include=include,
                                 exclude=exclude)
    want_scores, want = brute(vectors, ids, queries, K, sign, allowed)
    if kind in ("hnsw", "ivf"):  # approximate candidates: most of the true top-k, exact scores
        recall = np.mean([len(set(g) & set(w)) / K for g, w in zip(got, want, strict=True)])
        assert recall >= 0.8
        rows = IdRows(ids).rows(got.reshape(-1)).reshape(got.shape)
        exact = np.einsum("qd,qkd->qk", queries, vectors[rows])
        np.testing.assert_allclose(scores, exact, rtol=RTOL, atol=ATOL)
    else:
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(scores, want_scores, rtol=RTOL, atol=ATOL)
    assert np.isin(got, ids[allowed]).all()
    assert (np.diff(sign * scores, axis=1) <= 0).all()  # strongest first


@pytest.mark.parametrize("restrict", ["none", "include", "exclude", "include-and-exclude"])
@pytest.mark.parametrize("window", [7, 65536])
def test_one_pass_scan_equals_brute_force_in_both_directions(
        data: tuple[np.ndarray, np.ndarray, np.ndarray], restrict: str, window: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass gives each direction's top-k and the exact sign counts, with deleted rows,
    filters and a per-query skipped example left out, whatever the block size."""
    vectors, ids, queries = data
    monkeypatch.setattr(search, "SCORE_WINDOW", window)
    monkeypatch.setattr(search, "SCAN_BYTES", 4 * Q * window)
    rng = np.random.default_rng(2)
    chosen = rng.choice(ids, size=N // 3, replace=False)
    gone = rng.choice(ids, size=N // 7, replace=False)
    include = chosen if "include" in restrict else None
    exclude = gone if "exclude" in restrict else None
    allowed = np.ones(N, dtype=bool)
    if include is not None:
        allowed &= np.isin(ids, include)
    if exclude is not None:
        allowed &= ~np.isin(ids, exclude)
    skip = np.full(Q, -1, np.int64)
    skip[::2] = ids[np.flatnonzero(allowed)[:Q][::2]]  # every other query skips a live one
    scan = Searcher(vectors, IdRows(ids)).scan(queries, K, include=include, exclude=exclude,
                                               skip=skip)
    full = queries @ vectors.T
    for i in range(Q):
        mask = allowed & (ids != skip[i])
        assert scan.positives[i] == int((full[i][mask] > 0).sum())
        assert scan.negatives[i] == int((full[i][mask] < 0).sum())
        for direction, sign in (("proponents", 1.0), ("opponents", -1.0)):
            want_s, want = brute(vectors, ids, queries[i : i + 1], K, sign, mask)
            got_s, got = scan.top[direction][0][i], scan.top[direction][1][i]
            np.testing.assert_array_equal(got, want[0])
            np.testing.assert_allclose(got_s, want_s[0], rtol=RTOL, atol=ATOL)


def test_one_pass_scan_pads_when_fewer_rows_than_k(
        data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    vectors, ids, queries = data
    scan = Searcher(vectors, IdRows(ids)).scan(queries, K, include=ids[:3])
    for direction in ("proponents", "opponents"):
        scores, got = scan.top[direction]
        assert (got[:, 3:] == -1).all() and set(got[0, :3]) == set(ids[:3])
        assert np.isinf(scores[:, 3:]).all()
    assert (scan.positives + scan.negatives == 3).all()


def test_fewer_candidates_than_k_are_padded(data: tuple[np.ndarray, np.ndarray, np.ndarray]
                                            ) -> None:
    vectors, ids, queries = data
    searcher = Searcher(vectors, IdRows(ids))
    scores, got = searcher.top_k(queries, K, include=ids[:3])
    assert (got[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert set(got[0, :3]) == set(ids[:3])


def test_relative_influence_divides_by_sqrt_self_influence(
    data: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    vectors, ids, queries = data
    si = np.random.default_rng(2).uniform(0.5, 4.0, N)
    searcher = Searcher(relative_vectors(vectors, si), IdRows(ids))
    scores, got = searcher.top_k(queries, K)
    want_scores, want = brute(vectors / np.sqrt(si)[:, None], ids, queries, K, 1.0,
                              np.ones(N, dtype=bool))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, rtol=RTOL, atol=ATOL)


def test_scores_and_rows(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    vectors, ids, queries = data
    rows = IdRows(ids, label="index 'x' version 3")
    assert rows.rows(ids[[7, 2, 400]]).tolist() == [7, 2, 400]
    with pytest.raises(ExampleNotFound, match="index 'x' version 3"):
        rows.rows(np.array([ids[0], 1]))
    picked = np.array([9, 0, 33])
    np.testing.assert_allclose(Searcher(vectors, rows).scores(queries, picked),
                               queries @ vectors[picked].T, rtol=RTOL, atol=ATOL)


def test_bad_arguments_name_the_field(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    vectors, ids, queries = data
    searcher = Searcher(vectors, IdRows(ids))
    with pytest.raises(ConfigError, match="`k`"):
        searcher.top_k(queries, 0)
    with pytest.raises(ConfigError, match="`direction`"):
        searcher.top_k(queries, K, direction="up")
    with pytest.raises(ConfigError, match=rf"\[Q, {DIM}\]"):
        as_queries(np.zeros((2, DIM + 1)), DIM)
    assert as_queries(np.zeros(DIM), DIM).shape == (1, DIM)
    with pytest.raises(ConfigError, match="`bins`"):
        histogram(np.ones(3), 0)


def test_histogram_linear_log_and_empty() -> None:
    values = np.array([0.0, 1.0, 10.0, 100.0, 1000.0])
    edges, counts = histogram(values, 3, log=True)  # zero has no logarithm: first bin
    np.testing.assert_allclose(edges, [1.0, 10.0, 100.0, 1000.0])
    assert counts.tolist() == [2, 1, 2]
    edges, counts = histogram(values, 2)
    np.testing.assert_allclose(edges, [0.0, 500.0, 1000.0])
    assert counts.tolist() == [4, 1]
    edges, counts = histogram(np.zeros(0), 4)
    assert edges.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and counts.tolist() == [0, 0, 0, 0]


def test_histogram_counts_a_value_equal_to_the_minimum() -> None:
    """The first log edge is the minimum itself, not ``10**log10(min)``, which can round past
    it (the histogram of 1,000 live examples once counted 998)."""
    candidates = np.linspace(0.1, 0.9, 2001)
    rounds_up = candidates[10 ** np.log10(candidates) > candidates]
    assert len(rounds_up), "no value whose log10 round trip rounds up"
    low = float(rounds_up[0])
    values = np.concatenate([[low, low], np.linspace(1.0, 50.0, 997), [low * 1e4]])
    for log in (False, True):
        edges, counts = histogram(values, 40, log=log)
        assert int(counts.sum()) == len(values) == 1000
        assert edges[0] == low and edges[-1] == values.max()
        assert counts[0] >= 2
