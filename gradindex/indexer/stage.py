"""Featurize → staging: one shard's raw compressed gradients written to disk, chunk by chunk.

``stage`` streams the task's examples, keeps this shard's batches, featurizes each batch (raw
compressed gradients and, for the ``sampled``/``expected`` Fisher, the Fisher rows) and writes
them to staging chunks. A killed run loses at most the chunk it was writing: the next run skips
every staged position. Each example is checked as it is read (plain-JSON payload and metadata,
an id not seen before in this shard), so a bad task fails before its model pass, naming the
example.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine

from .assets import task_identity
from .build_config import NO_HOOKS, BuildConfig, BuildHooks, BuildProgressFn
from .config import PreconditionerConfig
from .errors import ConfigError, TaskError
from .featurize import Featurizer, FisherBatcher, batch_fisher_rows
from .fisher import FisherPlan
from .settings import Settings
from .staging import MAX_NAMED, ChunkWriter, Staging, duplicate_error
from .store import connect, file_lock, record_progress

__all__ = [
    "BatchAccumulator",
    "ChunkFlusher",
    "StagedBatch",
    "check_json",
    "shard_size",
    "stage",
    "staging_root",
]

log = logging.getLogger(__name__)

def staging_root(settings: Settings, name: str) -> Path:
    """The folder holding every staging folder of index ``name``."""
    return settings.index_dir(name) / "staging"


def shard_size(total: int, batch_size: int, shard: int, shards: int) -> int:
    """How many of ``total`` examples shard ``shard``/``shards`` owns (whole batches, round
    robin: batch b belongs to shard b % shards)."""
    batches = -(-total // batch_size)
    size = len(range(shard, batches, shards)) * batch_size
    if batches and (batches - 1) % shards == shard:  # the last batch may be short
        size -= batches * batch_size - total
    return size


# ----------------------------------------------------------------------------- checks


def _type_name(value: Any) -> str:
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _advice(value: Any) -> str:
    if getattr(value, "ndim", None) == 0 or isinstance(value, np.generic):
        return "convert it with float(...), int(...) or bool(...) (or `.item()`)"
    if hasattr(value, "tolist"):
        return "convert it with `.tolist()`"
    return "use str, int, float, bool, None, lists and dicts with string keys only"


def check_json(value: Any, *, example_id: str, field: str) -> None:
    """Check that ``value`` is plain JSON (what the database stores and the server returns).

    Args:
        value: a payload or metadata value, walked recursively.
        example_id: the example's id, for the message.
        field: where ``value`` sits, e.g. ``payload["x"]``, for the message.

    Raises:
        TaskError: naming the example, the field and the type found, and how to convert it.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TaskError(
                f"example {example_id!r}: {field} is {value}, which JSON cannot hold; use None "
                "or drop the example"
            )
        return
    if value is None or isinstance(value, str | int):  # bool is an int
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TaskError(
                    f"example {example_id!r}: {field} has the key {key!r} of type "
                    f"{_type_name(key)}; JSON object keys are strings: convert it with str(...)"
                )
            check_json(item, example_id=example_id, field=f"{field}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_json(item, example_id=example_id, field=f"{field}[{i}]")
        return
    raise TaskError(
        f"example {example_id!r}: {field} is a {_type_name(value)}, which is not JSON; "
        f"{_advice(value)} in the task's examples()"
        + (" and metadata()" if field.startswith("meta") else "")
    )


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class StagedBatch:
    """Featurized examples, ready to be written into a chunk."""

    positions: list[int]
    """Where each example sits in ``task.examples()``."""
    raw: np.ndarray
    """``[B, dim]`` raw compressed gradients."""
    records: list[dict[str, Any]]
    """Per example ``{"id", "payload", "meta"}``."""
    fisher: np.ndarray | None
    """``[F, R, dim]`` Fisher rows of the batch's examples in the Fisher subset, for the
    ``sampled``/``expected`` Fisher."""
    fisher_positions: list[int]
    """Their positions (a subset of ``positions``)."""


class BatchAccumulator:
    """Collects a shard's examples into batches of ``batch_size`` and featurizes each one.

    Args:
        featurizer: computes the raw gradients (and Fisher rows) of a batch of payloads.
        plan: which Fisher rows to stage, and for which examples (none for ``empirical``: the
            raw gradients are its rows).
        fisher: featurizes a bounded Fisher's subset (None: every example of a batch has its
            rows computed with it).
    """

    def __init__(self, featurizer: Featurizer, plan: FisherPlan,
                 fisher: FisherBatcher | None = None) -> None:
        self.featurizer = featurizer
        self.plan = plan
        self.fisher = fisher
        self.batch_size = featurizer.config.batch_size
        self.pending: list[tuple[int, dict[str, Any]]] = []

    def add(self, position: int, record: dict[str, Any]) -> StagedBatch | None:
        """Queue one example; returns the featurized batch once it is full."""
        self.pending.append((position, record))
        return self.drain() if len(self.pending) == self.batch_size else None

    def drain(self) -> StagedBatch | None:
        """Featurize what is queued (a short last batch), if anything."""
        if not self.pending:
            return None
        positions = [pos for pos, _ in self.pending]
        payloads = [rec["payload"] for _, rec in self.pending]
        raw = self.featurizer.raw(payloads).numpy()
        fisher: np.ndarray | None
        if self.fisher is not None:
            fisher, fisher_positions = self.fisher.take()
        else:
            fisher, n = batch_fisher_rows(self.featurizer, self.plan, payloads)
            fisher_positions = positions[:n]
        batch = StagedBatch(positions, raw, [rec for _, rec in self.pending], fisher,
                            fisher_positions)
        self.pending = []
        return batch


class ChunkFlusher:
    """Holds featurized batches until they add up to a chunk, then writes it durably.

    A chunk is written on a second thread while the next one is featurized (its JSON, its
    files and their fsyncs overlap the model passes); one chunk at most is in flight, so the
    memory held is two chunks'. ``on_chunk`` is called on the caller's thread, in order, once
    a chunk is durable. Use it as a context manager: leaving it waits for a chunk in flight.

    Args:
        writer: this shard's chunk writer.
        per_chunk: examples per chunk (whole batches).
        on_chunk: called after each durable chunk with (chunks written by this run, examples
            written by this run).
    """

    def __init__(self, writer: ChunkWriter, per_chunk: int,
                 on_chunk: Callable[[int, int], None]) -> None:
        self.writer = writer
        self.per_chunk = per_chunk
        self.on_chunk = on_chunk
        self.batches: list[StagedBatch] = []
        self.chunks = 0
        self.written = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gradindex-chunks")
        self._in_flight: tuple[Future[Path], int] | None = None

    def __enter__(self) -> ChunkFlusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, batch: StagedBatch | None) -> None:
        """Hold ``batch`` (if any); write the chunk once a chunk's worth is held."""
        if batch is None:
            return
        self.batches.append(batch)
        if sum(len(b.positions) for b in self.batches) >= self.per_chunk:
            self.flush()

    def finish(self, batches: BatchAccumulator) -> None:
        """Featurize what ``batches`` still queues and write every held batch, durably."""
        self.add(batches.drain())
        self.flush()
        self._landed()

    def flush(self) -> None:
        """Start writing what is held (the last, shorter chunk at the end of a run) as one
        chunk, once the chunk before it is durable."""
        if not self.batches:
            return
        parts = self.batches
        self.batches = []
        self._landed()
        fisher = None
        if parts[0].fisher is not None:
            fisher = [b.fisher for b in parts if b.fisher is not None]
        job = self._pool.submit(
            self.writer.write,
            [p for b in parts for p in b.positions], [b.raw for b in parts],
            [r for b in parts for r in b.records], fisher,
            [p for b in parts for p in b.fisher_positions] if fisher is not None else None,
        )
        self._in_flight = (job, sum(len(b.positions) for b in parts))

    def _landed(self) -> None:
        """Wait for the chunk in flight (raising what its write raised) and report it."""
        if self._in_flight is None:
            return
        job, examples = self._in_flight
        self._in_flight = None
        job.result()
        self.chunks += 1
        self.written += examples
        self.on_chunk(self.chunks, self.written)

    def close(self) -> None:
        """Let a chunk in flight finish (it is durable progress a resumed build keeps), without
        reporting it: after an error, the caller's own error is the one to raise."""
        if self._in_flight is not None:
            self._in_flight[0].exception()  # waits; a failed write leaves no chunk behind
            self._in_flight = None
        self._pool.shutdown()


