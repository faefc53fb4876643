"""The indexes a server serves: opened at start-up, reopened when a new version is published.

Each index is read through the indexer's :class:`~gradindex.indexer.reader.Index`; its queries
go to the device worker of its model, shared by every index (and version) built from the same
task, compression and weights, and retired once no served index uses that model any more.

One index that cannot be served never stops the server or the others: whatever goes wrong
while opening it (a damaged file, a manifest that does not parse, a task that raises, weights
that changed) is caught, logged in one line, and the index is reported ``unavailable`` with
the reason (which never names an absolute path) until a new version of it is published.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from gradindex.indexer.admin import list_indexes
from gradindex.indexer.errors import GradindexError, IndexNotFound
from gradindex.indexer.featurize import Featurizer
from gradindex.indexer.query import featurizer_for
from gradindex.indexer.reader import Index, open_index
from gradindex.indexer.settings import check_name
from gradindex.indexer.store import connect, current_version
from gradindex.indexer.task import TaskAdapter

from .batcher import SearchBatcher
from .errors import IndexUnavailable, is_outage
from .metrics import Metrics
from .settings import ServerSettings
from .worker import DeviceWorker

__all__ = ["IndexRegistry", "Served", "failure_reason", "model_key"]

log = logging.getLogger(__name__)

RETRY_SAME_VERSION_S = (30.0, 900.0)
"""A refused index whose version stays the same is opened again after 30 s, then after twice
as long each time, up to 15 min (a weights file put back, a database back up: without a restart,
yet without reloading a large model at every request); a new version is tried at once."""

MAX_REASON = 600
"""Characters of a refusal reason at most (a task's exception may be long)."""

_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s'\"/]+/)*[^\s'\"/,;)]+")


def model_key(manifest: dict[str, Any]) -> str:
    """What identifies the model (and masks) of an index: versions sharing it share a worker."""
    return json.dumps({"task": manifest.get("task"), "compression": manifest.get("compression"),
                       "fingerprint": manifest.get("model_fingerprint")}, sort_keys=True)


