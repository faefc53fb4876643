"""Milvus as the vector store of a version: for indexes beyond one machine's memory.

A version built with ``--store milvus`` writes, at publish, its vectors, their example ids and
the filterable metadata to a Milvus collection of its own, ``gi_<index>_<hash>_v<version id>_
<build id>``, fully inserted, flushed and loaded before the publishing transaction makes the
version current: a reader never sees half a collection, and the collection of a publish that
died is dropped by the next publish of the index (or by ``gradindex verify``).

Searches run in Milvus with the inner-product metric, the filter translated to a Milvus
boolean expression and deleted examples excluded inside the search. Milvus proposes candidates;
their scores are recomputed from the version's memory-mapped ``vectors.npy`` (the one stored
matrix), so every score is the exact inner product the FAISS store returns, however Milvus
indexed them. Relative influence has its own vector field, ``v_i / sqrt(self-influence_i)``: its
top-k is not among the raw top-k, so it must be searched, not re-ranked.

Metadata is stored typed, one small group of fields per key, so a filter means in Milvus what
it means in SQL (:mod:`.milvus_filters` lays the fields out and translates filters); a
condition Milvus cannot decide exactly is matched in SQL, as for FAISS.

Where it connects: ``GRADINDEX_VECTOR_STORE``, a milvus-lite file (``path/milvus.db``, one
process at a time) or a server (``http://host:19530``); unset, ``milvus.db`` in the data
directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ..errors import ConfigError, GradindexError, StorageError
from ..filters import MetadataSchema, parse_filter
from .db import ExampleRow, IndexRow, IndexVersion
from .milvus_filters import MetadataLayout, Untranslatable, expression, ids_in
from .vectors import FaissConfig

if TYPE_CHECKING:
    from ..search import Searcher

__all__ = [
    "STORES",
    "MilvusSearcher",
    "MilvusVersion",
    "clean_collections",
    "close_clients",
    "collection_name",
    "drop_orphan_collections",
    "index_versions",
    "milvus_uri",
    "open_version",
    "resolve_store",
    "retire_collections",
    "version_ids",
    "write_collection",
]

log = logging.getLogger(__name__)

STORES = ("faiss", "milvus")
"""Where a version's vectors are searched: FAISS files beside them, or a Milvus collection."""

LITE_FILE = "milvus.db"
"""The milvus-lite file in the data directory, when ``GRADINDEX_VECTOR_STORE`` is unset."""

TOPK_LIMIT = 16384
"""The most results one Milvus search returns (Milvus's ``topk`` limit)."""
FLAT_MARGIN = 8
"""Candidates beyond ``k`` fetched from an exact Milvus index: Milvus's float32 dot products
may order near-ties differently from the exact re-ranking."""
INSERT_BYTES = 16 << 20
"""Bytes of vectors per insert call (gRPC messages stay far below their 64 MiB limit)."""

_COLLECTION = re.compile(r"gi_\w+_[0-9a-f]{8}_v(\d+)_[0-9a-f]+")


def _require_milvus() -> Any:
    try:
        import pymilvus
    except ImportError as exc:
        raise GradindexError(
            "the Milvus store needs pymilvus (and, for a local file, milvus-lite): "
            "`pip install 'gradindex[milvus]'` or `pip install pymilvus milvus-lite`"
        ) from exc
    return pymilvus


# ------------------------------------------------------------------ where and which


def resolve_store(*, engine: Engine, name: str, requested: str | None) -> str:
    """The store a new version of index ``name`` is written to: ``requested``, else the
    store of its current version (a refinalize or an add keeps it), else ``faiss``.

    Raises:
        ConfigError: ``requested`` is not a known store.
    """
    if requested is not None:
        if requested not in STORES:
            raise ConfigError(f"`store` must be one of {list(STORES)}, got {requested!r}")
        return requested
    with Session(engine) as session:
        manifest = session.scalar(
            select(IndexVersion.manifest).join(IndexRow, IndexRow.id == IndexVersion.index_id)
            .where(IndexRow.name == name, IndexVersion.current.is_(True)))
    store = (manifest or {}).get("store") or {}
    return str(store.get("kind") or "faiss")


