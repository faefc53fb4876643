"""The FAISS side of an index: building, measuring recall, filtered search and exact re-ranking.

Every FAISS index is wrapped in ``IndexIDMap2`` so its ids are the examples' SQL row ids. The
float32 vectors are kept beside it in ``vectors.npy`` (memory-mapped), so an approximate search
can oversample candidates and return exact scores.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, GradindexError
from ..registry import FAISS_KINDS
from .files import fsync_file

__all__ = [
    "FAISS_KINDS",
    "FaissConfig",
    "ScaledRows",
    "build_faiss",
    "relative_scale",
    "exact_topk",
    "faiss_ids",
    "measure_recall",
    "read_faiss",
    "search_faiss",
    "write_faiss",
]

log = logging.getLogger(__name__)


def _require_faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise GradindexError(
            "the persistent index needs FAISS: `pip install faiss-cpu` (or faiss-gpu)"
        ) from exc
    return faiss


RELATIVE_EPS = 1e-6
"""Self-influence floor of relative influence, as a fraction of the mean self-influence: an
example whose gradient vanishes scores 0, not 0/0."""


def relative_scale(
    self_influence: np.ndarray, eps: float | None = None
) -> tuple[np.ndarray, float]:
    """Per-row factors ``1/sqrt(max(s_i, eps))`` of relative influence (RelatIF, Barshan et al.
    2020), and the ``eps`` used (default: :data:`RELATIVE_EPS` times the mean self-influence).
    """
    si = np.asarray(self_influence, dtype=np.float64)
    if eps is None:
        mean = float(np.abs(si).mean()) if len(si) else 0.0
        eps = max(RELATIVE_EPS * mean, float(np.finfo(np.float32).tiny))
    return (1.0 / np.sqrt(np.maximum(si, eps))).astype(np.float32), float(eps)


class ScaledRows:
    """``vectors`` with row ``i`` multiplied by ``scale[i]``, computed on access.

    Reads like the array it wraps (``shape``, slices, index arrays), so the relative-influence
    vectors ``v_i / sqrt(s_i)`` are searched and indexed without a second copy on disk.
    """

    def __init__(self, vectors: np.ndarray, scale: np.ndarray) -> None:
        if len(scale) != vectors.shape[0]:
            raise ConfigError(f"one scale per row needed: {vectors.shape[0]} rows, "
                              f"{len(scale)} scales")
        self.vectors = vectors
        self.scale = np.asarray(scale, dtype=np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.vectors.shape)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = np.asarray(self.vectors[key], dtype=np.float32)
        return rows * self.scale[key][..., None] if rows.ndim == 2 else rows * self.scale[key]


@dataclass(frozen=True)
class FaissConfig:
    """Which FAISS index holds the vectors, and how an approximate one is searched."""

    kind: str = "flat"
    """`flat` (exact inner product), `hnsw` (graph) or `ivf` (inverted lists)."""

    fp16: bool = False
    """Store the FAISS codes as float16 (half the memory; scores are still re-ranked exactly
    from the float32 vectors)."""

    hnsw_m: int = 32
    """`hnsw` only: neighbours per node."""

    ef_search: int = 256
    """`hnsw` only: candidate list size at search time."""

    nlist: int | None = None
    """`ivf` only: inverted lists; default about 4·√n."""

    nprobe: int = 32
    """`ivf` only: lists visited per query."""

    pq: int | None = None
    """`ivf` only: product-quantized codes of `pq` bytes per vector (`pq` sub-vectors of 8 bits;
    the dimension must divide by it) instead of 4·dim; scores are re-ranked exactly from the
    vectors."""

    oversample: int = 4
    """An approximate search fetches `oversample`·k candidates, then re-ranks them exactly."""

    def __post_init__(self) -> None:
        if self.kind not in FAISS_KINDS:
            raise ConfigError(f"`faiss` must be one of {list(FAISS_KINDS)}, got {self.kind!r}")
        for name in ("hnsw_m", "ef_search", "nprobe", "oversample"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"`{name}` must be a positive integer, got {value!r}")
        if self.nlist is not None and (not isinstance(self.nlist, int) or self.nlist < 1):
            raise ConfigError(f"`nlist` must be a positive integer, got {self.nlist!r}")
        if self.pq is not None:
            if not isinstance(self.pq, int) or isinstance(self.pq, bool) or self.pq < 1:
                raise ConfigError(f"`pq` must be a positive integer, got {self.pq!r}")
            if self.kind != "ivf" or self.fp16:
                raise ConfigError("`pq` applies to the `ivf` kind without fp16, got "
                                  f"kind {self.kind!r}{' with fp16' if self.fp16 else ''}")

    @property
    def exact(self) -> bool:
        """Whether FAISS's own scores are exact (float32 flat)."""
        return self.kind == "flat" and not self.fp16

    def factory(self, n: int) -> str:
        """The ``faiss.index_factory`` string for ``n`` vectors."""
        codes = "SQfp16" if self.fp16 else "Flat"
        if self.kind == "flat":
            inner = codes
        elif self.kind == "hnsw":
            inner = f"HNSW{self.hnsw_m}" + ("_SQfp16" if self.fp16 else "")
        else:
            inner = f"IVF{self.lists(n)},{codes if self.pq is None else f'PQ{self.pq}'}"
        return f"IDMap2,{inner}"

    def lists(self, n: int) -> int:
        if self.nlist is not None:
            return self.nlist
        return max(1, min(int(4 * np.sqrt(max(n, 1))), max(n // 39, 1)))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FaissConfig:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def build_faiss(
    config: FaissConfig, vectors: np.ndarray | ScaledRows, ids: np.ndarray, *, window: int = 65536,
    seed: int = 0,
) -> Any:
    """A FAISS index over ``vectors [N, dim]`` (float32, may be a memmap) with ``ids [N]``.

    Vectors are added ``window`` rows at a time, so a memmap is never read whole; an IVF index
    is trained on a random sample of at most 100k rows.
    """
    faiss = _require_faiss()
    n, dim = vectors.shape
    if config.pq is not None and dim % config.pq:
        raise ConfigError(f"`pq` must divide the vectors' dimension {dim}, got {config.pq}")
    index = faiss.index_factory(dim, config.factory(n), faiss.METRIC_INNER_PRODUCT)
    if config.kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efConstruction = 80
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, 100_000), replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    for lo in range(0, n, window):
        block = np.ascontiguousarray(vectors[lo : lo + window], dtype=np.float32)
        index.add_with_ids(block, np.ascontiguousarray(ids[lo : lo + window], dtype=np.int64))
    return index


def write_faiss(index: Any, path: Path) -> None:
    """Write ``index`` to ``path`` and fsync it."""
    faiss = _require_faiss()
    faiss.write_index(index, str(path))
    fsync_file(path)


def read_faiss(path: Path) -> Any:
    faiss = _require_faiss()
    return faiss.read_index(str(path))


def faiss_ids(index: Any) -> np.ndarray:
    """The ids an ``IndexIDMap2`` holds, in insertion order."""
    faiss = _require_faiss()
    return np.asarray(faiss.vector_to_array(index.id_map), dtype=np.int64)


def _params(index: Any, config: FaissConfig, selector: Any | None) -> Any:
    faiss = _require_faiss()
    inner = faiss.downcast_index(index.index)
    kwargs: dict[str, Any] = {} if selector is None else {"sel": selector}
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=config.ef_search, **kwargs)
    if isinstance(inner, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=config.nprobe, **kwargs)
    return faiss.SearchParameters(**kwargs) if kwargs else None


