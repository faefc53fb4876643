"""Reading a published index: search, exact scores, self-influence, look-up and delete.

:func:`open_index` pins the version that is current at that moment; everything an
:class:`Index` returns comes from that one version (its files, read by
:class:`~.version.VersionFiles`, and its SQL rows, read by :class:`~.examples.ExampleStore`),
so a publish running meanwhile is never seen half-done. The search itself is
:class:`~.search.Searcher`'s: deleted examples and metadata filters are applied inside it
(FAISS id selectors, or an exact scan of the matching rows), so a filtered top-k is the top-k
of the matching examples. Relative influence (``normalize=True``) searches a second FAISS
index over ``v_i / sqrt(self-influence_i)``; versions written before it existed are scanned
exactly instead. Query vectors come from :func:`~.query.featurizer_for`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from .errors import ExampleNotFound, StorageError
from .examples import ExampleStore, Filter, Hit
from .filters import MetadataSchema
from .precondition import Preconditioner
from .search import IdRows, Searcher, as_queries, check_search, histogram, relative_vectors
from .settings import Settings, check_name
from .store import IndexVersion, connect, current_version
from .store.milvus import MilvusSearcher, MilvusVersion, open_version
from .version import VersionFiles

__all__ = ["ExampleNotFound", "Filter", "Hit", "Index", "Ranked", "open_index"]

COUNT_SCAN_LIMIT = 50_000_000
"""Scores (searched rows × dim) computed to count a query's positive and negative scores
exactly; beyond it only "fewer than k" is known."""


@dataclass(frozen=True)
class Ranked:
    """One query's top hits in one direction, and how many scores lie on each side of zero."""

    hits: list[Hit]
    """Strongest first; only scores of the direction's sign (> 0 proponents, < 0 opponents)."""
    positives: int | None
    """Searched examples that score > 0; None when not counted (a large index, and at least
    ``k`` of them exist)."""
    negatives: int | None
    """Likewise, < 0."""


