"""Query latency and throughput of a running server, side by side with the same queries done
in process (no HTTP): the ratio is what the service costs on top of the indexer.

At each concurrency c (1, 8, 32), c client threads each send single-example ``/influence``
requests (k = 10, proponents) in a loop. The in-process column runs the same work the way the
device worker does at best: c examples featurized in one model pass, then searched, so its
latency is one such round and its throughput c per round.

    gradindex serve --port 8000 &                      # with GRADINDEX_AUTH=off, or a key:
    python bench/query_load.py --index digits --quick  # GRADINDEX_API_KEY=gik_...

The in-process side opens the index from GRADINDEX_DATA_DIR / GRADINDEX_DATABASE_URL, so run
it where the server's data lives. The payloads are the task's held-out examples when the task
offers them (``queries()``), else training payloads from the index.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from gradindex_client import Client

from gradindex import open_index
from gradindex.indexer.featurize import Featurizer
from gradindex.indexer.query import featurizer_for, query_vectors
from gradindex.indexer.reader import Index

K = 10
log = logging.getLogger("bench.query_load")


@dataclass
class Stats:
    p50_ms: float
    p99_ms: float
    per_s: float


def _stats(latencies: list[float], examples: int, wall: float) -> Stats:
    ms = np.asarray(latencies) * 1000
    return Stats(float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), examples / wall)


def _payloads(index: Index, featurizer: Featurizer, n: int) -> list[dict[str, Any]]:
    held_out = [p for _, p in featurizer.task.queries()[:n]]
    return held_out or [h.payload for h in index.self_influence(n)]


def over_http(url: str, api_key: str | None, name: str, payloads: list[dict[str, Any]],
              clients: int, per_client: int) -> Stats:
    """``clients`` threads, each sending ``per_client`` single-example requests."""
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def run(worker: int) -> None:
        with Client(url, api_key=api_key, retries=10) as c:
            c.influence(name, payloads[:1], K)  # warm the connection
            barrier.wait()
            mine = []
            for i in range(per_client):
                p = payloads[(worker * per_client + i) % len(payloads)]
                started = time.perf_counter()
                c.influence(name, [p], K)
                mine.append(time.perf_counter() - started)
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return _stats(latencies, clients * per_client, time.perf_counter() - started)


def in_process(index: Index, featurizer: Featurizer, payloads: list[dict[str, Any]],
               batch: int, rounds: int) -> Stats:
    """``rounds`` rounds of ``batch`` examples: one model pass, then one search."""
    index.search(query_vectors(featurizer, payloads[:batch]), K)  # warm-up
    latencies = []
    started = time.perf_counter()
    for r in range(rounds):
        chunk = [payloads[(r * batch + i) % len(payloads)] for i in range(batch)]
        t0 = time.perf_counter()
        index.search(query_vectors(featurizer, chunk), K)
        latencies.append(time.perf_counter() - t0)
    return _stats(latencies, batch * rounds, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("GRADINDEX_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("GRADINDEX_API_KEY"))
    parser.add_argument("--index", default="digits")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=2000,
                        help="Requests per concurrency level (split across clients).")
    parser.add_argument("--quick", action="store_true", help="About 300 requests per level.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the table
    total = 300 if args.quick else args.requests

    index = open_index(args.index)
    featurizer = featurizer_for(index)
    payloads = _payloads(index, featurizer, 256)
    with Client(args.url, api_key=args.api_key) as c:
        health = c.health()
    log.info("server %s: devices %s; in process: %s; %d examples of dim %d", args.url,
             health.devices, featurizer.device, index.count, index.dim)
    header = (f"{'clients':>7} | {'HTTP p50 ms':>11} {'p99 ms':>8} {'req/s':>8} | "
              f"{'in-proc p50 ms':>14} {'p99 ms':>8} {'ex/s':>8} | {'p50 ratio':>9}")
    rows = []
    for clients in args.concurrency:
        per_client = max(1, total // clients)
        http = over_http(args.url, args.api_key, args.index, payloads, clients, per_client)
        local = in_process(index, featurizer, payloads, clients, max(3, per_client))
        rows.append(f"{clients:>7} | {http.p50_ms:>11.2f} {http.p99_ms:>8.2f} "
                    f"{http.per_s:>8.0f} | {local.p50_ms:>14.2f} {local.p99_ms:>8.2f} "
                    f"{local.per_s:>8.0f} | {http.p50_ms / local.p50_ms:>9.2f}")
        log.info(rows[-1])
    print("\n".join([header, "-" * len(header), *rows]))  # noqa: T201 - the bench's output


if __name__ == "__main__":
    main()
