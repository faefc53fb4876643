"""Peak memory of a language-model build's passes beside a plain training step's.

A GPT-2-small-sized model (12 layers, width 768, 12 heads, vocabulary 50,257; random init,
built from its config) on batches of ``--batch`` × ``--seq`` tokens. Each measurement runs in its
own process, so one peak never hides another:

* ``training step``: forward, backward with every weight gradient (no optimizer state);
* ``featurize``: the build's raw pass (factorized-dropout, default k: gradients of the layer
  outputs only, never a per-example weight gradient);
* ``sampled Fisher``: the build's Fisher pass (targets drawn from the model, one sample).

On a CUDA device the peak is ``torch.cuda.max_memory_allocated``; on the CPU, the process's peak
resident set (``ru_maxrss``), reported with the resident set just before the pass (weights and
libraries), so the difference is what the pass itself needed.

    python bench/lm_memory.py [--device cuda] [--batch 8] [--seq 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ["training step", "featurize", "sampled Fisher"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def one(mode: str, device: str, batch: int, seq: int, folder: str) -> dict[str, Any]:
    from gradindex import CompressionConfig, Featurizer
    from gradindex.indexer.tasks import CausalLMTask

    task = CausalLMTask(folder)
    dev = torch.device(device)
    net = task.model().to(dev)
    vocab = len(task.tokenizer)
    gen = torch.Generator().manual_seed(0)
    # token ids straight from the tokenizer's range: the text itself does not matter here
    words = [task.tokenizer.decode(torch.randint(1, vocab, (seq - 1,), generator=gen).tolist())
             for _ in range(batch)]
    payloads = []
    for text in words:
        ids = task.tokenizer(text)["input_ids"][: seq - 1]
        payloads.append({"prompt": task.tokenizer.decode(ids[: seq // 2]),
                         "completion": task.tokenizer.decode(ids[seq // 2:])})
    tokens = int(task.collate(payloads)["attention_mask"].sum())
    feat = Featurizer(task, CompressionConfig(batch_size=batch), device=dev) \
        if mode != "training step" else None
    with torch.no_grad():  # page every weight in (safetensors maps them lazily)
        sum(float(p.abs().sum()) for p in net.parameters())
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib()
    if mode == "training step":
        b = {k: v.to(dev) for k, v in task.collate(payloads).items()}
        task.loss(net, b).mean().backward()
    elif mode == "featurize":
        assert feat is not None
        feat.raw(payloads)
    else:
        assert feat is not None
        feat.fisher(payloads, "sampled", 1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "before_mib": before, "peak_mib": peak, "tokens": tokens,
            "params": sum(p.numel() for p in net.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.device, args.batch, args.seq, args.folder)))
        return
    from gradindex.indexer.text_demo import make_gpt2, make_problems, train_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        texts = [p["prompt"] + p["completion"] for p in make_problems(2000)]
        train_tokenizer(texts, Path(tmp), vocab_size=2000)
        make_gpt2(50257, layers=args.layers, width=args.width, heads=args.width // 64,
                  context=max(1024, args.seq)).save_pretrained(tmp)
        for mode in MODES:
            done = subprocess.run(
                [sys.executable, __file__, "--one", mode, "--folder", tmp, "--device",
                 args.device, "--batch", str(args.batch), "--seq", str(args.seq)],
                capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{mode:15s} before {row['before_mib']:8,.0f} MiB  peak "
                  f"{row['peak_mib']:8,.0f} MiB  pass {row['peak_mib'] - row['before_mib']:8,.0f}"
                  " MiB", flush=True)
    base = rows[0]["peak_mib"] - rows[0]["before_mib"]
    print(f"\nGPT-2 {args.layers}×{args.width} ({rows[0]['params']:,} params), batch "
          f"{args.batch} × {args.seq} tokens ({rows[0]['tokens']} real), {args.device}:")
    print("| pass | peak MiB | MiB above the loaded model | × training step |")
    print("|---|---:|---:|---:|")
    for r in rows:
        extra = r["peak_mib"] - r["before_mib"]
        print(f"| {r['mode']} | {r['peak_mib']:,.0f} | {extra:,.0f} | {extra / base:.2f} |")


if __name__ == "__main__":
    main()
