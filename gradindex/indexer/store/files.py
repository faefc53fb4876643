"""Durable file operations: atomic writes, directory fsync and advisory locks."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import GradindexError

__all__ = ["RowsFile", "file_lock", "fsync_dir", "fsync_file", "write_atomic"]


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries (renames, new files) of folder ``path`` durable."""
    fsync_file(path)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync'ed, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (released by the kernel even on ``kill -9``).

    Raises:
        GradindexError: another process holds it; ``what`` says what is running.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise GradindexError(
                f"{what} is already running in another process (lock {str(path)!r}); wait for "
                "it to finish"
            ) from exc
        yield
    finally:
        os.close(fd)


class RowsFile:
    """A new ``.npy`` file of a float32 array of ``shape`` (rows along the first axis), written
    by positioned writes of row blocks (``put``), in any order, from arrays that can be reused
    right after: finalize's vectors go out of one reused buffer, with no memory map of the new
    file to fault in, and staging chunks are written batch by batch.

    Rows never put read back as zeros. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        import numpy as np

        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        self.row_bytes = 4 * int(np.prod(self.shape[1:], dtype=np.int64))
        with open(self.path, "wb") as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
            self.offset = fh.tell()
            fh.truncate(self.offset + self.row_bytes * int(shape[0]))
        self._fd: int | None = os.open(self.path, os.O_WRONLY)

    def put(self, start: int, rows: Any) -> None:
        """Rows ``start, start + 1, ...`` from ``rows`` (``[n, *shape[1:]]``, float32)."""
        import numpy as np

        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        block = np.ascontiguousarray(rows, dtype=np.float32)
        if block.shape[1:] != self.shape[1:] or not (
                0 <= start and start + len(block) <= self.shape[0]):
            raise ValueError(f"rows {start}-{start + len(block) - 1} of shape {block.shape} "
                             f"do not fit {self.path} of shape {self.shape}")
        if block.size == 0:
            return
        view = block.data.cast("B")
        at, done = self.offset + start * self.row_bytes, 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], at + done)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RowsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
