"""The text demo's known answer: how often a held-out word problem's top-10 proponents share
its template, for several attribution settings and a word-overlap baseline.

Two models from the same corpus (``gradindex.indexer.text_demo``: 8 templates, 3,000 training
problems): the demo model (trained until its loss has clearly dropped) and a deliberately
over-trained copy (trained on for many more epochs, until it memorises its answers). Settings:

* ``default``: factorized-dropout, k = 2048 per mask × 2 masks, block Fisher from sampled
  targets (what the ``auto`` Fisher picks for a language model: it has no ``logits``), fitted
  on a bounded subset (``--fisher-subset`` examples × ``--samples`` targets);
* ``dropout-sjlt``: the same with the SJLT compressor;
* ``dot``: the same vectors, no preconditioner (plain compressed dot product);
* ``relative``: the default scores divided by sqrt(self-influence) (``normalize``);
* ``dot_relative``: the plain dot product divided by the plain self-influence's root;
* ``tfidf``: cosine of TF-IDF vectors of the text (word overlap only, no model).

Chance is 1/8 = 0.125.

    OMP_NUM_THREADS=2 python bench/text_demo.py [--quick] [--out bench/out/text_demo]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradindex import (  # noqa: E402
    CompressionConfig,
    Featurizer,
    InMemoryIndex,
    PreconditionerConfig,
)
from gradindex.indexer.precondition import FisherAccumulator  # noqa: E402
from gradindex.indexer.tasks import CausalLMTask  # noqa: E402
from gradindex.indexer.text_demo import (  # noqa: E402
    build_text_model,
    make_problems,
    train_lm,
)

TOP = 10


def same_template_rate(scores: torch.Tensor, train_t: list[str], query_t: list[str]) -> float:
    """Mean share of each query's top-``TOP`` highest-scored training examples that share its
    template."""
    top = scores.topk(TOP, dim=1).indices
    hits = [sum(train_t[j] == query_t[q] for j in row.tolist()) / TOP
            for q, row in enumerate(top)]
    return sum(hits) / len(hits)


def concentration(scores: torch.Tensor, n: int) -> float:
    """Share of all top-10 places taken by the 1% most frequent training examples."""
    top = scores.topk(TOP, dim=1).indices.reshape(-1)
    counts = torch.bincount(top, minlength=n).sort(descending=True).values
    return float(counts[: max(1, n // 100)].sum() / top.numel())


def tfidf_scores(train: list[dict[str, Any]], queries: list[dict[str, Any]]) -> torch.Tensor:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer().fit([p["prompt"] + p["completion"] for p in train])
    a = vec.transform([p["prompt"] + p["completion"] for p in train])
    b = vec.transform([p["prompt"] + p["completion"] for p in queries])
    return torch.tensor((b @ a.T).toarray(), dtype=torch.float32)


def answer_loss(task: CausalLMTask, payloads: list[dict[str, Any]]) -> float:
    with torch.no_grad():
        losses = [task.loss(task.model(), task.collate(payloads[i:i + 64]))
                  for i in range(0, len(payloads), 64)]
    return float(torch.cat(losses).mean())


def fit_index(task: CausalLMTask, compressor: str, pairs: list[tuple[str, dict[str, Any]]],
              args: argparse.Namespace) -> InMemoryIndex:
    """Vectors of every training example; a block Fisher from sampled targets fitted on the
    first ``--fisher-subset`` examples (a bounded subset, as the build's default does)."""
    feat = Featurizer(task, CompressionConfig(compressor=compressor, dim=args.dim, masks=2,
                                              batch_size=32), device="cpu")
    payloads = [p for _, p in pairs]
    raw = torch.cat([feat.raw(payloads[i:i + 32]) for i in range(0, len(payloads), 32)])
    acc = FisherAccumulator(feat.blocks, "block")
    subset = payloads[: args.fisher_subset]
    for i in range(0, len(subset), 32):
        part = subset[i:i + 32]
        acc.update(feat.fisher(part, "sampled", args.samples), len(part))
    pcfg = PreconditionerConfig(fisher="sampled", samples=args.samples)
    return InMemoryIndex(feat, acc.finalize(pcfg.damping), raw, [i for i, _ in pairs], pcfg)


def evaluate(folder: Path, train: list[dict[str, Any]], queries: list[dict[str, Any]],
             args: argparse.Namespace) -> dict[str, Any]:
    task = CausalLMTask(str(folder))
    pairs = [(str(i), {"prompt": p["prompt"], "completion": p["completion"]})
             for i, p in enumerate(train)]
    qp = [{"prompt": p["prompt"], "completion": p["completion"]} for p in queries]
    train_t, query_t = [p["template"] for p in train], [p["template"] for p in queries]
    row: dict[str, Any] = {"answer_loss_train": answer_loss(task, [p for _, p in pairs][:400]),
                           "answer_loss_heldout": answer_loss(task, qp)}
    for name, comp in (("default", "factorized-dropout"), ("dropout-sjlt", "dropout-sjlt")):
        start = time.perf_counter()
        idx = fit_index(task, comp, pairs, args)
        scores = idx.scores(qp)
        row[name] = same_template_rate(scores, train_t, query_t)
        row[name + "_top1pct_share"] = concentration(scores, len(train))
        if name == "default":
            rel = scores / idx.self_influence.clamp(min=1e-12).sqrt()[None, :]
            row["relative"] = same_template_rate(rel, train_t, query_t)
            row["relative_top1pct_share"] = concentration(rel, len(train))
            plain = FisherAccumulator(idx.featurizer.blocks, "identity").finalize(0.0)
            dot = InMemoryIndex(idx.featurizer, plain, idx.raw, idx.ids,
                                PreconditionerConfig(shape="identity"))
            dscores = dot.scores(qp)
            row["dot"] = same_template_rate(dscores, train_t, query_t)
            row["dot_top1pct_share"] = concentration(dscores, len(train))
            dot_rel = dscores / dot.self_influence.clamp(min=1e-12).sqrt()[None, :]
            row["dot_relative"] = same_template_rate(dot_rel, train_t, query_t)
        row[name + "_seconds"] = round(time.perf_counter() - start, 1)
        print(f"  {name}: {row[name]:.3f} ({row[name + '_seconds']}s)", flush=True)
    row["tfidf"] = same_template_rate(tfidf_scores(train, queries), train_t, query_t)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--overtrain-epochs", type=int, default=12,
                        help="further epochs of the over-trained copy")
    parser.add_argument("--overtrain-base", type=Path, default=None,
                        help="train the over-trained copy on from this model (default: the "
                             "demo model)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--fisher-subset", type=int, default=800,
                        help="examples the Fisher is fitted on")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--only", choices=["demo", "overtrained"], default=None,
                        help="evaluate one model (two processes can share the work), then "
                             "print the table of every result found")
    parser.add_argument("--out", type=Path, default=Path("bench/out/text_demo"))
    args = parser.parse_args()
    if args.quick:
        args.train, args.queries, args.epochs, args.overtrain_epochs = 400, 40, 2, 2
    args.out.mkdir(parents=True, exist_ok=True)
    train = make_problems(args.train, seed=0)
    queries = make_problems(args.queries, seed=1)
    demo, over = args.out / "demo-model", args.out / "overtrained-model"
    if not (demo / "config.json").is_file():
        history = build_text_model(demo, train, epochs=args.epochs)
        print("demo model, loss by epoch:", [round(h, 3) for h in history], flush=True)
    if args.only != "demo" and not (over / "config.json").is_file():
        task = CausalLMTask(str(args.overtrain_base or demo))
        history = train_lm(task, train, epochs=args.overtrain_epochs, seed=1)
        task.tokenizer.save_pretrained(str(over))
        trained: Any = task.model()
        trained.save_pretrained(str(over))
        print("over-trained copy, loss by epoch:", [round(h, 3) for h in history], flush=True)
    for label, folder in (("demo", demo), ("overtrained", over)):
        if args.only in (None, label):
            print(label, flush=True)
            found = evaluate(folder, train, queries, args)
            (args.out / f"results-{label}.json").write_text(json.dumps(found, indent=2))
    results = {label: json.loads((args.out / f"results-{label}.json").read_text())
               for label in ("demo", "overtrained")
               if (args.out / f"results-{label}.json").is_file()}
    cols = ["default", "dropout-sjlt", "dot", "relative", "dot_relative", "tfidf"]
    print(f"\nsame-template rate in the top {TOP} proponents, {args.queries} held-out problems, "
          f"{args.train} training problems, 8 templates (chance 0.125)")
    print("| model | answer loss train / held-out | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for label, r in results.items():
        print(f"| {label} | {r['answer_loss_train']:.2f} / {r['answer_loss_heldout']:.2f} | "
              + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    print("\nshare of all top-10 places taken by the 1% most frequent training examples:")
    for label, r in results.items():
        print(f"  {label}: default {r['default_top1pct_share']:.2f}, dot "
              f"{r['dot_top1pct_share']:.2f}, relative {r['relative_top1pct_share']:.2f}")


if __name__ == "__main__":
    main()
