"""The build pipeline: featurize → staging → finalize → publish (DESIGN §2).

``stage`` streams the task's examples in batches and writes raw compressed gradients (and, for
the ``sampled``/``expected`` Fisher, the Fisher rows) to staging chunks; it resumes where a
killed run stopped and splits across shards. ``finalize`` streams the staged chunks twice, once
to fit the preconditioner and once to write preconditioned vectors, SQL rows and the FAISS file
into a new version folder, then ``publish`` makes that version current in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session

from .config import CompressionConfig, PreconditionerConfig
from .errors import ConfigError, GradindexError, IndexNotFound
from .featurize import Block, Featurizer
from .precondition import FisherAccumulator, Preconditioner, self_influence
from .settings import Settings, check_name
from .staging import Staging
from .store import (
    FaissConfig,
    ScaledRows,
    begin_version,
    build_faiss,
    connect,
    current_version,
    file_lock,
    fsync_dir,
    fsync_file,
    insert_examples,
    latest_staging_key,
    library_versions,
    load_manifest,
    measure_recall,
    publish_version,
    record_progress,
    relative_scale,
    save_manifest,
    write_atomic,
    write_faiss,
)
from .task import TaskSpec

__all__ = [
    "BuildConfig",
    "BuildProgressFn",
    "build",
    "finalize",
    "parse_shard",
    "refinalize",
    "shard_from_env",
    "stage",
]

log = logging.getLogger(__name__)

BuildProgressFn = Callable[[str, int, "int | None"], None]
"""Called with ``(phase, done, total)``; phases: featurize, fisher, vectors, faiss."""

PAUSE_CHUNKS_ENV = "GRADINDEX_TEST_PAUSE_AFTER_CHUNKS"
PAUSE_FINALIZE_ENV = "GRADINDEX_TEST_PAUSE_IN_FINALIZE"
PAUSED_MARK = "GRADINDEX_TEST_PAUSED"


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``gradindex build`` is told: what to index, how, and which shard."""

    name: str
    """Index name (a folder name: letters, digits, '.', '_', '-')."""

    task: str
    """Task spec, ``package.module:Name`` or ``path/to/file.py:Name``."""

    task_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the task's constructor."""

    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """Compressor, keep/dim, masks, seed and batch size."""

    preconditioner: PreconditionerConfig = field(default_factory=PreconditionerConfig)
    """Fisher kind, shape and damping."""

    faiss: FaissConfig = field(default_factory=FaissConfig)
    """FAISS index kind and precision."""

    shard: int = 0
    """This process's shard, in [0, `shards`): it featurizes the batches b (examples
    [b·batch_size, (b+1)·batch_size)) with b % shards == shard, so every batch holds the same
    examples as in a one-process build and the vectors come out bit-identical."""

    shards: int = 1
    """Number of shards; with more than one, a build only stages and a later finalize merges."""

    chunk_size: int = 1024
    """Examples per staging chunk (rounded up to whole batches): the unit a killed build loses."""

    window: int = 4096
    """Examples per finalize step (memory: `window` × dim floats, times R for Fisher rows)."""

    def __post_init__(self) -> None:
        check_name(self.name)
        if not isinstance(self.shards, int) or self.shards < 1:
            raise ConfigError(f"`shards` must be a positive integer, got {self.shards!r}")
        if not isinstance(self.shard, int) or not 0 <= self.shard < self.shards:
            raise ConfigError(f"`shard` must be in [0, {self.shards}), got {self.shard!r}")
        for name in ("chunk_size", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"`{name}` must be a positive integer, got {value!r}")

    @property
    def task_spec(self) -> TaskSpec:
        return TaskSpec(self.task, self.task_args)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``.

    Raises:
        ConfigError: the text is not of that form.
    """
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ConfigError(f"`shard` must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"`shard` must be i/n with 0 <= i < n, got {text!r}")
    return i, n


def shard_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard ``torchrun`` assigns through ``RANK`` and ``WORLD_SIZE``, if any."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    return parse_shard(f"{env.get('RANK', '0')}/{env['WORLD_SIZE']}")


def _pause(point: str, count: int = 0) -> None:
    """Test hook: stop here (until killed) when the environment asks for it."""
    chunks = os.environ.get(PAUSE_CHUNKS_ENV)
    stop = (point == "chunk" and chunks is not None and count == int(chunks)) or (
        point != "chunk" and os.environ.get(PAUSE_FINALIZE_ENV) == point
    )
    if stop:
        os.write(2, f"{PAUSED_MARK} {point} {count}\n".encode())
        time.sleep(3600)


def _staging_root(settings: Settings, name: str) -> Path:
    return settings.index_dir(name) / "staging"


# ----------------------------------------------------------------------------- featurize


def stage(
    config: BuildConfig,
    settings: Settings,
    *,
    progress: BuildProgressFn | None = None,
    featurizer: Featurizer | None = None,
) -> Staging:
    """Featurize this shard's examples that are not staged yet.

    Returns:
        The staging folder (complete once every shard has run).
    """
    engine = connect(settings)
    feat = featurizer or Featurizer(config.task_spec.load(), config.compression)
    task = feat.task
    pcfg = config.preconditioner
    staged_fisher = pcfg.fisher != "empirical"
    info = {
        "task": config.task_spec.to_json(),
        "compression": feat.config.to_json(),
        "fisher": {"kind": pcfg.fisher, "samples": pcfg.samples if pcfg.fisher == "sampled"
                   else None},
        "model_fingerprint": feat.fingerprint(),
        "layout": feat.describe(),
        "blocks": [vars(b) for b in feat.blocks],
    }
    key = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    staging = Staging(_staging_root(settings, config.name) / key)
    staging.init(info)
    write_atomic(staging.root / "build.json", json.dumps({
        "preconditioner": pcfg.to_json(), "faiss": config.faiss.to_json(),
        "window": config.window,
    }, sort_keys=True).encode())
    shard, shards = config.shard, config.shards
    lock = staging.shards_dir / f"s{shard}of{shards}.lock"
    with file_lock(lock, f"featurize of index {config.name!r} shard {shard}/{shards}"):
        done = set(staging.positions().tolist())
        writer = staging.writer(shard, shards)
        examples = task.examples()
        total_hint = staging.total() or (len(examples) if isinstance(examples, Sized) else None)
        bs = feat.config.batch_size

        def mine(pos: int) -> bool:
            return (pos // bs) % shards == shard

        def count_mine(total: int) -> int:
            return sum(1 for pos in range(total) if mine(pos))

        mine_done = sum(1 for p in done if mine(p))
        per_chunk = -(-config.chunk_size // bs) * bs
        mine_total = None if total_hint is None else count_mine(total_hint)

        def report(n: int, total: int | None, status: str) -> None:
            record_progress(engine=engine, name=config.name, key=key, shard=shard,
                            shards=shards, done=n, total=total, status=status)

        report(mine_done, mine_total, "featurizing")
        batch: list[tuple[int, str, Any]] = []
        pending: list[tuple[list[int], np.ndarray, list[dict[str, Any]], np.ndarray | None]] = []
        pending_n = chunks = 0
        start = time.perf_counter()

        def run_batch() -> None:
            nonlocal pending_n
            payloads = [p for _, _, p in batch]
            raw = feat.raw(payloads).numpy()
            fisher = None
            if staged_fisher:
                rows = feat.fisher(payloads, pcfg.fisher, pcfg.samples).numpy()
                r = rows.shape[0] // len(payloads)
                fisher = rows.reshape(r, len(payloads), -1).transpose(1, 0, 2)
            records = [{"id": str(i), "payload": p, "meta": task.metadata(p)}
                       for _, i, p in batch]
            pending.append(([pos for pos, _, _ in batch], raw, records, fisher))
            pending_n += len(batch)
            batch.clear()

        def flush() -> None:
            nonlocal pending_n, chunks, mine_done
            if not pending:
                return
            positions = [p for part in pending for p in part[0]]
            raw = np.concatenate([part[1] for part in pending])
            records = [r for part in pending for r in part[2]]
            fisher = (np.concatenate([part[3] for part in pending if part[3] is not None])
                      if staged_fisher else None)
            writer.write(positions, raw, records, fisher)
            mine_done += len(positions)
            pending.clear()
            pending_n = 0
            chunks += 1
            report(mine_done, mine_total, "featurizing")
            if progress is not None:
                progress("featurize", mine_done, mine_total)
            _pause("chunk", chunks)

        if progress is not None:
            progress("featurize", mine_done, mine_total)
        total = 0
        for pos, (ext_id, payload) in enumerate(examples):
            total = pos + 1
            if not mine(pos) or pos in done:
                continue
            batch.append((pos, ext_id, payload))
            if len(batch) == bs:
                run_batch()
                if pending_n >= per_chunk:
                    flush()
        if batch:
            run_batch()
        flush()
        staging.mark_shard_done(shard, shards, total)
        mine_total = count_mine(total)
        report(mine_done, mine_total, "staged")
        if progress is not None:
            progress("featurize", mine_done, mine_total)
    log.info("index %r shard %d/%d: %d examples staged in %s (%.1fs)", config.name, shard,
             shards, mine_done, staging.root, time.perf_counter() - start)
    return staging


# ----------------------------------------------------------------------------- finalize


def find_staging(settings: Settings, name: str) -> Staging:
    """The staging folder of the most recent featurize run of index ``name``."""
    check_name(name)
    engine = connect(settings)
    with Session(engine) as session:
        key = latest_staging_key(session=session, name=name)
    root = _staging_root(settings, name)
    if key is None or not (root / key).is_dir():
        candidates = sorted(root.glob("*/staging.json"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise IndexNotFound(
                f"index {name!r} has nothing staged; run `gradindex build --name {name} ...`"
            )
        return Staging(candidates[-1].parent)
    return Staging(root / key)


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
) -> int:
    """Fit the preconditioner over the staged gradients, write and publish a new version.

    Args:
        staging: which staged gradients (default: the latest build of ``name``).
        preconditioner: Fisher settings (default: those of that build).
        faiss: FAISS settings (default: those of that build).
        fitted: a preconditioner fitted on the same staging to reuse (refinalize with another
            damping), skipping the Fisher pass.

    Returns:
        The id of the published version.
    """
    staging = staging or find_staging(settings, name)
    info = staging.info()
    requested = json.loads((staging.root / "build.json").read_text()) \
        if (staging.root / "build.json").exists() else {}
    pcfg = preconditioner or PreconditionerConfig.from_json(requested.get("preconditioner", {}))
    fcfg = faiss or FaissConfig.from_json(requested.get("faiss", {}))
    window = window or int(requested.get("window", 4096))
    staged_kind = info["fisher"]["kind"]
    if pcfg.fisher != staged_kind or (
        staged_kind == "sampled" and pcfg.samples != info["fisher"]["samples"]
    ):
        raise ConfigError(
            f"index {name!r} was staged with the {staged_kind!r} Fisher"
            + (f" ({info['fisher']['samples']} samples)" if staged_kind == "sampled" else "")
            + f", not {pcfg.fisher!r}; `refinalize` can change --damping and --shape only. "
            f"Rebuild with `gradindex build ... --fisher {pcfg.fisher}` for another Fisher."
        )
    engine = connect(settings)
    index_dir = settings.index_dir(name)
    with file_lock(index_dir / "finalize.lock", f"finalize of index {name!r}"):
        if not staging.complete():
            raise GradindexError(
                f"index {name!r} is not fully staged ({staging.missing()} examples missing, "
                "or a shard has not finished); run the remaining `gradindex build --shard` "
                "commands first"
            )
        total = staging.total()
        assert total is not None
        blocks = [Block(**b) for b in info["blocks"]]
        layout = info["layout"]
        groups, dim = int(layout["groups"]), int(layout["dim"])
        started = time.perf_counter()

        version_id, stale = begin_version(engine=engine, name=name)
        for path in stale:
            shutil.rmtree(settings.data_dir / path, ignore_errors=True)
        versions = index_dir / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        for old in versions.glob(".tmp-*"):  # a killed finalize's half-written folder
            shutil.rmtree(old, ignore_errors=True)
        tmp = versions / f".tmp-v{version_id}"
        tmp.mkdir()

        # Pass 1: the Fisher, in fixed windows of positions (the same sums however staged).
        if fitted is not None and fitted.shape == pcfg.shape:
            precond = fitted.with_damping(pcfg.damping)
        else:
            acc = FisherAccumulator(blocks, pcfg.shape)
            if acc.ranges:
                for w in staging.windows(window):
                    rows = w.raw if w.fisher is None else w.fisher.reshape(-1, dim)
                    acc.update(torch.from_numpy(rows), w.stop - w.start)
                    if progress is not None:
                        progress("fisher", w.stop, total)
            else:
                acc.count = total
            precond = acc.finalize(pcfg.damping)
        precond.save(tmp / "precond.npz")

        # Pass 2: preconditioned vectors, self-influence and SQL rows.
        vectors = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32,
                                            shape=(total, dim))
        ids = np.zeros(total, dtype=np.int64)
        influence = np.zeros(total, dtype=np.float64)
        steps = 0
        for w in staging.windows(window):
            raw = torch.from_numpy(w.raw)
            vec = precond.apply(raw)
            si = self_influence(raw / groups, vec).numpy()
            vectors[w.start : w.stop] = vec.numpy()
            influence[w.start : w.stop] = si
            with engine.begin() as conn:
                ids[w.start : w.stop] = insert_examples(
                    conn=conn, version_id=version_id, start=w.start, records=w.records,
                    self_influence=si,
                )
            steps += 1
            if progress is not None:
                progress("vectors", w.stop, total)
            _pause("rows", steps)
        vectors.flush()
        del vectors
        np.save(tmp / "ids.npy", ids)
        np.save(tmp / "self_influence.npy", influence)
        stored = np.load(tmp / "vectors.npy", mmap_mode="r")

        if progress is not None:
            progress("faiss", 0, total)
        index = build_faiss(fcfg, stored, ids, seed=int(info["compression"]["seed"]))
        write_faiss(index, tmp / "index.faiss")
        recall = (
            {"recall_at_10": 1.0, "recall_at_10_reranked": 1.0} if fcfg.exact
            else measure_recall(index, fcfg, stored, ids, k=10)
        )
        # Relative influence (§1): a second index over v_i / sqrt(self-influence_i), so its
        # top-k is as exact as the first one's.
        scale, eps = relative_scale(influence)
        scaled = ScaledRows(stored, scale)
        relative = build_faiss(fcfg, scaled, ids, seed=int(info["compression"]["seed"]))
        write_faiss(relative, tmp / "relative.faiss")
        relative_recall = (
            {"recall_at_10": 1.0, "recall_at_10_reranked": 1.0} if fcfg.exact
            else measure_recall(relative, fcfg, scaled, ids, k=10)
        )
        if progress is not None:
            progress("faiss", total, total)
        del stored, index, relative, scaled

        manifest = {
            "name": name,
            "version": version_id,
            "created_at": datetime.now(UTC).isoformat(),
            "task": info["task"],
            "compression": info["compression"],
            "seed": info["compression"]["seed"],
            "layout": layout,
            "blocks": info["blocks"],
            "model_fingerprint": info["model_fingerprint"],
            "preconditioner": {**pcfg.to_json(), "lambdas": precond.lambdas},
            "faiss": {**fcfg.to_json(), "factory": fcfg.factory(total), **recall},
            "relative": {"file": "relative.faiss", "eps": eps, **relative_recall},
            "count": total,
            "dim": dim,
            "staging_key": staging.key,
            "libraries": library_versions(),
        }
        save_manifest(tmp, manifest)
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        final = versions / f"v{version_id}"
        os.rename(tmp, final)
        fsync_dir(versions)
        _pause("publish")
        dropped = publish_version(
            engine=engine, version_id=version_id,
            path=str(final.relative_to(settings.data_dir)), manifest=manifest, count=total,
            retain=settings.retain_versions,
        )
        for path in dropped:
            shutil.rmtree(settings.data_dir / path, ignore_errors=True)
    log.info("index %r version %d published: %d vectors of dim %d in %.1fs", name, version_id,
             total, dim, time.perf_counter() - started)
    return version_id


def build(
    config: BuildConfig,
    settings: Settings,
    *,
    progress: BuildProgressFn | None = None,
    featurizer: Featurizer | None = None,
) -> int | None:
    """Stage this shard; with one shard, finalize and publish too.

    Returns:
        The published version's id, or ``None`` when this was one shard of several.
    """
    staging = stage(config, settings, progress=progress, featurizer=featurizer)
    if config.shards > 1:
        missing = staging.missing()
        log.info(
            "shard %d/%d of index %r staged; %s", config.shard, config.shards, config.name,
            "all shards are staged: run `gradindex finalize " + config.name + "`"
            if missing == 0 else "waiting for the other shards",
        )
        return None
    return finalize(settings, config.name, staging=staging, preconditioner=config.preconditioner,
                    faiss=config.faiss, window=config.window, progress=progress)


def refinalize(
    settings: Settings,
    name: str,
    *,
    damping: float | None = None,
    shape: str | None = None,
    fisher: str | None = None,
    faiss: FaissConfig | None = None,
    progress: BuildProgressFn | None = None,
) -> int:
    """Rebuild index ``name`` from its staged gradients with another damping or shape.

    No model pass: the staged raw gradients (and Fisher rows) are reused.

    Raises:
        ConfigError: ``fisher`` differs from the staged Fisher kind.
        GradindexError: the staged gradients were removed.
    """
    engine = connect(settings)
    with Session(engine) as session:
        version = current_version(session=session, name=name)
        manifest = load_manifest(settings.data_dir / version.path)
    staging = Staging(_staging_root(settings, name) / manifest["staging_key"])
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
    if pcfg.shape == old.shape and pcfg.fisher == old.fisher and precond_path.exists():
        fitted = Preconditioner.load(precond_path)
    fcfg = faiss or FaissConfig.from_json(manifest["faiss"])
    return finalize(settings, name, staging=staging, preconditioner=pcfg, faiss=fcfg,
                    fitted=fitted, progress=progress)
