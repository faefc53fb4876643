"""A classification task over in-memory arrays: payloads ``{"x": [float, ...], "y": int}``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TaskError

__all__ = ["ArrayClassificationTask"]


class ArrayClassificationTask:
    """Cross-entropy classifier over feature vectors held in memory.

    Args:
        model: a module mapping ``[B, D]`` features to ``[B, C]`` logits, or a zero-argument
            factory (called with a checkpoint name when ``checkpoints`` is given).
        x: training features ``[N, D]``.
        y: training labels ``[N]`` in ``[0, C)``.
        ids: external ids of the training examples (default ``"0"``, ``"1"``, ...).
        checkpoints: names of several models to ensemble over; ``model`` must then be a
            factory taking one of them.
    """

    def __init__(
        self,
        model: nn.Module | Callable[..., nn.Module],
        x: np.ndarray,
        y: np.ndarray,
        *,
        ids: Sequence[str] | None = None,
        checkpoints: Sequence[str] | None = None,
        n_classes: int | None = None,
    ) -> None:
        self._model = model
        self.x = np.asarray(x, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.int64)
        if self.x.ndim != 2 or self.y.shape != (self.x.shape[0],):
            raise TaskError(f"x must be [N, D] and y [N], got {self.x.shape} and {self.y.shape}")
        self.ids = list(ids) if ids is not None else [str(i) for i in range(len(self.x))]
        self.n_features = self.x.shape[1]
        self.n_classes = int(n_classes if n_classes is not None else self.y.max() + 1)
        self._checkpoints = list(checkpoints) if checkpoints else None

    def __len__(self) -> int:
        """The training set's size, known without building its payloads (a Fisher budget
        plans over it)."""
        return len(self.x)

    def checkpoints(self) -> list[str]:
        return self._checkpoints or []

    def model(self, checkpoint: str | None = None) -> nn.Module:
        if isinstance(self._model, nn.Module):
            return self._model.eval()
        built = self._model(checkpoint) if checkpoint is not None else self._model()
        return built.eval()

    def examples(self) -> Iterable[tuple[str, dict[str, Any]]]:
        for i, ident in enumerate(self.ids):
            yield ident, self.payload(i)

    def payload(self, i: int, x: np.ndarray | None = None, y: np.ndarray | None = None) -> dict:
        """The JSON payload of row ``i`` of ``x``/``y`` (default: the training arrays)."""
        xs = self.x if x is None else x
        ys = self.y if y is None else y
        return {"x": [float(v) for v in xs[i]], "y": int(ys[i])}

    def collate(self, payloads: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for n, p in enumerate(payloads):
            if not isinstance(p, dict) or "x" not in p or "y" not in p:
                raise TaskError(f"example {n}: a payload needs keys 'x' (features) and 'y' (label)")
            x, y = p["x"], p["y"]
            if not isinstance(x, list | tuple) or len(x) != self.n_features:
                raise TaskError(f"example {n}: 'x' must be a list of {self.n_features} numbers")
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in x):
                raise TaskError(f"example {n}: 'x' must hold numbers only")
            if not isinstance(y, int) or isinstance(y, bool) or not 0 <= y < self.n_classes:
                raise TaskError(f"example {n}: 'y' must be an integer in [0, {self.n_classes})")
            xs.append(x)
            ys.append(y)
        return torch.tensor(xs, dtype=torch.float32), torch.tensor(ys, dtype=torch.long)

    def logits(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = model(batch[0])
        return out

    def loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], sample: bool = False
    ) -> torch.Tensor:
        logits = self.logits(model, batch)
        target = batch[1]
        if sample:
            with torch.no_grad():
                target = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1).squeeze(1)
        return F.cross_entropy(logits, target, reduction="none")

    def render(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "vector", "values": payload.get("x"), "label": payload.get("y")}
