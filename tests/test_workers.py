"""`gradindex serve --workers N`: several processes share the port and the indexes."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import numpy as np

from gradindex import BuildConfig, Settings, build, open_index
from gradindex.indexer.query import featurizer_for, query_vectors
from gradindex.indexer.tasks import DigitsTask

from .conftest import STORE_TASK, STORE_TASK_ARGS, LiveServer

K = 8


def test_workers_answer_alike_and_see_each_others_deletes(tmp_path: Path,
                                                          store_task: DigitsTask) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    build(BuildConfig(name="digits", task=STORE_TASK, task_args=dict(STORE_TASK_ARGS)), settings)
    payloads = store_task.test_payloads(3)
    reference = open_index("digits", settings)
    want = reference.search(query_vectors(featurizer_for(reference), payloads), K)
    server = LiveServer(settings, tmp_path / "server.log", auth="off", workers="2").wait()
    try:
        url = f"{server.url}/v1/indexes/digits"
        with httpx.Client(timeout=60) as client:  # new connections: either process answers
            for _ in range(6):
                got = httpx.post(f"{url}/influence", json={"examples": payloads, "k": K},
                                 timeout=60).json()["results"]
                for result, hits in zip(got, want, strict=True):
                    assert [h["id"] for h in result["proponents"]] == [h.external_id
                                                                       for h in hits]
                    np.testing.assert_allclose([h["score"] for h in result["proponents"]],
                                               [h.score for h in hits], rtol=1e-4, atol=1e-4)
            top = want[0][0].external_id
            assert client.delete(f"{url}/examples/{top}").status_code == 200
        for _ in range(6):  # whichever process answers, the deleted example is gone
            got = httpx.post(f"{url}/influence", json={"examples": payloads[:1], "k": K},
                             timeout=60).json()["results"][0]
            assert top not in [h["id"] for h in got["proponents"]]
            assert httpx.get(f"{url}/examples/{top}", timeout=60).status_code == 404
        pids = set(re.findall(r"Started server process \[(\d+)\]", server.log()))
        assert len(pids) == 2, server.log()
    finally:
        server.stop()


def test_connections_of_a_socket_bound_with_proto_0_send_without_delay() -> None:
    """The listening socket of `--workers N` is made with ``proto`` 0, whose connections asyncio
    leaves with Nagle's algorithm on (40 ms a request against a client's delayed ACK); the
    server's protocol turns it off on every TCP connection."""
    import asyncio
    import socket

    from gradindex.server.serving import set_nodelay

    async def accept_one(fix: bool) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # proto 0, as uvicorn's
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if fix:
                    set_nodelay(transport)
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accept_one(fix=False)) == 0  # the premise: asyncio leaves it on
    assert asyncio.run(accept_one(fix=True)) != 0
