"""A worked task file: a wine classifier (scikit-learn's bundled wine data) indexed by gradindex.

    python examples/wine_task.py train wine.safetensors       # train and save the weights
    gradindex build --task examples/wine_task.py:WineTask \\
        --task-arg weights=wine.safetensors --name wine --fisher expected
    gradindex serve

A task tells gradindex four things: the model (weights loaded, eval mode), the training
examples as (id, JSON payload), how to turn payloads into a batch (rejecting bad ones), and the
per-example loss. ``logits`` (classifiers) enables the expected Fisher; ``render`` and
``queries`` feed the web page.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FEATURES = 13
CLASSES = 3


def _data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_wine

    data = load_wine()
    x = data.data.astype(np.float32)
    x = (x - x.mean(axis=0)) / x.std(axis=0)  # standardised: the net trains in seconds
    order = np.random.default_rng(0).permutation(len(x))  # the file is sorted by class
    return x[order], data.target.astype(np.int64)[order]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES))


class WineTask:
    """Classify wines; the first 150 are training examples, the rest are queries.

    Args:
        weights: a safetensors file written by ``python examples/wine_task.py train``.
    """

    def __init__(self, weights: str) -> None:
        self.weights = weights
        self.x, self.y = _data()

    def model(self) -> nn.Module:
        from safetensors.torch import load_file  # never unpickles code

        net = make_model()
        net.load_state_dict(load_file(self.weights))
        return net.eval()

    def examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for i in range(150):
            yield f"wine-{i}", {"x": self.x[i].tolist(), "y": int(self.y[i])}

    def queries(self) -> list[tuple[str, dict[str, Any]]]:
        return [(f"wine-{i}", {"x": self.x[i].tolist(), "y": int(self.y[i])})
                for i in range(150, len(self.x))]

    def collate(self, payloads: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        for n, p in enumerate(payloads):
            if not isinstance(p, dict) or len(p.get("x", [])) != FEATURES:
                raise ValueError(f"example {n}: 'x' must hold {FEATURES} numbers")
            if p.get("y") not in range(CLASSES):
                raise ValueError(f"example {n}: 'y' must be a class in 0..{CLASSES - 1}")
        x = torch.tensor([p["x"] for p in payloads], dtype=torch.float32)
        return x, torch.tensor([p["y"] for p in payloads])

    def logits(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = model(batch[0])
        return out

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
             sample: bool = False) -> torch.Tensor:
        logits = self.logits(model, batch)
        target = batch[1]
        if sample:  # targets drawn from the model itself, for the sampled Fisher
            target = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(1)
        return F.cross_entropy(logits, target, reduction="none")  # per example: [B]

    def render(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "text", "text": f"class {payload['y']}", "label": payload["y"]}


def train(path: str, epochs: int = 300) -> None:
    """Train on the 150 training wines with Adam and save the weights as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    x, y = _data()
    net = make_model()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x[:150]), torch.from_numpy(y[:150])
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(net(xt), yt).backward()
        opt.step()
    save_file(net.state_dict(), path)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "train":
        sys.exit("usage: python examples/wine_task.py train OUT.safetensors")
    train(sys.argv[2])
