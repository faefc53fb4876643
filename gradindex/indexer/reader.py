"""Reading a published index: search, exact scores, self-influence, look-up and delete.

:func:`open_index` pins the version that is current at that moment; everything an
:class:`Index` returns comes from that one version (its FAISS file, its vectors and its SQL
rows), so a publish running meanwhile is never seen half-done. Deleted examples and metadata
filters are applied inside the search (FAISS id selectors, or an exact scan of the matching
rows), so a filtered top-k is the top-k of the matching examples. Relative influence
(``normalize=True``) searches a second FAISS index over ``v_i / sqrt(self-influence_i)``;
versions written before it existed are scanned exactly instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import ColumnElement, Engine, and_, func, or_, select, type_coerce, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from .config import CompressionConfig
from .errors import ConfigError, ExampleNotFound
from .featurize import Featurizer
from .settings import Settings, check_name
from .store import (
    ExampleRow,
    FaissConfig,
    IndexVersion,
    ScaledRows,
    StorageError,
    connect,
    current_version,
    exact_topk,
    faiss_ids,
    load_manifest,
    read_faiss,
    relative_scale,
    search_faiss,
)
from .task import TaskSpec

__all__ = ["ExampleNotFound", "Hit", "Index", "check_index", "open_index"]

log = logging.getLogger(__name__)

Filter = Mapping[str, Any]
"""``{"field": value}`` (equality) or ``{"field": [v1, v2]}`` (membership) on metadata; all
fields must match."""

EXACT_SCAN_LIMIT = 200_000
"""A filter matching at most this many examples is searched by an exact scan of their rows."""

DIRECTIONS = ("proponents", "opponents")


@dataclass(frozen=True)
class Hit:
    """A training example with its score against a query."""

    id: int
    """Row id (the FAISS id)."""
    external_id: str
    """The id the task gave the example."""
    score: float
    payload: Any
    meta: dict[str, Any]
    self_influence: float


def _scalar_ok(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _check_filter(filter: Filter | None) -> dict[str, list[Any]]:
    if filter is None:
        return {}
    if not isinstance(filter, Mapping):
        raise ConfigError(f"`filter` must be an object of metadata fields, got {filter!r}")
    out: dict[str, list[Any]] = {}
    for key, value in filter.items():
        values = list(value) if isinstance(value, list | tuple) else [value]
        if not isinstance(key, str) or not key or not all(_scalar_ok(v) for v in values):
            raise ConfigError(
                f"`filter` field {key!r} must map to a value or a list of values (strings, "
                f"numbers, booleans), got {value!r}"
            )
        if not values:
            raise ConfigError(f"`filter` field {key!r} has an empty list of values")
        out[key] = values
    return out


def _condition(engine: Engine, key: str, values: list[Any]) -> ColumnElement[bool]:
    """SQL for ``meta[key] in values``, exact on JSON values on both backends."""
    if engine.dialect.name == "postgresql":
        meta = type_coerce(ExampleRow.meta, JSONB)
        return or_(*[meta.contains({key: v}) for v in values])  # jsonb @>
    path = '$."' + key.replace('"', '\\"') + '"'
    extracted = func.json_extract(ExampleRow.meta, path)
    typed = func.json_type(ExampleRow.meta, path)
    parts = []
    for v in values:
        if v is None:
            parts.append(typed == "null")
        elif isinstance(v, bool):
            parts.append(typed == ("true" if v else "false"))
        elif isinstance(v, str):
            parts.append(and_(typed == "text", extracted == v))
        else:
            parts.append(and_(typed.in_(["integer", "real"]), extracted == v))
    return or_(*parts)


class Index:
    """One published version of a named index, open for reading.

    Args:
        name: the index.
        settings: storage locations.
        engine: the database engine.
        version: the version row to read.
        device: where the featurizer computes query gradients (default: cuda when available).
    """

    def __init__(self, name: str, settings: Settings, engine: Engine,
                 version: IndexVersion, *, device: str | None = None) -> None:
        self.name = name
        self.device = device
        self.settings = settings
        self.engine = engine
        self.version = int(version.id)
        self.folder = settings.data_dir / version.path
        self.manifest = load_manifest(self.folder)
        if int(self.manifest.get("version", self.version)) != self.version:
            raise StorageError(
                f"index {name!r}: folder {str(self.folder)!r} holds version "
                f"{self.manifest.get('version')}, the database says {self.version}"
            )
        self.faiss_config = FaissConfig.from_json(self.manifest["faiss"])
        self.faiss = read_faiss(self.folder / "index.faiss")
        self.vectors: np.ndarray = np.load(self.folder / "vectors.npy", mmap_mode="r")
        self.ids: np.ndarray = np.load(self.folder / "ids.npy")
        self._order = np.argsort(self.ids, kind="stable")
        relative = self.manifest.get("relative") or {}
        self.relative_faiss: Any | None = None
        if relative.get("file"):
            self.relative_faiss = read_faiss(self.folder / relative["file"])
        self._relative: ScaledRows | None = None
        self._featurizer: Featurizer | None = None
        check_index(self)

    # -------------------------------------------------------------- properties

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def featurizer(self) -> Featurizer:
        """The task's featurizer, rebuilt from the manifest on first use."""
        if self._featurizer is None:
            spec = self.manifest["task"]
            feat = Featurizer(TaskSpec(spec["spec"], spec["args"]).load(),
                              CompressionConfig.from_json(self.manifest["compression"]),
                              device=self.device)
            expected = self.manifest.get("model_fingerprint") or []
            if expected and feat.fingerprint() != expected:
                raise StorageError(
                    f"index {self.name!r} was built from other model weights than the task "
                    "now loads; rebuild the index or restore the weights"
                )
            if feat.dim != self.dim:
                raise StorageError(
                    f"index {self.name!r} holds vectors of dim {self.dim}, the featurizer "
                    f"makes {feat.dim}"
                )
            self._featurizer = feat
        return self._featurizer

    def queries(self, payloads: Sequence[dict[str, Any]]) -> torch.Tensor:
        """Query vectors ``[Q, dim]`` of test payloads (batched by the build's batch size)."""
        feat = self.featurizer
        bs = feat.config.batch_size
        return torch.cat([feat.query(list(payloads[lo : lo + bs]))
                          for lo in range(0, len(payloads), bs)])

    def is_current(self) -> bool:
        """Whether this is still the published version."""
        with Session(self.engine) as session:
            return int(current_version(session=session, name=self.name).id) == self.version

    # -------------------------------------------------------------- helpers

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row numbers of ``vectors`` for example ids."""
        pos = np.searchsorted(self.ids, ids, sorter=self._order)
        pos = np.clip(pos, 0, len(self.ids) - 1)
        rows = self._order[pos]
        if len(ids) and not np.array_equal(self.ids[rows], ids):
            raise ExampleNotFound(f"some ids are not in index {self.name!r} version "
                                  f"{self.version}")
        return rows

    def _deleted(self) -> np.ndarray:
        with Session(self.engine) as session:
            ids = session.scalars(select(ExampleRow.id).where(
                ExampleRow.version_id == self.version, ExampleRow.deleted)).all()
        return np.asarray(ids, dtype=np.int64)

    def _matching(self, conditions: dict[str, list[Any]]) -> np.ndarray:
        where = [ExampleRow.version_id == self.version, ExampleRow.deleted.is_(False)]
        where += [_condition(self.engine, k, v) for k, v in conditions.items()]
        with Session(self.engine) as session:
            ids = session.scalars(select(ExampleRow.id).where(*where)).all()
        return np.sort(np.asarray(ids, dtype=np.int64))

    def _hits(self, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        keep = ids >= 0
        ids, scores = ids[keep], scores[keep]
        if not len(ids):
            return []
        with Session(self.engine) as session:
            rows = {r.id: r for r in session.scalars(
                select(ExampleRow).where(ExampleRow.id.in_(ids.tolist()),
                                         ExampleRow.version_id == self.version))}
        if len(rows) != len(set(ids.tolist())):
            raise StorageError(
                f"index {self.name!r} version {self.version} was retired while in use; "
                "open the index again"
            )
        return [Hit(int(i), rows[int(i)].external_id, float(s), rows[int(i)].payload,
                    dict(rows[int(i)].meta or {}), float(rows[int(i)].self_influence))
                for i, s in zip(ids, scores, strict=True)]

    def _as_queries(self, queries: torch.Tensor | np.ndarray) -> np.ndarray:
        q = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else queries
        q = np.asarray(q, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ConfigError(f"queries must be [Q, {self.dim}], got {tuple(q.shape)}")
        return q

    def _exact_scores(self, q: np.ndarray, rows: np.ndarray,
                      vectors: np.ndarray | ScaledRows | None = None) -> np.ndarray:
        vectors = self.vectors if vectors is None else vectors
        return q @ np.asarray(vectors[np.sort(rows)], dtype=np.float32).T

    @property
    def relative_vectors(self) -> ScaledRows:
        """The vectors of relative influence, ``v_i / sqrt(max(self-influence_i, eps))``."""
        if self._relative is None:
            eps = (self.manifest.get("relative") or {}).get("eps")
            scale = relative_scale(self.self_influence_values, eps)[0]
            self._relative = ScaledRows(self.vectors, scale)
        return self._relative

    @functools.cached_property
    def self_influence_values(self) -> np.ndarray:
        """Self-influence of every stored example, by position (deleted ones included)."""
        path = self.folder / "self_influence.npy"
        if path.is_file():
            return np.load(path)
        with Session(self.engine) as session:  # a version written before the file existed
            return np.asarray(session.scalars(
                select(ExampleRow.self_influence)
                .where(ExampleRow.version_id == self.version)
                .order_by(ExampleRow.position)).all(), dtype=np.float64)

    def self_influence_histogram(
        self, bins: int = 40, *, log: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Histogram ``(edges [bins+1], counts [bins])`` of the live examples' self-influence,
        with ``log`` bins evenly spaced in log10 (self-influence is heavy-tailed); no SQL row
        is read beyond the deleted ids."""
        if not isinstance(bins, int) or not 1 <= bins <= 1000:
            raise ConfigError(f"`bins` must be an integer in [1, 1000], got {bins!r}")
        values = self.self_influence_values
        live = values[~np.isin(self.ids, self._deleted())]
        if log:
            live = live[live > 0]
        if not len(live):
            return np.linspace(0.0, 1.0, bins + 1), np.zeros(bins, dtype=np.int64)
        if log:
            edges = np.logspace(np.log10(live.min()), np.log10(live.max()), bins + 1)
            counts, edges = np.histogram(live, bins=edges)
        else:
            counts, edges = np.histogram(live, bins=bins)
        return edges, counts

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
            queries: query vectors ``[Q, dim]`` (:meth:`queries`).
            k: results per query.
            direction: ``proponents`` or ``opponents`` (the search of the negated query).
            filter: restrict to examples whose metadata match (see :data:`Filter`).
            normalize: rank by relative influence, ``score / sqrt(self-influence)`` (RelatIF,
                Barshan et al. 2020); the hits' scores are then those relative scores.

        Returns:
            Per query, up to ``k`` hits sorted by strength; scores are exact inner products.
        """
        if direction not in DIRECTIONS:
            raise ConfigError(f"`direction` must be one of {list(DIRECTIONS)}, got {direction!r}")
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"`k` must be a positive integer, got {k!r}")
        q = self._as_queries(queries)
        sign = 1.0 if direction == "proponents" else -1.0
        signed = sign * q
        conditions = _check_filter(filter)
        include = self._matching(conditions) if conditions else None
        exclude = None if include is not None else self._deleted()
        vectors: np.ndarray | ScaledRows = self.vectors
        index = self.faiss
        if normalize:
            vectors, index = self.relative_vectors, self.relative_faiss
            if index is None and include is None:  # no relative FAISS file: scan the live rows
                include = np.setdiff1d(self.ids, exclude if exclude is not None else [])
                exclude = None
        if include is not None and (len(include) <= EXACT_SCAN_LIMIT or index is None):
            s, rows = exact_topk(vectors, self._rows_of(np.sort(include)), signed, k)
            ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
        elif self.faiss_config.exact:
            s, ids = search_faiss(index, self.faiss_config, signed, k, include=include,
                                  exclude=exclude)
        else:
            wide = min(self.count, k * self.faiss_config.oversample)
            _, cand = search_faiss(index, self.faiss_config, signed, wide, include=include,
                                   exclude=exclude)
            s = np.full((len(q), k), -np.inf, dtype=np.float32)
            ids = np.full((len(q), k), -1, dtype=np.int64)
            for i in range(len(q)):
                c = np.sort(cand[i][cand[i] >= 0])
                if not len(c):
                    continue
                sc = self._exact_scores(signed[i : i + 1], self._rows_of(c), vectors)[0]
                top = np.argsort(-sc, kind="stable")[:k]
                s[i, : len(top)], ids[i, : len(top)] = sc[top], c[top]
        return [self._hits(ids[i], sign * s[i]) for i in range(len(q))]

    def select(
        self, queries: torch.Tensor | np.ndarray, k: int = 10, *, filter: Filter | None = None,
        normalize: bool = False,
    ) -> list[Hit]:
        """Training examples ranked by mean influence over a set of queries (data selection)."""
        q = self._as_queries(queries)
        return self.search(q.mean(axis=0, keepdims=True), k, filter=filter,
                           normalize=normalize)[0]

    def scores(
        self, queries: torch.Tensor | np.ndarray, ids: Sequence[str] | None = None
    ) -> tuple[list[str], np.ndarray]:
        """Exact scores ``[Q, len(ids)]`` against the given external ids (default: all live).

        Raises:
            ExampleNotFound: an id is not in the index, or was deleted.
        """
        q = self._as_queries(queries)
        where = [ExampleRow.version_id == self.version, ExampleRow.deleted.is_(False)]
        with Session(self.engine) as session:
            if ids is None:
                found = session.execute(select(ExampleRow.external_id, ExampleRow.position)
                                        .where(*where).order_by(ExampleRow.position)).all()
                names = [r[0] for r in found]
                rows = np.asarray([r[1] for r in found], dtype=np.int64)
            else:
                wanted = [str(i) for i in ids]
                found = session.execute(select(ExampleRow.external_id, ExampleRow.position)
                                        .where(*where, ExampleRow.external_id.in_(wanted))).all()
                where_of = {r[0]: int(r[1]) for r in found}
                missing = [i for i in wanted if i not in where_of]
                if missing:
                    raise ExampleNotFound(
                        f"index {self.name!r} has no (live) example with id(s) "
                        f"{[m if len(m) <= 80 else m[:77] + '...' for m in missing[:10]]}"
                        + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
                names = wanted
                rows = np.asarray([where_of[i] for i in wanted], dtype=np.int64)
        out = np.zeros((len(q), len(rows)), dtype=np.float32)
        for lo in range(0, len(rows), 65536):
            part = rows[lo : lo + 65536]
            out[:, lo : lo + len(part)] = q @ np.asarray(self.vectors[part], dtype=np.float32).T
        return names, out

    def self_influence(
        self, limit: int = 100, *, filter: Filter | None = None, descending: bool = True,
        offset: int = 0,
    ) -> list[Hit]:
        """Examples ranked by self-influence (outlier and mislabel candidates first).

        ``offset`` skips that many of the ranking (pages of ``limit``)."""
        if not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"`limit` must be a positive integer, got {limit!r}")
        if not isinstance(offset, int) or offset < 0:
            raise ConfigError(f"`offset` must be a non-negative integer, got {offset!r}")
        where = [ExampleRow.version_id == self.version, ExampleRow.deleted.is_(False)]
        where += [_condition(self.engine, k, v) for k, v in _check_filter(filter).items()]
        order = ExampleRow.self_influence.desc() if descending else ExampleRow.self_influence
        with Session(self.engine) as session:
            rows = session.scalars(select(ExampleRow).where(*where)
                                   .order_by(order, ExampleRow.id).offset(offset)
                                   .limit(limit)).all()
            return [Hit(r.id, r.external_id, float(r.self_influence), r.payload,
                        dict(r.meta or {}), float(r.self_influence)) for r in rows]

    # -------------------------------------------------------------- examples

    def _where_key(self, key: int | str) -> ColumnElement[bool]:
        if isinstance(key, int) and not isinstance(key, bool):
            return ExampleRow.id == key
        return ExampleRow.external_id == str(key)

    def example(self, key: int | str) -> Hit:
        """Look up a live example by row id (int) or external id (str).

        Raises:
            ExampleNotFound: no such example, or it was deleted.
        """
        with Session(self.engine) as session:
            row = session.scalar(select(ExampleRow).where(
                ExampleRow.version_id == self.version, self._where_key(key),
                ExampleRow.deleted.is_(False)))
            if row is None:
                raise ExampleNotFound(f"index {self.name!r} has no example {key!r}")
            return Hit(row.id, row.external_id, 0.0, row.payload, dict(row.meta or {}),
                       float(row.self_influence))

    def delete(self, key: int | str) -> Hit:
        """Remove an example from every result, for good (later versions included).

        Raises:
            ExampleNotFound: no such example, or it was already deleted.
        """
        hit = self.example(key)
        with Session(self.engine) as session, session.begin():
            versions = select(IndexVersion.id).where(
                IndexVersion.index_id == select(IndexVersion.index_id)
                .where(IndexVersion.id == self.version).scalar_subquery())
            session.execute(update(ExampleRow).where(
                ExampleRow.version_id.in_(versions),
                ExampleRow.external_id == hit.external_id).values(deleted=True))
        log.info("index %r: example %r deleted", self.name, hit.external_id)
        return hit


def check_index(index: Index) -> None:
    """Check that the FAISS ids, the stored vectors and the version's SQL rows agree.

    Raises:
        StorageError: they do not; the index must be rebuilt (``gradindex refinalize``).
    """
    in_faiss = faiss_ids(index.faiss)
    problem = None
    if int(index.faiss.ntotal) != index.count or len(index.ids) != index.count:
        problem = (f"FAISS holds {index.faiss.ntotal} vectors, vectors.npy {index.count}, "
                   f"ids.npy {len(index.ids)}")
    elif not np.array_equal(in_faiss, index.ids):
        problem = "FAISS ids differ from ids.npy"
    elif index.relative_faiss is not None and not (
        int(index.relative_faiss.ntotal) == index.count
        and np.array_equal(faiss_ids(index.relative_faiss), index.ids)
    ):
        problem = "the relative-influence FAISS ids differ from ids.npy"
    else:
        with Session(index.engine) as session:
            sql = session.execute(select(ExampleRow.id, ExampleRow.position)
                                  .where(ExampleRow.version_id == index.version)
                                  .order_by(ExampleRow.position)).all()
        sql_ids = np.asarray([r[0] for r in sql], dtype=np.int64)
        positions = np.asarray([r[1] for r in sql], dtype=np.int64)
        if len(sql_ids) != index.count:
            problem = f"the database has {len(sql_ids)} rows, FAISS {index.count} vectors"
        elif not (np.array_equal(sql_ids, index.ids)
                  and np.array_equal(positions, np.arange(index.count))):
            problem = "FAISS ids differ from the database's example ids"
    if problem is not None:
        raise StorageError(
            f"index {index.name!r} version {index.version} is inconsistent: {problem}; "
            f"rebuild it with `gradindex refinalize {index.name}`"
        )


def open_index(name: str, settings: Settings | None = None, *, device: str | None = None
               ) -> Index:
    """Open the current version of index ``name``.

    Args:
        device: where its featurizer computes query gradients (default: cuda when available).

    Raises:
        IndexNotFound: no such index or no published version.
        StorageError: the database is unreachable or the index is inconsistent.
    """
    check_name(name)
    settings = settings or Settings.from_env()
    engine = connect(settings)
    with Session(engine) as session:
        version = current_version(session=session, name=name)
        session.expunge(version)
    folder = Path(settings.data_dir / version.path)
    if not folder.is_dir():
        raise StorageError(f"index {name!r}: version folder {str(folder)!r} is missing")
    return Index(name, settings, engine, version, device=device)
