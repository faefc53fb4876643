"""The device worker in process: micro-batches equal one-by-one featurization, a bad payload
fails only its own request, and a full queue is refused at once with a retry hint."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from gradindex import CompressionConfig, Featurizer, TaskError
from gradindex.indexer.errors import NonFiniteLoss
from gradindex.indexer.tasks import DigitsTask
from gradindex.server.errors import Overloaded
from gradindex.server.metrics import Metrics
from gradindex.server.worker import DeviceWorker

ATOL = 1e-5


@pytest.fixture(scope="module")
def featurizer(store_task: DigitsTask) -> Featurizer:
    return Featurizer(store_task, CompressionConfig(batch_size=32), device="cpu")


def _run(featurizer: Featurizer, requests: list[list[dict[str, Any]]],
         **options: Any) -> tuple[list[Any], Metrics]:
    metrics = Metrics()

    async def main() -> list[Any]:
        worker = DeviceWorker("test", featurizer, metrics=metrics, **options)
        worker.start()
        try:
            return await asyncio.gather(*[worker.query(r) for r in requests],
                                        return_exceptions=True)
        finally:
            await worker.stop()

    return asyncio.run(main()), metrics


def test_batches_equal_one_by_one_and_a_bad_payload_fails_alone(
    featurizer: Featurizer, store_task: DigitsTask
) -> None:
    good = store_task.test_payloads(12)
    nan = {"x": [float("nan")] * 64, "y": 1}
    requests = [[good[0], good[1]], [{"x": [1.0], "y": 0}], *[[p] for p in good[2:]], [nan]]
    got, metrics = _run(featurizer, requests, max_batch=64, max_wait_s=0.05)
    assert isinstance(got[1], TaskError) and "64 numbers" in str(got[1])
    assert isinstance(got[-1], NonFiniteLoss)
    want = featurizer.query(good)
    torch.testing.assert_close(got[0], want[:2], atol=ATOL, rtol=1e-4)
    for i, rows in enumerate(got[2:-1]):
        torch.testing.assert_close(rows, want[2 + i : 3 + i], atol=ATOL, rtol=1e-4)
    labels = {"model": "test"}
    passes = metrics.registry.get_sample_value("gradindex_batch_requests_count", labels)
    served = metrics.registry.get_sample_value("gradindex_batch_requests_sum", labels)
    assert passes is not None and served is not None and served > passes  # some batched

def test_a_full_queue_is_refused_with_retry_after(featurizer: Featurizer,
                                                  store_task: DigitsTask) -> None:
    payload = store_task.test_payloads(1)
    got, metrics = _run(featurizer, [payload] * 40, max_batch=1, max_wait_s=0.0,
                        queue_size=4, retry_after_s=3)
    refused = [g for g in got if isinstance(g, Overloaded)]
    served = [g for g in got if isinstance(g, torch.Tensor)]
    assert refused and served and len(refused) + len(served) == 40
    assert refused[0].retry_after == 3 and "retry after 3s" in str(refused[0])
    assert metrics.registry.get_sample_value(
        "gradindex_rejected_total", {"model": "test"}) == len(refused)
    for rows in served:
        torch.testing.assert_close(rows, served[0])
