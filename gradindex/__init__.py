"""gradindex: a persistent gradient index for training-data attribution.

The public surface is :data:`__all__`, imported lazily so that ``import gradindex`` (and the
command line's ``--help``) stays fast: torch, FAISS and SQLAlchemy load on first use of a name
that needs them. Everything else lives in ``gradindex.indexer`` (the math and the index format)
and ``gradindex.server`` (the HTTP service) and may change between releases.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = {
    "BuildConfig": "gradindex.indexer.build",
    "CompressionConfig": "gradindex.indexer.config",
    "ExactInfluence": "gradindex.indexer.exact",
    "FaissConfig": "gradindex.indexer.store.vectors",
    "Featurizer": "gradindex.indexer.featurize",
    "GradindexError": "gradindex.indexer.errors",
    "InMemoryIndex": "gradindex.indexer.influence",
    "PreconditionerConfig": "gradindex.indexer.config",
    "Settings": "gradindex.indexer.settings",
    "Task": "gradindex.indexer.task",
    "TaskError": "gradindex.indexer.errors",
    "build": "gradindex.indexer.build",
    "lds": "gradindex.indexer.evaluate",
    "load_task": "gradindex.indexer.task",
    "open_index": "gradindex.indexer.reader",
    "refinalize": "gradindex.indexer.build",
}

__all__ = [
    "BuildConfig",
    "CompressionConfig",
    "ExactInfluence",
    "FaissConfig",
    "Featurizer",
    "GradindexError",
    "InMemoryIndex",
    "PreconditionerConfig",
    "Settings",
    "Task",
    "TaskError",
    "__version__",
    "build",
    "lds",
    "load_task",
    "open_index",
    "refinalize",
]

if TYPE_CHECKING:
    from .indexer.build import BuildConfig, build, refinalize
    from .indexer.config import CompressionConfig, PreconditionerConfig
    from .indexer.errors import GradindexError, TaskError
    from .indexer.evaluate import lds
    from .indexer.exact import ExactInfluence
    from .indexer.featurize import Featurizer
    from .indexer.influence import InMemoryIndex
    from .indexer.reader import open_index
    from .indexer.settings import Settings
    from .indexer.store.vectors import FaissConfig
    from .indexer.task import Task, load_task


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'gradindex' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
