"""What the default Fisher adds to a featurize: its model passes against the vectors', new and
old side by side.

On one model and training set, one CPU thread, it times (CPU seconds of this process, steadier
than wall time on a shared machine):

* the vectors: every example's compressed gradient, in batches;
* the Fisher rows of the default plan (``fisher="auto"`` at the default budget), batched: one
  forward and one batched backward for all of a batch's rows (right after the batch's vectors,
  as staging computes them, when every example is in the Fisher);
* the same plan one backward per row (``reference``), the path before batching;
* the previous default, the exact expected Fisher on ``ceil(8192 / C)`` examples, one backward
  per class.

With ``--stage`` it also times the featurize stage as `gradindex build` runs it (payloads
read, collated, featurized, staged to disk, their SQL rows written), in process, twice: with
the default Fisher and with ``fisher="empirical"`` (no Fisher pass), alternately, twice each,
the faster of each kept: what the default Fisher adds to the featurize a user waits for.

Models: a 784-1024-512-10 MLP (1.33M parameters, random weights) over 65,536 random examples,
or (``--mnist``) the first checkpoint of ``bench/fidelity.py``'s MNIST MLP over its 4,000
training examples (built or read from ``bench/.cache``).

    python bench/fisher_cost.py                  # the 1.3M-parameter MLP, 65,536 examples
    python bench/fisher_cost.py --mnist          # MNIST-5k, 4,000 examples
    python bench/fisher_cost.py --mnist --compressor dropout-sjlt --dim 4096 --masks 1
    python bench/fisher_cost.py --mnist --stage  # and the whole featurize stage, ±Fisher
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fidelity_data import Cache, MnistSettings, WithoutLogits, mnist_benchmark  # noqa: E402

from gradindex import CompressionConfig, Featurizer, PreconditionerConfig  # noqa: E402
from gradindex.indexer.build import BuildConfig, stage  # noqa: E402
from gradindex.indexer.fisher import FisherPlan  # noqa: E402
from gradindex.indexer.settings import Settings  # noqa: E402
from gradindex.indexer.tasks import ArrayClassificationTask  # noqa: E402

PREVIOUS_BUDGET = 8192
"""The budget of the previous default: exact rows (one per class) on ``ceil(8192 / C)``
examples."""


def _cpu_seconds(fn: Callable[[Sequence[dict[str, Any]]], Any],
                 batches: Sequence[Sequence[dict[str, Any]]]) -> float:
    start = time.process_time()
    for batch in batches:
        fn(batch)
    return time.process_time() - start


def _batches(payloads: Sequence[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [list(payloads[lo : lo + size]) for lo in range(0, len(payloads), size)]


def _task(args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]], str]:
    if args.mnist:
        bench = mnist_benchmark(MnistSettings(), Cache(Path(__file__).parent / ".cache"))
        return bench.single, bench.train, "MNIST MLP 784-128-128-10 (first checkpoint)"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(),
                          nn.Linear(512, 10)).eval()
    rng = np.random.default_rng(0)
    x = rng.random((args.examples, 784), dtype=np.float32)
    y = rng.integers(0, 10, args.examples)
    task = ArrayClassificationTask(model, x, y, n_classes=10)
    return task, [p for _, p in task.examples()], "MLP 784-1024-512-10 (random weights)"


def staged_seconds(feat: Featurizer, fisher: PreconditionerConfig, root: Path) -> float:
    """CPU seconds of the featurize stage of a build of ``feat``'s task into a fresh data
    directory under ``root`` (SQLite), as `gradindex build` runs it before finalize."""
    folder = Path(tempfile.mkdtemp(dir=root))
    config = BuildConfig(name="cost", task="gradindex.indexer.tasks:ArrayClassificationTask",
                         compression=feat.config, preconditioner=fisher)
    start = time.process_time()
    stage(config, Settings(data_dir=folder, database_url=None), featurizer=feat)
    return time.process_time() - start


def stage_share(feat: Featurizer, budget: int | None) -> dict[str, float]:
    """The featurize stage with the default Fisher and without one (``empirical``)."""
    default = PreconditionerConfig(fisher_budget=budget)
    empirical = PreconditionerConfig(fisher="empirical", fisher_budget=None)
    with tempfile.TemporaryDirectory() as tmp:
        times: dict[str, list[float]] = {"default": [], "empirical": []}
        for _ in range(2):
            times["empirical"].append(staged_seconds(feat, empirical, Path(tmp)))
            times["default"].append(staged_seconds(feat, default, Path(tmp)))
    best = {k: min(v) for k, v in times.items()}
    return {"stage_default_s": best["default"], "stage_empirical_s": best["empirical"],
            "stage_share": best["default"] / best["empirical"] - 1}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist", action="store_true", help="the MNIST benchmark's MLP")
    parser.add_argument("--examples", type=int, default=65536)
    parser.add_argument("--budget", type=int, default=PreconditionerConfig().fisher_budget)
    parser.add_argument("--compressor", default=CompressionConfig().compressor)
    parser.add_argument("--dim", type=int, default=CompressionConfig().dim)
    parser.add_argument("--masks", type=int, default=CompressionConfig().masks)
    parser.add_argument("--no-logits", action="store_true",
                        help="the task without logits: auto fits the sampled Fisher")
    parser.add_argument("--stage", action="store_true",
                        help="also time the whole featurize stage with and without the Fisher")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task, train, name = _task(args)
    if args.no_logits:
        task, name = WithoutLogits(task), name + ", without logits"
    compression = CompressionConfig(compressor=args.compressor, dim=args.dim, masks=args.masks)
    feat = Featurizer(task, compression, device="cpu")
    params = sum(p.numel() for p in feat.models[0].parameters())
    bs = compression.batch_size
    plan = feat.plan_fisher(PreconditionerConfig(fisher_budget=args.budget), train[:bs],
                            len(train))
    members = plan.members()
    fitted = [p for i, p in enumerate(train) if members is None or members[i]]
    old_n = min(len(train), math.ceil(PREVIOUS_BUDGET / int(plan.classes or 1)))
    old_plan = FisherPlan(kind="expected", requested="auto", examples=len(train),
                          subset=old_n, samples=None, classes=plan.classes,
                          budget=PREVIOUS_BUDGET)
    old_members = old_plan.members()
    old = [p for i, p in enumerate(train) if old_members is None or old_members[i]]

    def rows(reference: bool) -> Callable[[Sequence[dict[str, Any]]], Any]:
        return lambda batch: feat.fisher(batch, plan.kind, plan.samples or 1, rank=plan.rank,
                                         reference=reference)

    feat.raw(train[:bs])  # warm up both paths (first calls load lazily)
    rows(False)(train[:bs])
    rows(True)(train[:bs])
    if members is None:
        # every example in the Fisher: a batch's rows right after its vectors, as staging does
        vectors = new = reference = 0.0
        for batch in _batches(train, bs):
            vectors += _cpu_seconds(feat.raw, [batch])
            new += _cpu_seconds(rows(False), [batch])
        for batch in _batches(train, bs):
            vectors += _cpu_seconds(feat.raw, [batch])
            reference += _cpu_seconds(rows(True), [batch])
        vectors /= 2
    else:  # members in full batches of their own (FisherBatcher)
        vectors = _cpu_seconds(feat.raw, _batches(train, bs))
        new = _cpu_seconds(rows(False), _batches(fitted, bs))
        reference = _cpu_seconds(rows(True), _batches(fitted, bs))
    previous = float("nan") if plan.kind != "expected" else _cpu_seconds(
        lambda b: feat.fisher(b, "expected", reference=True), _batches(old, bs))
    result = {
        "model": name, "params": params, "examples": len(train), "budget": args.budget,
        "compression": feat.config.to_json(), "plan": plan.describe(),
        "vectors_s": vectors, "fisher_s": new, "fisher_reference_s": reference,
        "previous_default_s": previous, "fisher_share": new / vectors,
        "reference_share": reference / vectors, "previous_share": previous / vectors,
    }
    cc = feat.config
    print(f"{name} ({params:,} parameters), {len(train):,} examples, {cc.compressor} "
          f"k={cc.dim} ×{cc.masks}, batch {bs}, one CPU thread (CPU seconds)\n"
          f"{result['plan']}\n"
          f"vectors {vectors:.1f}s; Fisher rows batched {new:.1f}s "
          f"(+{result['fisher_share']:.0%}), one backward per row {reference:.1f}s "
          f"(+{result['reference_share']:.0%})" + (
              "" if plan.kind != "expected" else
              f"; previous default ({old_n} examples × {plan.classes} classes, one backward "
              f"per class) {previous:.1f}s (+{result['previous_share']:.0%})"))
    if args.stage:
        result.update(stage_share(feat, args.budget))
        print(f"featurize stage as a build runs it: {result['stage_empirical_s']:.2f}s without "
              f"a Fisher pass, {result['stage_default_s']:.2f}s with the default Fisher "
              f"(+{result['stage_share']:.0%})")
    return result


if __name__ == "__main__":
    main()
