"""Soak: many clients of mixed traffic against a real server on PostgreSQL, with an admin
deleting examples and a refinalize publishing mid-run; every answer checked afterwards.

64 clients (``--clients``) send, for ``--duration`` seconds, a mix of ``/influence``,
``/scores``, ``/select``, ``/self-influence`` and malformed requests (NaN, ``"k": true``,
integers beyond int64, too many ids, a response beyond the budget), while an admin deletes
an example every 0.5 s and ``gradindex refinalize`` publishes a new version a third of the way
in. Reported: throughput, p50/p99 latency, answers by status, server RSS at start, peak and end.

Every 200 is then checked against an in-process reader of the version it names: each hit's
score equals the exact score, no example scoring above the last hit is missing unless it was
deleted before the answer came, and no example deleted before the request was sent appears.

``--outage`` runs it again with the database going away for 10 s at half time and coming
back: the server reaches PostgreSQL through a TCP proxy that the bench stops and starts (the
shared PostgreSQL itself is not restarted), so other users of it are not disturbed. Reported:
statuses during the outage (only 503 expected) and how long after it the first and the
steady 200s came.

    python bench/soak.py                        # both runs, writes bench/.cache/soak.json
    python bench/soak.py --duration 20 --no-outage
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import STORE_TASK, STORE_TASK_ARGS, LiveServer  # noqa: E402
from tests.faults import TcpProxy  # noqa: E402

NAME = "digits"
K = 10
POOL = 32
PG = ("127.0.0.1", 5432)
TOL = 1e-3


@dataclass
class Record:
    kind: str
    spec: dict[str, Any]
    sent: float
    done: float
    status: int
    body: Any = None


@dataclass
class Run:
    records: list[Record] = field(default_factory=list)
    deleted: dict[str, float] = field(default_factory=dict)
    """External id → when its DELETE was answered 200."""
    rss: list[tuple[float, int]] = field(default_factory=list)
    outage: tuple[float, float] | None = None
    published: float | None = None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def make_database() -> str:
    import psycopg

    name = f"gradindex_soak_{secrets.token_hex(4)}"
    with psycopg.connect(host=PG[0], user="postgres", dbname="postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(host=PG[0], user="postgres", dbname="postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def request_for(rng: random.Random, payloads: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """One request of the mix: ``(kind, spec)``."""
    roll = rng.random()
    pick = sorted(rng.sample(range(POOL), rng.randint(1, 3)))
    if roll < 0.35:
        return "influence", {"pool": pick, "direction": rng.choice(["proponents", "opponents"])}
    if roll < 0.55:
        return "scores", {"pool": pick[:1], "ids": [f"train-{rng.randrange(300)}"
                                                    for _ in range(5)]}
    if roll < 0.70:
        return "select", {"pool": pick}
    if roll < 0.85:
        return "self-influence", {}
    return "malformed", {"which": rng.randrange(5)}


def http_call(kind: str, spec: dict[str, Any], payloads: list[dict[str, Any]]
              ) -> tuple[str, str, bytes | None]:
    """``(method, path, body)`` of a request."""
    examples = [payloads[i] for i in spec.get("pool", [])]
    if kind == "influence":
        body = {"examples": examples, "k": K, "direction": spec["direction"]}
        return "POST", f"/v1/indexes/{NAME}/influence", json.dumps(body).encode()
    if kind == "scores":
        body = {"examples": examples, "ids": spec["ids"]}
        return "POST", f"/v1/indexes/{NAME}/scores", json.dumps(body).encode()
    if kind == "select":
        body = {"examples": examples, "k": K}
        return "POST", f"/v1/indexes/{NAME}/select", json.dumps(body).encode()
    if kind == "self-influence":
        return "GET", f"/v1/indexes/{NAME}/self-influence?limit=20", None
    head = '{"examples": [' + json.dumps(payloads[0]) + "], "
    bad = [
        head + '"filter": {"label": NaN}}',
        head + '"k": true}',
        head + '"filter": {"label": ' + str(2**64) + "}}",
        json.dumps({"examples": [payloads[0]], "ids": [f"t{i}" for i in range(20_000)]}),
        json.dumps({"examples": [payloads[0]] * 256, "k": 1000, "direction": "both"}),
    ][spec["which"]]
    route = "scores" if spec["which"] == 3 else "influence"
    return "POST", f"/v1/indexes/{NAME}/{route}", bad.encode()


async def client(url: str, payloads: list[dict[str, Any]], run: Run, until: float,
                 seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 headers={"Content-Type": "application/json"}) as http:
        while time.monotonic() < until:
            kind, spec = request_for(rng, payloads)
            method, path, body = http_call(kind, spec, payloads)
            sent = time.monotonic()
            try:
                response = await http.request(method, path, content=body)
                status, data = response.status_code, None
                if status == 200 and kind != "malformed":
                    data = response.json()
            except httpx.TransportError:
                status, data = 0, None  # connection refused or reset: counted as status 0
            run.records.append(Record(kind, spec, sent, time.monotonic(), status, data))


async def admin(url: str, run: Run, until: float, seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while time.monotonic() < until:
            victim = f"train-{rng.randrange(300)}"
            if victim not in run.deleted:
                try:
                    r = await http.delete(f"/v1/indexes/{NAME}/examples/{victim}")
                    if r.status_code == 200:
                        run.deleted[victim] = time.monotonic()
                except httpx.TransportError:
                    pass
            await asyncio.sleep(0.5)


def sample_rss(pid: int, run: Run, stop: threading.Event) -> None:
    while not stop.is_set():
        run.rss.append((time.monotonic(), rss_kib(pid)))
        stop.wait(1.0)


def soak(settings: Any, server: LiveServer, proxy: TcpProxy, payloads: list[dict[str, Any]],
         *, clients: int, duration: float, outage: bool) -> Run:
    run = Run()
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(server.process.pid, run, stop))
    sampler.start()
    start = time.monotonic()
    until = start + duration

    def refinalize() -> None:
        time.sleep(duration / 3)
        env = {**os.environ, "GRADINDEX_DATA_DIR": str(settings.data_dir),
               "GRADINDEX_DATABASE_URL": settings.database_url, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", "from gradindex.cli import main; main()",
                        "refinalize", NAME, "--damping", "0.3"], env=env, check=True,
                       capture_output=True, cwd=REPO)
        run.published = time.monotonic()

    def database_outage() -> None:
        time.sleep(duration / 2)
        down = time.monotonic()
        proxy.stop()
        time.sleep(10)
        proxy.start()
        run.outage = (down, time.monotonic())

    threads = [threading.Thread(target=refinalize)]
    if outage:
        threads.append(threading.Thread(target=database_outage))
    for t in threads:
        t.start()

    async def main() -> None:
        await asyncio.gather(admin(server.url, run, until, 7),
                             *[client(server.url, payloads, run, until, i)
                               for i in range(clients)])

    asyncio.run(main())
    for t in threads:
        t.join()
    time.sleep(2)
    stop.set()
    sampler.join()
    return run


# ------------------------------------------------------------------ checking


class Reference:
    """In-process readers of each version, with the exact scores of the payload pool."""

    def __init__(self, settings: Any, payloads: list[dict[str, Any]]) -> None:
        self.settings = settings
        self.payloads = payloads
        self.versions: dict[int, dict[str, Any]] = {}

    def of(self, number: int) -> dict[str, Any]:
        if number in self.versions:
            return self.versions[number]
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from gradindex.indexer.query import featurizer_for, query_vectors
        from gradindex.indexer.reader import Index
        from gradindex.indexer.store import ExampleRow, IndexRow, IndexVersion, connect

        engine = connect(self.settings)
        with Session(engine) as session:
            row = session.scalars(select(IndexVersion).join(
                IndexRow, IndexRow.id == IndexVersion.index_id).where(
                IndexRow.name == NAME, IndexVersion.number == number)).one()
            session.expunge(row)
            rows = session.execute(select(ExampleRow.external_id, ExampleRow.position,
                                          ExampleRow.self_influence)
                                   .where(ExampleRow.version_id == row.id)).all()
        index = Index(NAME, self.settings, engine, row)
        q = query_vectors(featurizer_for(index), self.payloads).numpy().astype(np.float64)
        vectors = np.asarray(index.vectors, dtype=np.float64)
        position = {r[0]: int(r[1]) for r in rows}
        names = [""] * len(rows)
        for external, pos in position.items():
            names[pos] = external
        found = {"q": q, "vectors": vectors, "position": position, "names": names,
                 "self": {r[0]: float(r[2]) for r in rows}}
        self.versions[number] = found
        return found


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * (1 + abs(b))


def check(record: Record, ref: Reference, deleted: dict[str, float]) -> str | None:
    """Why a 200 answer is wrong, or None."""
    body = record.body
    v = ref.of(int(body["version"]))
    gone_before = {i for i, t in deleted.items() if t < record.sent}
    gone_by_end = {i for i, t in deleted.items() if t <= record.done}

    def ranked(q: np.ndarray, hits: list[dict[str, Any]], opponents: bool) -> str | None:
        exact = v["vectors"] @ q
        ids = [h["id"] for h in hits]
        if set(ids) & gone_before:
            return f"deleted example(s) {sorted(set(ids) & gone_before)} returned"
        for h in hits:
            want = exact[v["position"][h["id"]]]
            if not _close(h["score"], want):
                return f"{h['id']}: score {h['score']} != exact {want}"
        if len(hits) < K:
            return None
        edge = min(h["score"] for h in hits) if not opponents else max(h["score"] for h in hits)
        better = exact > edge + TOL * (1 + abs(edge)) if not opponents else \
            exact < edge - TOL * (1 + abs(edge))
        missing = {v["names"][p] for p in np.flatnonzero(better)} - set(ids) - gone_by_end
        return f"missing {sorted(missing)[:5]}" if missing else None

    if record.kind == "influence":
        for i, result in zip(record.spec["pool"], body["results"], strict=True):
            d = record.spec["direction"]
            problem = ranked(v["q"][i], result[d], d == "opponents")
            if problem:
                return problem
    elif record.kind == "select":
        return ranked(v["q"][record.spec["pool"]].mean(axis=0), body["results"], False)
    elif record.kind == "scores":
        i = record.spec["pool"][0]
        for name, got in zip(body["ids"], body["scores"][0], strict=True):
            want = float(v["vectors"][v["position"][name]] @ v["q"][i])
            if not _close(got, want):
                return f"score of {name}: {got} != {want}"
    elif record.kind == "self-influence":
        ids = [h["id"] for h in body["results"]]
        if set(ids) & gone_before:
            return f"deleted example(s) {sorted(set(ids) & gone_before)} listed"
        values = [h["self_influence"] for h in body["results"]]
        if values != sorted(values, reverse=True):
            return "not in descending order"
        for h in body["results"]:
            if not _close(h["self_influence"], v["self"][h["id"]]):
                return f"self-influence of {h['id']} differs"
    return None


def summarize(run: Run, ref: Reference, duration: float) -> dict[str, Any]:
    statuses = Counter(r.status for r in run.records)
    latencies = np.asarray([r.done - r.sent for r in run.records]) * 1000
    wrong = []
    checked = 0
    for r in run.records:
        if r.status == 200 and r.kind != "malformed":
            checked += 1
            problem = check(r, ref, run.deleted)
            if problem:
                wrong.append(f"{r.kind} v{r.body['version']}: {problem}")
    malformed = Counter(r.status for r in run.records if r.kind == "malformed")
    versions = Counter(int(r.body["version"]) for r in run.records
                       if r.status == 200 and r.body)
    rss = [kib for _, kib in run.rss]
    out: dict[str, Any] = {
        "requests": len(run.records), "per_s": round(len(run.records) / duration, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "statuses": dict(sorted(statuses.items())),
        "malformed_statuses": dict(sorted(malformed.items())),
        "5xx": sum(n for s, n in statuses.items() if s >= 500 or s == 0),
        "checked": checked, "wrong": len(wrong), "wrong_examples": wrong[:5],
        "answers_by_version": dict(sorted(versions.items())),
        "deleted": len(run.deleted),
        "rss_mib": {"start": round(rss[0] / 1024), "peak": round(max(rss) / 1024),
                    "end": round(rss[-1] / 1024)},
    }
    if run.outage is not None:
        down, up = run.outage
        during = Counter(r.status for r in run.records if down <= r.done <= up)
        after = sorted((r.done, r.status) for r in run.records if r.done > up)
        first_ok = next((t - up for t, s in after if s == 200), None)
        last_503 = max((t - up for t, s in after if s == 503), default=0.0)
        out["outage"] = {
            "seconds": round(up - down, 1), "statuses_during": dict(sorted(during.items())),
            "first_200_after_s": None if first_ok is None else round(first_ok, 2),
            "last_503_after_s": round(last_503, 2),
            "non_503_5xx_during": sum(n for s, n in during.items()
                                      if (s >= 500 and s != 503) or s == 0),
        }
        out["5xx_outside_outage"] = sum(1 for r in run.records if (r.status >= 500 or
                                        r.status == 0) and not down <= r.done <= up + 5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--no-outage", dest="outage", action="store_false",
                        help="Skip the second run (database outage mid-run).")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / ".cache" / "soak.json")
    args = parser.parse_args()

    from gradindex import BuildConfig, Settings, build
    from gradindex.indexer.store import upgrade
    from gradindex.indexer.store.db import dispose_engines
    from gradindex.indexer.tasks import DigitsTask

    results: dict[str, Any] = {"clients": args.clients, "duration_s": args.duration}
    root = REPO / "bench" / ".cache" / f"soak-{secrets.token_hex(3)}"
    for label, outage in [("steady", False), ("outage", True)][: 2 if args.outage else 1]:
        database = make_database()
        try:
            direct = Settings(data_dir=root / label / "data",
                              database_url=f"postgresql+psycopg://postgres@{PG[0]}:{PG[1]}/"
                                           f"{database}")
            upgrade(direct)
            build(BuildConfig(name=NAME, task=STORE_TASK, task_args=dict(STORE_TASK_ARGS)),
                  direct)
            proxy = TcpProxy(PG).start()
            url = str(direct.database_url).replace(f":{PG[1]}/", f":{proxy.port}/")
            server = LiveServer(Settings(data_dir=direct.data_dir, database_url=url),
                                root / label / "server.log", auth="off").wait()
            payloads = DigitsTask(**STORE_TASK_ARGS).test_payloads(POOL)
            try:
                run = soak(direct, server, proxy, payloads, clients=args.clients,
                           duration=args.duration, outage=outage)
            finally:
                server.stop()
                proxy.stop()
            log = server.log()
            results[label] = summarize(run, Reference(direct, payloads), args.duration)
            results[label]["server_log_tracebacks"] = log.count("Traceback")
            results[label]["server_log_kib"] = round(len(log.encode()) / 1024, 1)
            print(json.dumps({label: results[label]}, indent=2), flush=True)
        finally:
            dispose_engines()
            drop_database(database)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
