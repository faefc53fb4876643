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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from .errors import ExampleNotFound
from .examples import ExampleStore, Filter, Hit
from .search import IdRows, Searcher, as_queries, check_search, histogram, relative_vectors
from .settings import Settings, check_name
from .store import IndexVersion, connect, current_version
from .version import VersionFiles

__all__ = ["ExampleNotFound", "Filter", "Hit", "Index", "open_index"]


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
        self.examples = ExampleStore(engine, name=name, version=self.version_id)
        self.files.check(*self.examples.row_ids())
        self._rows = IdRows(self.files.ids, label=f"index {name!r} version {self.version}")
        self.searcher = Searcher(self.files.vectors, self._rows, index=self.files.faiss,
                                 config=self.files.faiss_config)

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
        """Whether relative influence searches its own FAISS index (else an exact scan)."""
        return self.files.relative_faiss is not None

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
    def relative_searcher(self) -> Searcher:
        """The searcher of relative influence, ``v_i / sqrt(max(self-influence_i, eps))``."""
        eps = (self.manifest.get("relative") or {}).get("eps")
        vectors = relative_vectors(self.files.vectors, self.self_influence_values, eps)
        return Searcher(vectors, self._rows, index=self.files.relative_faiss,
                        config=self.files.faiss_config)

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
    ) -> list[list[Hit]]:
        """Top-``k`` proponents (highest scores) or opponents (lowest) per query vector.

        Args:
            queries: query vectors ``[Q, dim]`` (:func:`~.query.query_vectors`).
            k: results per query.
            direction: ``proponents`` or ``opponents`` (the search of the negated query).
            filter: restrict to examples whose metadata match (see :data:`Filter`).
            normalize: rank by relative influence, ``score / sqrt(self-influence)`` (RelatIF,
                Barshan et al. 2020); the hits' scores are then those relative scores.

        Returns:
            Per query, up to ``k`` hits sorted by strength; scores are exact inner products.
        """
        check_search(k, direction)
        q = self._queries(queries)
        include = self.examples.matching(filter)
        exclude = None if include is not None else self.examples.deleted()
        searcher = self.relative_searcher if normalize else self.searcher
        scores, ids = searcher.top_k(q, k, direction=direction, include=include,
                                     exclude=exclude)
        return [self.examples.hits(ids[i], scores[i]) for i in range(len(q))]

    def select(
        self, queries: torch.Tensor | np.ndarray, k: int = 10, *, filter: Filter | None = None,
        normalize: bool = False,
    ) -> list[Hit]:
        """Training examples ranked by mean influence over a set of queries (data selection)."""
        q = self._queries(queries)
        return self.search(q.mean(axis=0, keepdims=True), k, filter=filter,
                           normalize=normalize)[0]

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
        offset: int = 0,
    ) -> list[Hit]:
        """Examples ranked by self-influence (outlier and mislabel candidates first).

        ``offset`` skips that many of the ranking (pages of ``limit``)."""
        return self.examples.self_influence_page(limit=limit, offset=offset,
                                                 descending=descending, filter=filter)

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
