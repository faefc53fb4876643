"""Featurize throughput: every compressor side by side with a plain training step.

Measured in one run, on the same model and the same batch: examples per second of a plain
forward+backward training step (weight gradients computed), and of `factorized-dropout`,
`dropout`, `dropout-sjlt` and `gaussian` at k = 4096 and k = 16384, each as a ratio to the
training step. Two models: an MLP of 1.3M parameters over vectors, and a transformer block over
token sequences ``[B, T, D]``. Then a language-model row: tokens per second of the build's
featurize (``CausalLMTask``, factorized-dropout, default k) beside a plain training step on the
same batches of a tiny GPT-2 (random init; ``--lm-size mini``: 4 layers of width 256;
``small``: GPT-2-small's shape).

    python bench/featurize.py [--device cuda] [--quick] [--lm-only] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradindex import CompressionConfig, Featurizer  # noqa: E402

COMPRESSORS = ["factorized-dropout", "dropout", "dropout-sjlt", "gaussian"]


class Block(nn.Module):
    """A pre-norm transformer block built from nn.Linear layers, then a classifier head."""

    def __init__(self, d: int = 256, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(dim=1))


class TensorTask:
    """Payloads are row indices into tensors already in memory, so collate costs nothing and
    only gradient work is timed."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self._model, self.x, self.y = model, x, y

    def model(self) -> nn.Module:
        return self._model

    def examples(self) -> list[tuple[str, dict[str, Any]]]:
        return [(str(i), {"i": i}) for i in range(len(self.x))]

    def collate(self, payloads: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([p["i"] for p in payloads])
        return self.x[idx], self.y[idx]

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _once(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(
    name: str, task: TensorTask, batch: int, dims: list[int], device: torch.device,
    repeats: int, gaussian_max_k: int | None = None,
) -> list[dict[str, Any]]:
    """Seconds per batch of each method, in interleaved rounds so that a neighbour's load
    slows every method alike and the ratios stay fair; the median round counts."""
    model = task.model().to(device)
    task.x, task.y = task.x.to(device), task.y.to(device)
    payloads = [p for _, p in task.examples()][:batch]
    params = sum(p.numel() for p in model.parameters())

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        task.loss(model, task.collate(payloads)).sum().backward()

    methods: list[tuple[str, int | str, Callable[[], Any]]] = [("training step", "-", train_step)]
    slow = []
    for k in dims:
        for comp in COMPRESSORS:
            if comp == "gaussian" and gaussian_max_k is not None and k > gaussian_max_k:
                continue
            feat = Featurizer(task, CompressionConfig(compressor=comp, dim=k, batch_size=batch),
                              device=device)
            entry = (comp, feat.dim, lambda f=feat: f.raw(payloads))
            # the dense projection regenerates its matrix on every call: one call says it all
            (slow if comp == "gaussian" else methods).append(entry)
    times: dict[int, list[float]] = {i: [] for i in range(len(methods))}
    for _, _, fn in methods:
        fn()  # warm-up
    for _ in range(repeats):
        for i, (_, _, fn) in enumerate(methods):
            times[i].append(_once(fn, device))
    seconds = [statistics.median(times[i]) for i in range(len(methods))]
    for _, _, fn in slow:
        seconds.append(_once(fn, device))
    model.zero_grad(set_to_none=True)
    base = seconds[0]
    rows = []
    for (method, k, _), sec in zip(methods + slow, seconds, strict=True):
        rows.append({"model": name, "params": params, "method": method, "k": k,
                     "examples_per_s": batch / sec, "ratio": base / sec})
        print(f"{name}: {method:18s} k={k!s:>6} {batch / sec:12,.1f} ex/s "
              f"({base / sec:.2f}× training step)", flush=True)
    return rows


def measure_lm(device: torch.device, repeats: int, size: str, batch: int,
                seq_len: int) -> list[dict[str, Any]]:
    """Tokens/s of featurize against a training step (forward, backward with weight gradients,
    collate included in both) on the same batches of a GPT-2 built from its config."""
    import tempfile

    from gradindex.indexer.tasks import CausalLMTask
    from gradindex.indexer.text_demo import make_gpt2, make_problems, train_tokenizer

    problems = make_problems(2000, seed=0)
    texts = [p["prompt"] + p["completion"] for p in problems]
    shape = {"tiny": dict(layers=2, width=128, heads=4),
             "mini": dict(layers=4, width=256, heads=4),
             "small": dict(layers=12, width=768, heads=12)}[size]
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(texts, Path(tmp), vocab_size=1000 if size == "tiny" else 8000)
        model = make_gpt2(len(tok), context=max(128, seq_len), seed=0, **shape)
        model.save_pretrained(tmp)
        task = CausalLMTask(tmp)
        task.model()
    net = task.model().to(device)
    # each payload: problems joined up to about seq_len tokens of text
    per = max(1, seq_len // 27)  # a problem is about 27 tokens
    payloads = [{"text": " ".join(texts[i * per:(i + 1) * per])} for i in range(batch)]
    tokens = int(task.collate(payloads)["attention_mask"].sum())
    params = sum(p.numel() for p in net.parameters())

    def train_step() -> None:
        net.zero_grad(set_to_none=True)
        batch_ = {k: v.to(device) for k, v in task.collate(payloads).items()}
        task.loss(net, batch_).mean().backward()

    feat = Featurizer(task, CompressionConfig(batch_size=batch), device=device)
    methods = [("training step", "-", train_step),
               ("factorized-dropout", feat.dim, lambda: feat.raw(payloads))]
    for _, _, fn in methods:
        fn()
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, (_, _, fn) in enumerate(methods):
            times[i].append(_once(fn, device))
    net.zero_grad(set_to_none=True)
    seconds = [statistics.median(t) for t in times]
    name = f"GPT-2 {size} ({shape['layers']}×{shape['width']}), {batch}×{tokens // batch} tok"
    rows = []
    for (method, k, _), sec in zip(methods, seconds, strict=True):
        rows.append({"model": name, "params": params, "method": method, "k": k,
                     "examples_per_s": batch / sec, "tokens_per_s": tokens / sec,
                     "ratio": seconds[0] / sec})
        print(f"{name}: {method:18s} k={k!s:>6} {tokens / sec:12,.0f} tokens/s "
              f"({seconds[0] / sec:.2f}× training step)", flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], device: str) -> str:
    threads = torch.get_num_threads()
    lines = [f"Device: {device}, torch {torch.__version__}, {threads} CPU "
             f"thread{'s' if threads > 1 else ''}.",
             "", "| model | params | method | k | examples/s | × training step |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['method']} | {r['k']} | "
                     f"{r['examples_per_s']:,.1f} | {r['ratio']:.2f} |")
    lines.append("")
    for model in dict.fromkeys(r["model"] for r in rows):
        # actual k differs a little per compressor (rounding per layer): pair them by rank
        fds = sorted((r for r in rows if r["model"] == model
                      and r["method"] == "factorized-dropout"), key=lambda r: r["k"])
        gas = sorted((r for r in rows if r["model"] == model and r["method"] == "gaussian"),
                     key=lambda r: r["k"])
        for fd, ga in zip(fds, gas, strict=False):
            lines.append(f"- {model}, k≈{ga['k']}: factorized-dropout is "
                         f"{fd['examples_per_s'] / ga['examples_per_s']:,.0f}× gaussian and "
                         f"{fd['ratio']:.2f}× the training step.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        sub = [r for r in rows if r["model"] == model]
        labels = [r["method"] if r["k"] == "-" else f"{r['method']}\nk={r['k']}" for r in sub]
        ax.barh(labels, [r["ratio"] for r in sub], color=[
            "grey" if r["k"] == "-" else "C0" if r["method"].startswith("factorized") else "C1"
            for r in sub])
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("throughput / training step (log)")
        ax.set_title(model)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller models, k=4096 only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: on this 2-vCPU machine two OpenMP threads stalled "
             "small ops ~100×, a transformer step 347 ms against 2.5 ms on one)")
    parser.add_argument("--gaussian-max-k", type=int, default=None,
                        help="skip the (slow) gaussian baseline above this k")
    parser.add_argument("--lm-only", action="store_true", help="the language-model row only")
    parser.add_argument("--lm-size", choices=["tiny", "mini", "small"], default="tiny")
    parser.add_argument("--lm-batch", type=int, default=16)
    parser.add_argument("--lm-seq", type=int, default=128, help="about this many tokens each")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden = (256, 128) if args.quick else (1024, 512)
    mlp = nn.Sequential(nn.Linear(784, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]),
                        nn.ReLU(), nn.Linear(hidden[1], 10))
    seq_len, d = (16, 64) if args.quick else (64, 256)
    batch_mlp, batch_seq = (64, 16) if device.type == "cpu" else (512, 128)
    dims = [4096] if args.quick else [4096, 16384]
    tasks = [
        (f"MLP 784-{hidden[0]}-{hidden[1]}-10", TensorTask(
            mlp, torch.rand(batch_mlp, 784), torch.randint(0, 10, (batch_mlp,))), batch_mlp),
        (f"transformer block d={d}, T={seq_len}", TensorTask(
            Block(d), torch.randn(batch_seq, seq_len, d), torch.randint(0, 10, (batch_seq,))),
         batch_seq),
    ]
    rows = []
    for name, task, batch in [] if args.lm_only else tasks:
        rows.extend(measure(name, task, batch, dims, device, args.repeats, args.gaussian_max_k))
    lm = measure_lm(device, args.repeats, args.lm_size, args.lm_batch, args.lm_seq)
    rows.extend(lm)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, str(device))
    table += "".join(f"- {r['model']}: {r['method']} {r['tokens_per_s']:,.0f} tokens/s, "
                     f"{r['ratio']:.2f}× the training step.\n" for r in lm)
    print("\n" + table)
    (args.out / f"featurize-{device.type}.md").write_text(table)
    (args.out / f"featurize-{device.type}.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / f"featurize-{device.type}.png")
    print(f"wrote {args.out}/featurize-{device.type}.{{md,json,png}}")
    assert all(math.isfinite(r["examples_per_s"]) for r in rows)


if __name__ == "__main__":
    main()
