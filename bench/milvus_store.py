"""FAISS (exact, the memory-mapped matrix) against Milvus-lite as the vector store of one version.

Writes N random vectors of dim D the way a publish does: for FAISS, ``vectors.npy`` (an exact
index stores no other copy); for Milvus, the same file plus the version's collection
(:func:`gradindex.indexer.store.milvus.write_collection`: vectors, relative vectors, ids and
metadata, flushed, indexed and loaded), over real SQL rows. Then times one query at a time
(k = 10, exact scores in both: Milvus's candidates are re-ranked from the matrix), without and
with a metadata filter, and checks both stores return the same ids.

    python bench/milvus_store.py [--n 20000] [--dim 1024] [--queries 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from gradindex.indexer.filters import MetadataSchema
from gradindex.indexer.search import IdRows, Searcher
from gradindex.indexer.settings import Settings
from gradindex.indexer.store import (
    FaissConfig,
    begin_version,
    connect,
    fsync_file,
    insert_examples,
    relative_scale,
)
from gradindex.indexer.store.milvus import (
    MilvusSearcher,
    MilvusVersion,
    close_clients,
    write_collection,
)

K = 10
LABELS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "data")
        settings.data_dir.mkdir(parents=True)
        engine = connect(settings)
        version = begin_version(engine=engine, name="bench")
        records = [{"id": f"e{i}", "payload": {}, "meta": {"label": i % LABELS}}
                   for i in range(args.n)]
        influence = rng.random(args.n) + 0.5
        with engine.begin() as conn:
            ids = insert_examples(conn=conn, version_id=version.id, start=0, records=records,
                                  self_influence=influence)
        schema = MetadataSchema.of(r["meta"] for r in records)

        started = time.perf_counter()
        path = settings.data_dir / "vectors.npy"
        vectors = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                            shape=(args.n, args.dim))
        for lo in range(0, args.n, 4096):
            hi = min(lo + 4096, args.n)
            vectors[lo:hi] = rng.standard_normal((hi - lo, args.dim), dtype=np.float32)
        vectors.flush()
        del vectors
        fsync_file(path)
        faiss_publish = time.perf_counter() - started
        stored = np.load(path, mmap_mode="r")

        started = time.perf_counter()
        entry = write_collection(
            uri=str(settings.data_dir / "milvus.db"), name="bench", version_id=version.id,
            build_id=version.build_id, live=[], engine=engine, vectors=stored, ids=ids,
            scale=relative_scale(influence)[0], schema=schema, config=FaissConfig(),
            after_batch=lambda done: None)
        milvus_publish = time.perf_counter() - started

        rows = IdRows(ids)
        faiss = Searcher(stored, rows)
        milvus = MilvusSearcher(MilvusVersion(str(settings.data_dir / "milvus.db"), entry,
                                              label="bench", remedy="rerun"),
                                Searcher(stored, rows), field="vectors")
        queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
        label3 = np.sort(ids[np.arange(args.n) % LABELS == 3])
        where = milvus.store.where({"label": 3}, schema)
        times: dict[str, list[float]] = {k: [] for k in ("faiss", "milvus", "faiss_f",
                                                          "milvus_f")}
        agree = 0
        for q in queries:
            q = q[None, :]
            t = time.perf_counter()
            _, want = faiss.top_k(q, K)
            times["faiss"].append(time.perf_counter() - t)
            t = time.perf_counter()
            _, got = milvus.top_k(q, K)
            times["milvus"].append(time.perf_counter() - t)
            agree += int(np.array_equal(want, got))
            t = time.perf_counter()
            _, want = faiss.top_k(q, K, include=label3)
            times["faiss_f"].append(time.perf_counter() - t)
            t = time.perf_counter()
            _, got = milvus.top_k(q, K, where=where)  # filtered inside Milvus
            times["milvus_f"].append(time.perf_counter() - t)
            agree += int(np.array_equal(want, got))
        close_clients()

    def p50(key: str) -> float:
        return float(np.median(times[key]) * 1e3)

    print(f"{args.n:,} vectors of dim {args.dim}, k = {K}, {args.queries} queries one at a "
          f"time; identical top-k in {agree} of {2 * args.queries} searches")
    print("| store | publish (s) | query p50 (ms) | filtered query p50 (ms), 1 label in "
          f"{LABELS} |")
    print("|---|---|---|---|")
    print(f"| FAISS exact (memory-mapped matrix) | {faiss_publish:.2f} | {p50('faiss'):.2f} | "
          f"{p50('faiss_f'):.2f} |")
    print(f"| Milvus-lite FLAT (+ the matrix, re-ranked) | {faiss_publish + milvus_publish:.2f} "
          f"| {p50('milvus'):.2f} | {p50('milvus_f'):.2f} |")


if __name__ == "__main__":
    main()
