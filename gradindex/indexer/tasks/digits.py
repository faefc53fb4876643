"""The digits demo: a classifier trained on scikit-learn's bundled 8×8 digits, no download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TaskError
from .classification import ArrayClassificationTask

__all__ = ["DigitsTask", "load_digits_split", "make_digits_model", "train_classifier"]


def load_digits_split(
    train_size: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1], shuffled by ``seed``: ``x_train, y_train, x_test, y_test``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    if not 1 <= train_size < len(x):
        raise TaskError(f"`train_size` must be in [1, {len(x)}), got {train_size}")
    tr, te = order[:train_size], order[train_size:]
    return x[tr], y[tr], x[te], y[te]


def make_digits_model(kind: str = "logreg", hidden: int = 32, seed: int = 0) -> nn.Module:
    """``logreg`` (multinomial logistic regression) or ``mlp`` (one hidden tanh layer)."""
    torch.manual_seed(seed)
    if kind == "logreg":
        return nn.Sequential(nn.Linear(64, 10))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    raise TaskError(f"digits model must be 'logreg' or 'mlp', got {kind!r}")


def train_classifier(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    weight_decay: float = 1e-3,
    max_iter: int = 500,
) -> nn.Module:
    """Full-batch L-BFGS on mean cross-entropy + ``weight_decay/2·‖θ‖²``, to convergence.

    Deterministic on the CPU, so the same data and seed give the same weights; converged, so
    influence functions (which assume an optimum) apply. Trained on one thread whatever the
    process's thread count: a product split across threads sums in another order, and 500
    L-BFGS steps carry that rounding into other weights, so a server's worker processes (which
    run fewer threads each) would load a model the index was not built from.
    """
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
        history_size=50, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(xt), yt)
        loss = loss + 0.5 * weight_decay * sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


class DigitsTask(ArrayClassificationTask):
    """Built-in task: a digits classifier, trained here in seconds or loaded from safetensors.

    Args:
        model: ``logreg`` or ``mlp``.
        train_size: training examples (the rest of the 1,797 are the test split).
        seed: data shuffle and initialisation seed.
        weight_decay: L2 penalty used when training.
        weights: a safetensors file of the trained state dict; trained (and not saved) if None.
        hidden: hidden units of the ``mlp``.
    """

    def __init__(
        self,
        model: str = "logreg",
        train_size: int = 1000,
        seed: int = 0,
        weight_decay: float = 1e-3,
        weights: str | None = None,
        hidden: int = 32,
    ) -> None:
        x_tr, y_tr, x_te, y_te = load_digits_split(train_size, seed)
        self.kind = model
        self.hidden = hidden
        self.seed = seed
        self.weight_decay = weight_decay
        self.weights = weights
        self.x_test, self.y_test = x_te, y_te
        self._trained: nn.Module | None = None
        super().__init__(self._load, x_tr, y_tr, ids=[f"train-{i}" for i in range(len(x_tr))],
                         n_classes=10)

    def _load(self) -> nn.Module:
        if self._trained is None:
            net = make_digits_model(self.kind, self.hidden, self.seed)
            if self.weights is not None:
                from safetensors.torch import load_file

                path = Path(self.weights)
                if not path.is_file():
                    raise TaskError(f"digits weights {str(path)!r} do not exist")
                net.load_state_dict(load_file(str(path)))
            else:
                train_classifier(net, self.x, self.y, weight_decay=self.weight_decay)
            self._trained = net.eval()
        return self._trained

    def test_payloads(self, n: int | None = None) -> list[dict[str, Any]]:
        """Payloads of the held-out digits, for queries."""
        count = len(self.x_test) if n is None else min(n, len(self.x_test))
        return [self.payload(i, self.x_test, self.y_test) for i in range(count)]

    def queries(self) -> list[tuple[str, dict[str, Any]]]:
        """Held-out digits as ``(id, payload)``: what a web page offers to query with."""
        return [(f"test-{i}", p) for i, p in enumerate(self.test_payloads())]

    def render(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "image", "shape": [8, 8], "pixels": payload.get("x"),
                "label": payload.get("y")}
