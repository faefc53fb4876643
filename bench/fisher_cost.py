"""What the default Fisher adds to a build: its model passes against the featurize ones.

Builds an in-memory index of a 784-1024-512-10 MLP (1.33M parameters, random weights) over
65,536 random examples with the default settings (``fisher="auto"``: expected, fitted on a
budget of rows) and reports the seconds of the vectors' model passes, of the Fisher rows', and
of the finalize, on one CPU thread.

    python bench/fisher_cost.py                  # 65,536 examples
    python bench/fisher_cost.py --examples 8192  # quicker
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity import TimedFeaturizer  # noqa: E402

from gradindex import CompressionConfig, InMemoryIndex, PreconditionerConfig  # noqa: E402
from gradindex.indexer.tasks import ArrayClassificationTask  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=65536)
    parser.add_argument("--budget", type=int, default=PreconditionerConfig().fisher_budget)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(),
                          nn.Linear(512, 10)).eval()
    params = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    x = rng.random((args.examples, 784), dtype=np.float32)
    y = rng.integers(0, 10, args.examples)
    task = ArrayClassificationTask(model, x, y, n_classes=10)
    compression = CompressionConfig()
    pcfg = PreconditionerConfig(fisher_budget=args.budget)
    start = time.perf_counter()
    feat = TimedFeaturizer(task, compression, device="cpu")
    index = InMemoryIndex.fit(task, compression, pcfg, featurizer=feat)
    total = time.perf_counter() - start
    vectors = feat.seconds - feat.fisher_seconds
    plan = index.fisher_plan
    result = {
        "params": params, "examples": args.examples, "budget": args.budget,
        "plan": plan.describe() if plan else "", "vectors_s": vectors,
        "fisher_s": feat.fisher_seconds, "finalize_s": total - feat.seconds,
        "fisher_share": feat.fisher_seconds / vectors,
    }
    print(f"MLP 784-1024-512-10 ({params:,} parameters), {args.examples:,} examples, batch 32,"
          f" one CPU thread\n{result['plan']}\nvectors {vectors:.1f}s, Fisher rows "
          f"{feat.fisher_seconds:.1f}s (+{result['fisher_share']:.0%} of featurize), finalize "
          f"{result['finalize_s']:.1f}s")
    return result


if __name__ == "__main__":
    main()
