"""An in-memory influence index: featurize, fit the Fisher, precondition and score, all in RAM.

The persistent index stores the same vectors on disk; this one serves tests, benchmarks and
notebooks on data that fits in memory, and is the reference the persistent one must agree with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .config import CompressionConfig, PreconditionerConfig
from .featurize import Featurizer, FisherBatcher, batch_fisher_rows
from .fisher import FisherPlan
from .precondition import (
    FisherAccumulator,
    Preconditioner,
    fisher_window_rows,
    self_influence,
)
from .task import Task

__all__ = ["InMemoryIndex", "Progress"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called with ``(done, total)`` examples after each batch."""


class InMemoryIndex:
    """Raw and preconditioned vectors of a training set, held in memory.

    Build with :meth:`fit`; :meth:`scores` then gives ``[Q, N]`` influence scores.
    """

    def __init__(
        self,
        featurizer: Featurizer,
        preconditioner: Preconditioner,
        raw: torch.Tensor,
        ids: Sequence[str],
        precondition_config: PreconditionerConfig,
    ) -> None:
        self.featurizer = featurizer
        self.preconditioner = preconditioner
        self.raw = raw
        self.ids = list(ids)
        self.precondition_config = precondition_config
        self.vectors = preconditioner.apply(raw)
        self.self_influence = self_influence(raw / featurizer.groups, self.vectors)
        self.fisher_plan: FisherPlan | None = None
        """The Fisher :meth:`fit` resolved and fitted (kind, subset, rows)."""

    @classmethod
    def fit(
        cls,
        task: Task,
        compression: CompressionConfig | None = None,
        preconditioning: PreconditionerConfig | None = None,
        *,
        examples: Sequence[tuple[str, dict[str, Any]]] | None = None,
        featurizer: Featurizer | None = None,
        device: str | None = None,
        progress: Progress | None = None,
    ) -> InMemoryIndex:
        """Featurize every training example and fit the preconditioner.

        Args:
            task: the task; its ``examples()`` are indexed unless ``examples`` is given.
            compression: compressor settings (defaults: :class:`CompressionConfig`).
            preconditioning: Fisher settings (defaults: :class:`PreconditionerConfig`).
            examples: ``(id, payload)`` pairs to index instead of ``task.examples()``.
            featurizer: reuse a featurizer (its models and masks) instead of building one.
            progress: called with ``(done, total)`` after each batch.
        """
        pcfg = preconditioning or PreconditionerConfig()
        feat = featurizer or Featurizer(task, compression, device=device)
        pairs = list(examples if examples is not None else task.examples())
        bs = feat.config.batch_size
        plan = feat.plan_fisher(pcfg, [p for _, p in pairs[:bs]], len(pairs))
        if pcfg.shape == "identity":
            plan = replace(plan, kind="empirical")  # no Fisher to fit
        log.info("%s", plan.describe())
        members = plan.members()
        batcher = FisherBatcher(feat, plan) if members is not None else None
        acc = FisherAccumulator(feat.blocks, pcfg.shape)
        chunks = []
        start = time.perf_counter()
        for lo in range(0, len(pairs), bs):
            payloads = [p for _, p in pairs[lo : lo + bs]]
            raw = feat.raw(payloads)
            chunks.append(raw)
            if pcfg.shape != "identity":
                if batcher is not None:
                    for i, payload in enumerate(payloads):
                        batcher.see(lo + i, payload)
                    fisher: np.ndarray | None = batcher.take()[0]
                else:
                    fisher = batch_fisher_rows(feat, plan, payloads)[0]
                inside = (members[lo : lo + len(payloads)] if members is not None
                          else np.ones(len(payloads), dtype=bool))
                rows = fisher_window_rows(raw.numpy(), fisher, inside)
                acc.update(torch.from_numpy(rows), len(payloads))
            if progress is not None:
                progress(min(lo + bs, len(pairs)), len(pairs))
        log.info("featurized %d examples in %.1fs", len(pairs), time.perf_counter() - start)
        precond = acc.finalize(pcfg.damping)
        resolved = replace(pcfg, fisher=plan.kind, samples=plan.samples)
        index = cls(feat, precond, torch.cat(chunks), [i for i, _ in pairs], resolved)
        index.fisher_plan = plan
        return index

    def with_damping(self, damping: float) -> InMemoryIndex:
        """The same index preconditioned with another damping, without any model pass."""
        cfg = PreconditionerConfig(**{**self.precondition_config.to_json(), "damping": damping})
        index = InMemoryIndex(self.featurizer, self.preconditioner.with_damping(damping),
                              self.raw, self.ids, cfg)
        index.fisher_plan = self.fisher_plan
        return index

    def queries(self, payloads: Sequence[dict[str, Any]]) -> torch.Tensor:
        """Query vectors ``[Q, dim]`` in batches of the featurizer's batch size."""
        bs = self.featurizer.config.batch_size
        return torch.cat([self.featurizer.query(list(payloads[lo : lo + bs]))
                          for lo in range(0, len(payloads), bs)])

    def scores(self, payloads: Sequence[dict[str, Any]]) -> torch.Tensor:
        """Influence of every indexed example on each query, ``[Q, N]`` (float32)."""
        return self.queries(payloads) @ self.vectors.T