class Index:
    """One published version of a named index, open for reading.

    Args:
        name: the index.
        settings: storage locations.
        engine: the database engine.
        version: the version row to read.

    Raises:
        StorageError: a file of the version is missing or damaged, or the files and the SQL
            rows disagree.
    """

    def __init__(self, name: str, settings: Settings, engine: Engine,
                 version: IndexVersion) -> None:
        self.name = name
        self.settings = settings
        self.engine = engine
        self.version_id = int(version.id)
        """The database's id of this version (never reused; its rows' ids are the FAISS ids)."""
        self.version = int(version.number or version.id)
        """The version number users see: 1, 2, 3, ... within this index."""
        self.build_id = str(version.build_id or "")
        """A random id of the finalize that wrote this version."""
        self.files = VersionFiles.open(settings.data_dir / version.path, name=name,
                                       version=self.version, version_id=self.version_id,
                                       build_id=self.build_id or None)
        self.metadata_schema = MetadataSchema.from_json(
            self.files.manifest.get("metadata_schema"))
        """Metadata keys and their JSON types, recorded at build; None for older versions."""
        self.examples = ExampleStore(engine, name=name, version=self.version_id,
                                     schema=self.metadata_schema)
        self.files.check(*self.examples.row_ids())
        self._rows = IdRows(self.files.ids, label=f"index {name!r} version {self.version}")
        self.searcher: Searcher | MilvusSearcher = Searcher(
            self.files.vectors, self._rows, index=self.files.faiss,
            config=self.files.faiss_config)
        self.store: MilvusVersion | None = None
        """The Milvus collection searched (``--store milvus``); None: FAISS or a scan."""
        entry = self.manifest.get("store") or {}  # versions written before stores: FAISS
        if entry.get("kind") == "milvus":
            self.store = open_version(
                vector_store=settings.vector_store, data_dir=settings.data_dir, entry=entry,
                label=f"index {name!r} version {self.version}",
                remedy=f"rebuild it with `gradindex refinalize {name}`")
            self.searcher = self._milvus(self.searcher, "vectors")

    # -------------------------------------------------------------- properties

    @property
    def manifest(self) -> dict[str, Any]:
        return self.files.manifest

    @property
    def folder(self) -> Path:
        """The version's folder."""
        return self.files.folder

    @property
    def vectors(self) -> np.ndarray:
        """The stored vectors ``[count, dim]`` (float32, memory-mapped)."""
        return self.files.vectors

    @property
    def ids(self) -> np.ndarray:
        """The example row id of each vector (the FAISS ids)."""
        return self.files.ids

    @property
    def count(self) -> int:
        return self.files.count

    @property
    def dim(self) -> int:
        return self.files.dim

    @property
    def has_relative_index(self) -> bool:
        """Whether relative influence ranks as exactly as raw influence: by an exact scan of
        the stored vectors (an exact index stores no FAISS copy) or by a FAISS index of its
        own; else (versions written before relative influence had an index) it scans too."""
        return self.files.relative_faiss is not None or self.files.faiss is None

    @property
    def identity(self) -> tuple[int, str]:
        """What tells this version from any other, ever: its id and its build id."""
        return self.version_id, self.build_id

    def is_current(self) -> bool:
        """Whether this is still the published version."""
        with Session(self.engine) as session:
            row = current_version(session=session, name=self.name)
            return (int(row.id), str(row.build_id or "")) == self.identity

    @functools.cached_property
    def self_influence_values(self) -> np.ndarray:
        """Self-influence of every stored example, by position (deleted ones included)."""
        if self.files.self_influence is not None:
            return np.asarray(self.files.self_influence)
        return self.examples.self_influence_by_position()  # written before the file existed

    @functools.cached_property
    def relative_searcher(self) -> Searcher | MilvusSearcher:
        """The searcher of relative influence, ``v_i / sqrt(max(self-influence_i, eps))``."""
        eps = (self.manifest.get("relative") or {}).get("eps")
        vectors = relative_vectors(self.files.vectors, self.self_influence_values, eps)
        return self._milvus(Searcher(vectors, self._rows, index=self.files.relative_faiss,
                                     config=self.files.faiss_config), "relative")

    def _milvus(self, searcher: Searcher, field: str) -> Searcher | MilvusSearcher:
        """``searcher``, searching through Milvus's ``field`` when the version is there."""
        if self.store is None:
            return searcher
        return MilvusSearcher(self.store, searcher, field=field,
                              oversample=self.files.faiss_config.oversample)

    def _queries(self, queries: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().cpu().numpy()
        return as_queries(queries, self.dim)

    # -------------------------------------------------------------- search

    def search(
        self,
        queries: torch.Tensor | np.ndarray,
        k: int = 10,
        *,
        direction: str = "proponents",
        filter: Filter | None = None,
        normalize: bool = False,
        skip: Sequence[int | None] | None = None,
    ) -> list[list[Hit]]:
        """Top-``k`` proponents (highest scores) or opponents (lowest) per query vector.

        Args:
            queries: query vectors ``[Q, dim]`` (:func:`~.query.query_vectors`).
            k: results per query.
            direction: ``proponents`` or ``opponents`` (the search of the negated query).
            filter: restrict to examples whose metadata match (see :mod:`.filters`).
            normalize: rank by relative influence, ``score / sqrt(self-influence)`` (RelatIF,
                Barshan et al. 2020); the hits' scores are then those relative scores.
            skip: per query, an example row id never to return (a stored example queried
                with itself), or None.

        Returns:
            Per query, up to ``k`` hits sorted by strength, proponents scoring > 0 and
            opponents < 0 (fewer than ``k`` when fewer exist); scores are exact inner products.
        """
        return [r.hits for r in self.rank(queries, k, direction=direction, filter=filter,
                                          normalize=normalize, skip=skip)]

    def rank(
        self,
        queries: torch.Tensor | np.ndarray,
        k: int = 10,
        *,
        direction: str = "proponents",
        filter: Filter | None = None,
        normalize: bool = False,
        skip: Sequence[int | None] | None = None,
        signed: bool = True,
    ) -> list[Ranked]:
        """:meth:`search`, with how many searched examples score above and below zero.

        ``signed=False`` keeps the top ``k`` whatever their sign (a data selection ranks by
        mean influence and wants ``k`` examples)."""
        return self.rank_many(queries, k, directions=(direction,), filter=filter,
                              normalize=normalize, skip=skip, signed=signed)[direction]

    def rank_many(
        self,
        queries: torch.Tensor | np.ndarray,
        k: int = 10,
        *,
        directions: Sequence[str] = ("proponents",),
        filter: Filter | None = None,
        normalize: bool = False,
        skip: Sequence[int | None] | None = None,
        signed: bool = True,
    ) -> dict[str, list[Ranked]]:
        """:meth:`rank` in several directions at once, per direction a list over queries.

        An exactly searched index (no FAISS index, or a filter matching few examples)
        computes every score once for all directions and the sign counts; the hits of all
        queries are read from SQL in one query."""
        for d in directions:
            check_search(k, d)
        q = self._queries(queries)
        skipped = np.full(len(q), -1, dtype=np.int64)
        if skip is not None:
            skipped[:] = [-1 if s is None else int(s) for s in skip]
        # Milvus: a filter it decides exactly runs inside its search, no SQL id list
        where = None if self.store is None else self.store.where(filter, self.metadata_schema)
        include = self.examples.matching(filter) if where is None else None
        exclude = None if include is not None else self.examples.deleted()
        searcher = self.relative_searcher if normalize else self.searcher
        counts: tuple[np.ndarray, np.ndarray] | None = None
        if not isinstance(searcher, MilvusSearcher) and searcher.scannable(include):
            scan = searcher.scan(q, k, directions=directions, include=include, exclude=exclude,
                                 skip=skipped)
            top, counts = scan.top, (scan.positives, scan.negatives)
        else:
            extra = int((skipped >= 0).any())
            if isinstance(searcher, MilvusSearcher):
                top = {d: searcher.top_k(q, k + extra, direction=d, include=include,
                                         exclude=exclude, where=where) for d in directions}
            else:
                top = {d: searcher.top_k(q, k + extra, direction=d, include=include,
                                         exclude=exclude) for d in directions}
            if signed and where is not None:  # counted over the matches when they are few
                if self.examples.count(filter) * self.dim <= COUNT_SCAN_LIMIT:
                    counts = self._sign_counts(q, self.examples.matching(filter), None,
                                               skipped)
            elif signed:
                counts = self._sign_counts(q, include, exclude, skipped)
        picked: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for d in directions:
            sign = 1.0 if d == "proponents" else -1.0
            scores, ids = top[d]
            keep = (ids >= 0) & (ids != skipped[:, None])
            if signed:
                keep &= sign * scores > 0
            picked[d] = [(ids[i][keep[i]][:k], scores[i][keep[i]][:k]) for i in range(len(q))]
        hits = self.examples.hits_many([p for d in directions for p in picked[d]])
        out: dict[str, list[Ranked]] = {}
        for n, d in enumerate(directions):
            found = hits[n * len(q) : (n + 1) * len(q)]
            if counts is not None and signed:
                out[d] = [Ranked(h, int(counts[0][i]), int(counts[1][i]))
                          for i, h in enumerate(found)]
            elif d == "proponents":
                out[d] = [Ranked(h, len(h) if len(h) < k else None, None) for h in found]
            else:
                out[d] = [Ranked(h, None, len(h) if len(h) < k else None) for h in found]
        return out

    def _sign_counts(self, q: np.ndarray, include: np.ndarray | None,
                     exclude: np.ndarray | None, skipped: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray] | None:
        """Per query, how many searched examples score ``> 0`` and ``< 0`` (``skipped`` left
        out), or None when that scan would exceed :data:`COUNT_SCAN_LIMIT`."""
        ids = include if include is not None else np.setdiff1d(
            self._rows.ids, exclude if exclude is not None else [])
        if len(ids) * self.dim > COUNT_SCAN_LIMIT:
            return None
        rows = np.sort(self._rows.rows(ids))
        s = self.searcher.scores(q, rows)
        s[self._rows.ids[rows][None, :] == skipped[:, None]] = 0.0
        return (s > 0).sum(axis=1), (s < 0).sum(axis=1)

    @functools.cached_property
    def preconditioner(self) -> Preconditioner:
        """The fitted ``(F̃+λI)`` of this version (``precond.npz``).

        Raises:
            StorageError: the version has no readable ``precond.npz``.
        """
        path = self.folder / "precond.npz"
        try:
            return Preconditioner.load(path)
        except Exception as exc:  # noqa: BLE001 - numpy raises many kinds
            raise StorageError(
                f"index {self.name!r} version {self.version}: precond.npz is missing or "
                f"unreadable ({type(exc).__name__}); rebuild it with "
                f"`gradindex refinalize {self.name}`") from exc

    def stored_queries(self, external_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Query vectors of stored training examples, without a model pass.

        A stored vector is ``v = (F̃+λI)⁻¹ g̃``; its query is ``(F̃+λI) v / groups``, what
        :func:`~.query.query_vectors` makes of the example's payload (to float rounding).

        Returns:
            Their row ids ``[Q]`` (to leave each out of its own results) and query vectors
            ``[Q, dim]`` float32.

        Raises:
            ExampleNotFound: an id is not in the index, or was deleted.
        """
        _, positions = self.examples.live_positions(external_ids)
        stored = torch.from_numpy(np.asarray(self.vectors[positions], dtype=np.float32))
        groups = int((self.manifest.get("layout") or {}).get("groups") or 1)
        raw = self.preconditioner.unapply(stored) / groups
        return np.asarray(self.ids[positions], dtype=np.int64), raw.float().numpy()

    def select(
        self, queries: torch.Tensor | np.ndarray, k: int = 10, *, filter: Filter | None = None,
        normalize: bool = False,
    ) -> list[Hit]:
        """Training examples ranked by mean influence over a set of queries (data selection)."""
        q = self._queries(queries)
        return self.rank(q.mean(axis=0, keepdims=True), k, filter=filter,
                         normalize=normalize, signed=False)[0].hits

    def scores(
        self, queries: torch.Tensor | np.ndarray, ids: Sequence[str] | None = None
    ) -> tuple[list[str], np.ndarray]:
        """Exact scores ``[Q, len(ids)]`` against the given external ids (default: all live).

        Raises:
            ExampleNotFound: an id is not in the index, or was deleted.
        """
        q = self._queries(queries)
        names, rows = self.examples.live_positions(ids)
        return names, self.searcher.scores(q, rows)

    def self_influence(
        self, limit: int = 100, *, filter: Filter | None = None, descending: bool = True,
        offset: int = 0, low: float | None = None, high: float | None = None,
    ) -> list[Hit]:
        """Examples ranked by self-influence (outlier and mislabel candidates first).

        ``offset`` skips that many of the ranking (pages of ``limit``); ``low`` (inclusive)
        and ``high`` (exclusive) bound the self-influence (a histogram bin)."""
        return self.examples.self_influence_page(limit=limit, offset=offset,
                                                 descending=descending, filter=filter,
                                                 low=low, high=high)

    def self_influence_histogram(
        self, bins: int = 40, *, log: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Histogram ``(edges [bins+1], counts [bins])`` of the live examples' self-influence,
        with ``log`` bins evenly spaced in log10 (self-influence is heavy-tailed); no SQL row
        is read beyond the deleted ids."""
        values = self.self_influence_values
        live = values[~np.isin(self.files.ids, self.examples.deleted())]
        return histogram(live, bins, log=log)

    # -------------------------------------------------------------- examples

    def example(self, key: int | str) -> Hit:
        """Look up a live example by row id (int) or external id (str).

        Raises:
            ExampleNotFound: no such example, or it was deleted.
        """
        return self.examples.example(key)

    def delete(self, key: int | str) -> Hit:
        """Remove an example from every result, for good (later versions included).

        Raises:
            ExampleNotFound: no such example, or it was already deleted.
        """
        return self.examples.delete(key)


def open_index(name: str, settings: Settings | None = None) -> Index:
    """Open the current version of index ``name``.

    Raises:
        IndexNotFound: no such index or no published version.
        StorageError: the database is unreachable, or a file of the version is missing,
            damaged or inconsistent with the others.
    """
    check_name(name)
    settings = settings or Settings.from_env()
    engine = connect(settings)
    with Session(engine) as session:
        version = current_version(session=session, name=name)
        session.expunge(version)
    return Index(name, settings, engine, version)
