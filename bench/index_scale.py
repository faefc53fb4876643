"""How the FAISS side of an index scales: build time, size on disk, latency and recall.

Synthetic random vectors (k = 1024 columns, float32, the hardest case for approximate search:
no cluster structure) at 1e4, 1e5 and 1e6 rows; exact flat, flat fp16 and HNSW (fp16 codes),
searched the way ``indexer.Index`` does: FAISS candidates (4k for approximate indexes) re-ranked
exactly from the memory-mapped float32 vectors.

    python bench/index_scale.py --quick        # 1e4 only, under a minute
    python bench/index_scale.py                # 1e4, 1e5 and 1e6
    python bench/index_scale.py --ivfpq        # IVF-PQ at 1e6 and 1e7, dim 64 (see below)

``--ivfpq`` is the path past one machine's memory: vectors of a reduced dimension (64) drawn
from 4,096 Gaussian clusters (gradient vectors of a trained model are clustered by class and
by example type; uniform random vectors are the worst case measured above), stored once as a
memory-mapped float32 matrix, with an IVF-PQ index of 16 bytes per vector that returns 4·k
candidates re-ranked exactly from the matrix. Recall@10 against exact search (BLAS over the
matrix, in blocks) on 100 held-out queries, build time (train + add), the FAISS file's size,
the process's resident memory after the build and p50/p99 single-query latency.

The full run needs about 11 GB of memory at 1e6 (vectors 4 GB, flat copy 4 GB, fp16 2 GB);
its HNSW build at 1e6 dominates the run time (see the README note printed at the end).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradindex.indexer.store import (
    FaissConfig,
    build_faiss,
    measure_recall,
    search_faiss,
    write_faiss,
)

DIM = 1024
K = 10
BATCH = 32
SINGLE_QUERIES = 200
BATCHES = 20

log = logging.getLogger("bench.index_scale")


@dataclass
class Row:
    n: int
    variant: str
    build_s: float
    faiss_mb: float
    vectors_mb: float
    p50_ms: float
    p99_ms: float
    batch_p50_ms: float
    recall: float
    recall_reranked: float


def synthetic(path: Path, n: int, seed: int = 0, window: int = 65536) -> np.ndarray:
    """``n × DIM`` random float32 vectors in a ``.npy`` memmap, written window by window."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    rng = np.random.default_rng(seed)
    for lo in range(0, n, window):
        hi = min(lo + window, n)
        out[lo:hi] = rng.standard_normal((hi - lo, DIM), dtype=np.float32) / np.sqrt(DIM)
    out.flush()
    return np.load(path, mmap_mode="r")


