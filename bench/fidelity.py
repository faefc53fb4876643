"""Fidelity and cost of gradindex's attributions: the benchmark that chooses the defaults.

For each benchmark (digits logistic regression, a digits MLP, an MNIST MLP ensemble) it scores
the test queries with exact influence (where feasible), the gradient dot product, TRAK's
Gaussian projection and gradindex's compressors over a grid of settings, and reports the linear
datamodeling score (LDS, mean ± standard error over the queries), top-10 overlap with exact
influence, and featurize cost. Rows vary one setting at a time from the library's defaults.

Checkpoints and retraining ground truth are cached in ``bench/.cache`` under a hash of their
settings; so are each row's scores, keyed also by a hash of the indexer's scoring code, so a
rerun re-measures only what changed (``--refresh`` re-measures every row).

    python bench/fidelity.py            # digits + MNIST: 11 min cold on 2 cores, 10 s warm
    python bench/fidelity.py --stretch  # also ensembles beyond the defaults (+4 min cold)
    python bench/fidelity.py --quick    # tiny configuration, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper module beside this file

from _fidelity_data import (  # noqa: E402
    Benchmark,
    Cache,
    DigitsSettings,
    MnistSettings,
    WithoutLogits,
    digits_benchmark,
    load_mnist,
    make_mlp,
    mnist_benchmark,
    one_thread,
    train_mlp,
)

from gradindex import CompressionConfig, Featurizer, InMemoryIndex, PreconditionerConfig, Task, lds
from gradindex.indexer.config import ENSEMBLE_FROM
from gradindex.indexer.evaluate import topk_overlap
from gradindex.indexer.task import TaskAdapter
from gradindex.indexer.tasks import (
    ArrayClassificationTask,
    load_digits_split,
    make_digits_model,
    train_classifier,
)

log = logging.getLogger("fidelity")

HERE = Path(__file__).resolve().parent
SCORING_CODE = (
    "compress.py", "featurize.py", "fisher.py", "hooks.py", "influence.py", "masks.py",
    "precondition.py", "task.py", "exact.py", "tasks/classification.py", "tasks/digits.py",
)
"""Indexer modules whose code determines a row's scores: a change to any re-measures the row.
(``config.py`` holds defaults only; a row's key records its full configuration instead.)"""

BUDGET = 4096
"""Default storage budget: floats per training example per checkpoint (all masks together)."""

GAUSSIAN_BATCH = 1000
"""Batch size of the Gaussian baseline: it regenerates its ``[d, k]`` projection per batch, so
a small batch would charge it mostly for random numbers (measured on MNIST: 512 took 1.4× as
long as 1000)."""

CHECKPOINT_LEVELS = (1, 2, 3, 5, 10)
"""Ensembles are scored at these checkpoint counts (slices of one featurize); an ``auto``
compression row takes the counts below ``ENSEMBLE_FROM`` from a featurize with what ``auto``
picks for them."""


def scoring_fingerprint() -> str:
    """Hash of the indexer's scoring code and the torch version."""
    root = HERE.parent / "indexer"
    digest = hashlib.sha256(torch.__version__.encode())
    for name in SCORING_CODE:
        path = root / name
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b""))
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One attribution method to score: an index configuration, exact influence or random.

    Attributes:
        label: what the tables call it.
        axis: the sweep it belongs to (``reference``, ``damping``, ``k``, ``masks``,
            ``fisher``, ``shape``, ``compressor``, ``ensemble``, ``stretch``).
        kind: ``index``, ``exact`` (the benchmark's exact influence) or ``random``.
        ensemble: featurize every checkpoint of the benchmark (else the first only).
        dampings: further dampings scored from the same Fisher (``with_damping``).
    """

    label: str
    axis: str
    kind: str = "index"
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    preconditioning: PreconditionerConfig = field(default_factory=PreconditionerConfig)
    ensemble: bool = False
    dampings: tuple[float, ...] = ()
    wrap: str = ""
    """``no-logits``: the benchmark's task without ``logits`` (only ``loss(sample=True)``)."""

    def all_dampings(self) -> list[float]:
        """The configured damping first, then the further ones (none for ``identity``)."""
        first = self.preconditioning.damping
        if self.preconditioning.shape == "identity":
            return [first]
        return [first] + [d for d in self.dampings if d != first]


def index_method(
    axis: str, base: Method, label: str = "", *, dampings: Sequence[float] = (),
    ensemble: bool = False, wrap: str = "", **changes: Any,
) -> Method:
    """``base`` with some compression or preconditioning fields changed."""
    cfields = {f.name for f in dataclasses.fields(CompressionConfig)}
    cc = {k: v for k, v in changes.items() if k in cfields}
    pc = {k: v for k, v in changes.items() if k not in cfields}
    compression = base.compression.to_json()
    if "keep" in cc:
        compression["dim"] = None
    if "dim" in cc:
        compression["keep"] = None
    compression.update(cc)
    ccfg = CompressionConfig.from_json(compression)
    pcfg = PreconditionerConfig(**{**base.preconditioning.to_json(), **pc})
    return Method(label=label or describe(ccfg, pcfg), axis=axis, compression=ccfg,
                  preconditioning=pcfg, ensemble=ensemble, dampings=tuple(dampings), wrap=wrap)


def describe(cc: CompressionConfig, pc: PreconditionerConfig) -> str:
    """A short label: ``factorized-dropout k=4096 ×2, expected, block``."""
    if cc.compressor == "auto" and cc.keep is None and cc.dim is None and cc.masks is None:
        size, masks = "compression", ""
    else:
        cc = cc.resolve(1) if cc.compressor != "auto" else cc
        size = f"keep={cc.keep:g}" if cc.keep is not None else f"k={cc.dim or 'auto'}"
        masks = f" ×{cc.masks}" if cc.masks and cc.masks > 1 else ""
    if cc.compressor == "dropout-sjlt" and cc.sjlt_expand != CompressionConfig().sjlt_expand:
        masks += f" (expand {cc.sjlt_expand})"
    if pc.shape == "identity":
        return f"dot product ({cc.compressor} {size}{masks})"
    fisher = f"sampled×{pc.samples}" if pc.fisher == "sampled" and pc.samples else pc.fisher
    budget = "" if pc.fisher == "empirical" else (
        ", all rows" if pc.fisher_budget is None else f", {pc.fisher_budget} rows")
    return f"{cc.compressor} {size}{masks}, {fisher}{budget}, {pc.shape}"


DAMPINGS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
"""Dampings (× each block's mean diagonal) swept from one Fisher with ``with_damping``."""
PREVIOUS_DEFAULTS = {"compressor": "factorized-dropout", "dim": 4096, "masks": 1, "damping": 0.1}
"""The defaults before this benchmark chose them, kept as a row for comparison."""


def digits_methods(quick: bool) -> list[Method]:
    """Digits grid. Sizes are keep fractions: the default k exceeds these models, so the
    default keeps every coordinate (in each of its masks)."""
    base = Method("default", "k")
    one = {"masks": 1}
    factorized = {"compressor": "factorized-dropout", **one}
    sjlt = {"compressor": "dropout-sjlt", **one}
    gaussian = {"compressor": "gaussian", "batch_size": GAUSSIAN_BATCH, **one}
    quarter = index_method("k", base, keep=0.25, **factorized)
    methods = [
        Method("exact influence", "reference", kind="exact"),
        Method("random scores", "reference", kind="random"),
        index_method("reference", base, "gradient dot product (full gradient)", keep=1.0,
                     shape="identity", **factorized),
        index_method("damping", base, dampings=() if quick else DAMPINGS),
        quarter,
        index_method("masks", quarter, masks=4),
        index_method("fisher", base, fisher="expected", dampings=() if quick else DAMPINGS),
        index_method("k", base, keep=0.25, **gaussian),
    ]
    if quick:
        return methods
    for keep in (0.05, 0.1, 0.5):
        methods.append(index_method("k", base, keep=keep, **factorized))
    methods.append(index_method("k", base, "previous defaults (factorized-dropout keep=1)",
                                **PREVIOUS_DEFAULTS))
    for keep in (0.05, 0.1, 0.25, 0.5):
        methods.append(index_method("k", base, keep=keep, **sjlt))
    for keep in (0.05, 0.1, 0.5):
        methods.append(index_method("k", base, keep=keep, **gaussian))
    for masks, keep in ((2, 0.125), (4, 0.0625), (2, 0.25), (8, 0.25)):
        methods.append(index_method("masks", quarter, masks=masks, keep=keep))
    methods += [
        index_method("fisher", base, fisher="sampled"),
        index_method("fisher", quarter, fisher="sampled"),
        index_method("fisher", quarter, fisher="expected"),
        index_method("shape", base, shape="full"),
        index_method("shape", base, shape="full", fisher="expected", keep=1.0, **one),
        index_method("compressor", quarter, compressor="dropout"),
        index_method("compressor", base, compressor="dropout-sjlt"),
    ]
    return methods


def mnist_methods(quick: bool, stretch: bool) -> list[Method]:
    """MNIST grid around the defaults at one checkpoint; the defaults, the previous defaults
    and the Gaussian projection at the same k also as ensembles of 1, 5 and 10 checkpoints."""
    base = Method("default", "k")
    one = {"masks": 1}
    factorized = {"compressor": "factorized-dropout", **one}
    sjlt = {"compressor": "dropout-sjlt", **one}
    gaussian = {"compressor": "gaussian", "batch_size": GAUSSIAN_BATCH, "dim": BUDGET, **one}
    extra = () if quick else (0.3,)
    methods = [
        Method("random scores", "reference", kind="random"),
        index_method("reference", base, shape="identity"),
        index_method("ensemble", base, ensemble=True, dampings=extra),
        index_method("ensemble", base, ensemble=True, dampings=extra, **gaussian),
    ]
    if quick:
        return methods
    methods += [
        index_method("ensemble", base, "previous defaults (factorized-dropout k=4096)",
                     ensemble=True, **PREVIOUS_DEFAULTS),
        index_method("damping", base, dampings=DAMPINGS),
    ]
    for dim in (1024, 2048, 8192):  # 4096 is the previous defaults' row
        methods.append(index_method("k", base, dim=dim, **factorized))
    for dim in (1024, 2048, 4096, 8192):
        methods.append(index_method("k", base, dim=dim, **sjlt))
    methods.append(index_method("k", base, **{**gaussian, "dim": 1024}))
    methods += [
        index_method("masks", base, masks=4, dim=BUDGET // 4),
        index_method("masks", base, masks=2, dim=BUDGET),
        index_method("masks", base, masks=2, dim=BUDGET // 2, compressor="dropout-sjlt"),
        index_method("fisher", base, fisher="sampled"),
        index_method("fisher", base, fisher="expected", dampings=(0.3, 1.0)),
        index_method("shape", base, shape="full"),
        index_method("compressor", base, dim=BUDGET, compressor="dropout", masks=1),
    ]
    if stretch:
        methods += [
            index_method("stretch", base, ensemble=True, compressor="dropout-sjlt",
                         dampings=(0.3,)),
            index_method("stretch", base, ensemble=True, fisher="expected", dampings=(0.3,)),
            index_method("stretch", base, ensemble=True, fisher="expected", damping=0.3,
                         dampings=(0.1,), dim=BUDGET, **sjlt),
        ]
    return methods


OLD_DEFAULTS = {"fisher": "empirical", "fisher_budget": None, "compressor": "factorized-dropout",
                "dim": 2048, "masks": 2, "damping": 0.1}
"""The defaults before ``auto``: the empirical Fisher on every example, `factorized-dropout`
k=2,048 ×2, λ = 0.1."""
FACTORIZED = {"compressor": "factorized-dropout", "dim": 2048, "masks": 2}
"""The compression of the defaults before `dropout-sjlt`."""
BUDGETS = (1024, 2048, 4096, 8192, 16384, None)
"""Fisher row budgets of the fidelity-against-budget curve (None: every example)."""


def fisher_methods(name: str) -> list[Method]:
    """The new defaults side by side with the old ones and the Gaussian baseline, the digits
    task without ``logits``, and fidelity against the Fisher budget."""
    base = Method("default", "defaults")
    one = {"masks": 1}
    gaussian = {"compressor": "gaussian", "batch_size": GAUSSIAN_BATCH, "dim": BUDGET, **one}
    extra = (0.1, 0.3)
    if name == "mnist-mlp":
        sjlt = {"compressor": "dropout-sjlt", "dim": BUDGET, **one}
        return [
            Method("random scores", "reference", kind="random"),
            index_method("defaults", base, "new defaults", ensemble=True, dampings=extra),
            index_method("defaults", base, "old defaults (empirical, every example)",
                         ensemble=True, dampings=extra, **OLD_DEFAULTS),
            # what auto picks below and from ENSEMBLE_FROM checkpoints, alone (the same
            # scores as the defaults' row), and two masks of 2,048 with dropout-sjlt
            index_method("compression", base, ensemble=True, dampings=extra, **FACTORIZED),
            index_method("compression", base, ensemble=True, dampings=extra, **sjlt),
            index_method("compression", base, ensemble=True, dampings=extra,
                         **{**FACTORIZED, "compressor": "dropout-sjlt"}),
            index_method("defaults", base, dampings=extra, **gaussian),
        ]
    methods = [
        Method("exact influence", "reference", kind="exact"),
        Method("random scores", "reference", kind="random"),
        index_method("defaults", base, "new defaults", dampings=DAMPINGS),
        index_method("defaults", base, "old defaults (empirical, every example)",
                     dampings=extra, **OLD_DEFAULTS),
        index_method("defaults", base, dampings=extra, **{**gaussian, "dim": None,
                                                          "keep": 0.25}),
    ]
    if name == "digits-logreg":
        methods.append(index_method("defaults", base, "new defaults", dampings=DAMPINGS,
                                    wrap="no-logits"))
        methods += [index_method("budget", base, dampings=extra, fisher_budget=b,
                                 wrap="no-logits") for b in BUDGETS]
    methods += [index_method("budget", base, dampings=extra, fisher_budget=b) for b in BUDGETS]
    return methods


# ----------------------------------------------------------------------------- scoring


class TimedFeaturizer(Featurizer):
    """A featurizer that adds up the seconds spent in model passes (``raw`` and ``fisher``).

    ``shared_seconds`` is the part spent collating payloads, which every checkpoint shares;
    the rest grows with the number of checkpoints.
    """

    def __init__(self, *args: Any, reference: bool = False, **kwargs: Any) -> None:
        self.reference = reference
        """Compute ``expected`` Fisher rows one backward per class (the path before batching)."""
        self._depth = 0
        self.shared_seconds = 0.0
        self.fisher_seconds = 0.0
        start = time.perf_counter()
        super().__init__(*args, **kwargs)
        self.seconds = time.perf_counter() - start

    def collate(self, payloads: Sequence[dict[str, Any]]) -> Any:
        start = time.perf_counter()
        try:
            return super().collate(payloads)
        finally:
            if self._depth > 0:
                self.shared_seconds += time.perf_counter() - start

    def _timed(self, fn: Any, *args: Any) -> torch.Tensor:
        # Hook compressors run many small operations, fastest on one thread (a second gains
        # nothing, and on a busy machine torch's pool slowed them tenfold); full-gradient
        # compressors spend their time in large matrix products, which use every thread.
        threads = one_thread() if self.compressors[0][0].uses_hooks else contextlib.nullcontext()
        self._depth += 1
        start = time.perf_counter()
        try:
            with threads:
                out: torch.Tensor = fn(*args)
            return out
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.seconds += time.perf_counter() - start

    def raw(self, payloads: Sequence[dict[str, Any]]) -> torch.Tensor:
        return self._timed(super().raw, payloads)

    def fisher(
        self, payloads: Sequence[dict[str, Any]], kind: str, samples: int = 1,
        *, rank: int | None = None, reference: bool = False,
    ) -> torch.Tensor:
        before = self.seconds
        fisher = functools.partial(super().fisher, rank=rank,
                                   reference=reference or self.reference)
        try:
            return self._timed(fisher, payloads, kind, samples)
        finally:
            self.fisher_seconds += self.seconds - before


def fit_timed(
    task: Task, compression: CompressionConfig, preconditioning: PreconditionerConfig,
    train: Sequence[dict[str, Any]],
) -> tuple[InMemoryIndex, float, float, float, float]:
    """Build an in-memory index.

    Returns:
        The index; featurize seconds (model passes for the vectors and the Fisher rows), the
        part of them every checkpoint shares (collating payloads), finalize seconds (Fisher
        accumulation, factorization, preconditioning), and the Fisher rows' seconds (part of
        the featurize seconds).
    """
    start = time.perf_counter()
    feat = TimedFeaturizer(task, compression, device="cpu")
    examples = [(str(i), p) for i, p in enumerate(train)]
    index = InMemoryIndex.fit(task, compression, preconditioning, examples=examples,
                              featurizer=feat)
    total = time.perf_counter() - start
    return index, feat.seconds, feat.shared_seconds, total - feat.seconds, feat.fisher_seconds


def checkpoint_scores(index: InMemoryIndex, query_raw: torch.Tensor) -> np.ndarray:
    """Scores ``[C, Q, N]`` of each checkpoint alone (mean over its masks).

    Every (checkpoint, mask) group has its own preconditioner blocks, so a checkpoint's slice of
    the vectors is an index of that checkpoint alone (with its own masks), and the mean of the
    first ``c`` slices is the ``c``-checkpoint ensemble.
    """
    feat = index.featurizer
    masks = feat.config.masks
    out = []
    for c in range(len(feat.checkpoints)):
        blocks = [b for b in feat.blocks if b.checkpoint == c]
        lo, hi = blocks[0].start, blocks[-1].stop
        out.append((query_raw[:, lo:hi] @ index.vectors[:, lo:hi].T / masks).numpy())
    return np.stack(out)


def attribute(bench: Benchmark, method: Method, cache: Cache, refresh: bool) -> dict[str, Any]:
    """Per-checkpoint scores ``[D, C, Q, N]`` (one per damping) and the costs, cached."""
    task: Any = bench.task if method.ensemble else bench.single
    if method.wrap == "no-logits":
        task = WithoutLogits(task)
    checkpoints = len(TaskAdapter.of(task).checkpoints())
    key = {  # what auto picks, not "auto": a row equal to another shares its scores
        "bench": bench.key(), "compression": method.compression.resolve(checkpoints).to_json(),
        "wrap": method.wrap,
        "preconditioning": method.preconditioning.to_json(), "ensemble": method.ensemble,
        "dampings": method.all_dampings(), "code": scoring_fingerprint(),
        "queries": len(bench.queries),
    }

    def build() -> dict[str, np.ndarray]:
        log.info("%s: featurizing %s", bench.name, method.label)
        index, featurize_s, shared_s, finalize_s, fisher_s = fit_timed(
            task, method.compression, method.preconditioning, bench.train)
        feat = index.featurizer
        query_raw = torch.cat([
            feat.raw(bench.queries[lo : lo + feat.config.batch_size])
            for lo in range(0, len(bench.queries), feat.config.batch_size)
        ])
        scores = []
        for damping in method.all_dampings():
            refit = (index if damping == method.preconditioning.damping
                     else index.with_damping(damping))
            scores.append(checkpoint_scores(refit, query_raw))
        return {
            "scores": np.stack(scores).astype(np.float32),
            "featurize_s": np.array(featurize_s),
            "shared_s": np.array(shared_s),
            "finalize_s": np.array(finalize_s),
            "fisher_s": np.array(fisher_s),
            "fisher_plan": np.array(index.fisher_plan.describe() if index.fisher_plan else ""),
            "dim": np.array(feat.dim),
            "checkpoints": np.array(len(feat.checkpoints)),
            "keep": np.array(feat.keep),
        }

    hits = cache.hits
    if refresh and (path := cache.path("scores", key)) is not None:
        path.unlink(missing_ok=True)
    arrays = cache.arrays("scores", key, build)
    return {**arrays, "cached": cache.hits > hits}


def evaluate(bench: Benchmark, scores: np.ndarray) -> dict[str, Any]:
    """LDS mean and standard error over the queries, and top-10 overlap with exact influence."""
    per_query = lds(scores, bench.subsets, bench.losses)
    ok = per_query[np.isfinite(per_query)]
    return {
        "lds": float(ok.mean()),
        "lds_se": float(ok.std(ddof=1) / math.sqrt(len(ok))) if len(ok) > 1 else float("nan"),
        "queries": int(len(ok)),
        "per_query": [float(v) for v in per_query],
        "top10": None if bench.exact is None else topk_overlap(scores, bench.exact, 10),
    }


def run_benchmark(
    bench: Benchmark, methods: Sequence[Method], cache: Cache, refresh: bool = False
) -> list[dict[str, Any]]:
    """Score every method on ``bench``: one row per (method, damping, checkpoint count)."""
    rows: list[dict[str, Any]] = []
    n = len(bench.train)
    for method in methods:
        if method.kind == "exact":
            if bench.exact is not None:
                rows.append({**_row(bench, method), "label": bench.exact_label,
                             **evaluate(bench, bench.exact)})
            continue
        if method.kind == "random":
            rng = np.random.default_rng(0)
            scores = rng.normal(size=(len(bench.queries), n))
            rows.append({**_row(bench, method), **evaluate(bench, scores)})
            continue
        result = attribute(bench, method, cache, refresh)
        few = result
        if method.ensemble and method.compression.compressor == "auto":
            few = attribute(bench, dataclasses.replace(
                method, compression=method.compression.resolve(1)), cache, refresh)
        total_c = int(result["checkpoints"])
        levels = sorted({c for c in CHECKPOINT_LEVELS if c <= total_c} | {total_c})
        for d, damping in enumerate(method.all_dampings()):
            for c in levels:
                got = few if c < ENSEMBLE_FROM else result
                shared = float(got["shared_s"])
                featurize_s = shared + (float(got["featurize_s"]) - shared) * c / total_c
                rows.append({
                    **_row(bench, method),
                    **({"compressor": method.compression.resolve(c).compressor}
                       if method.compression.compressor == "auto" else {}),
                    "damping": damping,
                    "checkpoints": c,
                    "storage": int(got["dim"]) // total_c,
                    "keep": float(got["keep"]),
                    "featurize_s": featurize_s,
                    "finalize_s": float(got["finalize_s"]) * c / total_c,
                    "fisher_s": float(got.get("fisher_s", 0.0)) * c / total_c,
                    "fisher_plan": str(got.get("fisher_plan", "")),
                    "examples_per_s": n / featurize_s,
                    "cached": bool(got["cached"]),
                    "swept": d > 0,
                    **evaluate(bench, got["scores"][d, :c].mean(axis=0)),
                })
    return rows


def _row(bench: Benchmark, method: Method) -> dict[str, Any]:
    cc, pc = method.compression, method.preconditioning
    index = method.kind == "index"
    return {
        "benchmark": bench.name, "label": method.label, "axis": method.axis,
        "kind": method.kind,
        "compressor": cc.compressor if index else None,
        "dim": cc.dim if index else None, "keep": cc.keep if index else None,
        "masks": cc.masks if index else None, "batch_size": cc.batch_size if index else None,
        "shape": pc.shape if index else None, "fisher": pc.fisher if index else None,
        "samples": pc.samples if index else None, "damping": pc.damping if index else None,
        "checkpoints": 1, "storage": None, "featurize_s": None, "finalize_s": None,
        "fisher_s": None, "fisher_budget": pc.fisher_budget if index else None,
        "wrap": method.wrap,
        "examples_per_s": None, "cached": False, "swept": False,
        "default": index and _is_default(cc, pc),
    }


def _is_default(cc: CompressionConfig, pc: PreconditionerConfig) -> bool:
    return (dataclasses.replace(cc, batch_size=CompressionConfig().batch_size)
            == CompressionConfig() and pc == PreconditionerConfig())


# ----------------------------------------------------------------------------- mislabels

FLIP = 0.1
"""Fraction of the digits training labels flipped for mislabel detection."""
TOPS = (0.05, 0.1, 0.2)


def mislabel_detection(kind: str, cache: Cache) -> dict[str, Any]:
    """Flip 10% of the training labels (seed 0) to another class, retrain the ``kind`` model
    on them (``logreg``, ``mlp``: 1,000 digits; ``mnist``: the MNIST MLP on 4,000 images, one
    seed), and rank the training examples by each score: the fraction of the flipped ones
    found in the top 5%, 10% and 20%."""
    if kind == "mnist":
        x, y, _, _ = load_mnist(MnistSettings())
    else:
        x, y, _, _ = load_digits_split(1000, seed=0)
    rng = np.random.default_rng(0)
    n = len(y)
    flipped = rng.choice(n, int(FLIP * n), replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 10, len(flipped))) % 10

    def make() -> torch.nn.Module:
        if kind == "mnist":
            return make_mlp(MnistSettings().hidden)
        return make_digits_model(kind, 32, seed=0)

    def train() -> torch.nn.Module:
        if kind == "mnist":
            return train_mlp(x, noisy, MnistSettings(), seed=0)
        net = make()
        with one_thread():
            return train_classifier(net, x, noisy, weight_decay=1e-3)

    state = cache.state_dict(f"mislabel-{kind}", {"model": kind, "flip": FLIP, "seed": 0}, train)
    net = make()
    net.load_state_dict(state)
    net.eval()
    task = ArrayClassificationTask(net, x, noisy, n_classes=10)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(
            net(torch.tensor(x)), torch.tensor(noisy), reduction="none").numpy()
    rankings: dict[str, np.ndarray] = {"random": rng.random(n), "trained model's loss": loss}
    seconds: dict[str, float] = {}
    configs = (
        ("new defaults (auto: expected, 8192 rows)", PreconditionerConfig()),
        ("empirical (old default)", PreconditionerConfig(fisher="empirical", fisher_budget=None)),
        ("sampled, 8192 rows", PreconditionerConfig(fisher="sampled")),
        ("expected, every example", PreconditionerConfig(fisher="expected", fisher_budget=None)),
    )
    for label, pcfg in configs:
        start = time.perf_counter()
        with one_thread():
            index = InMemoryIndex.fit(task, CompressionConfig(), pcfg, device="cpu")
        seconds[label] = time.perf_counter() - start
        si = index.self_influence.double().numpy()
        norm = (index.raw.double() ** 2).sum(dim=1).numpy() / index.featurizer.groups
        rankings[f"{label}: self-influence"] = si
        rankings[f"{label}: relative self-influence"] = si / np.maximum(norm, 1e-30)
    is_flipped = np.zeros(n, dtype=bool)
    is_flipped[flipped] = True
    found = {}
    for label, score in rankings.items():
        order = np.argsort(-score, kind="stable")
        found[label] = {f"{top:g}": float(is_flipped[order[: int(top * n)]].sum() / len(flipped))
                        for top in TOPS}
    return {"model": kind, "examples": n, "flipped": len(flipped), "found": found,
            "seconds": seconds}


def mislabel_table(results: Sequence[dict[str, Any]]) -> str:
    """Fraction of the flipped examples in the top 5/10/20% of each ranking, per model."""
    head = " | ".join(f"{r['model']} top {int(t * 100)}%" for r in results for t in TOPS)
    out = ["### Mislabel detection (10% of labels flipped)\n",
           f"| ranking | {head} |", "|---|" + "---|" * (len(results) * len(TOPS))]
    for label in results[0]["found"]:
        cells = " | ".join(f"{r['found'][label][f'{t:g}']:.2f}" for r in results for t in TOPS)
        out.append(f"| {label} | {cells} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- reports


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else \
        format(value, spec)


def markdown_tables(rows: Sequence[dict[str, Any]]) -> str:
    """One table per benchmark, then the MNIST default-vs-Gaussian comparison."""
    out = []
    for name in dict.fromkeys(r["benchmark"] for r in rows):
        out.append(f"### {name}\n")
        out.append("| axis | method | λ | floats/ex/ckpt | ckpts | LDS ± s.e. | × exact | top-10 "
                   "| featurize s | of which Fisher s | finalize s |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        exact = next((r["lds"] for r in rows if r["benchmark"] == name and r["kind"] == "exact"),
                     None)
        for r in rows:
            if r["benchmark"] != name:
                continue
            label = f"**{r['label']}** (default)" if r["default"] else r["label"]
            if r.get("wrap"):
                label += f" [task {r['wrap']}]"
            ratio = _fmt(r["lds"] / exact, ".2f") if exact else "—"
            out.append(
                f"| {r['axis']} | {label} | {_fmt(r['damping'], 'g')} | "
                f"{_fmt(r['storage'], 'd')} | {r['checkpoints']} | "
                f"{r['lds']:.3f} ± {r['lds_se']:.3f} | {ratio} | {_fmt(r['top10'], '.2f')} | "
                f"{_fmt(r['featurize_s'], '.2f')} | {_fmt(r.get('fisher_s'), '.2f')} | "
                f"{_fmt(r['finalize_s'], '.2f')} |"
            )
        out.append("")
    versus = default_vs_gaussian(rows)
    if versus:
        out.append("### Default against the Gaussian projection (same k, same checkpoints)\n")
        out.append("| ckpts | λ (default, gaussian) | default LDS | gaussian LDS | "
                   "difference (paired s.e.) | default featurize s | gaussian featurize s | "
                   "time ratio |")
        out.append("|---|---|---|---|---|---|---|---|")
        for v in versus:
            out.append(
                f"| {v['checkpoints']} | {v['damping']}: {v['default_damping']:g}, "
                f"{v['gaussian_damping']:g} | {v['default_lds']:.3f} ± {v['default_se']:.3f} | "
                f"{v['gaussian_lds']:.3f} ± {v['gaussian_se']:.3f} | "
                f"{v['difference']:+.3f} ± {v['difference_se']:.3f} | "
                f"{v['default_s']:.2f} | {v['gaussian_s']:.2f} | {v['ratio']:.0f}× |"
            )
        out.append("")
    return "\n".join(out)


def default_vs_gaussian(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per checkpoint count, the default ensemble against the Gaussian one: LDS, the paired
    difference over the queries, and featurize time; at the default damping (the same
    preconditioner) and with each at its best damping of those scored."""
    ens = [r for r in rows if r["axis"] == "ensemble"]
    default_damping = PreconditionerConfig().damping
    out = []
    for c in sorted({r["checkpoints"] for r in ens}):
        mine = [r for r in ens if r["default"] and r["checkpoints"] == c]
        theirs = [r for r in ens if r["compressor"] == "gaussian" and r["checkpoints"] == c]
        if not mine or not theirs:
            continue
        for damping in ("default", "best"):
            if damping == "default":
                d = next(r for r in mine if r["damping"] == default_damping)
                g = next(r for r in theirs if r["damping"] == default_damping)
            else:
                d = max(mine, key=lambda r: r["lds"])
                g = max(theirs, key=lambda r: r["lds"])
            diff = np.asarray(d["per_query"]) - np.asarray(g["per_query"])
            diff = diff[np.isfinite(diff)]
            out.append({
                "benchmark": d["benchmark"], "checkpoints": c, "damping": damping,
                "default_damping": d["damping"], "gaussian_damping": g["damping"],
                "default_lds": d["lds"], "default_se": d["lds_se"],
                "gaussian_lds": g["lds"], "gaussian_se": g["lds_se"],
                "difference": float(diff.mean()),
                "difference_se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
                "default_s": d["featurize_s"], "gaussian_s": g["featurize_s"],
                "ratio": g["featurize_s"] / d["featurize_s"],
            })
    return out


def best_at_budget(rows: Sequence[dict[str, Any]], benchmark: str) -> dict[str, Any] | None:
    """The highest-LDS gradindex configuration at one checkpoint within :data:`BUDGET`."""
    candidates = [
        r for r in rows
        if r["benchmark"] == benchmark and r["kind"] == "index" and r["checkpoints"] == 1
        and r["compressor"] != "gaussian" and r["shape"] != "identity"
        and r["storage"] is not None and r["storage"] <= BUDGET * 1.01  # per-layer rounding
    ]
    return max(candidates, key=lambda r: r["lds"], default=None)


def plots(rows: Sequence[dict[str, Any]], out: Path, stem: str = "fidelity") -> list[Path]:
    """LDS against k per compressor, against damping, and against featurize time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["benchmark"] for r in rows))
    default_damping = PreconditionerConfig().damping
    paths = []

    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        pts = [r for r in rows if r["benchmark"] == name and r["kind"] == "index"
               and r["checkpoints"] == 1 and r["masks"] == 1 and r["shape"] == "block"
               and r["fisher"] == "empirical" and r["damping"] == default_damping]
        for comp in sorted({r["compressor"] for r in pts}):
            line = sorted((r["storage"], r["lds"], r["lds_se"]) for r in pts
                          if r["compressor"] == comp)
            xs, ys, es = zip(*line, strict=True)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=comp)
        ax.set_xscale("log", base=2)
        ax.set(title=f"{name}: LDS against k (1 checkpoint)", xlabel="floats per example",
               ylabel="LDS")
        ax.legend(fontsize=8)
    paths.append(_save(fig, out / f"{stem}_lds_vs_k.png"))

    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        lines: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for r in rows:
            if r["benchmark"] == name and r["checkpoints"] == 1 and r["damping"] is not None:
                lines.setdefault((r["axis"], r["label"]), []).append(
                    (r["damping"], r["lds"], r["lds_se"]))
        swept = {key: sorted(line) for key, line in lines.items() if len(line) >= 3}
        for (_, label), line in sorted(swept.items()):
            xs, ys, es = zip(*line, strict=True)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set(title=f"{name}: LDS against damping", xlabel="damping (× mean diagonal)",
               ylabel="LDS")
        if swept:
            ax.legend(fontsize=7)
    paths.append(_save(fig, out / f"{stem}_lds_vs_damping.png"))

    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        pts = [r for r in rows if r["benchmark"] == name and r["featurize_s"]
               and not r["swept"]]
        for comp in sorted({r["compressor"] for r in pts}):
            sel = [r for r in pts if r["compressor"] == comp]
            ax.scatter([r["featurize_s"] for r in sel], [r["lds"] for r in sel], label=comp)
            for r in sel:
                if r["checkpoints"] > 1:
                    ax.annotate(f"{r['checkpoints']} ckpt", (r["featurize_s"], r["lds"]),
                                fontsize=6)
        ax.set_xscale("log")
        ax.set(title=f"{name}: LDS against featurize time", xlabel="featurize seconds (CPU)",
               ylabel="LDS")
        ax.legend(fontsize=8)
    paths.append(_save(fig, out / f"{stem}_lds_vs_time.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


def benchmarks(quick: bool, only: Sequence[str], cache: Cache) -> list[tuple[Benchmark, Any]]:
    """The benchmarks of a run, each built (or read from the cache) when reached."""
    if quick:
        specs: list[tuple[str, Any]] = [
            ("digits-logreg", lambda: digits_benchmark(
                DigitsSettings("logreg", train_size=300, subsets=20, queries=40), cache)),
            ("mnist-mlp", lambda: mnist_benchmark(MnistSettings(
                train_size=400, test_size=100, hidden=(32,), epochs=3, checkpoints=2,
                subsets=10, retrain_seeds=1, queries=20), cache)),
        ]
    else:
        specs = [
            ("digits-logreg", lambda: digits_benchmark(DigitsSettings("logreg"), cache)),
            ("digits-mlp", lambda: digits_benchmark(DigitsSettings("mlp"), cache)),
            ("mnist-mlp", lambda: mnist_benchmark(MnistSettings(), cache)),
        ]
    return [(name, build) for name, build in specs if not only or name in only]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (seconds)")
    parser.add_argument("--stretch", action="store_true",
                        help="also MNIST ensembles beyond the default budget")
    parser.add_argument("--only", nargs="*", default=[],
                        help="benchmarks to run: digits-logreg digits-mlp mnist-mlp")
    parser.add_argument("--fisher", action="store_true",
                        help="the Fisher defaults against the old ones, and against the budget")
    parser.add_argument("--mislabel", action="store_true",
                        help="also mislabel detection by self-influence (digits, 10%% flipped)")
    parser.add_argument("--mislabel-models", nargs="*", default=["logreg", "mlp"],
                        help="models of --mislabel: logreg mlp (digits), mnist")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads for scoring (training always uses one)")
    parser.add_argument("--refresh", action="store_true",
                        help="re-measure every row (keeps checkpoints and ground truth)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    cache = Cache(None if args.no_cache else args.cache)
    rows: list[dict[str, Any]] = []
    settings = {}
    for name, build in benchmarks(args.quick, args.only, cache):
        t0 = time.perf_counter()
        bench = build()
        log.info("%s ready in %.1fs", name, time.perf_counter() - t0)
        settings[name] = bench.settings
        if args.fisher:
            methods = fisher_methods(name)
        else:
            methods = (digits_methods(args.quick) if name.startswith("digits")
                       else mnist_methods(args.quick, args.stretch))
        rows += run_benchmark(bench, methods, cache, args.refresh)
        log.info("%s scored in %.1fs", name, time.perf_counter() - t0)
    tables = markdown_tables(rows)
    if args.mislabel:
        found = [mislabel_detection(kind, cache) for kind in args.mislabel_models]
        tables += "\n" + mislabel_table(found)
    print(tables)
    best = {name: best_at_budget(rows, name) for name in settings}
    for name, row in best.items():
        if row is not None:
            print(f"best at ≤{BUDGET} floats/example/checkpoint on {name}: {row['label']} "
                  f"λ={row['damping']:g}  LDS {row['lds']:.3f} ± {row['lds_se']:.3f}")
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f}s (cache: {cache.hits} hits, {cache.misses} misses)")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(["python bench/fidelity.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "wall_s": wall, "budget": BUDGET, "gaussian_batch_size": GAUSSIAN_BATCH,
        "threads": args.threads, "settings": settings, "rows": rows,
        "default_vs_gaussian": default_vs_gaussian(rows), "best_at_budget": best,
        "defaults": {"compression": CompressionConfig().to_json(),
                     "preconditioning": PreconditionerConfig().to_json()},
    }
    stem = "fidelity_quick" if args.quick else ("fidelity_fisher" if args.fisher else "fidelity")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / f"{stem}.md").write_text(tables)
    if rows:
        plots(rows, args.out, stem)
    return result


if __name__ == "__main__":
    main()
