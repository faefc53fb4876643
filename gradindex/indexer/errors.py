"""The errors gradindex raises: one small hierarchy, mapped to HTTP status codes in one place."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ExampleNotFound",
    "GradindexError",
    "IndexNotFound",
    "NonFiniteLoss",
    "StorageError",
    "TaskError",
]


class GradindexError(Exception):
    """Base class of every error that gradindex raises on purpose."""


class ConfigError(GradindexError, ValueError):
    """A setting is out of range or inconsistent; the message names the field."""


class TaskError(GradindexError, ValueError):
    """A task spec does not resolve, or a task broke its contract (shapes, payloads)."""


class NonFiniteLoss(TaskError):
    """The task's loss was NaN or infinite for some example, so it has no gradient to index."""


class IndexNotFound(GradindexError, KeyError):
    """No index of that name exists."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "index not found"


class ExampleNotFound(GradindexError, KeyError):
    """No example with that id in the index (or it was deleted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "example not found"


class StorageError(GradindexError):
    """The database or the index files are unreachable, out of date or inconsistent."""