# ----------------------------------------------------------------------------- stage


def staging_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What a staging folder's vectors depend on: its settings, with the task named by its
    recorded content rather than the paths it was copied from (shards on other machines, or a
    task re-pointed by ``gradindex repair``, see other paths)."""
    task = info["task"]
    return {**info, "task": task_identity(task) if "source" in task else task}


def _open_staging(config: BuildConfig, settings: Settings, feat: Featurizer,
                  plan: FisherPlan) -> Staging:
    """The staging folder of these settings (created, or checked to match), with the build's
    requested finalize settings, the Fisher resolved, recorded in its ``build.json``."""
    pcfg = resolved_preconditioner(config, plan)
    task = config.task_spec.record(settings.data_dir)
    info = {
        "task": task,
        "compression": feat.config.to_json(),
        "fisher": plan.to_json(),
        "model_fingerprint": feat.fingerprint(),
        "layout": feat.describe(),
        "blocks": [vars(b) for b in feat.blocks],
    }
    key = hashlib.sha256(json.dumps(staging_identity(info), sort_keys=True).encode()
                         ).hexdigest()[:16]
    staging = Staging(staging_root(settings, config.name) / key)
    staging.init(info, staging_identity)
    staging.save_finalize_settings(preconditioner=pcfg.to_json(), faiss=config.faiss.to_json(),
                                   window=config.window)
    return staging


def resolved_preconditioner(config: BuildConfig, plan: FisherPlan) -> PreconditionerConfig:
    """The build's preconditioner settings with ``auto`` and the samples resolved."""
    return replace(config.preconditioner, fisher=plan.kind, samples=plan.samples)


