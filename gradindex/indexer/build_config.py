"""What a build is told: its settings, its shard, its progress callback and its hooks.

A leaf module shared by the pipeline's steps (``stage``, ``finalize``) and ``build`` above them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import CompressionConfig, PreconditionerConfig
from .errors import ConfigError
from .settings import check_name
from .store import FaissConfig
from .task import TaskSpec

__all__ = [
    "BuildConfig",
    "BuildHooks",
    "BuildProgressFn",
    "FinalizePoint",
    "parse_shard",
    "shard_from_env",
]

BuildProgressFn = Callable[[str, int, "int | None"], None]
"""Called with ``(phase, done, total)``; phases: featurize, fisher, vectors, faiss."""

FinalizePoint = Literal["fitted", "rows", "store", "faiss", "before_publish", "published"]
"""Where :meth:`BuildHooks.in_finalize` is called: ``fitted`` once the preconditioner is
saved; ``rows`` after each window of SQL rows is committed; ``store`` after each batch of
vectors inserted into a Milvus collection (``--store milvus``); ``faiss`` once the FAISS files
(or the Milvus collection) are written; ``before_publish`` after the version folder's rename
and before the publishing transaction; ``published`` after it."""


class BuildHooks:
    """Named points of a build where a caller can step in; here every hook does nothing.

    Subclass it and override what you need: tests stop a build at a known point to kill it
    there (a crash at exactly that moment), a service can log or checkpoint. Hooks run in the
    building thread; an exception raised by one aborts the build like any other error.
    """

    def after_chunk(self, chunks: int) -> None:
        """Called once this run of ``stage`` has made its ``chunks``-th chunk durable."""

    def in_finalize(self, point: FinalizePoint) -> None:
        """Called at ``point`` of ``finalize`` (see :data:`FinalizePoint`)."""


NO_HOOKS = BuildHooks()
"""The default: a build that nobody watches."""


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``gradindex build`` is told: what to index, how, and which shard."""

    name: str
    """Index name (a folder name: letters, digits, '.', '_', '-')."""

    task: str
    """Task spec, ``package.module:Name`` or ``path/to/file.py:Name``."""

    task_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the task's constructor."""

    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """Compressor, keep/dim, masks, seed and batch size."""

    preconditioner: PreconditionerConfig = field(default_factory=PreconditionerConfig)
    """Fisher kind, shape and damping."""

    faiss: FaissConfig = field(default_factory=FaissConfig)
    """FAISS index kind and precision."""

    store: str | None = None
    """Where the vectors are searched: `faiss` (files beside them) or `milvus` (a collection
    in the Milvus of `GRADINDEX_VECTOR_STORE`); unset: the store of the index's current
    version, else `faiss`."""

    shard: int = 0
    """This process's shard, in [0, `shards`): it featurizes the batches b (examples
    [b·batch_size, (b+1)·batch_size)) with b % shards == shard, so every batch holds the same
    examples as in a one-process build and the vectors come out bit-identical."""

    shards: int = 1
    """Number of shards; with more than one, a build only stages and a later finalize merges."""

    chunk_size: int = 1024
    """Examples per staging chunk (rounded up to whole batches): the unit a killed build loses."""

    window: int = 4096
    """Examples per finalize step (memory: `window` × dim floats, times R for Fisher rows)."""

    def __post_init__(self) -> None:
        check_name(self.name)
        if not isinstance(self.shards, int) or self.shards < 1:
            raise ConfigError(f"`shards` must be a positive integer, got {self.shards!r}")
        if not isinstance(self.shard, int) or not 0 <= self.shard < self.shards:
            raise ConfigError(f"`shard` must be in [0, {self.shards}), got {self.shard!r}")
        if self.store is not None and self.store not in ("faiss", "milvus"):
            raise ConfigError(f"`store` must be one of ['faiss', 'milvus'], got {self.store!r}")
        for name in ("chunk_size", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"`{name}` must be a positive integer, got {value!r}")

    @property
    def task_spec(self) -> TaskSpec:
        return TaskSpec(self.task, self.task_args)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``.

    Raises:
        ConfigError: the text is not of that form.
    """
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ConfigError(f"`shard` must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"`shard` must be i/n with 0 <= i < n, got {text!r}")
    return i, n


def shard_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard ``torchrun`` assigns through ``RANK`` and ``WORLD_SIZE``, if any."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    return parse_shard(f"{env.get('RANK', '0')}/{env['WORLD_SIZE']}")
