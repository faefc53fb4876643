"""Query latency and throughput of a running server, side by side with the same queries done
in process (no HTTP): the ratio is what the service costs on top of the indexer.

At each concurrency c (1, 8, 32, 128), c client threads each send single-example ``/influence``
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
from threadpoolctl import threadpool_limits

from gradindex import open_index
from gradindex.indexer.featurize import Featurizer
from gradindex.indexer.predict import predictions
from gradindex.indexer.query import featurizer_for, query_vectors
from gradindex.indexer.reader import Index
from gradindex.server.schemas import Example, InfluenceResponse, InfluenceResult

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


def _median_ms(fn: Any, rounds: int = 200) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def breakdown(index: Index, featurizer: Featurizer, payload: dict[str, Any],
              http_p50_ms: float) -> list[tuple[str, float]]:
    """Where one request's time goes at one client: each step the server takes, timed alone
    in process (median ms), and what is left of the HTTP p50 (HTTP parsing, the request
    checks, routing, the event loop's hand-offs, the socket)."""
    q = query_vectors(featurizer, [payload])
    ranked = index.rank(q, K)

    def respond() -> bytes:
        hits = [Example(id=h.external_id, payload=h.payload, meta=h.meta,
                        self_influence=h.self_influence, score=h.score,
                        render=featurizer.task.render(h.payload)) for h in ranked[0].hits]
        body = InfluenceResponse(index=index.name, version=index.version, results=[
            InfluenceResult(proponents=hits, positives=ranked[0].positives)])
        return body.model_dump_json().encode()

    steps = [
        ("model pass (query vector)", _median_ms(lambda: featurizer.query([payload]))),
        ("prediction pass", _median_ms(lambda: predictions(featurizer, [payload]))),
        ("search: scan + sign counts", _median_ms(
            lambda: index.searcher.scan(q.numpy(), K, exclude=index.examples.deleted()))),
        ("search: deleted ids + hits (SQL)", _median_ms(
            lambda: (index.examples.deleted(),
                     index.examples.hits(np.asarray(index.ids[:K]), np.zeros(K))))),
        ("response models + JSON", _median_ms(respond)),
    ]
    # the server runs the prediction pass beside the search, so it is not added twice
    serial = sum(ms for name, ms in steps if name != "prediction pass")
    steps.append(("HTTP, checks, routing, hand-offs (rest of p50)", http_p50_ms - serial))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("GRADINDEX_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("GRADINDEX_API_KEY"))
    parser.add_argument("--index", default="digits")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=2000,
                        help="Requests per concurrency level (split across clients).")
    parser.add_argument("--quick", action="store_true", help="About 300 requests per level.")
    parser.add_argument("--search-threads", type=int, default=1,
                        help="BLAS threads of the in-process search: the server's "
                             "GRADINDEX_SEARCH_THREADS (default 1), so both sides search alike; "
                             "0 leaves BLAS's default.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the table
    logging.getLogger("alembic").setLevel(logging.WARNING)
    total = 300 if args.quick else args.requests
    if args.search_threads:
        threadpool_limits(args.search_threads, user_api="blas")

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
    one_client: float | None = None
    for clients in args.concurrency:
        per_client = max(3, total // clients)
        http = over_http(args.url, args.api_key, args.index, payloads, clients, per_client)
        local = in_process(index, featurizer, payloads, clients, max(3, per_client))
        if clients == 1:
            one_client = http.p50_ms
        rows.append(f"{clients:>7} | {http.p50_ms:>11.2f} {http.p99_ms:>8.2f} "
                    f"{http.per_s:>8.0f} | {local.p50_ms:>14.2f} {local.p99_ms:>8.2f} "
                    f"{local.per_s:>8.0f} | {http.p50_ms / local.p50_ms:>9.2f}")
        log.info(rows[-1])
    out = [header, "-" * len(header), *rows]
    if one_client is not None:
        out += ["", "one client, where the time goes (median ms, each step timed in process):"]
        out += [f"  {name:<48} {ms:>7.2f}"
                for name, ms in breakdown(index, featurizer, payloads[0], one_client)]
    print("\n".join(out))  # noqa: T201 - the bench's output


if __name__ == "__main__":
    main()
