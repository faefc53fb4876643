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
from .registry import COMPRESSORS, FISHER_KINDS, SHAPES, check_choice

__all__ = ["CompressionConfig", "PreconditionerConfig"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class CompressionConfig:
    """How a per-example gradient becomes a short vector (the compressor C of DESIGN §1)."""

    compressor: str = "factorized-dropout"
    """Registered compressor name: `factorized-dropout`, `dropout`, `dropout-sjlt`, `gaussian`."""

    keep: float | None = None
    """Fraction of gradient coordinates kept, in (0, 1]. Exclusive with `dim`."""

    dim: int | None = 2048
    """Target compressed size per mask and checkpoint (k); turned into `keep` from the model's
    size and capped at 1. Exclusive with `keep`; used when `keep` is None."""

    masks: int = 2
    """Independent masks per checkpoint; their vectors are concatenated and their scores
    averaged."""

    seed: int = 0
    """Seed of every mask and projection; shards and queries must share it."""

    sjlt_expand: int = 4
    """`dropout-sjlt` only: the mask keeps `sjlt_expand`·k coordinates before the sparse
    Johnson-Lindenstrauss transform folds them down to k."""

    batch_size: int = 32
    """Examples per forward/backward pass."""

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
                isinstance(self.dim, int) and self.dim >= 1,
                f"`dim` must be a positive integer when `keep` is not set, got {self.dim!r}",
            )
        _check(
            isinstance(self.masks, int) and self.masks >= 1,
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
        check_choice(self.compressor, COMPRESSORS, "compressor")
        mods = self.modules
        if isinstance(mods, str):
            mods = (mods,)
        _check(
            isinstance(mods, list | tuple) and all(isinstance(m, str) and m for m in mods),
            f"`modules` must be a list of non-empty name patterns, got {self.modules!r}",
        )
        object.__setattr__(self, "modules", tuple(mods))

    def resolve_keep(self, total_params: int) -> float:
        """The keep fraction for a model with ``total_params`` attributed coordinates."""
        if self.keep is not None:
            return float(self.keep)
        assert self.dim is not None
        return min(1.0, self.dim / max(total_params, 1))

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

    fisher: str = "empirical"
    """Which gradients estimate the Fisher: `empirical` (true targets), `sampled` (targets drawn
    from the model), `expected` (exact expectation over classes; needs `task.logits`)."""

    samples: int = 4
    """`sampled` only: targets drawn per example."""

    damping: float = 0.1
    """λ as a multiple of the block's mean diagonal, tr(F̃)/k."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Reserved for settings of future shapes; stored in the manifest."""

    def __post_init__(self) -> None:
        check_choice(self.shape, SHAPES, "shape")
        check_choice(self.fisher, FISHER_KINDS, "fisher")
        _check(
            isinstance(self.samples, int) and self.samples >= 1,
            f"`samples` must be a positive integer, got {self.samples!r}",
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
