"""Can the Fisher's completion be sampled? LDS on MNIST-5k when the examples outside the Fisher
budget's subset complete the Fisher with a seeded sample of their gradients instead of all.

A budget smaller than the training set fits the ``expected`` rows on a seeded subset and adds
every other example's raw gradient (``fisher_window_rows``), so finalize's Fisher pass grows
with N. This run keeps a fraction ``p`` of those other gradients (a seeded draw per window,
each kept row weighted by ``1/p``, so the Fisher's expectation is unchanged) and scores MNIST-5k
(4,000 examples, 10 checkpoints, the default compression) at budgets of 512 and 1,024 rows,
whose subsets leave 3,488 and 2,976 examples to the completion.

    python bench/fisher_completion.py [--budgets 512 1024] [--fractions 1 0.5 0.25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity  # noqa: E402
from _fidelity_data import Cache, MnistSettings, mnist_benchmark  # noqa: E402

import gradindex.indexer.influence as influence  # noqa: E402
from gradindex import CompressionConfig, PreconditionerConfig  # noqa: E402

FULL = influence.fisher_window_rows


def sampled_completion(fraction: float, seed: int = 0):  # noqa: ANN201 - a drop-in function
    """``fisher_window_rows`` keeping a seeded ``fraction`` of the completion's gradients."""
    draws = np.random.default_rng(seed)

    def rows(raw: np.ndarray, fisher: np.ndarray | None, members: np.ndarray) -> np.ndarray:
        if fisher is None or fraction >= 1.0:
            return FULL(raw, fisher, members)
        rest = raw[~members]
        kept = rest[draws.random(len(rest)) < fraction] / np.sqrt(fraction)
        return np.concatenate([fisher.reshape(-1, raw.shape[1]), kept])

    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="*", default=[512, 1024])
    parser.add_argument("--fractions", type=float, nargs="*", default=[1.0, 0.5, 0.25])
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = mnist_benchmark(MnistSettings(), Cache(args.cache))
    print("| budget | completion kept | λ | LDS 1 ckpt | LDS 10 ckpts |\n|---|---|---|---|---|")
    for budget in args.budgets:
        for fraction in args.fractions:
            influence.fisher_window_rows = sampled_completion(fraction)
            pc = PreconditionerConfig(fisher_budget=budget)
            index = fidelity.fit_timed(bench.task, CompressionConfig(), pc, bench.train)[0]
            feat = index.featurizer
            queries = torch.cat([feat.raw(bench.queries[lo : lo + 128])
                                 for lo in range(0, len(bench.queries), 128)])
            for damping in (0.3, 0.1):
                refit = index if damping == pc.damping else index.with_damping(damping)
                scores = fidelity.checkpoint_scores(refit, queries)
                one = fidelity.evaluate(bench, scores[:1].mean(axis=0))
                ten = fidelity.evaluate(bench, scores.mean(axis=0))
                print(f"| {budget} | {fraction:g} | {damping:g} | {one['lds']:.3f} | "
                      f"{ten['lds']:.3f} ± {ten['lds_se']:.3f} |", flush=True)
    influence.fisher_window_rows = FULL


if __name__ == "__main__":
    main()