def failure_reason(exc: BaseException, data_dir: Path) -> str:
    """Why opening an index failed, in one line without absolute paths.

    A path inside the data directory is shown relative to it, any other by its file name:
    the reason is sent to every client, which has no business knowing the server's layout.
    """
    if isinstance(exc, GradindexError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.filename:
        text = f"{type(exc).__name__}: {exc.strerror or exc}: {exc.filename}"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    root = str(Path(data_dir).resolve())

    def shown(match: re.Match[str]) -> str:
        path = match.group(0)
        for base in (root, str(data_dir)):
            if path == base:
                return "the data directory"
            if path.startswith(base.rstrip("/") + "/"):
                return path[len(base.rstrip("/")) + 1 :]
        return Path(path).name

    text = " ".join(_ABSOLUTE_PATH.sub(shown, text).split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


@dataclass
class Served:
    """An index version being served, and the worker that makes its query vectors."""

    index: Index
    worker: DeviceWorker
    key: str
    """The worker's :func:`model_key`."""
    checked: float
    """When it was last confirmed to be the current version (monotonic seconds)."""
    searches: SearchBatcher
    """Ranks the searches of concurrent requests on this version together."""

    @property
    def featurizer(self) -> Featurizer:
        return self.worker.featurizer

    @property
    def task(self) -> TaskAdapter:
        """The index's task (``render``, ``queries``), as the worker's featurizer loaded it."""
        return self.worker.featurizer.task


@dataclass
class _Refused:
    version: tuple[int, str] | None
    """The identity (id, build id) of the version that failed to open (None: not even that
    could be read)."""
    message: str
    checked: float
    """When the refusal was last confirmed (monotonic seconds)."""
    tried: float
    """When the version was last opened (monotonic seconds)."""
    retry_s: float = RETRY_SAME_VERSION_S[0]
    """How long after ``tried`` the same version is opened again."""


class IndexRegistry:
    """Served indexes by name, and device workers by model."""

    def __init__(self, settings: ServerSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.storage = settings.storage()
        self.metrics = metrics
        self._served: dict[str, Served] = {}
        self._refused: dict[str, _Refused] = {}
        self._workers: dict[str, DeviceWorker] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    @property
    def workers(self) -> list[DeviceWorker]:
        return list(self._workers.values())

    @property
    def served(self) -> dict[str, Served]:
        return dict(self._served)

    def serves(self, name: str) -> bool:
        """Whether this server serves ``name`` at all (``GRADINDEX_SERVE_ONLY``)."""
        only = self.settings.served_names
        return only is None or name in only

    def expire(self, name: str) -> None:
        """Check ``name``'s current version at its next request (it was found replaced)."""
        served = self._served.get(name)
        if served is not None:
            served.checked = float("-inf")

    def refused(self) -> dict[str, str]:
        """Why each refused index is not served."""
        return {name: r.message for name, r in self._refused.items()}

    async def start(self) -> None:
        """Open every published index; one that fails is refused, never fatal."""
        rows = await asyncio.to_thread(list_indexes, self.storage)
        for row in rows:
            if row["version"] is None or not self.serves(row["name"]):
                continue
            try:
                async with self._lock:
                    await self._open(row["name"])
            except (IndexUnavailable, IndexNotFound):
                pass  # refused (logged by _open), or deleted meanwhile
            except Exception as exc:
                if not is_outage(exc):
                    raise
                log.error("index %r: not opened yet, the database is unavailable (%s); "
                          "opened on its first request", row["name"], type(exc).__name__)
        log.info("serving %d index(es): %s", len(self._served), ", ".join(self._served) or "-")

    async def stop(self) -> None:
        for worker in self._workers.values():
            await worker.stop()
        self._workers.clear()
        self._served.clear()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    async def get(self, name: str) -> Served:
        """The current version of ``name``, reopened if a newer one was published.

        Raises:
            IndexNotFound: no such index (or it has no published version).
            IndexUnavailable: the index exists but cannot be served.
        """
        check_name(name)
        if not self.serves(name):
            raise IndexNotFound(f"no index named {name!r} on this server")
        now = time.monotonic()
        served = self._served.get(name)
        if served is not None and now - served.checked < self.settings.reload_ttl_s:
            return served
        refused = self._refused.get(name)
        if refused is not None and now - refused.checked < self.settings.reload_ttl_s:
            raise IndexUnavailable(refused.message)
        try:
            current = await asyncio.to_thread(self._current_version, name)
        except IndexNotFound:
            self._forget(name)
            raise
        if served is not None and served.index.identity == current:
            served.checked = now
            return served
        if (served is None and refused is not None and refused.version == current
                and now - refused.tried < refused.retry_s):
            refused.checked = now
            raise IndexUnavailable(refused.message)
        async with self._lock:  # another request may have opened or refused it meanwhile
            again = self._served.get(name)
            if again is not None and again.index.identity == current:
                return again
            late = self._refused.get(name)
            if late is not None and late.version == current and late.tried >= now:
                raise IndexUnavailable(late.message)
            return await self._open(name)

    def sync(self, names: set[str]) -> None:
        """Forget the indexes not in ``names`` (deleted since), retiring their workers."""
        for name in set(self._served) | set(self._refused):
            if name not in names:
                self._forget(name)

    def _current_version(self, name: str) -> tuple[int, str]:
        """The identity (id, build id) of the published version of ``name``."""
        with Session(connect(self.storage)) as session:
            row = current_version(session=session, name=name)
            return int(row.id), str(row.build_id or "")

    async def _open(self, name: str) -> Served:
        """Open the current version of ``name`` (the caller holds the lock).

        Raises:
            IndexNotFound: the index is gone.
            IndexUnavailable: anything else went wrong; the index is refused.
        """
        now = time.monotonic()
        version: tuple[int, str] | None = None
        try:
            version = await asyncio.to_thread(self._current_version, name)
            index = await asyncio.to_thread(open_index, name, self.storage)
            key = model_key(index.manifest)
            worker = self._workers.get(key)
            if worker is None:
                featurizer = await asyncio.to_thread(
                    featurizer_for, index, device=self.settings.device)
                worker = DeviceWorker(
                    f"{name}-v{index.version}", featurizer, max_batch=self.settings.max_batch,
                    max_wait_s=self.settings.max_wait_ms / 1000,
                    queue_size=self.settings.queue_size,
                    retry_after_s=self.settings.retry_after_s, metrics=self.metrics)
                worker.start()
                self._workers[key] = worker
        except IndexNotFound:
            self._forget(name)
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - one index never stops the rest
            if is_outage(exc) and not isinstance(exc, OSError):
                raise  # the database or the disk is down, not the index: 503, retried at once
            raise self._refuse(name, version, exc) from exc
        previous = self._served.get(name)
        served = Served(index, worker, key, now, SearchBatcher(index, metrics=self.metrics))
        self._served[name] = served
        self._refused.pop(name, None)
        if previous is not None and previous.index.version != index.version:
            log.info("index %r: now serving version %d (was %d)", name, index.version,
                     previous.index.version)
        else:
            log.info("index %r: serving version %d (%d examples, dim %d) on %s", name,
                     index.version, index.count, index.dim, worker.device)
        self._retire_unused()
        return served

    def _refuse(self, name: str, version: tuple[int, str] | None, exc: BaseException
                ) -> IndexUnavailable:
        reason = failure_reason(exc, self.storage.data_dir)
        reason = reason.removeprefix(f"index {name!r}: ")  # the message names it already
        message = f"index {name!r} cannot be served: {reason}"
        before = self._refused.get(name)
        if before is None or before.message != message:
            log.error("index %r is not served: %s", name, reason)
            log.debug("index %r: the failure in full", name, exc_info=exc)
        retry_s = RETRY_SAME_VERSION_S[0]
        if before is not None and before.version == version:
            retry_s = min(2 * before.retry_s, RETRY_SAME_VERSION_S[1])
        now = time.monotonic()
        self._refused[name] = _Refused(version, message, now, now, retry_s)
        self._served.pop(name, None)
        self._retire_unused()
        return IndexUnavailable(message)

    def _forget(self, name: str) -> None:
        if self._served.pop(name, None) is not None:
            log.info("index %r: no longer served (deleted)", name)
        self._refused.pop(name, None)
        self._retire_unused()

    def _retire_unused(self) -> None:
        """Retire the workers whose model no served index uses any more (after a version
        replacement or a deletion); each finishes its waiting requests first."""
        used = {s.key for s in self._served.values()}
        for key in [k for k in self._workers if k not in used]:
            worker = self._workers.pop(key)
            task = asyncio.get_running_loop().create_task(worker.close(),
                                                          name=f"retire-{worker.name}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