def search(index: object, cfg: FaissConfig, vectors: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Top-K ids, re-ranked exactly from the float32 vectors when FAISS is approximate."""
    if cfg.exact:
        return search_faiss(index, cfg, q, K)[1]
    _, cand = search_faiss(index, cfg, q, K * cfg.oversample)
    out = np.empty((len(q), K), dtype=np.int64)
    for i in range(len(q)):
        c = np.sort(cand[i][cand[i] >= 0])  # ids are row numbers here
        s = np.asarray(vectors[c]) @ q[i]
        out[i] = c[np.argsort(-s)[:K]]
    return out


def measure(n: int, variant: str, cfg: FaissConfig, vectors: np.ndarray, folder: Path) -> Row:
    ids = np.arange(n, dtype=np.int64)
    start = time.perf_counter()
    index = build_faiss(cfg, vectors, ids)
    build_s = time.perf_counter() - start
    path = folder / f"{variant}.faiss"
    write_faiss(index, path)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((SINGLE_QUERIES, DIM), dtype=np.float32) / np.sqrt(DIM)
    single = []
    for i in range(SINGLE_QUERIES):
        t = time.perf_counter()
        search(index, cfg, vectors, queries[i : i + 1])
        single.append(time.perf_counter() - t)
    batched = []
    for b in range(BATCHES):
        q = queries[(b * BATCH) % SINGLE_QUERIES :][:BATCH]
        t = time.perf_counter()
        search(index, cfg, vectors, q)
        batched.append(time.perf_counter() - t)
    recall = measure_recall(index, cfg, vectors, ids, k=K, queries=100)
    row = Row(
        n, variant, build_s, path.stat().st_size / 2**20, vectors.nbytes / 2**20,
        1e3 * float(np.percentile(single, 50)), 1e3 * float(np.percentile(single, 99)),
        1e3 * float(np.percentile(batched, 50)), recall[f"recall_at_{K}"],
        recall[f"recall_at_{K}_reranked"],
    )
    log.info("%s", row)
    return row


def table(rows: list[Row]) -> str:
    head = (f"{'n':>9} {'index':<10} {'build s':>9} {'faiss MB':>9} {'vec MB':>8} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'b32 p50 ms':>11} {'R@10':>6} {'R@10 rr':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.n:>9,} {r.variant:<10} {r.build_s:>9.2f} {r.faiss_mb:>9.1f} "
            f"{r.vectors_mb:>8.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.batch_p50_ms:>11.2f} "
            f"{r.recall:>6.3f} {r.recall_reranked:>8.3f}"
        )
    return "\n".join(lines)


def clustered(path: Path, n: int, dim: int, clusters: int = 4096, seed: int = 0,
              window: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """``n × dim`` float32 vectors around ``clusters`` random centres, as a ``.npy`` memmap,
    and 100 queries from the same distribution (not in the matrix)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for lo in range(0, n, window):
        hi = min(lo + window, n)
        which = rng.integers(0, clusters, size=hi - lo)
        out[lo:hi] = centres[which] + 0.5 * rng.standard_normal((hi - lo, dim), dtype=np.float32)
    out.flush()
    queries = centres[rng.integers(0, clusters, size=100)]
    queries = queries + 0.5 * rng.standard_normal(queries.shape, dtype=np.float32)
    return np.load(path, mmap_mode="r"), queries.astype(np.float32)


def ivfpq_rows(sizes: list[int], dim: int, pq: int, scratch: Path, nprobes: list[int],
               oversamples: list[int]) -> list[str]:
    """The IVF-PQ table's lines, one size at a time (the matrix is deleted after each), one
    line per ``nprobe`` and ``oversample`` (candidates re-ranked per result) searched on the
    same index."""
    import psutil

    from gradindex.indexer.store import exact_topk

    proc = psutil.Process()
    head = (f"{'n':>11} {'dim':>4} {'nlist':>6} {'nprobe':>6} {'over':>4} {'build s':>8} "
            f"{'faiss MB':>9} "
            f"{'matrix MB':>10} {'RSS MB':>7} {'p50 ms':>7} {'p99 ms':>7} {'R@10 rr':>8} "
            f"{'exact ms':>9}")
    lines = [head, "-" * len(head)]
    for n in sizes:
        path = scratch / f"clustered-{n}.npy"
        t = time.perf_counter()
        vectors, queries = clustered(path, n, dim)
        log.info("%d × %d clustered vectors written in %.0fs", n, dim, time.perf_counter() - t)
        nlist = 1024 if n <= 1_000_000 else 2048
        cfg = FaissConfig(kind="ivf", nlist=nlist, nprobe=32, pq=pq)
        start = time.perf_counter()
        index = build_faiss(cfg, vectors, np.arange(n, dtype=np.int64), window=1 << 18)
        build_s = time.perf_counter() - start
        write_faiss(index, scratch / "ivfpq.faiss")
        faiss_mb = (scratch / "ivfpq.faiss").stat().st_size / 2**20
        rss = proc.memory_info().rss / 2**20
        t = time.perf_counter()
        _, truth = exact_topk(vectors, None, queries, K, window=1 << 20)
        exact_ms = 1e3 * (time.perf_counter() - t) / len(queries)
        for nprobe, oversample in itertools.product(nprobes, oversamples):
            probed = dataclasses.replace(cfg, nprobe=nprobe, oversample=oversample)
            found, latency = 0, []
            for i in range(len(queries)):
                t = time.perf_counter()
                got = search(index, probed, vectors, queries[i : i + 1])[0]
                latency.append(time.perf_counter() - t)
                found += len(set(got.tolist()) & set(truth[i].tolist()))
            recall = found / (K * len(queries))
            lines.append(
                f"{n:>11,} {dim:>4} {nlist:>6} {nprobe:>6} {oversample:>4} {build_s:>8.1f} "
                f"{faiss_mb:>9.1f} "
                f"{vectors.nbytes / 2**20:>10.1f} {rss:>7.0f} "
                f"{1e3 * float(np.percentile(latency, 50)):>7.2f} "
                f"{1e3 * float(np.percentile(latency, 99)):>7.2f} {recall:>8.3f} "
                f"{exact_ms:>9.1f}")
            log.info("%s", lines[-1])
        del index, vectors
        path.unlink()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1e4 vectors only")
    parser.add_argument("--sizes", type=int, nargs="*", help="override the sizes")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: tmp)")
    parser.add_argument("--ivfpq", action="store_true",
                        help="IVF-PQ over a memory-mapped matrix at 1e6 and 1e7, dim 64")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[32, 128, 512],
                        help="--ivfpq: inverted lists visited per query, one line each")
    parser.add_argument("--oversample", type=int, nargs="+", default=[4, 16, 64],
                        help="--ivfpq: candidates fetched per result and re-ranked exactly")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.ivfpq:
        scratch = Path(tempfile.mkdtemp(prefix="gradindex-bench-", dir=args.dir))
        try:
            lines = ivfpq_rows(args.sizes or [1_000_000, 10_000_000], 64, 16, scratch,
                               args.nprobe, args.oversample)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print("\n".join(lines))
        return
    sizes = args.sizes or ([10_000] if args.quick else [10_000, 100_000, 1_000_000])
    variants = {
        "flat": FaissConfig(kind="flat"),
        "flat-fp16": FaissConfig(kind="flat", fp16=True),
        "hnsw-fp16": FaissConfig(kind="hnsw", fp16=True),
    }
    scratch = Path(tempfile.mkdtemp(prefix="gradindex-bench-", dir=args.dir))
    rows: list[Row] = []
    started = time.perf_counter()
    try:
        for n in sizes:
            vectors = synthetic(scratch / f"vectors-{n}.npy", n)
            for name, cfg in variants.items():
                rows.append(measure(n, name, cfg, vectors, scratch))
            del vectors
            for f in scratch.iterdir():
                f.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(table(rows))
    print(f"\ntotal {time.perf_counter() - started:.0f}s; k={DIM}, top-{K}, single-query "
          f"latency over {SINGLE_QUERIES} queries, batches of {BATCH}; approximate indexes "
          f"fetch 4·{K} candidates and re-rank exactly (R@10 rr).")


if __name__ == "__main__":
    main()