def _plan(config: BuildConfig, feat: Featurizer,
          examples: Iterable[tuple[Any, Any]]) -> tuple[FisherPlan, Iterator[tuple[Any, Any]]]:
    """Resolve the Fisher on the first batch of ``examples`` and plan its budget over the
    training set; returns the plan and the examples, the peeked ones included.

    The example count comes from ``len(task)`` or a sized ``examples()``; failing both, and
    only when a budget needs it, from one pass over a fresh ``task.examples()``.
    """
    pcfg = config.preconditioner
    count = feat.task.count(examples)
    stream = iter(examples)
    head = list(itertools.islice(stream, feat.config.batch_size))
    if not head:
        raise TaskError("the task's examples() yields no example")
    payloads = [payload for _, payload in head]
    try:
        plan = feat.plan_fisher(pcfg, payloads, count)
    except ConfigError:
        if count is not None or pcfg.fisher_budget is None:
            raise
        log.info("counting the task's examples to plan the Fisher budget")
        count = sum(1 for _ in feat.task.examples())
        plan = feat.plan_fisher(pcfg, payloads, count)
    log.info("index %r: %s", config.name, plan.describe())
    return plan, itertools.chain(head, stream)


class _ShardRun:
    """One run of ``stage`` for one shard: which positions it owns, what it reports.

    Args:
        config: the build (its name and shard).
        engine: the database of the progress rows.
        staging: the staging folder; positions staged there by earlier runs are skipped.
        batch_size: the featurizer's batch size (shards own whole batches).
        progress: the caller's progress callback.
        hooks: the caller's hooks.
    """

    def __init__(self, config: BuildConfig, engine: Engine, staging: Staging, batch_size: int,
                 progress: BuildProgressFn | None, hooks: BuildHooks) -> None:
        self.config = config
        self.engine = engine
        self.staging = staging
        self.batch_size = batch_size
        self.progress = progress
        self.hooks = hooks
        self.done: set[int] = set()
        self.done = {p for p in staging.positions().tolist() if self.owns(p)}
        self.staged = len(self.done)
        self.total: int | None = None
        self.seen: dict[str, int] = {}
        """This run's ids of this shard → their positions."""

    def owns(self, position: int) -> bool:
        """Whether ``position`` belongs to this shard (whole batches, round robin)."""
        return (position // self.batch_size) % self.config.shards == self.config.shard

    def mine(self, position: int) -> bool:
        """Whether this run featurizes ``position``: this shard's, and not staged yet."""
        return self.owns(position) and position not in self.done

    def set_total(self, examples: int | None) -> None:
        """How many examples the task has, when known: sizes this shard's progress."""
        self.total = None if examples is None else shard_size(
            examples, self.batch_size, self.config.shard, self.config.shards)

    def report(self, status: str) -> None:
        """The progress row (informational) and the caller's progress callback."""
        record_progress(engine=self.engine, name=self.config.name, key=self.staging.key,
                        shard=self.config.shard, shards=self.config.shards, done=self.staged,
                        total=self.total, status=status)
        if self.progress is not None:
            self.progress("featurize", self.staged, self.total)

    def on_chunk(self, chunks: int, written: int) -> None:
        """After each durable chunk: progress, then the hook (a kill there loses nothing)."""
        self.staged = len(self.done) + written
        self.report("featurizing")
        self.hooks.after_chunk(chunks)

    def record(self, feat: Featurizer, position: int, ext_id: Any, payload: Any,
               rest: Iterator[tuple[int, tuple[Any, Any]]]) -> dict[str, Any]:
        """The staged record of one example, checked to be plain JSON with a new id.

        Raises:
            TaskError: the payload or metadata is not JSON, or the id was seen before (then
                ``rest`` of the stream is scanned, ids only, to name the first few).
        """
        key = str(ext_id)
        meta = feat.task.metadata(payload)
        check_json(payload, example_id=key, field="payload")
        check_json(meta, example_id=key, field="meta")
        if key in self.seen:
            raise self._duplicates(key, position, rest)
        self.seen[key] = position
        return {"id": key, "payload": payload, "meta": meta}

    def _duplicates(self, key: str, position: int,
                    rest: Iterator[tuple[int, tuple[Any, Any]]]) -> TaskError:
        found = {key: [self.seen[key], position]}
        more = False
        for pos, (other, _) in rest:
            if not self.mine(pos):
                continue
            other = str(other)
            if other in found:
                found[other].append(pos)
            elif other not in self.seen:
                self.seen[other] = pos
            elif len(found) == MAX_NAMED:
                more = True
                break
            else:
                found[other] = [self.seen[other], pos]
        return duplicate_error(found, more, str(self.staging.root))


def stage(
    config: BuildConfig,
    settings: Settings,
    *,
    progress: BuildProgressFn | None = None,
    featurizer: Featurizer | None = None,
    hooks: BuildHooks | None = None,
) -> Staging:
    """Featurize this shard's examples that are not staged yet.

    Args:
        config: what to index, how, and which shard.
        settings: where the data directory and the database are.
        progress: called with ``("featurize", done, total)``; ``total`` is known up front when
            the task has ``__len__`` or a sized ``examples()``.
        featurizer: a featurizer of ``config``'s task to reuse (default: load the task).
        hooks: called after each durable chunk (default: none).

    Returns:
        The staging folder (complete once every shard has run).

    Raises:
        TaskError: an example's payload or metadata is not plain JSON, or this shard meets an
            id twice.
    """
    engine = connect(settings)
    feat = featurizer or Featurizer(config.task_spec.load(), config.compression)
    examples = feat.task.examples()
    total = feat.task.count(examples)
    plan, examples = _plan(config, feat, examples)
    staging = _open_staging(config, settings, feat, plan)
    shard, shards = config.shard, config.shards
    lock = staging.shards_dir / f"s{shard}of{shards}.lock"
    start = time.perf_counter()
    with file_lock(lock, f"featurize of index {config.name!r} shard {shard}/{shards}"):
        run = _ShardRun(config, engine, staging, feat.config.batch_size, progress,
                        hooks or NO_HOOKS)
        run.set_total(staging.total() or total or plan.examples)
        fisher = None
        if plan.members() is not None:
            fisher = FisherBatcher(feat, plan, claims=run.mine)
        batches = BatchAccumulator(feat, plan, fisher)
        per_chunk = -(-config.chunk_size // run.batch_size) * run.batch_size
        run.report("featurizing")
        count = 0
        stream = enumerate(examples)
        with ChunkFlusher(staging.writer(shard, shards), per_chunk, run.on_chunk) as flusher:
            for pos, (ext_id, payload) in stream:
                count = pos + 1
                if fisher is not None:
                    fisher.see(pos, payload)
                if run.mine(pos):
                    flusher.add(batches.add(pos, run.record(feat, pos, ext_id, payload,
                                                            stream)))
            flusher.finish(batches)
        staging.mark_shard_done(shard, shards, count)
        run.set_total(count)
        run.report("staged")
    log.info("index %r shard %d/%d: %d examples staged in %s (%.1fs)", config.name, shard,
             shards, run.staged, staging.root, time.perf_counter() - start)
    return staging
