"""The device worker: owns one model on its device and micro-batches the queries sent to it.

Requests wait in a bounded queue; one loop takes up to ``max_batch`` examples (waiting at most
``max_wait`` for more to arrive; by default not at all, so a lone request starts at once and
the requests that arrive during a pass form the next one), computes their query vectors in
one model pass on the worker's own thread, and hands each request its rows. A full queue is
refused at once (:class:`~.errors.Overloaded`, 503 with ``Retry-After``). When a pass fails,
its requests are retried one by one, so a bad payload fails only its own request. A worker
whose model no served index uses any more is retired with :meth:`DeviceWorker.close`: it
refuses new requests, finishes the waiting ones, and frees its thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from gradindex.indexer.errors import GradindexError, TaskError
from gradindex.indexer.featurize import Featurizer
from gradindex.indexer.predict import Prediction, predictions

from .errors import Overloaded
from .metrics import Metrics

__all__ = ["DeviceWorker"]

log = logging.getLogger(__name__)


@dataclass
class _Job:
    payloads: list[dict[str, Any]]
    future: asyncio.Future[tuple[torch.Tensor, list[Prediction] | None]]
    predict: bool = False
    """Whether the request also wants the model's predictions (made on the same visit to the
    worker's thread)."""
    queued_at: float = field(default_factory=time.perf_counter)


