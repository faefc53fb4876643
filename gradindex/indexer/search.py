"""The pure search of a published index: top-k over a vector matrix or its FAISS index.

Numpy and FAISS only (no SQL, no files): the reader hands a :class:`Searcher` the vectors, their
example ids and the FAISS index of one version, and the id sets that a filter or deletions
leave in or out; it returns scores and example ids. Every score it returns is an exact inner
product: an approximate FAISS index only proposes candidates, which are re-ranked exactly from
the stored vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError, ExampleNotFound
from .store import FaissConfig, ScaledRows, relative_scale, search_faiss

__all__ = [
    "DIRECTIONS",
    "EXACT_SCAN_LIMIT",
    "IdRows",
    "Scan",
    "Searcher",
    "as_queries",
    "check_search",
    "histogram",
    "relative_vectors",
]

EXACT_SCAN_LIMIT = 200_000
"""A filter matching at most this many examples is searched by an exact scan of their rows."""

DIRECTIONS = ("proponents", "opponents")

SCORE_WINDOW = 65536
"""Rows multiplied at once by :meth:`Searcher.scores` (bounds the memory of a full scan)."""

SCAN_BYTES = 64 * 1024 * 1024
"""Memory of the score block ``[Q, window]`` of one step of :meth:`Searcher.scan`."""

Vectors = np.ndarray | ScaledRows


@dataclass(frozen=True)
class Scan:
    """What one exact pass over the searched rows tells about each query."""

    top: dict[str, tuple[np.ndarray, np.ndarray]]
    """Per direction, ``(scores, ids)`` ``[Q, k]`` strongest first (ids -1 and scores ∓inf
    where fewer rows were searched)."""
    positives: np.ndarray
    """``[Q]`` searched rows scoring > 0."""
    negatives: np.ndarray
    """``[Q]`` searched rows scoring < 0."""


def check_search(k: int, direction: str) -> None:
    """Raise :class:`ConfigError` unless ``k`` is a positive integer and ``direction`` known."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"`direction` must be one of {list(DIRECTIONS)}, got {direction!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"`k` must be a positive integer, got {k!r}")


def as_queries(queries: Any, dim: int) -> np.ndarray:
    """Query vectors as float32 ``[Q, dim]`` (one vector ``[dim]`` becomes ``[1, dim]``).

    Raises:
        ConfigError: they are not ``[Q, dim]``.
    """
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ConfigError(f"queries must be [Q, {dim}], got {tuple(q.shape)}")
    return q


def relative_vectors(vectors: np.ndarray, self_influence: np.ndarray,
                     eps: float | None = None) -> ScaledRows:
    """The vectors of relative influence, ``v_i / sqrt(max(self-influence_i, eps))`` (RelatIF,
    Barshan et al. 2020), computed on access from the one stored matrix."""
    return ScaledRows(vectors, relative_scale(self_influence, eps)[0])


def histogram(values: np.ndarray, bins: int = 40, *, log: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
    """Histogram ``(edges [bins+1], counts [bins])`` of ``values``, every value counted: the
    first edge is the minimum and the last the maximum, exactly. With ``log``, bins are evenly
    spaced in log10 between the smallest and largest positive values (self-influence is
    heavy-tailed), and values <= 0 are counted in the first bin. No values give ``[0, 1]``
    split evenly, with zero counts.

    Raises:
        ConfigError: ``bins`` is not an integer in [1, 1000].
    """
    if not isinstance(bins, int) or isinstance(bins, bool) or not 1 <= bins <= 1000:
        raise ConfigError(f"`bins` must be an integer in [1, 1000], got {bins!r}")
    live = np.asarray(values, dtype=np.float64)
    if not len(live):
        return np.linspace(0.0, 1.0, bins + 1), np.zeros(bins, dtype=np.int64)
    positive = live[live > 0]
    if log and len(positive) and positive.min() < positive.max():
        lo, hi = float(positive.min()), float(positive.max())
        edges = np.logspace(np.log10(lo), np.log10(hi), bins + 1)
        edges[0], edges[-1] = lo, hi  # 10**log10(x) may round past x and drop it
        counts, _ = np.histogram(np.maximum(live, lo), bins=edges)
        return edges, counts
    counts, edges = np.histogram(live, bins=bins)
    return edges, counts


class IdRows:
    """Example ids ``[N]`` (one per stored vector) and the way back from an id to its row.

    Args:
        ids: the example id of each row of the vectors.
        label: what the ids belong to, for error messages (``index 'x' version 3``).
    """

    def __init__(self, ids: np.ndarray, *, label: str = "the index") -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.label = label
        self._order = np.argsort(self.ids, kind="stable")

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row numbers of example ``ids``, in their order.

        Raises:
            ExampleNotFound: an id has no row.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.ids):
            if len(ids):
                raise ExampleNotFound(f"some ids are not in {self.label}")
            return np.zeros(0, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids, sorter=self._order)
        pos = np.clip(pos, 0, len(self.ids) - 1)
        rows = self._order[pos]
        if len(ids) and not np.array_equal(self.ids[rows], ids):
            raise ExampleNotFound(f"some ids are not in {self.label}")
        return rows


