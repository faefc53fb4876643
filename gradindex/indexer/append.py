"""Incremental adds: new training examples into a published index, without a pass over the old.

``add`` featurizes only the examples of a task that the index does not hold yet (by external
id), with the index's own compressor, masks and seed, and checks the task's model is the one
the index was built from. The new raw gradients (and Fisher rows) are staged beside the old
ones, at the positions after them, so a later ``refinalize`` refits the Fisher on everything.
The new version copies the old version's vectors and rows as they are (deleted examples stay
deleted) and preconditions the new ones with the old version's preconditioner: an added
example's vector is the one a full rebuild would give it under that preconditioner.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from .build_config import NO_HOOKS, BuildHooks, BuildProgressFn
from .config import CompressionConfig, PreconditionerConfig
from .errors import ConfigError, GradindexError, TaskError
from .featurize import Featurizer
from .finalize import Finalizer
from .fisher import FisherPlan
from .precondition import Preconditioner
from .settings import Settings
from .stage import BatchAccumulator, ChunkFlusher, check_json, staging_root
from .staging import Staging
from .store import (
    FaissConfig,
    connect,
    current_version,
    file_lock,
    load_manifest,
    save_manifest,
)
from .store.catalog import insert_rows
from .store.db import ExampleRow
from .store.files import RowsFile
from .task import TaskSpec

__all__ = ["AddResult", "add"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AddResult:
    """What ``add`` did."""

    version: int | None
    """The published version's number, or ``None`` when there was nothing new."""
    added: int
    """Examples featurized and published."""
    skipped: int
    """Examples of the task the index already held (by id, deleted ones included)."""


def _new_records(feat: Featurizer, known: set[str]) -> tuple[list[dict[str, Any]], int]:
    """The task's examples whose ids the index does not hold, checked like a build's."""
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    skipped = 0
    for ext_id, payload in feat.task.examples():
        key = str(ext_id)
        if key in known:
            skipped += 1
            continue
        if key in seen:
            raise TaskError(f"the task yields id {key!r} twice; ids must be unique")
        seen.add(key)
        meta = feat.task.metadata(payload)
        check_json(payload, example_id=key, field="payload")
        check_json(meta, example_id=key, field="meta")
        records.append({"id": key, "payload": payload, "meta": meta})
    return records, skipped


def _new_examples_plan(staging: Staging, seed: int, total: int) -> FisherPlan:
    """How the new examples enter the Fisher a later ``refinalize`` fits: with their own
    Fisher rows while the build fitted every example and all of them still fit its budget
    (as a build of them all would do), else by their gradients (no extra pass), like the
    examples outside a bounded Fisher's subset."""
    plan = FisherPlan.from_staged(staging.info()["fisher"], seed)
    every = plan.kind != "empirical" and plan.members() is None and (
        plan.budget is None or total * plan.rows_per_example <= plan.budget)
    if every:
        return plan
    return FisherPlan(kind="empirical", requested=plan.requested, examples=None, subset=None,
                      samples=None, classes=None, budget=None, seed=plan.seed)