class DeviceWorker:
    """Computes query vectors ``[Q, dim]`` for one model, batching concurrent requests.

    Args:
        name: the model's label in metrics and logs.
        featurizer: the indexer's featurizer of the model (same masks and loss as the index).
        max_batch: examples per model pass at most.
        max_wait_s: how long a pass waits for more requests before it starts.
        queue_size: requests allowed to wait; beyond it :meth:`query` raises ``Overloaded``.
        retry_after_s: the ``Retry-After`` a refused request is given.
        metrics: where queue depth and batch sizes are recorded.
    """

    def __init__(self, name: str, featurizer: Featurizer, *, max_batch: int = 64,
                 max_wait_s: float = 0.0, queue_size: int = 256, retry_after_s: int = 1,
                 metrics: Metrics | None = None) -> None:
        self.name = name
        self.featurizer = featurizer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        self.metrics = metrics or Metrics()
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"gradindex-{name[:16]}")
        self._loop_task: asyncio.Task[None] | None = None
        self._carry: _Job | None = None
        self._batch: list[_Job] = []
        """The jobs of the pass being gathered or run."""
        self._closing = False
        self._predicting: list[tuple[list[Any], asyncio.Future[list[Prediction]]]] = []
        """Prediction requests waiting for the next pass; one drains them at a time."""
        self._predict_busy = False

    @property
    def device(self) -> str:
        return str(self.featurizer.device)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(), name=f"device-worker-{self.name}")
            log.info("device worker %r started on %s", self.name, self.device)

    @property
    def idle(self) -> bool:
        """Nothing waits and no model pass runs."""
        return not self._batch and self._carry is None and self._queue.empty()

    async def close(self, timeout_s: float = 60.0) -> None:
        """Retire the worker: refuse new requests, finish the waiting ones (for at most
        ``timeout_s``), then :meth:`stop`."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        running = self._loop_task is not None and not self._loop_task.done()
        while running and not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.stop()
        log.info("device worker %r stopped: no served index uses its model any more", self.name)

    async def stop(self) -> None:
        """Stop the loop; requests still waiting fail with ``Overloaded``."""
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        pending = list(self._batch) + ([self._carry] if self._carry is not None else [])
        self._batch, self._carry = [], None
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(Overloaded("the server is shutting down",
                                                    self.retry_after_s))
        self._executor.shutdown(wait=False, cancel_futures=True)
        try:  # a retired model's queue is no longer a series of /metrics
            self.metrics.queue_depth.remove(self.name)
        except KeyError:
            pass

    async def query(self, payloads: Sequence[dict[str, Any]]) -> torch.Tensor:
        """Query vectors ``[len(payloads), dim]`` (float32, cpu) of test payloads.

        Raises:
            Overloaded: the queue is full.
            TaskError: the task rejected a payload, or its loss was not finite.
        """
        return (await self._submit(payloads, predict=False))[0]

    async def query_and_predict(self, payloads: Sequence[dict[str, Any]]
                                ) -> tuple[torch.Tensor, list[Prediction]]:
        """:meth:`query`, and the model's prediction, confidence and loss of each payload
        (:meth:`predict`), made on the same visit to the worker's thread.

        Raises:
            Overloaded: the queue is full.
            TaskError: the task rejected a payload, or its loss was not finite.
        """
        vectors, predicted = await self._submit(payloads, predict=True)
        assert predicted is not None
        return vectors, predicted

    async def _submit(self, payloads: Sequence[dict[str, Any]], *, predict: bool
                      ) -> tuple[torch.Tensor, list[Prediction] | None]:
        if self._closing or self._loop_task is None or self._loop_task.done():
            raise Overloaded(f"the device worker of {self.name!r} is not running",
                             self.retry_after_s)
        job = _Job(list(payloads), asyncio.get_running_loop().create_future(), predict)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.metrics.rejected.labels(self.name).inc()
            raise Overloaded(
                f"the device worker of {self.name!r} has {self._queue.maxsize} requests "
                f"waiting; retry after {self.retry_after_s}s", self.retry_after_s) from None
        self.metrics.queue_depth.labels(self.name).set(self._queue.qsize())
        return await job.future

    async def predict(self, payloads: Sequence[dict[str, Any]]) -> list[Prediction]:
        """The model's prediction, confidence and loss of each payload (no-grad passes on the
        worker's thread, between its batches; None where the task cannot tell). Requests that
        wait together share a pass of up to ``max_batch`` examples, as queries do."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Prediction]] = loop.create_future()
        self._predicting.append((list(payloads), done))
        if not self._predict_busy:
            self._predict_busy = True
            loop.create_task(self._drain_predictions())
        return await done

    async def _drain_predictions(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._predicting:
                jobs: list[tuple[list[Any], asyncio.Future[list[Prediction]]]] = []
                size = 0
                while self._predicting and (not jobs or
                                            size + len(self._predicting[0][0]) <= self.max_batch):
                    job = self._predicting.pop(0)
                    jobs.append(job)
                    size += len(job[0])
                flat = [p for payloads, _ in jobs for p in payloads]
                try:
                    out = await loop.run_in_executor(self._executor, predictions,
                                                     self.featurizer, flat)
                except Exception as exc:  # noqa: BLE001 - each request gets the failure
                    for _, waiting in jobs:
                        if not waiting.done():
                            waiting.set_exception(exc)
                    continue
                start = 0
                for payloads, waiting in jobs:
                    if not waiting.done():
                        waiting.set_result(out[start : start + len(payloads)])
                    start += len(payloads)
        finally:
            self._predict_busy = False

    # ------------------------------------------------------------------ the loop

    def _take(self, batch: list[_Job], size: int) -> int:
        """Move waiting jobs into ``batch`` while they fit in ``max_batch`` examples."""
        while size < self.max_batch:
            if self._carry is None:
                try:
                    self._carry = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
            if batch and size + len(self._carry.payloads) > self.max_batch:
                break
            batch.append(self._carry)
            size += len(self._carry.payloads)
            self._carry = None
        return size

    async def _run(self) -> None:
        while True:
            if self._carry is None:
                self._carry = await self._queue.get()
            batch = self._batch = []  # kept where stop() finds it
            try:
                size = self._take(batch, 0)
                if size < self.max_batch and self.max_wait_s > 0:
                    await asyncio.sleep(self.max_wait_s)
                    size = self._take(batch, size)
                self.metrics.queue_depth.labels(self.name).set(self._queue.qsize())
                live = [job for job in batch if not job.future.done()]  # callers that left
                if live:
                    await self._process(live)
            except Exception:  # noqa: BLE001 - the loop must outlive any one pass
                log.exception("device worker %r: a pass failed unexpectedly", self.name)
            self._batch = []  # not on cancellation: stop() fails what is left of it

    async def _process(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        payloads = [p for job in batch for p in job.payloads]
        self.metrics.batch_examples.labels(self.name).observe(len(payloads))
        self.metrics.batch_requests.labels(self.name).observe(len(batch))
        started = time.perf_counter()
        predict = [p for job in batch if job.predict for p in job.payloads]
        try:
            vectors, predicted = await loop.run_in_executor(self._executor, self._featurize,
                                                            payloads, predict)
        except Exception as exc:  # noqa: BLE001 - sorted out request by request below
            if len(batch) == 1:
                _fail(batch[0], _as_request_error(exc, self.retry_after_s))
                return
            log.info("device worker %r: a batch of %d requests failed (%s); retrying them "
                     "one by one", self.name, len(batch), exc)
            for job in batch:
                await self._process([job])
            return
        self.metrics.pass_seconds.labels(self.name).observe(time.perf_counter() - started)
        lo = at = 0
        for job in batch:
            rows = vectors[lo : lo + len(job.payloads)]
            lo += len(job.payloads)
            mine = None
            if job.predict:
                mine = predicted[at : at + len(job.payloads)]
                at += len(job.payloads)
            if not job.future.done():
                job.future.set_result((rows, mine))

    def _featurize(self, payloads: list[dict[str, Any]], predict: list[dict[str, Any]]
                   ) -> tuple[torch.Tensor, list[Prediction]]:
        """Runs on the worker's thread: the model pass(es), ``max_batch`` examples at a time,
        then the no-grad predictions of ``predict`` (never an error: None where they fail)."""
        parts = [self.featurizer.query(payloads[lo : lo + self.max_batch])
                 for lo in range(0, len(payloads), self.max_batch)]
        vectors = torch.cat(parts).detach().cpu()
        predicted = [p for lo in range(0, len(predict), self.max_batch)
                     for p in predictions(self.featurizer, predict[lo : lo + self.max_batch])]
        return vectors, predicted


def _fail(job: _Job, exc: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(exc)


def _as_request_error(exc: Exception, retry_after_s: int) -> BaseException:
    """What a request whose own pass failed is told."""
    if isinstance(exc, GradindexError):
        return exc
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return Overloaded("the device ran out of memory; send fewer examples per request or "
                          "retry later", retry_after_s)
    log.warning("the task failed on a request: %s: %s", type(exc).__name__, exc)
    return TaskError(f"the task failed on these examples: {type(exc).__name__}: {exc}")