class Searcher:
    """Top-``k`` search over ``vectors [N, dim]`` whose rows are the examples of ``rows``.

    Args:
        vectors: the stored vectors (a memmap, or :class:`ScaledRows` for relative influence).
        rows: their example ids.
        index: a FAISS index over the same vectors, with the same ids; ``None`` scans exactly.
        config: how that index is searched (oversampling and re-ranking when approximate).
        scan_limit: an ``include`` set of at most this many ids is scanned exactly, a larger
            one selected inside the FAISS search.
    """

    def __init__(self, vectors: Vectors, rows: IdRows, *, index: Any | None = None,
                 config: FaissConfig | None = None, scan_limit: int = EXACT_SCAN_LIMIT) -> None:
        if vectors.shape[0] != len(rows):
            raise ConfigError(f"one id per vector needed: {vectors.shape[0]} vectors, "
                              f"{len(rows)} ids")
        self.vectors = vectors
        self.rows = rows
        self.index = index
        self.config = config or FaissConfig()
        self.scan_limit = scan_limit

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])

    def top_k(
        self, queries: np.ndarray, k: int, *, direction: str = "proponents",
        include: np.ndarray | None = None, exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` proponents (highest scores) or opponents (lowest) of each query.

        Args:
            queries: ``[Q, dim]`` float32 (:func:`as_queries`).
            k: results per query.
            direction: ``proponents``, or ``opponents`` (the search of the negated query).
            include: only these example ids may be returned (a metadata filter's matches).
            exclude: these example ids may not be returned (deleted examples).

        Returns:
            ``(scores, ids)``, ``[Q, k]`` each, strongest first; missing results (fewer than
            ``k`` candidates) have id -1 and score ∓inf.
        """
        check_search(k, direction)
        sign = 1.0 if direction == "proponents" else -1.0
        if self.scannable(include):
            return self.scan(queries, k, directions=(direction,), include=include,
                             exclude=exclude).top[direction]
        signed = sign * np.asarray(queries, dtype=np.float32)
        if self.config.exact:
            s, ids = search_faiss(self.index, self.config, signed, k, include=include,
                                  exclude=exclude)
        else:
            wide = min(self.count, k * self.config.oversample)
            _, candidates = search_faiss(self.index, self.config, signed, wide,
                                         include=include, exclude=exclude)
            s, ids = self.rerank(signed, candidates, k)
        return sign * s, ids

    def scannable(self, include: np.ndarray | None) -> bool:
        """Whether a search restricted to ``include`` (None: every row) is an exact scan
        (:meth:`scan`) rather than a FAISS search."""
        return self.index is None or (include is not None and len(include) <= self.scan_limit)

    def scan(
        self, queries: np.ndarray, k: int, *, directions: Sequence[str] = DIRECTIONS,
        include: np.ndarray | None = None, exclude: np.ndarray | None = None,
        skip: np.ndarray | None = None,
    ) -> Scan:
        """Exact top-``k`` in each of ``directions`` and the sign counts of every query, from
        one pass of matrix products over the searched rows (the scores are computed once,
        whatever is asked of them; the memmap is read in file order).

        Args:
            queries: ``[Q, dim]`` float32.
            k: results per query and direction.
            include: only these example ids are searched (sorted or not); None: every row.
            exclude: these example ids are not searched (deleted examples).
            skip: ``[Q]`` per query an example id it must not see (-1: none).
        """
        for d in directions:
            check_search(k, d)
        q = np.asarray(queries, dtype=np.float32)
        n_q = len(q)
        if include is not None:
            rows = np.sort(self.rows.rows(np.asarray(include, dtype=np.int64)))
            if exclude is not None and len(exclude):
                rows = rows[~np.isin(self.rows.ids[rows], exclude)]
            total = len(rows)
        else:
            rows, total = None, self.count
        dead = (None if rows is not None or exclude is None or not len(exclude)
                else np.isin(self.rows.ids, exclude))
        skipped = np.full(n_q, -1, np.int64) if skip is None else np.asarray(skip, np.int64)
        window = max(1024, min(SCORE_WINDOW, SCAN_BYTES // (4 * max(n_q, 1))))
        best = {d: (np.zeros((n_q, 0), np.float32), np.zeros((n_q, 0), np.int64))
                for d in directions}
        positives = np.zeros(n_q, np.int64)
        negatives = np.zeros(n_q, np.int64)
        for lo in range(0, total, window):
            if rows is None:
                cand = np.arange(lo, min(lo + window, total), dtype=np.int64)
                block = np.asarray(self.vectors[lo : lo + window], dtype=np.float32)
            else:
                cand = rows[lo : lo + window]
                block = np.asarray(self.vectors[cand], dtype=np.float32)
            s = q @ block.T  # [Q, window]
            off = np.zeros(s.shape, dtype=bool)
            if dead is not None:
                off[:, dead[cand]] = True
            off |= self.rows.ids[cand][None, :] == skipped[:, None]
            s[off] = np.nan  # neither counted nor ranked
            positives += (s > 0).sum(axis=1)
            negatives += (s < 0).sum(axis=1)
            for d in directions:
                signed = s if d == "proponents" else -s
                signed = np.where(off, -np.inf, signed)
                best[d] = _merge_top(best[d], signed, cand, k)
        top = {}
        for d, (b_s, b_r) in best.items():
            order = np.argsort(-b_s, axis=1, kind="stable")
            b_s = np.take_along_axis(b_s, order, axis=1)
            b_r = np.take_along_axis(b_r, order, axis=1)
            ids = np.where(np.isfinite(b_s), self.rows.ids[np.maximum(b_r, 0)], -1)
            pad = k - b_s.shape[1]
            b_s = np.pad(b_s, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            top[d] = (b_s if d == "proponents" else -b_s, ids)
        return Scan(top, positives, negatives)

    def rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-``k`` ``(scores, ids)`` ``[Q, k]`` among each query's candidate ids
        ``[Q, C]`` (-1 for none), scored from the stored vectors."""
        s = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for i in range(len(queries)):
            c = np.sort(candidates[i][candidates[i] >= 0])
            if not len(c):
                continue
            rows = self.rows.rows(c)
            by_row = np.argsort(rows, kind="stable")  # read the memmap in file order
            c = c[by_row]
            sc = queries[i : i + 1] @ np.asarray(self.vectors[rows[by_row]], dtype=np.float32).T
            top = np.argsort(-sc[0], kind="stable")[:k]
            s[i, : len(top)], ids[i, : len(top)] = sc[0][top], c[top]
        return s, ids

    def scores(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact scores ``[Q, len(rows)]`` against the given row numbers, in their order."""
        out = np.zeros((len(queries), len(rows)), dtype=np.float32)
        for lo in range(0, len(rows), SCORE_WINDOW):
            part = rows[lo : lo + SCORE_WINDOW]
            out[:, lo : lo + len(part)] = queries @ np.asarray(self.vectors[part],
                                                                dtype=np.float32).T
        return out


def _merge_top(best: tuple[np.ndarray, np.ndarray], scores: np.ndarray, rows: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest of ``best`` (scores, rows) ``[Q, ≤k]`` and a new block ``scores``
    ``[Q, B]`` of ``rows [B]``, unordered."""
    all_s = np.concatenate([best[0], scores], axis=1)
    all_r = np.concatenate([best[1], np.broadcast_to(rows, scores.shape)], axis=1)
    take = min(k, all_s.shape[1])
    if take == all_s.shape[1]:
        return all_s, all_r
    part = np.argpartition(-all_s, take - 1, axis=1)[:, :take]
    return np.take_along_axis(all_s, part, axis=1), np.take_along_axis(all_r, part, axis=1)