def _stage_new(staging: Staging, feat: Featurizer, records: list[dict[str, Any]], start: int,
               progress: BuildProgressFn | None) -> None:
    """Featurize ``records`` into staging chunks at positions ``start, start+1, ...``, then
    record the new total (one atomic write: a kill before it leaves the index as it was)."""
    plan = _new_examples_plan(staging, feat.config.seed, start + len(records))
    batches = BatchAccumulator(feat, plan)
    per_chunk = -(-1024 // feat.config.batch_size) * feat.config.batch_size

    def on_chunk(chunks: int, written: int) -> None:
        if progress is not None:
            progress("featurize", written, len(records))

    with ChunkFlusher(staging.writer(0, 1), per_chunk, on_chunk) as flusher:
        for j, record in enumerate(records):
            flusher.add(batches.add(start + j, record))
        flusher.finish(batches)
    staging.mark_appended(start + len(records))


class _Appender(Finalizer):
    """A finalize whose vectors pass copies the old version and computes only the new rows."""

    def __init__(self, *args: Any, old_dir: Path, old_version_id: int, old_count: int,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.old_dir = old_dir
        self.old_version_id = old_version_id
        self.old_count = old_count

    def write_vectors(self, precond: Preconditioner) -> tuple[np.ndarray, np.ndarray]:
        assert self.version is not None, "begin() first"
        vectors = RowsFile(self.tmp / "vectors.npy", (self.total, self.dim))
        old = np.load(self.old_dir / "vectors.npy", mmap_mode="r")
        for lo in range(0, self.old_count, self.window):
            hi = min(lo + self.window, self.old_count)
            vectors.put(lo, old[lo:hi])
        del old
        ids = np.zeros(self.total, dtype=np.int64)
        influence = np.zeros(self.total, dtype=np.float64)
        influence[: self.old_count] = np.load(self.old_dir / "self_influence.npy")
        with self.engine.begin() as conn:
            rows = [
                {"version_id": self.version.id, "position": r.position,
                 "external_id": r.external_id, "payload": r.payload, "metadata": r.meta,
                 "self_influence": r.self_influence, "deleted": r.deleted}
                for r in Session(bind=conn).scalars(
                    select(ExampleRow).where(ExampleRow.version_id == self.old_version_id)
                    .order_by(ExampleRow.position))
            ]
            if len(rows) != self.old_count:
                raise GradindexError(
                    f"index {self.name!r}: its current version has {len(rows)} rows for "
                    f"{self.old_count} vectors; rebuild it with `gradindex build`")
            for row in rows:
                self.metadata_schema.observe(row["metadata"] or {})
            for lo in range(0, len(rows), self.window):
                part = rows[lo : lo + self.window]
                ids[lo : lo + len(part)] = insert_rows(conn=conn, rows=part)
        self._report("vectors", self.old_count)
        with vectors:
            self.write_windows(precond, self.old_count, vectors, ids, influence)
        np.save(self.tmp / "ids.npy", ids)
        np.save(self.tmp / "self_influence.npy", influence)
        return ids, influence


def add(
    settings: Settings,
    name: str,
    task: TaskSpec,
    *,
    batch_size: int | None = None,
    progress: BuildProgressFn | None = None,
    hooks: BuildHooks | None = None,
) -> AddResult:
    """Featurize the examples of ``task`` that index ``name`` does not hold and publish a
    version holding the old examples and the new ones.

    Args:
        settings: where the data directory and the database are.
        name: a published index.
        task: the task whose ``examples()`` yield the new examples (examples whose id the index
            already holds, deleted ones included, are skipped); its model must be the index's.
        batch_size: examples per model pass (default: the index's).
        progress: called with ``(phase, done, total)``.
        hooks: called at the named points of finalize.

    Raises:
        ConfigError: the task's model differs from the index's.
        GradindexError: the index's staged gradients are gone, or staged examples wait for a
            finalize.
        TaskError: the task yields an id twice, or a payload that is not plain JSON.
    """
    started = time.perf_counter()
    engine = connect(settings)
    with Session(engine) as session:
        version = current_version(session=session, name=name)
        old_dir = settings.data_dir / version.path
        old_version_id, old_count = version.id, version.count
    manifest = load_manifest(old_dir)
    staging = Staging(staging_root(settings, name) / manifest["staging_key"])
    if not staging.exists():
        raise GradindexError(
            f"the staged gradients of index {name!r} are gone; rebuild it with `gradindex build`")
    with file_lock(settings.index_dir(name) / "finalize.lock", f"add to index {name!r}"):
        if staging.discard_unrecorded():
            log.info("index %r: removed the chunks of an add that never finished", name)
        if staging.total() != old_count:
            raise GradindexError(
                f"index {name!r} has {(staging.total() or 0) - old_count} staged examples that "
                f"are not published; run `gradindex finalize {name}` first")
        compression = CompressionConfig.from_json(manifest["compression"])
        if batch_size is not None:
            compression = CompressionConfig.from_json({**compression.to_json(),
                                                       "batch_size": batch_size})
        feat = Featurizer(task.load(), compression)
        if feat.fingerprint() != manifest["model_fingerprint"]:
            raise ConfigError(
                f"the task's model is not the one index {name!r} was built from (its weights "
                "differ); build a new index for a new model")
        known = {i for _, ids in staging.ids() for i in ids}
        records, skipped = _new_records(feat, known)
        if not records:
            log.info("index %r: nothing to add (%d examples already indexed)", name, skipped)
            return AddResult(None, 0, skipped)
        pcfg = PreconditionerConfig.from_json(manifest["preconditioner"])
        _stage_new(staging, feat, records, old_count, progress)
        run = _Appender(settings, name, staging, preconditioner=pcfg,
                        faiss=FaissConfig.from_json(manifest["faiss"]),
                        window=int(staging.finalize_settings().get("window", 4096)),
                        progress=progress, hooks=hooks or NO_HOOKS,
                        old_dir=old_dir, old_version_id=old_version_id, old_count=old_count)
        run.check_ids()
        new = run.begin()
        precond = run.fit_preconditioner(Preconditioner.load(old_dir / "precond.npz"))
        ids, influence = run.write_vectors(precond)
        published = run.write_manifest(precond, run.write_faiss(ids, influence))
        published["added"] = {"from_version": manifest.get("number"), "examples": len(records)}
        save_manifest(run.tmp, json.loads(json.dumps(published)))
        run.publish(published)
    log.info("index %r version %d: %d examples added to %d in %.1fs", name, new.number,
             len(records), old_count, time.perf_counter() - started)
    return AddResult(new.number, len(records), skipped)
