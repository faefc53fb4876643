"""The preconditioner: a damped Fisher in the compressed space, inverted by Cholesky.

``F̃ = (1/n) Σ_i g̃'_i g̃'_iᵀ`` is accumulated over batches (never all gradients in memory), per
block of the feature vector as the *shape* partitions it; each block is damped by
``λ = damping · tr(F̃_b)/k_b`` and factorized. Inverting inside the compressed space, rather than
preconditioning the full gradient and masking afterwards, is what measured best (DESIGN §1).

Precision: the staged gradients are float32, so each batch's ``Σ r rᵀ`` is one float32 GEMM
added to a float64 total, and the vectors are one float32 GEMM with the inverse (computed in
float64 from the Cholesky factor) wherever the block is conditioned well enough for it
(:data:`FLOAT32_MAX_CONDITION`), else float64 Cholesky solves. Measured against float64 on a
1.9M-parameter MLP: Fisher sums within 1e-7, vectors within 1.7e-5, scores within 7e-6 (the
float32 rounding of the staged gradients alone moves the vectors by 4e-7), with the same LDS;
both passes ran two to three times faster (bench/RESULTS.md, "The whole build in training
epochs").
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .errors import GradindexError
from .featurize import Block
from .registry import FISHER_KINDS, SHAPES, check_choice, register_shape

__all__ = [
    "FISHER_KINDS",
    "FLOAT32_MAX_CONDITION",
    "SHAPES",
    "FisherAccumulator",
    "Preconditioner",
    "Shape",
    "fisher_window_rows",
    "register_shape",
    "self_influence",
]

FLOAT32_MAX_CONDITION = 1e5
"""Blocks whose damped Fisher has a condition number bound ``(‖F̃‖_∞ + λ)/λ`` up to this are
applied by a float32 GEMM with their inverse, worse conditioned ones by float64 Cholesky solves.
The GEMM's relative error grows with the condition number times float32's 2⁻²⁴ (its inverse's
rounding dominates): 1.7e-5 on the vectors and 7e-6 on the scores measured on a 1.9M-parameter
MLP with the default damping (condition numbers 3,000-6,800, bounds 11,000-21,000)."""


class Shape:
    """How the feature vector is partitioned into independently preconditioned blocks."""

    name: ClassVar[str]

    @staticmethod
    def partition(blocks: Sequence[Block]) -> list[tuple[int, int]]:
        raise NotImplementedError


@register_shape
class BlockShape(Shape):
    """One matrix per layer of each (checkpoint, mask) group."""

    name = "block"

    @staticmethod
    def partition(blocks: Sequence[Block]) -> list[tuple[int, int]]:
        return [(b.start, b.stop) for b in blocks]


@register_shape
class FullShape(Shape):
    """One matrix per (checkpoint, mask) group, across its layers."""

    name = "full"

    @staticmethod
    def partition(blocks: Sequence[Block]) -> list[tuple[int, int]]:
        ranges: dict[int, tuple[int, int]] = {}
        for b in blocks:
            lo, hi = ranges.get(b.group, (b.start, b.stop))
            ranges[b.group] = (min(lo, b.start), max(hi, b.stop))
        return list(ranges.values())


@register_shape
class IdentityShape(Shape):
    """No preconditioning: the plain gradient dot product (TracIn-like)."""

    name = "identity"

    @staticmethod
    def partition(blocks: Sequence[Block]) -> list[tuple[int, int]]:
        return []


def fisher_window_rows(
    raw: np.ndarray, fisher: np.ndarray | None, members: np.ndarray
) -> np.ndarray:
    """The Fisher rows ``[R', dim]`` that stand for a window of ``W`` examples.

    ``empirical`` (``fisher`` None): the raw gradients. Otherwise the Fisher rows ``[F, R,
    dim]`` of the window's ``members`` (``[W]`` bool), and for each example outside the Fisher
    subset its raw gradient: the subset's sampled or expected Fisher, completed by the others'
    empirical one, so the estimate spans every training gradient (a subset alone left the
    others' directions to the damping: digits MLP LDS 0.73 against 0.76 at 800 of 1,000
    examples, digits logistic regression 0.74 against 0.80 at 50) and equals the full one when
    the subset is everything. A seeded half or quarter of the others, reweighted, cost the
    MNIST ensemble 0.07-0.08 LDS (bench/fisher_completion.py): each example's own gradient
    belongs in the Fisher that preconditions it.
    """
    if fisher is None:
        return raw
    rows = fisher.reshape(-1, raw.shape[1])
    rest = raw[~members]
    return np.concatenate([rows, rest]) if len(rest) else rows


GRAM_SPLIT = 4
"""A block's ``Σ r rᵀ`` is computed as the upper triangle of a ``GRAM_SPLIT``² grid of
products (10 of 16), mirrored: a quarter fewer flops than one full product, measured 25% less
time for a window of 4,096 rows of a 1,156-column block at one thread."""

GRAM_SPLIT_FROM = 256
"""Blocks narrower than this are summed by one product (the grid's overhead would dominate)."""


def _on_numpy(t: torch.Tensor) -> bool:
    """Whether ``t``'s products go through numpy's BLAS (:data:`NUMPY_GEMM`): a CPU tensor."""
    return t.device.type == "cpu" and not t.requires_grad


NUMPY_GEMM = True
"""Float32 products of CPU tensors (the Fisher's sums, the preconditioner's application) go
through numpy's BLAS (OpenBLAS) rather than torch's (MKL): on AMD EPYC, where MKL does not pick
its fast kernels, a window's product took 2-2.4× less time (bench/RESULTS.md, "Finalize's
products through numpy's BLAS"); on Intel CPUs the two are alike."""


def _add_gram(acc: torch.Tensor, part: torch.Tensor) -> None:
    """``acc += partᵀ part`` (float32 products added to the float64 ``acc``), exactly
    symmetric."""
    if NUMPY_GEMM and _on_numpy(part) and _on_numpy(acc):
        _add_gram_numpy(acc.numpy(), part.numpy())
        return
    k = part.shape[1]
    if k < GRAM_SPLIT_FROM:
        acc += (part.T @ part).to(torch.float64)
        return
    edges = [k * i // GRAM_SPLIT for i in range(GRAM_SPLIT + 1)]
    cols = [part[:, a:b] for a, b in itertools.pairwise(edges)]
    for i, (a, b) in enumerate(itertools.pairwise(edges)):
        for j in range(i, GRAM_SPLIT):
            c, d = edges[j], edges[j + 1]
            product = (cols[i].T @ cols[j]).to(torch.float64)
            acc[a:b, c:d] += product
            if i != j:
                acc[c:d, a:b] += product.T


def _add_gram_numpy(acc: np.ndarray, part: np.ndarray) -> None:
    """:func:`_add_gram` on numpy arrays (views of the tensors: ``acc`` is updated in place).
    numpy computes ``partᵀ part`` by one symmetric rank-k update (BLAS ``syrk``: one triangle,
    mirrored), so no grid: measured 30% faster than the grid at one thread."""
    acc += part.T @ part


class FisherAccumulator:
    """Streams Fisher rows into per-block float64 sums.

    Float32 rows (what staging holds) are summed by one float32 GEMM per block and update, then
    added to the float64 totals: half the time of a float64 GEMM, with a rounding error of the
    order of the rows' own float32 rounding. Float64 rows are summed in float64.

    Args:
        blocks: the featurizer's layout.
        shape: a registered shape name.
    """

    def __init__(self, blocks: Sequence[Block], shape: str) -> None:
        check_choice(shape, SHAPES, "shape")
        self.shape = shape
        self.dim = max((b.stop for b in blocks), default=0)
        self.ranges = SHAPES[shape].partition(blocks)
        self.sums = [torch.zeros(hi - lo, hi - lo, dtype=torch.float64) for lo, hi in self.ranges]
        self.count = 0

    def update(self, rows: torch.Tensor, n_examples: int) -> None:
        """Add ``Σ r rᵀ`` of ``rows [R, dim]`` that stand for ``n_examples`` examples."""
        if rows.shape[-1] != self.dim:
            raise GradindexError(f"Fisher rows have {rows.shape[-1]} columns, expected {self.dim}")
        if rows.dtype == torch.float64:
            for acc, (lo, hi) in zip(self.sums, self.ranges, strict=True):
                part = rows[:, lo:hi]
                acc.addmm_(part.T, part)
        elif len(rows):
            r = rows.to(torch.float32)
            for acc, (lo, hi) in zip(self.sums, self.ranges, strict=True):
                _add_gram(acc, r[:, lo:hi])
        self.count += n_examples

    def merge(self, other: FisherAccumulator) -> None:
        """Add another accumulator's sums (another shard's)."""
        if other.ranges != self.ranges:
            raise GradindexError("cannot merge Fisher sums of different layouts")
        for acc, more in zip(self.sums, other.sums, strict=True):
            acc += more
        self.count += other.count

    def finalize(self, damping: float) -> Preconditioner:
        """The damped, factorized preconditioner of the mean Fisher."""
        if self.count == 0 and self.ranges:
            raise GradindexError("no example was accumulated into the Fisher")
        fishers = [s / max(self.count, 1) for s in self.sums]
        return Preconditioner(self.shape, self.dim, self.ranges, fishers, damping, self.count)


class Preconditioner:
    """``(F̃ + λI)⁻¹`` per block, applied by a float32 GEMM with the inverse where the block's
    condition bound allows it (:data:`FLOAT32_MAX_CONDITION`), else by float64 Cholesky solves.

    Keeps the Fisher blocks themselves, so a different damping is a refit, not a model pass.
    """

    def __init__(
        self,
        shape: str,
        dim: int,
        ranges: Sequence[tuple[int, int]],
        fishers: Sequence[torch.Tensor],
        damping: float,
        count: int,
    ) -> None:
        self.shape = shape
        self.dim = dim
        self.ranges: list[tuple[int, int]] = [(int(lo), int(hi)) for lo, hi in ranges]
        self.fishers = [f.to(torch.float64) for f in fishers]
        self.damping = float(damping)
        self.count = count
        self.lambdas: list[float] = []
        self.factors: list[torch.Tensor] = []
        self.conditions: list[float] = []
        """Per block, the bound ``(‖F̃‖_∞ + λ)/λ`` on its damped Fisher's condition number."""
        self._inverses: list[torch.Tensor | None] | None = None
        for (lo, hi), fisher in zip(self.ranges, self.fishers, strict=True):
            k = hi - lo
            lam = self.damping * float(torch.trace(fisher)) / k
            if lam <= 0:  # an all-zero block (a layer the loss never reaches) or no damping
                lam = max(lam, 1e-12 * max(float(fisher.diagonal().max()), 1.0))
            matrix = fisher + lam * torch.eye(k, dtype=torch.float64)
            factor, info = torch.linalg.cholesky_ex(matrix)
            if int(info) != 0:
                raise GradindexError(
                    f"the damped Fisher of block [{lo}, {hi}) is not positive definite "
                    f"(λ = {lam:.3g}); raise `damping`"
                )
            self.lambdas.append(lam)
            self.factors.append(factor)
            # λ_max(F̃) ≤ ‖F̃‖_∞ (max absolute row sum) and λ_min(F̃ + λI) ≥ λ
            norm = float(fisher.abs().sum(dim=1).max()) if k else 0.0
            self.conditions.append((norm + lam) / lam)

    def with_damping(self, damping: float) -> Preconditioner:
        """The same Fisher, refactorized with another damping."""
        return Preconditioner(self.shape, self.dim, self.ranges, self.fishers, damping, self.count)

    def inverses(self) -> list[torch.Tensor | None]:
        """Per block, ``(F̃+λI)⁻¹`` in float32 (from the float64 factor), or ``None`` where the
        block is too ill-conditioned for it and :meth:`apply` solves in float64."""
        if self._inverses is None:
            self._inverses = [
                torch.cholesky_inverse(factor).to(torch.float32)
                if cond <= FLOAT32_MAX_CONDITION else None
                for factor, cond in zip(self.factors, self.conditions, strict=True)
            ]
        return self._inverses

    def apply(self, raw: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(F̃+λI)⁻¹ g̃`` for rows ``raw [B, dim]``; float32 result, into ``out`` (``[B, dim]``
        float32, not ``raw``) when given: each block's product is written in place."""
        if raw.shape[-1] != self.dim:
            raise GradindexError(f"vectors have {raw.shape[-1]} columns, expected {self.dim}")
        if out is None:
            out = torch.empty(raw.shape[0], self.dim, dtype=torch.float32)
        elif tuple(out.shape) != (raw.shape[0], self.dim) or out.dtype != torch.float32:
            raise GradindexError(f"an output of {tuple(out.shape)} {out.dtype} for "
                                 f"{tuple(raw.shape)} rows")
        covered = 0
        for lo, hi in sorted(self.ranges):  # columns outside every block pass unchanged
            if lo > covered:
                out[:, covered:lo] = raw[:, covered:lo]
            covered = max(covered, hi)
        if covered < self.dim:
            out[:, covered:] = raw[:, covered:]
        for inverse, factor, (lo, hi) in zip(self.inverses(), self.factors, self.ranges,
                                             strict=True):
            if inverse is not None:  # symmetric: g̃ᵀ A⁻¹ = (A⁻¹ g̃)ᵀ
                rows = raw[:, lo:hi].to(torch.float32)
                if NUMPY_GEMM and _on_numpy(rows) and _on_numpy(out) and _on_numpy(inverse):
                    np.matmul(rows.numpy(), inverse.numpy(), out=out[:, lo:hi].numpy())
                else:
                    torch.mm(rows, inverse, out=out[:, lo:hi])
            else:
                block = raw[:, lo:hi].to(torch.float64).T.contiguous()
                out[:, lo:hi] = torch.cholesky_solve(block, factor).T
        return out

    def unapply(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(F̃+λI) v`` for stored rows ``vectors [B, dim]``: the raw gradients back (the
        inverse of :meth:`apply`, a product, no solve); float64 result."""
        if vectors.shape[-1] != self.dim:
            raise GradindexError(f"vectors have {vectors.shape[-1]} columns, expected {self.dim}")
        v = vectors.to(torch.float64)
        out = v.clone()
        for fisher, lam, (lo, hi) in zip(self.fishers, self.lambdas, self.ranges, strict=True):
            out[:, lo:hi] = v[:, lo:hi] @ fisher.T + lam * v[:, lo:hi]
        return out

    def save(self, path: str | Path) -> None:
        """Write the Fisher blocks and settings to one ``.npz`` file."""
        arrays: dict[str, np.ndarray] = {
            f"fisher_{i}": f.numpy() for i, f in enumerate(self.fishers)
        }
        arrays.update(
            shape=np.array(self.shape),
            dim=np.array(self.dim),
            ranges=np.array(self.ranges, dtype=np.int64).reshape(-1, 2),
            damping=np.array(self.damping),
            count=np.array(self.count),
        )
        np.savez(path, allow_pickle=False, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Preconditioner:
        with np.load(path, allow_pickle=False) as data:
            ranges = [(int(lo), int(hi)) for lo, hi in data["ranges"]]
            fishers = [torch.from_numpy(data[f"fisher_{i}"]) for i in range(len(ranges))]
            return cls(
                str(data["shape"]), int(data["dim"]), ranges, fishers,
                float(data["damping"]), int(data["count"]),
            )


def self_influence(queries: torch.Tensor, vectors: torch.Tensor,
                   scale: float = 1.0) -> torch.Tensor:
    """``scale · g̃_iᵀ(F̃+λI)⁻¹g̃_i`` per row: query vectors ``[N, dim]`` · index vectors
    ``[N, dim]``, float32 result. Summed in the rows' dtype: torch's pairwise reduction kept a
    float32 sum of 4,102 products within 2e-7 of float64 at a fifth of its time.

    The products are formed :data:`SELF_INFLUENCE_ROWS` rows at a time in one reused buffer
    (cached), not as one ``[N, dim]`` temporary: the same sums, 5× faster on windows of 4,096
    rows."""
    if queries.shape != vectors.shape:
        raise GradindexError(f"self-influence of {tuple(queries.shape)} queries against "
                             f"{tuple(vectors.shape)} vectors")
    n = len(queries)
    dtype = torch.promote_types(queries.dtype, vectors.dtype)
    sums = torch.empty(n, dtype=dtype)
    step = min(n, SELF_INFLUENCE_ROWS)
    products = torch.empty(step, *queries.shape[1:], dtype=dtype)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        part = products[: hi - lo]
        torch.mul(queries[lo:hi], vectors[lo:hi], out=part)
        torch.sum(part, dim=1, out=sums[lo:hi])
    return (sums.double() * scale).float()


SELF_INFLUENCE_ROWS = 256
"""Rows of products :func:`self_influence` forms at once (4 MB at dim 4,096)."""
