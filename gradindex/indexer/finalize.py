"""Staging → a published version: fit the preconditioner, write vectors, rows and FAISS files,
then publish in one transaction (DESIGN §2).

``finalize`` runs named steps, in order, under the index's finalize lock:

1. :meth:`Finalizer.begin`: a new ``building`` version row (a fresh id, the index's next
   number, a random build id); folders no version row references (left by a killed finalize)
   are removed.
2. :meth:`Finalizer.fit_preconditioner`: one streaming pass over the staged Fisher rows.
3. :meth:`Finalizer.write_vectors`: a second pass writes preconditioned vectors,
   self-influence and the SQL rows.
4. :meth:`Finalizer.write_faiss`: the FAISS index and its relative-influence twin, or (``--store
   milvus``) the version's Milvus collection, written and loaded before the publish.
5. :meth:`Finalizer.write_manifest`.
6. :meth:`Finalizer.publish`: fsync, rename ``.tmp-v<id>`` → ``v<id>``, one transaction
   makes the version current, and the settings used become those a plain finalize reuses.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session

from .build_config import NO_HOOKS, BuildHooks, BuildProgressFn
from .config import PreconditionerConfig
from .errors import ConfigError, GradindexError, IndexNotFound
from .featurize import Block
from .filters import MetadataSchema
from .precondition import (
    FisherAccumulator,
    Preconditioner,
    self_influence,
)
from .settings import Settings, check_name
from .stage import staging_root
from .staging import Staging, duplicate_error
from .store import (
    FaissConfig,
    ScaledRows,
    build_faiss,
    connect,
    current_version,
    file_checksums,
    file_lock,
    fsync_dir,
    fsync_file,
    insert_examples,
    latest_staging_key,
    library_versions,
    load_manifest,
    measure_recall,
    publish_version,
    relative_scale,
    save_manifest,
    write_faiss,
)
from .store.catalog import NewVersion, begin_version
from .store.files import RowsFile
from .store.milvus import (
    index_versions,
    milvus_uri,
    resolve_store,
    retire_collections,
    version_ids,
    write_collection,
)

__all__ = ["Finalizer", "find_staging", "finalize", "refinalize"]

log = logging.getLogger(__name__)

_VERSION_FOLDER = re.compile(r"(\.tmp-)?v\d+")
EXACT_RECALL = {"recall_at_10": 1.0, "recall_at_10_reranked": 1.0}


def find_staging(settings: Settings, name: str) -> Staging:
    """The staging folder of the most recent featurize run of index ``name``."""
    check_name(name)
    engine = connect(settings)
    with Session(engine) as session:
        key = latest_staging_key(session=session, name=name)
    root = staging_root(settings, name)
    if key is None or not (root / key).is_dir():
        candidates = sorted(root.glob("*/staging.json"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise IndexNotFound(
                f"index {name!r} has nothing staged; run `gradindex build --name {name} ...`"
            )
        return Staging(candidates[-1].parent)
    return Staging(root / key)


def _staged_preconditioner(name: str, info: dict[str, Any],
                           pcfg: PreconditionerConfig) -> PreconditionerConfig:
    """``pcfg`` with the staged Fisher: its rows are what was staged, so the kind (``auto``
    resolves to it) and the samples must be the staged ones; the budget is the staged one.

    Raises:
        ConfigError: another kind, or other samples, were asked for.
    """
    staged = info["fisher"]
    staged_kind = staged["kind"]
    if pcfg.fisher not in ("auto", staged_kind) or (
        staged_kind == "sampled" and pcfg.samples not in (None, staged["samples"])
    ):
        raise ConfigError(
            f"index {name!r} was staged with the {staged_kind!r} Fisher"
            + (f" ({staged['samples']} samples)" if staged_kind == "sampled" else "")
            + f", not {pcfg.fisher!r}; `refinalize` can change --damping and --shape only. "
            f"Rebuild with `gradindex build ... --fisher {pcfg.fisher}` for another Fisher."
        )
    return replace(pcfg, fisher=staged_kind, samples=staged.get("samples"),
                   fisher_budget=staged.get("budget"))


class Finalizer:
    """One finalize of one index from one staging folder; its methods are the steps, in order.

    The caller holds the index's finalize lock for the whole run.

    Args:
        settings: where the data directory and the database are.
        name: the index.
        staging: its complete staging folder.
        preconditioner: Fisher shape and damping (the kind must be the staged one).
        faiss: FAISS kind and precision.
        window: examples per step of the passes over staging.
        progress: the caller's progress callback.
        hooks: the caller's hooks.
    """

    def __init__(self, settings: Settings, name: str, staging: Staging, *,
                 preconditioner: PreconditionerConfig, faiss: FaissConfig, window: int,
                 progress: BuildProgressFn | None = None, hooks: BuildHooks = NO_HOOKS,
                 store: str | None = None) -> None:
        self.settings = settings
        self.name = name
        self.staging = staging
        self.info = staging.info()
        self.preconditioner = preconditioner
        self.faiss = faiss
        self.window = window
        self.progress = progress
        self.hooks = hooks
        self.engine = connect(settings)
        self.store = resolve_store(engine=self.engine, name=name, requested=store)
        """Where the version's vectors are searched: ``faiss`` or ``milvus``."""
        self.versions = settings.index_dir(name) / "versions"
        total = staging.total()
        if total is None or not staging.complete():
            raise GradindexError(
                f"index {name!r} is not fully staged ({staging.missing()} examples missing, "
                "or a shard has not finished); run the remaining `gradindex build --shard` "
                "commands first"
            )
        self.total = total
        self.dim = int(self.info["layout"]["dim"])
        self.version: NewVersion | None = None
        self.tmp = self.versions / ".tmp"
        self.metadata_schema = MetadataSchema()
        """The metadata keys and JSON types seen by :meth:`write_vectors` (what filters check)."""

    def _report(self, phase: str, done: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, self.total)

    @property
    def seed(self) -> int:
        return int(self.info["compression"]["seed"])

    def check_ids(self) -> None:
        """Refuse an index whose staged examples share an id (across shards and runs).

        Raises:
            TaskError: naming the first few duplicated ids and their positions.
        """
        duplicates, more = self.staging.duplicate_ids()
        if duplicates:
            raise duplicate_error(duplicates, more, str(self.staging.root))

    def begin(self) -> NewVersion:
        """Create the ``building`` version row and its temporary folder, after removing every
        folder of this index that no version row references: those of versions left
        ``building`` by a killed finalize, a killed finalize's ``.tmp-v*`` folder, and a
        ``v<id>`` folder renamed just before a kill, whose publish never committed."""
        version = begin_version(engine=self.engine, name=self.name)
        self.version = version
        self.versions.mkdir(parents=True, exist_ok=True)
        live = {Path(p).name for p in version.live}
        for folder in self.versions.iterdir():
            if _VERSION_FOLDER.fullmatch(folder.name) and folder.name not in live:
                log.info("index %r: removing %s, which no version references", self.name,
                         folder)
                shutil.rmtree(folder, ignore_errors=True)
        for path in version.stale:  # a stale version's folder elsewhere (moved data dir)
            shutil.rmtree(self.settings.data_dir / path, ignore_errors=True)
        self.tmp = self.versions / f".tmp-v{version.id}"
        self.tmp.mkdir()
        return version

    def fit_preconditioner(self, fitted: Preconditioner | None = None) -> Preconditioner:
        """Pass 1: the damped Fisher over every staged example, in fixed windows of positions
        (the same sums however the chunks were staged), saved as ``precond.npz``.

        Args:
            fitted: a preconditioner already fitted on this staging with this shape, to reuse
                with this damping (no pass).
        """
        pcfg = self.preconditioner
        if fitted is not None and fitted.shape == pcfg.shape:
            precond = fitted.with_damping(pcfg.damping)
        else:
            blocks = [Block(**b) for b in self.info["blocks"]]
            acc = FisherAccumulator(blocks, pcfg.shape)
            if acc.ranges:
                for w in self.staging.windows(self.window, reuse=True, records=False):
                    if w.fisher is None:  # empirical: the raw gradients are the rows
                        acc.update(torch.from_numpy(w.raw), w.stop - w.start)
                    else:  # the subset's rows and the others' raw gradients, not concatenated
                        members = w.fisher_members()
                        acc.update(torch.from_numpy(w.fisher.reshape(-1, self.dim)), 0)
                        acc.update(torch.from_numpy(w.raw[~members]), w.stop - w.start)
                    self._report("fisher", w.stop)
            else:
                acc.count = self.total
            precond = acc.finalize(pcfg.damping)
        precond.save(self.tmp / "precond.npz")
        self.hooks.in_finalize("fitted")
        return precond

    def write_vectors(self, precond: Preconditioner) -> tuple[np.ndarray, np.ndarray]:
        """Pass 2: preconditioned vectors (``vectors.npy``), self-influence and the SQL rows,
        committed one window at a time.

        Returns:
            The rows' ids (the FAISS ids) ``[N]`` and self-influence ``[N]``, by position.
        """
        assert self.version is not None, "begin() first"
        ids = np.zeros(self.total, dtype=np.int64)
        influence = np.zeros(self.total, dtype=np.float64)
        with RowsFile(self.tmp / "vectors.npy", (self.total, self.dim)) as vectors:
            self.write_windows(precond, 0, vectors, ids, influence)
        np.save(self.tmp / "ids.npy", ids)
        np.save(self.tmp / "self_influence.npy", influence)
        return ids, influence

    def write_windows(self, precond: Preconditioner, start: int, vectors: RowsFile,
                      ids: np.ndarray, influence: np.ndarray) -> None:
        """Staged examples from position ``start`` on: preconditioned into ``vectors``, their
        self-influence into ``influence``, their SQL rows committed window by window (their
        ids into ``ids``), their metadata into the version's schema.

        A window's vectors file write, SQL rows and metadata run on a second thread while the
        next window is preconditioned (the GEMM releases the GIL): on two cores the pass takes
        the longer of the two rather than their sum. Progress and the ``rows`` hook follow
        each window's commit, on this thread, in order.
        """
        assert self.version is not None, "begin() first"
        groups = int(self.info["layout"]["groups"])
        buffers: list[torch.Tensor] = []  # two: one window written while the next is computed
        with ThreadPoolExecutor(1, thread_name_prefix="gradindex-rows") as rows:
            pending: tuple[Future[None], int] | None = None
            for n, w in enumerate(self.staging.windows(self.window, start=start, reuse=True,
                                                       defer_records=True)):
                raw = torch.from_numpy(w.raw)
                slot = n % 2
                if len(buffers) <= slot:
                    buffers.append(torch.empty(len(raw), self.dim, dtype=torch.float32))
                elif len(buffers[slot]) < len(raw):
                    buffers[slot] = torch.empty(len(raw), self.dim, dtype=torch.float32)
                vec = precond.apply(raw, out=buffers[slot][: len(raw)])
                si = self_influence(raw, vec, 1.0 / groups).numpy()
                influence[w.start : w.stop] = si
                assert w.read_records is not None
                job = rows.submit(self._write_rows, vectors, w.start, vec.numpy(),
                                  w.read_records, si, ids)
                if pending is not None:  # the window before: its buffer is free from here on
                    self._rows_written(*pending)
                pending = (job, w.stop)
            if pending is not None:
                self._rows_written(*pending)

    def _write_rows(self, vectors: RowsFile, start: int, vec: np.ndarray,
                    read_records: Callable[[], list[dict[str, Any]]], si: np.ndarray,
                    ids: np.ndarray) -> None:
        """One window's vectors into the file, its records read (their JSON parsed here, beside
        the next window's product), its metadata into the schema, its SQL rows committed
        (their ids into ``ids``)."""
        assert self.version is not None, "begin() first"
        vectors.put(start, vec)
        records = read_records()
        for rec in records:
            self.metadata_schema.observe(rec.get("meta") or {})
        with self.engine.begin() as conn:
            ids[start : start + len(records)] = insert_examples(
                conn=conn, version_id=self.version.id, start=start, records=records,
                self_influence=si,
            )

    def _rows_written(self, job: Future[None], stop: int) -> None:
        """Wait for a window's :meth:`_write_rows` (raising what it raised), then report it."""
        job.result()
        self._report("vectors", stop)
        self.hooks.in_finalize("rows")

    def write_faiss(self, ids: np.ndarray, influence: np.ndarray) -> dict[str, Any]:
        """The FAISS index over the vectors, and a second one over ``v_i / sqrt(self-influence_i)``
        for relative influence (§1), so its top-k is as exact as the first one's.

        An exact (float32 flat) index is not written at all: it would be a second copy of
        ``vectors.npy``, which searches scan directly (BLAS, in blocks), so the vectors are
        stored once. Approximate indexes hold codes and ids, and re-rank from the vectors.

        Returns:
            The manifest's ``faiss`` and ``relative`` entries (with measured recall); their
            ``file`` is ``None`` when searches scan ``vectors.npy``.
        """
        fcfg = self.faiss
        self._report("faiss", 0)
        scale, eps = relative_scale(influence)
        if self.store == "milvus":  # Milvus indexes the vectors: no FAISS file
            return self.write_collection(ids, scale, eps)
        if fcfg.exact:
            self._report("faiss", self.total)
            self.hooks.in_finalize("faiss")
            return {
                "faiss": {**fcfg.to_json(), "factory": None, "file": None, **EXACT_RECALL},
                "relative": {"file": None, "eps": eps, **EXACT_RECALL},
                "store": {"kind": "faiss"},
            }
        stored = np.load(self.tmp / "vectors.npy", mmap_mode="r")
        index = build_faiss(fcfg, stored, ids, seed=self.seed)
        write_faiss(index, self.tmp / "index.faiss")
        recall = measure_recall(index, fcfg, stored, ids, k=10)
        del index
        scaled = ScaledRows(stored, scale)
        relative = build_faiss(fcfg, scaled, ids, seed=self.seed)
        write_faiss(relative, self.tmp / "relative.faiss")
        relative_recall = measure_recall(relative, fcfg, scaled, ids, k=10)
        self._report("faiss", self.total)
        self.hooks.in_finalize("faiss")
        return {
            "faiss": {**fcfg.to_json(), "factory": fcfg.factory(self.total),
                      "file": "index.faiss", **recall},
            "relative": {"file": "relative.faiss", "eps": eps, **relative_recall},
            "store": {"kind": "faiss"},
        }

    def write_collection(self, ids: np.ndarray, scale: np.ndarray, eps: float
                         ) -> dict[str, Any]:
        """``--store milvus``: the version's Milvus collection (vectors, relative vectors, ids
        and metadata), written and loaded before :meth:`publish` (:mod:`.store.milvus`).

        Returns:
            The manifest's ``faiss`` (no file), ``relative`` and ``store`` entries.
        """
        assert self.version is not None, "begin() first"
        stored = np.load(self.tmp / "vectors.npy", mmap_mode="r")
        entry = write_collection(
            uri=milvus_uri(self.settings.vector_store, self.settings.data_dir), name=self.name,
            version_id=self.version.id, build_id=self.version.build_id,
            live=version_ids(self.version.live), engine=self.engine, vectors=stored, ids=ids,
            scale=scale, schema=self.metadata_schema, config=self.faiss,
            after_batch=self._stored)
        self.hooks.in_finalize("faiss")
        exact = EXACT_RECALL if entry["index"] == "FLAT" else {}
        return {"faiss": {**self.faiss.to_json(), "factory": None, "file": None, **exact},
                "relative": {"file": None, "eps": eps, **exact}, "store": entry}

    def _stored(self, done: int) -> None:
        self._report("faiss", done)
        self.hooks.in_finalize("store")

    def write_manifest(self, precond: Preconditioner, faiss: dict[str, Any]) -> dict[str, Any]:
        """``manifest.json``: how to rebuild the query side and how this version was made.

        ``version`` is the version's database id (the owner of its FAISS ids), ``number`` the
        one users see, ``build_id`` what ties the folder to its rows.
        """
        assert self.version is not None, "begin() first"
        info = self.info
        manifest = {
            "name": self.name,
            "version": self.version.id,
            "number": self.version.number,
            "build_id": self.version.build_id,
            "created_at": datetime.now(UTC).isoformat(),
            "task": info["task"],
            "compression": info["compression"],
            "seed": info["compression"]["seed"],
            "layout": info["layout"],
            "blocks": info["blocks"],
            "model_fingerprint": info["model_fingerprint"],
            "preconditioner": {**self.preconditioner.to_json(), "lambdas": precond.lambdas},
            "fisher": info["fisher"],
            **faiss,
            "count": self.total,
            "dim": self.dim,
            "metadata_schema": self.metadata_schema.to_json(),
            "staging_key": self.staging.key,
            "libraries": library_versions(),
            # Last: the SHA-256 of every file written above, checked whenever it is opened.
            "checksums": file_checksums(self.tmp),
        }
        save_manifest(self.tmp, manifest)
        return manifest

    def publish(self, manifest: dict[str, Any]) -> None:
        """Make the folder durable, rename it to ``v<id>``, then one transaction makes it
        current; versions beyond retention go. Afterwards this run's settings are those a
        plain ``finalize`` of the staging reuses (so a refinalized damping sticks)."""
        assert self.version is not None, "begin() first"
        for f in self.tmp.iterdir():
            fsync_file(f)
        fsync_dir(self.tmp)
        final = self.versions / f"v{self.version.id}"
        os.rename(self.tmp, final)
        fsync_dir(self.versions)
        self.hooks.in_finalize("before_publish")
        # read before retention removes the rows of the versions it drops
        milvus = self.store == "milvus" or index_versions(self.engine, self.name)[1]
        dropped = publish_version(
            engine=self.engine, version_id=self.version.id,
            path=str(final.relative_to(self.settings.data_dir)), manifest=manifest,
            count=self.total, retain=self.settings.retain_versions,
        )
        for path in dropped:
            shutil.rmtree(self.settings.data_dir / path, ignore_errors=True)
        if milvus:  # their collections go too
            retire_collections(uri=milvus_uri(self.settings.vector_store, self.settings.data_dir),
                               engine=self.engine, name=self.name)
        self.staging.save_finalize_settings(preconditioner=self.preconditioner.to_json(),
                                            faiss=self.faiss.to_json(), window=self.window)
        self.hooks.in_finalize("published")


