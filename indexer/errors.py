"""The errors gradindex raises: one small hierarchy, mapped to HTTP status codes in one place."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "GradindexError",
    "IndexNotFound",
    "NonFiniteLoss",
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
