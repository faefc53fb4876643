"""The model's predictions of stored and gallery examples, computed on the device worker and
kept per index version (training examples) or per task (its query gallery).

They feed the ``predict`` and ``misclassified`` options of the example and gallery listings: a
forward pass per example, no gradient, so at most :data:`MAX_PREDICTED` examples are predicted
for one listing.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from gradindex.indexer.errors import ConfigError
from gradindex.indexer.predict import NONE, Prediction

from .indexes import Served

__all__ = [
    "MAX_PREDICTED",
    "check_can_tell",
    "gallery_cache",
    "is_misclassified",
    "predict_many",
    "training_cache",
]

MAX_PREDICTED = 50_000
"""Examples one listing may send through the model (``misclassified`` predicts every match)."""

Cache = dict[str, Prediction]
_training: weakref.WeakKeyDictionary[Any, Cache] = weakref.WeakKeyDictionary()
_gallery: weakref.WeakKeyDictionary[Any, Cache] = weakref.WeakKeyDictionary()


def training_cache(served: Served) -> Cache:
    """Predictions of the served version's training examples, by external id."""
    return _training.setdefault(served.index, {})


def gallery_cache(served: Served) -> Cache:
    """Predictions of the task's gallery examples, by gallery id."""
    return _gallery.setdefault(served.task, {})


def check_can_tell(served: Served) -> None:
    """Raise :class:`ConfigError` unless the index's task can tell a misclassified example.

    Raises:
        ConfigError: the task has no ``logits`` (it is not a classifier).
    """
    if not served.task.has_logits:
        raise ConfigError(f"`misclassified` needs a classifier: the task of index "
                          f"{served.index.name!r} defines no logits(model, batch)")


def is_misclassified(meta: dict[str, Any], prediction: Prediction) -> bool:
    """The predicted class differs from the example's integer ``label`` metadata (False when
    either is unknown)."""
    label = meta.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or prediction.prediction is None:
        return False
    return prediction.prediction != label


async def predict_many(served: Served, items: Sequence[tuple[str, Any]], cache: Cache
                       ) -> dict[str, Prediction]:
    """Predictions of ``(id, payload)`` items, from ``cache`` or the worker (then cached).

    Raises:
        ConfigError: more than :data:`MAX_PREDICTED` items need a model pass.
    """
    todo = [(i, p) for i, p in items if i not in cache]
    if len(todo) > MAX_PREDICTED:
        raise ConfigError(f"this listing needs the model's prediction of {len(todo):,} "
                          f"examples, more than {MAX_PREDICTED:,}; narrow it with a `filter`")
    step = max(1, served.worker.max_batch)
    for lo in range(0, len(todo), step):
        chunk = todo[lo : lo + step]
        try:
            found = await served.worker.predict([p for _, p in chunk])
        except Exception:  # noqa: BLE001 - a retiring worker: unknown (not cached), no error
            continue
        cache.update(zip([i for i, _ in chunk], found, strict=True))
    return {i: cache.get(i, NONE) for i, _ in items}