def finalize(
    settings: Settings,
    name: str,
    *,
    staging: Staging | None = None,
    preconditioner: PreconditionerConfig | None = None,
    faiss: FaissConfig | None = None,
    fitted: Preconditioner | None = None,
    window: int | None = None,
    progress: BuildProgressFn | None = None,
    hooks: BuildHooks | None = None,
    store: str | None = None,
) -> int:
    """Fit the preconditioner over the staged gradients, write and publish a new version.

    Args:
        settings: where the data directory and the database are.
        name: the index.
        staging: which staged gradients (default: the latest build of ``name``).
        preconditioner: Fisher settings (default: those last built or published from that
            staging).
        faiss: FAISS settings (default: likewise).
        fitted: a preconditioner fitted on the same staging to reuse (refinalize with another
            damping), skipping the Fisher pass.
        window: examples per step (default: likewise).
        progress: called with ``(phase, done, total)`` for the fisher, vectors, faiss phases.
        hooks: called at the named points of :data:`~.build_config.FinalizePoint`.
        store: ``faiss`` or ``milvus`` (default: the store of the index's current version,
            else ``faiss``).

    Returns:
        The published version's number (1, 2, 3, ... within the index).

    Raises:
        ConfigError: the Fisher kind is not the staged one.
        GradindexError: the staging is incomplete, or another finalize of ``name`` runs.
        TaskError: staged examples share an id.
    """
    staging = staging or find_staging(settings, name)
    info = staging.info()
    requested = staging.finalize_settings()
    pcfg = preconditioner or PreconditionerConfig.from_json(requested.get("preconditioner", {}))
    fcfg = faiss or FaissConfig.from_json(requested.get("faiss", {}))
    window = window or int(requested.get("window", 4096))
    pcfg = _staged_preconditioner(name, info, pcfg)
    started = time.perf_counter()
    with file_lock(settings.index_dir(name) / "finalize.lock", f"finalize of index {name!r}"):
        staging.discard_unrecorded()  # the chunks of an add killed before it recorded them
        run = Finalizer(settings, name, staging, preconditioner=pcfg, faiss=fcfg, window=window,
                        progress=progress, hooks=hooks or NO_HOOKS, store=store)
        run.check_ids()
        version = run.begin()
        precond = run.fit_preconditioner(fitted)
        ids, influence = run.write_vectors(precond)
        manifest = run.write_manifest(precond, run.write_faiss(ids, influence))
        run.publish(manifest)
    log.info("index %r version %d (id %d) published: %d vectors of dim %d in %.1fs", name,
             version.number, version.id, run.total, run.dim, time.perf_counter() - started)
    return version.number


