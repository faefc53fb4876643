"""Build settings as frozen dataclasses: what to compress and how to precondition.

Every field has a docstring and is validated with a message that names it, so a bad value fails
at construction, before any model pass.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .registry import COMPRESSORS, FISHER_CHOICES, SHAPES, check_choice

__all__ = [
    "AUTO_COMPRESSION",
    "AUTO_MAX_CLASSES",
    "ENSEMBLE_FROM",
    "DEFAULT_FISHER_BUDGET",
    "MAX_SAMPLES",
    "CompressionConfig",
    "PreconditionerConfig",
]

AUTO_MAX_CLASSES = 1024
"""``fisher="auto"`` picks ``expected`` up to this many classes: it costs one backward pass and
stages one row per class, so a language model over a 50k vocabulary gets ``sampled``."""

MAX_SAMPLES = 16
"""The most targets per example a ``sampled`` Fisher draws to spend its budget on a small
training set."""

DEFAULT_FISHER_BUDGET = 8192
"""Fisher rows of the default ``sampled``/``expected`` Fisher (bench/RESULTS.md: the curve of
fidelity against budget; the MNIST ensemble needs two rows for each of its 4,000 examples)."""


ENSEMBLE_FROM = 2
"""``compressor="auto"`` treats a task with this many checkpoints or more as an ensemble: on the
MNIST MLP `dropout-sjlt` k=4,096 led from two checkpoints on (bench/RESULTS.md)."""

AUTO_COMPRESSION = {
    False: ("factorized-dropout", 2048, 2),
    True: ("dropout-sjlt", 4096, 1),
}
"""What ``compressor="auto"`` picks, (compressor, k, masks), for one model (False) and for an
ensemble (True): the same 4,096 floats per example and checkpoint. On the MNIST MLP with the
default Fisher and damping (bench/RESULTS.md), LDS at 1, 2, 3, 5 and 10 checkpoints:
factorized 0.342, 0.389, 0.393, 0.430, 0.469; `dropout-sjlt` 0.315, 0.411, 0.438, 0.469,
0.508 (and two masks of 2,048 of it 0.342, 0.399, 0.429, 0.459, 0.494)."""

DEFAULT_DIM, DEFAULT_MASKS = AUTO_COMPRESSION[False][1:]
"""k and masks of a compressor named explicitly, when they are not given."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CompressionConfig:
    """How a per-example gradient becomes a short vector (the compressor C of DESIGN §1)."""

    compressor: str = "auto"
    """Registered compressor name: `factorized-dropout`, `dropout`, `dropout-sjlt`,
    `gaussian`, or `auto`: `factorized-dropout` k=2,048 ×2 for a task of one checkpoint,
    `dropout-sjlt` k=4,096 ×1 for an ensemble (`AUTO_COMPRESSION`, `ENSEMBLE_FROM`; the
    manifest records what was picked). Both keep every coordinate of a model smaller
    than k."""

    keep: float | None = None
    """Fraction of gradient coordinates kept, in (0, 1]. Exclusive with `dim`."""

    dim: int | None = None
    """Target compressed size per mask and checkpoint (k); turned into `keep` from the model's
    size and capped at 1. Exclusive with `keep`; when neither is set, `auto`'s choice (2,048
    or 4,096), else 2,048."""

    masks: int | None = None
    """Independent masks per checkpoint; their vectors are concatenated and their scores
    averaged. None: `auto`'s choice (2 or 1), else 2."""

    seed: int = 0
    """Seed of every mask and projection; shards and queries must share it."""

    sjlt_expand: int = 4
    """`dropout-sjlt` only: the mask keeps `sjlt_expand`·k coordinates before the sparse
    Johnson-Lindenstrauss transform folds them down to k."""

    batch_size: int = 128
    """Examples per forward/backward pass. 128 featurized a 1.9M-parameter MLP in about half
    the time of batch 32 on a CPU (bench/RESULTS.md, "The whole build in training epochs");
    lower it for long sequences on a small GPU."""

    modules: tuple[str, ...] = ()
    """Name patterns (``fnmatch``; ``*`` matches dots too) of the modules to attribute, e.g.
    ``transformer.h.*.mlp.*``; empty: the task's own choice (``task.modules``, else every
    linear layer)."""

    def __post_init__(self) -> None:
        if self.keep is not None:
            object.__setattr__(self, "dim", None)
            _check(
                isinstance(self.keep, int | float) and 0.0 < self.keep <= 1.0,
                f"`keep` must be in (0, 1], got {self.keep!r}",
            )
        else:
            _check(
                self.dim is None or (_is_int(self.dim) and self.dim >= 1),
                f"`dim` must be a positive integer when `keep` is not set, got {self.dim!r}",
            )
        _check(
            self.masks is None or (_is_int(self.masks) and self.masks >= 1),
            f"`masks` must be a positive integer, got {self.masks!r}",
        )
        _check(isinstance(self.seed, int), f"`seed` must be an integer, got {self.seed!r}")
        _check(
            isinstance(self.sjlt_expand, int) and self.sjlt_expand >= 1,
            f"`sjlt_expand` must be a positive integer, got {self.sjlt_expand!r}",
        )
        _check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"`batch_size` must be a positive integer, got {self.batch_size!r}",
        )
        check_choice(self.compressor, ("auto", *COMPRESSORS), "compressor")
        mods = self.modules
        if isinstance(mods, str):
            mods = (mods,)
        _check(
            isinstance(mods, list | tuple) and all(isinstance(m, str) and m for m in mods),
            f"`modules` must be a list of non-empty name patterns, got {self.modules!r}",
        )
        object.__setattr__(self, "modules", tuple(mods))

    def resolve(self, checkpoints: int) -> CompressionConfig:
        """These settings for a task of ``checkpoints`` models: ``auto`` and unset ``dim`` and
        ``masks`` replaced by what they stand for (:data:`AUTO_COMPRESSION`)."""
        if self.compressor == "auto":
            name, dim, masks = AUTO_COMPRESSION[checkpoints >= ENSEMBLE_FROM]
        else:
            name, dim, masks = self.compressor, DEFAULT_DIM, DEFAULT_MASKS
        return dataclasses.replace(
            self, compressor=name, masks=masks if self.masks is None else self.masks,
            dim=None if self.keep is not None else dim if self.dim is None else self.dim)

    def resolve_keep(self, total_params: int) -> float:
        """The keep fraction for a model with ``total_params`` attributed coordinates (of
        resolved settings)."""
        if self.keep is not None:
            return float(self.keep)
        dim = self.dim if self.dim is not None else DEFAULT_DIM
        return min(1.0, dim / max(total_params, 1))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CompressionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class PreconditionerConfig:
    """How the compressed gradients are preconditioned: a damped Fisher in the compressed space."""

    shape: str = "block"
    """Registered shape: `block` (one block per layer), `full`, or `identity` (plain dot)."""

    fisher: str = "auto"
    """Which gradients estimate the Fisher: `empirical` (true targets), `sampled` (targets drawn
    from the model), `expected` (exact expectation over classes; needs `task.logits`), or
    `auto`: the most faithful the task offers (expected, else sampled, else empirical)."""

    samples: int | None = None
    """`sampled` only: targets drawn per example; None: as many as the budget allows on a
    small training set (1 to `MAX_SAMPLES`), 4 without a budget."""

    fisher_budget: int | None = DEFAULT_FISHER_BUDGET
    """Fisher rows the `sampled`/`expected` Fisher is fitted on (examples × samples, or
    examples × classes or top directions of each example's output Hessian): several per
    example on a small training set, one per example of a seeded subset on a large one; None
    fits every example, one row per class. The `empirical` Fisher always uses every example's
    gradient (no extra pass)."""

    damping: float = 0.3
    """λ as a multiple of the block's mean diagonal, tr(F̃)/k. 0.3 with the default Fisher:
    digits logistic regression 0.949 against 0.919 at 0.1 (exact influence 0.949), its task
    without logits 0.906 against 0.853, the MNIST ensemble 0.508 against 0.506."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Reserved for settings of future shapes; stored in the manifest."""

    def __post_init__(self) -> None:
        check_choice(self.shape, SHAPES, "shape")
        check_choice(self.fisher, FISHER_CHOICES, "fisher")
        _check(
            self.samples is None or (isinstance(self.samples, int) and self.samples >= 1),
            f"`samples` must be a positive integer or None, got {self.samples!r}",
        )
        _check(
            self.fisher_budget is None
            or (isinstance(self.fisher_budget, int) and self.fisher_budget >= 1),
            f"`fisher_budget` must be a positive integer or None, got {self.fisher_budget!r}",
        )
        _check(
            isinstance(self.damping, int | float)
            and math.isfinite(self.damping)
            and self.damping >= 0,
            f"`damping` must be a finite number ≥ 0, got {self.damping!r}",
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreconditionerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