def search_faiss(
    index: Any, config: FaissConfig, queries: np.ndarray, k: int, *,
    include: np.ndarray | None = None, exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's own top-``k`` (scores, ids), ``[Q, k]`` each, restricted inside the search.

    Args:
        include: only these ids may be returned (``IDSelectorBatch``).
        exclude: these ids may not be returned (deleted examples).

    Missing results (fewer than ``k`` candidates) have id -1.
    """
    faiss = _require_faiss()
    selector = None
    if include is not None:
        keep = np.ascontiguousarray(include, dtype=np.int64)
        if exclude is not None and len(exclude):
            keep = np.setdiff1d(keep, exclude, assume_unique=False)
        selector = faiss.IDSelectorBatch(keep)
    elif exclude is not None and len(exclude):
        selector = faiss.IDSelectorNot(
            faiss.IDSelectorBatch(np.ascontiguousarray(exclude, dtype=np.int64))
        )
    params = _params(index, config, selector)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    scores, ids = index.search(q, k, params=params)
    return scores, ids


def exact_topk(
    vectors: np.ndarray | ScaledRows, rows: np.ndarray | None, queries: np.ndarray, k: int, *,
    window: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, row numbers) of ``queries @ vectors[rows].T``, streamed.

    ``rows`` restricts (and orders) the candidate rows; ``None`` means all of them. Rows are
    returned as indices into ``vectors``; missing results have row -1 and score -inf.
    """
    q = np.asarray(queries, dtype=np.float32)
    n = vectors.shape[0] if rows is None else len(rows)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_r = np.zeros((len(q), 0), dtype=np.int64)
    for lo in range(0, n, window):
        if rows is None:
            cand = np.arange(lo, min(lo + window, n), dtype=np.int64)
            block = np.asarray(vectors[lo : lo + window], dtype=np.float32)
        else:
            cand = np.asarray(rows[lo : lo + window], dtype=np.int64)
            block = np.asarray(vectors[np.sort(cand)], dtype=np.float32)
            cand = np.sort(cand)
        s = q @ block.T
        all_s = np.concatenate([best_s, s], axis=1)
        all_r = np.concatenate([best_r, np.broadcast_to(cand, s.shape)], axis=1)
        take = min(k, all_s.shape[1])
        part = np.argpartition(-all_s, take - 1, axis=1)[:, :take]
        best_s = np.take_along_axis(all_s, part, axis=1)
        best_r = np.take_along_axis(all_r, part, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_s = np.take_along_axis(best_s, order, axis=1)
    best_r = np.take_along_axis(best_r, order, axis=1)
    if best_s.shape[1] < k:
        pad = k - best_s.shape[1]
        best_s = np.pad(best_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_r = np.pad(best_r, ((0, 0), (0, pad)), constant_values=-1)
    return best_s, best_r


def measure_recall(
    index: Any, config: FaissConfig, vectors: np.ndarray | ScaledRows, ids: np.ndarray, *,
    k: int = 10, queries: int = 100, seed: int = 0,
) -> dict[str, float]:
    """recall@k of ``index`` against exact search, with stored vectors as queries.

    Returns ``{"recall_at_10": ANN alone, "recall_at_10_reranked": after fetching
    oversample·k candidates and re-ranking them exactly, as searches do}`` (keys name ``k``).
    """
    n = vectors.shape[0]
    if n == 0:
        return {f"recall_at_{k}": 1.0, f"recall_at_{k}_reranked": 1.0}
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    q = np.asarray(vectors[sample], dtype=np.float32)
    kk = min(k, n)
    _, truth_rows = exact_topk(vectors, None, q, kk)
    truth = ids[truth_rows]
    _, got = search_faiss(index, config, q, kk)
    _, wide = search_faiss(index, config, q, min(n, kk * config.oversample))
    order = np.argsort(ids, kind="stable")
    hits = reranked = 0
    for i in range(len(q)):
        hits += len(set(got[i][got[i] >= 0].tolist()) & set(truth[i].tolist()))
        cand = wide[i][wide[i] >= 0]
        rows = np.sort(order[np.searchsorted(ids, cand, sorter=order)])
        s = np.asarray(vectors[rows], dtype=np.float32) @ q[i]
        top = ids[rows][np.argsort(-s, kind="stable")[:kk]]
        reranked += len(set(top.tolist()) & set(truth[i].tolist()))
    total = kk * len(q)
    return {f"recall_at_{k}": hits / total, f"recall_at_{k}_reranked": reranked / total}