def refinalize(
    settings: Settings,
    name: str,
    *,
    damping: float | None = None,
    shape: str | None = None,
    fisher: str | None = None,
    faiss: FaissConfig | None = None,
    progress: BuildProgressFn | None = None,
    hooks: BuildHooks | None = None,
) -> int:
    """Rebuild index ``name`` from its staged gradients with another damping or shape.

    No model pass: the staged raw gradients (and Fisher rows) are reused. The settings it
    publishes become those a later plain ``finalize`` uses.

    Returns:
        The published version's number (1, 2, 3, ... within the index).

    Raises:
        ConfigError: ``fisher`` differs from the staged Fisher kind.
        GradindexError: the staged gradients were removed.
    """
    engine = connect(settings)
    with Session(engine) as session:
        version = current_version(session=session, name=name)
        manifest = load_manifest(settings.data_dir / version.path)
    staging = Staging(staging_root(settings, name) / manifest["staging_key"])
    if not staging.exists():
        raise GradindexError(
            f"the staged gradients of index {name!r} are gone ({str(staging.root)!r}); "
            "rebuild it with `gradindex build`"
        )
    old = PreconditionerConfig.from_json(manifest["preconditioner"])
    changes: dict[str, Any] = {}
    if damping is not None:
        changes["damping"] = damping
    if shape is not None:
        changes["shape"] = shape
    if fisher is not None:
        changes["fisher"] = fisher
    pcfg = replace(old, **changes)
    fitted = None
    precond_path = settings.data_dir / version.path / "precond.npz"
    # after `gradindex add` the preconditioner was fitted without the added examples: refit
    if (pcfg.shape == old.shape and pcfg.fisher == old.fisher and precond_path.exists()
            and "added" not in manifest):
        fitted = Preconditioner.load(precond_path)
    fcfg = faiss or FaissConfig.from_json(manifest["faiss"])
    return finalize(settings, name, staging=staging, preconditioner=pcfg, faiss=fcfg,
                    fitted=fitted, progress=progress, hooks=hooks)