def milvus_uri(vector_store: str | None, data_dir: Path) -> str:
    """The Milvus to connect to: ``GRADINDEX_VECTOR_STORE``, else a milvus-lite file in the
    data directory."""
    return vector_store or str(data_dir / LITE_FILE)


def _shown(uri: str) -> str:
    """``uri`` without credentials, for messages and logs."""
    return re.sub(r"//[^/@]*@", "//", uri)


_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def _client(uri: str) -> Any:
    """One ``MilvusClient`` per Milvus, shared by every version and thread.

    Raises:
        StorageError: Milvus cannot be reached, or the milvus-lite file is open in another
            process.
    """
    with _clients_lock:
        client = _clients.get(uri)
        if client is not None:
            return client
        pymilvus = _require_milvus()
        if uri.endswith(".db"):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            client = pymilvus.MilvusClient(uri=uri)
        except Exception as exc:  # noqa: BLE001 - pymilvus raises many kinds
            lite = (" milvus-lite serves one process at a time: stop the other one (a running "
                    "server or build), or use a Milvus server (GRADINDEX_VECTOR_STORE="
                    "http://host:19530)" if uri.endswith(".db") else "")
            raise StorageError(f"cannot open the Milvus store {_shown(uri)!r} "
                               f"({type(exc).__name__}: {exc});{lite}") from exc
        _clients[uri] = client
        return client


def close_clients() -> None:
    """Close every Milvus connection of this process (and stop its milvus-lite servers, so
    another process may open their files)."""
    with _clients_lock:
        clients = dict(_clients)
        _clients.clear()
    for uri, client in clients.items():
        client.close()
        if uri.endswith(".db"):
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(uri)


def collection_name(name: str, version_id: int, build_id: str) -> str:
    """The collection of one version: names a Milvus accepts, never shared by two indexes
    (the hash of the exact name tells ``a.b`` from ``a_b``) or two builds."""
    return f"{_prefix(name)}{int(version_id)}_{build_id}"


