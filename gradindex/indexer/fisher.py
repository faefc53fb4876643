"""Which Fisher a build fits, and on which examples: ``auto`` resolved, the budget planned.

``auto`` (the default) becomes the most faithful kind the task offers (DESIGN §1): ``expected``
when ``task.logits`` gives ``[B, C]`` with a modest C, ``sampled`` when ``task.loss(...,
sample=True)`` draws targets from the model, ``empirical`` otherwise. The ``sampled`` and
``expected`` kinds cost extra model passes (one batched backward for an example's ``expected``
rows, one pass per sample), so they are fitted on a budget of rows: a large training set spends
it on a seeded subset of its examples, a small one on more rows per example (more samples, or
more of the top directions of each example's output Hessian). The subset is a pure function of
a hashed key (seed, training-set size, subset size), like the masks of :mod:`.masks`, so every
shard, process and resumed build picks the same examples. Vectors are still computed for every
example.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .config import AUTO_MAX_CLASSES, MAX_SAMPLES, PreconditionerConfig
from .errors import ConfigError

__all__ = ["FisherPlan", "FisherSupport", "fisher_subset", "plan_fisher", "resolve_kind"]


@dataclass(frozen=True)
class FisherSupport:
    """What a task offers for the Fisher, found by probing it once on a few examples."""

    classes: int | None
    """C of ``task.logits`` ``[B, C]``; None when the task has no usable ``logits``."""
    sampling: bool
    """Whether ``task.loss(..., sample=True)`` draws targets (differs from the true ones)."""
    why_not_sampling: str = ""
    """Why sampling is unusable, for the build's log line."""


def resolve_kind(requested: str, support: FisherSupport) -> tuple[str, str]:
    """The Fisher kind a build uses, and a sentence saying why (and what would do better).

    Args:
        requested: ``auto`` or an explicit kind (returned as is).
        support: what the task offers.
    """
    if requested != "auto":
        return requested, f"{requested} (asked for)"
    if support.classes is not None and support.classes <= AUTO_MAX_CLASSES:
        return "expected", f"expected (the task's logits give {support.classes} classes)"
    if support.sampling:
        reason = ("its logits have "
                  f"{support.classes} classes, more than {AUTO_MAX_CLASSES}: one row per class "
                  "would cost too much" if support.classes is not None
                  else "the task defines no logits(model, batch) -> [B, C]; add it to get the "
                  "expected Fisher, the most faithful")
        return "sampled", f"sampled (loss(..., sample=True) draws targets; {reason})"
    return "empirical", (
        "empirical, the least faithful: the task defines no logits(model, batch) -> [B, C] "
        "(add it for the expected Fisher) and its loss(..., sample=True) "
        f"{support.why_not_sampling} (make it draw targets from the model's predictive "
        "distribution for the sampled Fisher)"
    )


