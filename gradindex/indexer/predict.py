"""What the model says about an example: its prediction, confidence and loss.

The page shows them on the query card, so that a mislabel can be judged at a glance. They come
from one forward pass (no gradient) of every checkpoint of the featurizer's task: the loss is
the task's own ``loss`` at the example's target, averaged over checkpoints; for a task with
``logits`` (a classifier), the prediction is the class of highest mean softmax probability and
the confidence that probability. What the task cannot tell is None.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .featurize import Featurizer

__all__ = ["NONE", "Prediction", "predictions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """The model's view of one example."""

    prediction: int | None
    """The predicted class (argmax of the mean softmax); None without ``logits``."""
    confidence: float | None
    """Its mean softmax probability; None without ``logits``."""
    loss: float | None
    """The task's loss at the example's target (mean over checkpoints); None if not finite."""


NONE = Prediction(None, None, None)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def predictions(featurizer: Featurizer, payloads: Sequence[dict[str, Any]]
                ) -> list[Prediction]:
    """One :class:`Prediction` per payload, from one no-grad pass per checkpoint.

    A task whose ``loss`` or ``logits`` fails here gives None for what failed (logged), never
    an error: the influence results stand without it.
    """
    if not payloads:
        return []
    task = featurizer.task
    try:
        batch = featurizer.collate(list(payloads))
    except Exception as exc:  # noqa: BLE001 - the influence pass reports a bad payload
        log.info("no prediction: the task rejected the payloads (%s)", exc)
        return [NONE] * len(payloads)
    b = len(payloads)
    losses: list[float | None] = [None] * b
    try:
        with torch.no_grad():
            mean = torch.stack([task.loss(m, batch).detach().double().reshape(-1)
                                for m in featurizer.models]).mean(dim=0)
        if mean.shape == (b,):
            losses = [_finite(float(x)) for x in mean.cpu()]
    except Exception as exc:  # noqa: BLE001 - a user's loss may raise anything
        log.info("no loss for the page: task.loss failed (%s)", exc)
    classes: list[int | None] = [None] * b
    confidence: list[float | None] = [None] * b
    if task.has_logits:
        try:
            with torch.no_grad():
                probs = torch.stack([torch.softmax(task.logits(m, batch).detach().double(), -1)
                                     for m in featurizer.models]).mean(dim=0)
            if probs.dim() == 2 and probs.shape[0] == b:
                top, arg = probs.max(dim=1)
                classes = [int(c) for c in arg.cpu()]
                confidence = [_finite(float(p)) for p in top.cpu()]
        except Exception as exc:  # noqa: BLE001
            log.info("no prediction for the page: task.logits failed (%s)", exc)
    return [Prediction(classes[i], confidence[i], losses[i]) for i in range(b)]
