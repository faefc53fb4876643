"""Judging attributions: the linear datamodeling score (LDS) and top-k agreement.

LDS (Park et al. 2023, TRAK §2): for each test example, the Spearman correlation across random
training subsets between the summed attribution scores of the subset and the test loss of a
model retrained on it. With gradindex's sign (positive = lowers the loss), the prediction is
correlated with the *negated* loss, so a good attribution scores near 1 and random near 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import spearmanr

__all__ = ["lds", "random_subsets", "retrain_losses", "topk_overlap"]


def random_subsets(n: int, count: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``count`` random subsets of ``range(n)``, each of ``round(fraction·n)``, as ``[M, n]``
    bool."""
    rng = np.random.default_rng(seed)
    size = round(fraction * n)
    masks = np.zeros((count, n), dtype=bool)
    for j in range(count):
        masks[j, rng.choice(n, size=size, replace=False)] = True
    return masks


def retrain_losses(
    subsets: np.ndarray, train_and_eval: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Test losses ``[M, Q]`` of models retrained on each subset (``train_and_eval(indices)``)."""
    return np.stack([np.asarray(train_and_eval(np.flatnonzero(s))) for s in subsets])


def lds(scores: np.ndarray, subsets: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Per-query LDS.

    Args:
        scores: ``[Q, N]`` attribution scores (positive = proponent).
        subsets: ``[M, N]`` bool masks of the retraining subsets.
        losses: ``[M, Q]`` test losses of the retrained models.

    Returns:
        ``[Q]`` Spearman correlations (NaN where a query's predictions are constant).
    """
    predicted = subsets.astype(np.float64) @ np.asarray(scores, dtype=np.float64).T  # [M, Q]
    out = np.empty(predicted.shape[1])
    for q in range(predicted.shape[1]):
        if np.ptp(predicted[:, q]) == 0 or np.ptp(losses[:, q]) == 0:
            out[q] = np.nan
        else:
            out[q] = spearmanr(predicted[:, q], -losses[:, q]).statistic
    return out


def topk_overlap(scores: np.ndarray, reference: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the reference's top-k proponents that ``scores`` also ranks top-k."""
    a = np.argsort(-scores, axis=1)[:, :k]
    b = np.argsort(-reference, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))
