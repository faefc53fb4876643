"""Seeded random masks: a pure function of what they are for, so every process draws the same.

A mask depends on (seed, checkpoint, mask index, layer name, layer shape, keep, purpose) only,
hashed with SHA-256 into the seed of a private CPU generator. Two shards, a later query, or
another machine therefore draw identical coordinates, while each checkpoint and each mask of
an ensemble draws its own.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

__all__ = ["mask_generator", "sample_indices", "split_keep"]


def mask_generator(
    *,
    seed: int,
    checkpoint: int,
    mask: int,
    layer: str,
    shape: Sequence[int],
    keep: float,
    purpose: str,
) -> torch.Generator:
    """A CPU generator seeded from a hash of everything the mask is a function of."""
    key = "|".join(
        [
            "gradindex-mask-v1",
            str(int(seed)),
            str(int(checkpoint)),
            str(int(mask)),
            layer,
            "x".join(str(int(s)) for s in shape),
            repr(float(keep)),
            purpose,
        ]
    )
    digest = hashlib.sha256(key.encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def sample_indices(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` distinct indices out of ``range(n)``, sorted (so ``k == n`` is the identity)."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot draw {k} of {n} indices")
    if k == n:
        return torch.arange(n)
    return torch.randperm(n, generator=gen)[:k].sort().values


def split_keep(rows: int, cols: int, keep: float) -> tuple[int, int]:
    """Rows and columns to keep so that ``k_out·k_in ≈ keep·rows·cols``.

    Both sides keep about √keep of their size, the input side rounding to make up the product;
    when that needs more columns than exist, all columns stay and the rows take up the rest.
    """
    if keep >= 1.0:
        return rows, cols
    target = keep * rows * cols
    k_out = max(1, round(math.sqrt(keep) * rows))
    k_in = max(1, round(target / k_out))
    if k_in > cols:
        k_in = cols
        k_out = max(1, min(rows, round(target / cols)))
    return k_out, k_in