def fisher_subset(*, seed: int, examples: int, size: int) -> np.ndarray:
    """``[examples]`` bool: which examples the Fisher is fitted on, ``size`` of them.

    A pure function of its arguments, hashed into a private generator's seed as the masks are.
    """
    if size >= examples:
        return np.ones(examples, dtype=bool)
    key = "|".join(["gradindex-fisher-subset-v1", str(int(seed)), str(int(examples)),
                    str(int(size))])
    digest = hashlib.sha256(key.encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    chosen = torch.randperm(examples, generator=gen)[:size].numpy()
    members = np.zeros(examples, dtype=bool)
    members[chosen] = True
    return members


@dataclass(frozen=True)
class FisherPlan:
    """The resolved Fisher of one build: its kind, and the rows it is fitted on."""

    kind: str
    """``empirical``, ``sampled`` or ``expected``."""
    requested: str
    """What the settings asked for (``auto`` or a kind)."""
    examples: int | None
    """Training examples of the build (None: not known, only for ``empirical`` or no budget)."""
    subset: int | None
    """Examples whose Fisher rows are computed (None: every one)."""
    samples: int | None
    """``sampled`` only: targets drawn per example."""
    classes: int | None
    """``expected`` only: rows per example."""
    budget: int | None
    """The row budget asked for (None: unbounded)."""
    seed: int = 0
    """Seed of the subset (the compression seed)."""
    rank: int | None = None
    """``expected`` only: rows per example, the top eigen-directions of each example's output
    Hessian, when the budget buys fewer than ``classes`` per example (None: one row per class;
    ``classes - 1`` directions are exact too)."""
    note: str = field(default="", compare=False)
    """Why this kind, for the log (not part of the plan's identity)."""

    @property
    def rows_per_example(self) -> int:
        if self.kind == "expected":
            return int(self.rank or self.classes or 1)
        if self.kind == "sampled":
            return int(self.samples or 1)
        return 1

    @property
    def rows(self) -> int | None:
        """Fisher rows in all (None when the example count is unknown)."""
        n = self.subset if self.subset is not None else self.examples
        return None if n is None else n * self.rows_per_example

    def members(self) -> np.ndarray | None:
        """``[examples]`` bool of the subset, or None when every example is a member."""
        if self.subset is None or self.examples is None or self.subset >= self.examples:
            return None
        return fisher_subset(seed=self.seed, examples=self.examples, size=self.subset)

    def describe(self) -> str:
        """One line for the build's log."""
        if self.kind == "empirical":
            return f"Fisher: {self.note}; fitted on every example's gradient (no extra pass)"
        per = (f"{self.classes} classes" if self.kind == "expected" and self.rank is None
               else f"the top {self.rank} of {self.classes} classes' directions"
               if self.kind == "expected"
               else f"{self.samples} sample{'s' if self.samples != 1 else ''}")
        n = self.subset if self.subset is not None else self.examples
        of = f" of {self.examples}" if self.examples is not None else ""
        budget = f" (budget {self.budget} rows)" if self.budget is not None else " (no budget)"
        rows = f" = {self.rows} rows" if self.rows is not None else ""
        return f"Fisher: {self.note}; fitted on {n if n is not None else 'every'}{of} " \
               f"examples × {per}{rows}{budget}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("note")
        return data

    @classmethod
    def from_staged(cls, info: dict[str, Any], seed: int) -> FisherPlan:
        """The plan a staging folder recorded; folders staged before plans existed recorded
        ``{"kind", "samples"}`` only: every example, no budget."""
        kind = info["kind"]
        return cls(kind=kind, requested=info.get("requested", kind),
                   examples=info.get("examples"), subset=info.get("subset"),
                   samples=info.get("samples"), classes=info.get("classes"),
                   budget=info.get("budget"), seed=int(info.get("seed", seed)),
                   rank=info.get("rank"))


def plan_fisher(
    config: PreconditionerConfig, support: FisherSupport, examples: int | None, seed: int
) -> FisherPlan:
    """Resolve the kind and spend the budget.

    ``expected`` spends the budget as ``sampled`` does: one row per class (exact) on every
    example when ``budget // N`` reaches ``C``, else ``budget // N`` rows per example (the
    top eigen-directions of its output Hessian, at least one) on ``ceil(budget / rows)``
    examples; an example's top directions hold most of its Fisher (digits: 2 hold 83-89%), so
    covering every example beats exact rows on a subset (bench/RESULTS.md). ``sampled`` draws
    ``budget // N`` samples per example when that is more than one (up to :data:`MAX_SAMPLES`;
    a small training set), else one sample on ``budget`` examples; an explicit ``samples`` is
    kept and the subset shrinks to fit. Without a budget every example is fitted (4 samples
    unless set).

    Raises:
        ConfigError: ``expected`` was asked for and the task has no ``[B, C]`` logits, or the
            budget needs the example count and it is unknown.
    """
    kind, note = resolve_kind(config.fisher, support)
    budget = config.fisher_budget
    common: dict[str, Any] = {"kind": kind, "requested": config.fisher, "budget": budget,
                              "seed": seed, "note": note}
    if kind == "empirical":
        return FisherPlan(examples=examples, subset=None, samples=None, classes=None, **common)
    if kind == "expected" and support.classes is None:
        raise ConfigError("`fisher` is 'expected' but the task defines no logits(model, batch) "
                          "-> [B, C]; add it, or use --fisher auto")
    if budget is None:
        samples = (config.samples or 4) if kind == "sampled" else None
        return FisherPlan(examples=examples, subset=None, samples=samples,
                          classes=support.classes if kind == "expected" else None, **common)
    if examples is None:
        raise ConfigError("a Fisher budget needs the number of training examples; give the "
                          "task a __len__, or set fisher_budget=None")
    if kind == "expected":
        classes = int(support.classes or 1)
        per = budget // max(examples, 1)
        rank = None if per >= classes else max(1, per)
        subset = min(examples, max(1, math.ceil(budget / (rank or classes))))
        return FisherPlan(examples=examples, subset=subset, samples=None, classes=classes,
                          rank=rank, **common)
    samples = config.samples or max(1, min(MAX_SAMPLES, budget // max(examples, 1)))
    subset = min(examples, max(1, math.ceil(budget / samples)))
    return FisherPlan(examples=examples, subset=subset, samples=samples, classes=None, **common)