def _prefix(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return f"gi_{safe}_{hashlib.sha256(name.encode()).hexdigest()[:8]}_v"


def drop_orphan_collections(uri: str, name: str, keep: Iterable[int]) -> list[str]:
    """Drop the collections of index ``name`` whose version id is not in ``keep`` (those of a
    publish that died, and of versions retention removed); the caller holds the index's
    finalize lock. Returns the names dropped."""
    client = _client(uri)
    keep = {int(k) for k in keep}
    prefix = _prefix(name)
    dropped = []
    with _refusal(f"index {name!r}: Milvus ({_shown(uri)}) failed to list or drop collections"):
        collections = client.list_collections()
    for collection in collections:
        match = _COLLECTION.fullmatch(collection)
        if collection.startswith(prefix) and match and int(match.group(1)) not in keep:
            with _refusal(f"index {name!r}: Milvus ({_shown(uri)}) failed to drop {collection}"):
                client.drop_collection(collection)
            dropped.append(collection)
            log.info("index %r: dropped Milvus collection %s, which no version references",
                     name, collection)
    return dropped


def index_versions(engine: Engine, name: str) -> tuple[list[int], bool]:
    """Index ``name``'s versions that are not being built (their ids), and whether any of its
    versions (those being built included) was written to Milvus."""
    with Session(engine) as session:
        rows = session.execute(
            select(IndexVersion.id, IndexVersion.status, IndexVersion.manifest)
            .join(IndexRow, IndexRow.id == IndexVersion.index_id)
            .where(IndexRow.name == name)).all()
    live = [int(r[0]) for r in rows if r[1] != "building"]
    milvus = any(((r[2] or {}).get("store") or {}).get("kind") == "milvus" for r in rows)
    return live, milvus


def clean_collections(*, vector_store: str | None, data_dir: Path, engine: Engine,
                      name: str) -> list[str]:
    """Drop index ``name``'s collections that no published or retired version references;
    the caller holds the index's finalize lock, so
    a version still ``building`` is a dead one. Touches no Milvus when none of the index's
    versions was written there (a milvus-lite file stays free for the process that uses it)."""
    live, milvus = index_versions(engine, name)
    if not milvus:
        return []
    return drop_orphan_collections(milvus_uri(vector_store, data_dir), name, live)


def retire_collections(*, uri: str, engine: Engine, name: str) -> None:
    """After a publish of an index that has (or had, before retention) Milvus-backed
    versions: drop the collections of the versions retention removed, as their folders go.
    The publish has committed, so a Milvus that fails now is logged, not raised (the next
    publish or ``gradindex verify`` drops them)."""
    try:
        drop_orphan_collections(uri, name, index_versions(engine, name)[0])
    except GradindexError as exc:
        log.warning("index %r: old Milvus collections not dropped yet: %s", name, exc)


# ------------------------------------------------------------------ metadata layout


# ------------------------------------------------------------------ publish


def _index_params(client: Any, config: FaissConfig, n: int) -> Any:
    """A Milvus index of the kind the FAISS settings ask for, on both vector fields."""
    params = client.prepare_index_params()
    if config.kind == "hnsw":
        kind, extra = "HNSW", {"M": config.hnsw_m, "efConstruction": 80}
    elif config.kind == "ivf":
        kind = "IVF_FLAT" if config.pq is None else "IVF_PQ"
        extra = {"nlist": config.lists(n)} | ({} if config.pq is None
                                             else {"m": config.pq, "nbits": 8})
    else:
        kind, extra = "FLAT", {}
    for vector_field in ("vectors", "relative"):
        params.add_index(field_name=vector_field, index_type=kind, metric_type="IP",
                         params=extra)
    return params


def write_collection(
    *, uri: str, name: str, version_id: int, build_id: str, live: Iterable[int],
    engine: Engine, vectors: np.ndarray, ids: np.ndarray, scale: np.ndarray,
    schema: MetadataSchema, config: FaissConfig, after_batch: Callable[[int], object],
) -> dict[str, Any]:
    """Write one version's collection, completely, before it is published.

    Orphans of index ``name`` (collections of versions not in ``live`` nor this one) are
    dropped first. The rows are inserted in batches (``after_batch(done)`` after each), then
    flushed, indexed and loaded; the count Milvus reports is checked.

    Args:
        vectors: ``[N, dim]`` float32 (the memory-mapped ``vectors.npy``).
        ids: ``[N]`` example row ids, by position.
        scale: ``[N]`` factors of relative influence (:func:`.vectors.relative_scale`).
        schema: the version's metadata schema.

    Returns:
        The manifest's ``store`` entry.

    Raises:
        StorageError: Milvus refused a step, or holds another count than was written.
    """
    pymilvus = _require_milvus()
    client = _client(uri)
    drop_orphan_collections(uri, name, [*live, version_id])
    collection = collection_name(name, version_id, build_id)
    n, dim = vectors.shape
    layout = MetadataLayout.of(schema)
    fields = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    fields.add_field("id", pymilvus.DataType.INT64, is_primary=True)
    fields.add_field("vectors", pymilvus.DataType.FLOAT_VECTOR, dim=dim)
    fields.add_field("relative", pymilvus.DataType.FLOAT_VECTOR, dim=dim)
    layout.add_fields(fields, pymilvus.DataType)
    refused = f"index {name!r}: Milvus ({_shown(uri)}) refused to write collection {collection}"
    with _refusal(refused):  # the index declared up front: Milvus builds it as rows arrive
        client.create_collection(collection, schema=fields,
                                 index_params=_index_params(client, config, n))
    batch = max(1, INSERT_BYTES // (8 * dim))
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        block = np.asarray(vectors[lo:hi], dtype=np.float32)
        relative = block * scale[lo:hi, None]
        metas = _metadata(engine, version_id, lo, hi)
        rows = [{"id": int(ids[lo + i]), "vectors": block[i], "relative": relative[i],
                 **layout.row(metas[i])} for i in range(hi - lo)]
        with _refusal(refused):
            client.insert(collection, rows)
        after_batch(hi)
    with _refusal(refused):
        client.flush(collection)
        client.load_collection(collection)
        stored = _count(client, collection)
    if stored != n:
        raise StorageError(f"index {name!r}: Milvus holds {stored} rows in {collection}, "
                           f"{n} were written")
    return {"kind": "milvus", "collection": collection, "count": n,
            "index": _index_kind(config), "metadata": layout.to_json(),
            "search": {"ef": config.ef_search, "nprobe": config.nprobe}}


@contextlib.contextmanager
def _refusal(message: str) -> Iterator[None]:
    """Milvus's errors (of many kinds) as a :class:`StorageError` that says what failed."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - pymilvus raises many kinds
        raise StorageError(f"{message} ({type(exc).__name__}: {exc})") from exc


def _index_kind(config: FaissConfig) -> str:
    if config.kind == "hnsw":
        return "HNSW"
    if config.kind == "ivf":
        return "IVF_FLAT" if config.pq is None else "IVF_PQ"
    return "FLAT"


def _metadata(engine: Engine, version_id: int, lo: int, hi: int) -> list[dict[str, Any]]:
    """The metadata of positions ``[lo, hi)`` of a version, by position."""
    with Session(engine) as session:
        rows = session.execute(
            select(ExampleRow.position, ExampleRow.meta)
            .where(ExampleRow.version_id == version_id, ExampleRow.position >= lo,
                   ExampleRow.position < hi)
            .order_by(ExampleRow.position)).all()
    if [int(r[0]) for r in rows] != list(range(lo, hi)):
        raise StorageError(f"version {version_id}: the rows of positions {lo}-{hi - 1} are "
                           "not all written")
    return [dict(r[1] or {}) for r in rows]


def _count(client: Any, collection: str) -> int:
    # Strong: every flushed row, not a view that may lag by Milvus's default staleness
    got = client.query(collection, filter="", output_fields=["count(*)"],
                       consistency_level="Strong")
    return int(got[0]["count(*)"])


# ------------------------------------------------------------------ read


class MilvusVersion:
    """The Milvus collection of one published version, open for searching.

    Args:
        uri: the Milvus.
        entry: the manifest's ``store`` entry.
        label: what to name in messages (``index 'x'``).
        remedy: what to run when the collection is gone or damaged.

    Raises:
        StorageError: Milvus is unreachable, or the collection is missing or holds another
            count than the manifest says.
    """

    def __init__(self, uri: str, entry: Mapping[str, Any], *, label: str, remedy: str) -> None:
        self.uri = uri
        self.collection = str(entry["collection"])
        self.count = int(entry["count"])
        self.exact = entry.get("index", "FLAT") == "FLAT"
        self.search = dict(entry.get("search") or {"ef": 256, "nprobe": 32})
        """HNSW's ``ef`` and IVF's ``nprobe`` (the build's FAISS settings)."""
        self.layout = MetadataLayout.from_json(entry.get("metadata") or {})
        self.client = _client(uri)
        try:
            present = self.client.has_collection(self.collection)
            if present:
                self.client.load_collection(self.collection)
                stored = _count(self.client, self.collection)
        except Exception as exc:  # noqa: BLE001 - pymilvus raises many kinds
            raise StorageError(f"{label}: Milvus ({_shown(uri)}) cannot serve collection "
                               f"{self.collection} ({type(exc).__name__}: {exc}); {remedy}"
                               ) from exc
        if not present:
            raise StorageError(f"{label}: its Milvus collection {self.collection} is missing "
                               f"from {_shown(uri)}; {remedy}")
        if stored != self.count:
            raise StorageError(f"{label}: its Milvus collection {self.collection} holds "
                               f"{stored} rows, the manifest {self.count}; {remedy}")

    def where(self, filter: Any, schema: MetadataSchema | None) -> str | None:
        """The filter as a Milvus expression; None without a filter, or when some condition
        must be matched in SQL.

        Raises:
            ConfigError: the filter is malformed (as :func:`..filters.parse_filter`).
        """
        node = parse_filter(filter, schema)
        if node is None:
            return None
        try:
            return expression(node, self.layout)
        except Untranslatable:
            return None

    def candidates(self, queries: np.ndarray, limit: int, *, field: str,
                   expr: str | None) -> np.ndarray:
        """Milvus's top-``limit`` ids ``[Q, limit]`` by inner product (-1 where fewer match).

        Raises:
            StorageError: Milvus failed the search.
        """
        out = np.full((len(queries), limit), -1, dtype=np.int64)
        try:
            found = self.client.search(
                self.collection, data=[np.asarray(q, dtype=np.float32) for q in queries],
                anns_field=field, limit=limit, filter=expr or "", output_fields=[],
                search_params={"metric_type": "IP", "params": self._params(limit)})
        except Exception as exc:  # noqa: BLE001 - pymilvus raises many kinds
            raise StorageError(f"Milvus ({_shown(self.uri)}) failed a search of "
                               f"{self.collection} ({type(exc).__name__}: {exc})") from exc
        for i, hits in enumerate(found):
            got = [int(h["id"]) for h in hits][:limit]
            out[i, : len(got)] = got
        return out

    def _params(self, limit: int) -> dict[str, Any]:
        if self.exact:
            return {}
        # HNSW needs ef >= the results asked for
        return {"ef": max(limit, int(self.search["ef"])), "nprobe": int(self.search["nprobe"])}


class MilvusSearcher:
    """:class:`..search.Searcher`'s ``top_k`` over a Milvus collection, with exact scores.

    Milvus proposes candidates (the filter and the deletions applied inside its search); the
    base searcher (over the same vectors, memory-mapped) re-ranks them exactly, and scans a
    small ``include`` set itself, as it does for FAISS.

    Args:
        store: the version's collection.
        base: the searcher of the same vectors (raw or relative).
        field: ``vectors`` or ``relative``.
        oversample: candidates per result when Milvus's index is approximate.
    """

    def __init__(self, store: MilvusVersion, base: Searcher, *, field: str,
                 oversample: int = 4) -> None:
        self.store = store
        self.base = base
        self.field = field
        self.oversample = oversample

    @property
    def count(self) -> int:
        return self.base.count

    def scores(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return self.base.scores(queries, rows)

    def top_k(
        self, queries: np.ndarray, k: int, *, direction: str = "proponents",
        include: np.ndarray | None = None, exclude: np.ndarray | None = None,
        where: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`..search.Searcher.top_k`; ``where`` is a Milvus expression that results
        must meet too (a translated filter).

        Raises:
            ConfigError: ``k`` beyond what one Milvus search returns.
        """
        if include is not None and len(include) <= self.base.scan_limit:
            return self.base.top_k(queries, k, direction=direction, include=include,
                                   exclude=exclude)
        if direction not in ("proponents", "opponents"):
            return self.base.top_k(queries, k, direction=direction)  # raises its ConfigError
        sign = 1.0 if direction == "proponents" else -1.0
        signed = sign * np.asarray(queries, dtype=np.float32)
        wide = k + FLAT_MARGIN if self.store.exact else k * self.oversample
        limit = min(self.count, wide, TOPK_LIMIT)
        if k > TOPK_LIMIT:
            raise ConfigError(f"`k` must be at most {TOPK_LIMIT} on a Milvus-backed index, "
                              f"got {k}")
        if limit == 0:
            return (np.full((len(signed), k), -sign * np.inf, dtype=np.float32),
                    np.full((len(signed), k), -1, dtype=np.int64))
        parts = [f"({where})"] if where else []
        if include is not None:
            parts.append(ids_in(include))
        if exclude is not None and len(exclude):
            parts.append(f"not ({ids_in(exclude)})")
        expr = " and ".join(parts) or None
        candidates = self.store.candidates(signed, limit, field=self.field, expr=expr)
        s, ids = self.base.rerank(signed, candidates, k)
        return sign * s, ids


def open_version(*, vector_store: str | None, data_dir: Path, entry: Mapping[str, Any],
                 label: str, remedy: str) -> MilvusVersion:
    """The Milvus collection a manifest's ``store`` entry names."""
    return MilvusVersion(milvus_uri(vector_store, data_dir), entry, label=label, remedy=remedy)


def version_ids(paths: Sequence[str]) -> list[int]:
    """Version ids of version folders ``.../v<id>``."""
    out = []
    for p in paths:
        m = re.fullmatch(r"v(\d+)", Path(p).name)
        if m:
            out.append(int(m.group(1)))
    return out
