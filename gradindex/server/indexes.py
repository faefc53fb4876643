"""The indexes a server serves: opened at start-up, reopened when a new version is published.

Each index is read through the indexer's :class:`~.reader.Index`; its queries go to the
device worker of its model, shared by every index (and version) built from the same task,
compression and weights. An index the server cannot serve (inconsistent files, model weights
that no longer match) is refused with a log line, and the others are served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from gradindex.indexer.admin import list_indexes
from gradindex.indexer.errors import GradindexError, IndexNotFound, StorageError, TaskError
from gradindex.indexer.reader import Index, open_index
from gradindex.indexer.settings import check_name

from .errors import IndexUnavailable
from .metrics import Metrics
from .settings import ServerSettings
from .worker import DeviceWorker

__all__ = ["IndexRegistry", "Served", "model_key"]

log = logging.getLogger(__name__)


def model_key(manifest: dict[str, Any]) -> str:
    """What identifies the model (and masks) of an index: versions sharing it share a worker."""
    return json.dumps({"task": manifest.get("task"), "compression": manifest.get("compression"),
                       "fingerprint": manifest.get("model_fingerprint")}, sort_keys=True)


@dataclass
class Served:
    """An index version being served, and the worker that makes its query vectors."""

    index: Index
    worker: DeviceWorker
    checked: float
    """When it was last confirmed to be the current version (monotonic seconds)."""


@dataclass
class _Refused:
    version: int | None
    message: str
    checked: float


class IndexRegistry:
    """Served indexes by name, and device workers by model."""

    def __init__(self, settings: ServerSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.storage = settings.storage()
        self.metrics = metrics
        self._served: dict[str, Served] = {}
        self._refused: dict[str, _Refused] = {}
        self._workers: dict[str, DeviceWorker] = {}
        self._lock = asyncio.Lock()

    @property
    def workers(self) -> list[DeviceWorker]:
        return list(self._workers.values())

    @property
    def served(self) -> dict[str, Served]:
        return dict(self._served)

    def refused(self) -> dict[str, str]:
        """Why each refused index is not served."""
        return {name: r.message for name, r in self._refused.items()}

    async def start(self) -> None:
        """Open every published index."""
        rows = await asyncio.to_thread(list_indexes, self.storage)
        for row in rows:
            if row["version"] is None:
                continue
            try:
                async with self._lock:
                    await self._open(row["name"])
            except GradindexError:
                pass  # refused: logged by _open
        log.info("serving %d index(es): %s", len(self._served), ", ".join(self._served) or "-")

    async def stop(self) -> None:
        for worker in self._workers.values():
            await worker.stop()
        self._workers.clear()
        self._served.clear()

    async def get(self, name: str) -> Served:
        """The current version of ``name``, reopened if a newer one was published.

        Raises:
            IndexNotFound: no such index (or it has no published version).
            IndexUnavailable: the index exists but cannot be served.
        """
        check_name(name)
        now = time.monotonic()
        served = self._served.get(name)
        if served is not None and now - served.checked < self.settings.reload_ttl_s:
            return served
        refused = self._refused.get(name)
        if refused is not None and now - refused.checked < self.settings.reload_ttl_s:
            raise IndexUnavailable(refused.message)
        if served is not None:
            try:
                current = await asyncio.to_thread(served.index.is_current)
            except IndexNotFound:
                self._served.pop(name, None)
                raise
            if current:
                served.checked = now
                return served
        async with self._lock:
            again = self._served.get(name)
            if again is not None and again is not served:  # another request reopened it
                return again
            return await self._open(name)

    async def _open(self, name: str) -> Served:
        """Open the current version of ``name`` (the caller holds the lock)."""
        now = time.monotonic()
        try:
            index = await asyncio.to_thread(open_index, name, self.storage,
                                            device=self.settings.device)
        except IndexNotFound:
            self._served.pop(name, None)
            self._refused.pop(name, None)
            raise
        except StorageError as exc:
            raise self._refuse(name, None, str(exc), now) from exc
        key = model_key(index.manifest)
        worker = self._workers.get(key)
        if worker is None:
            try:
                featurizer = await asyncio.to_thread(lambda: index.featurizer)
            except (StorageError, TaskError) as exc:
                raise self._refuse(name, index.version, str(exc), now) from exc
            worker = DeviceWorker(
                f"{name}-v{index.version}", featurizer, max_batch=self.settings.max_batch,
                max_wait_s=self.settings.max_wait_ms / 1000, queue_size=self.settings.queue_size,
                retry_after_s=self.settings.retry_after_s, metrics=self.metrics)
            worker.start()
            self._workers[key] = worker
        previous = self._served.get(name)
        served = Served(index, worker, now)
        self._served[name] = served
        self._refused.pop(name, None)
        if previous is not None and previous.index.version != index.version:
            log.info("index %r: now serving version %d (was %d)", name, index.version,
                     previous.index.version)
        else:
            log.info("index %r: serving version %d (%d examples, dim %d) on %s", name,
                     index.version, index.count, index.dim, worker.device)
        return served

    def _refuse(self, name: str, version: int | None, reason: str, now: float
                ) -> IndexUnavailable:
        message = f"index {name!r} cannot be served: {reason}"
        if name not in self._refused or self._refused[name].message != message:
            log.error("index %r is not served: %s", name, reason)
        self._refused[name] = _Refused(version, message, now)
        self._served.pop(name, None)
        return IndexUnavailable(message)
