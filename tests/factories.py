"""Small tasks built in code for the tests (sequences, broken losses, tiny classifiers) and
build hooks that record or stop a build at a named point."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradindex.indexer.build import BuildHooks, FinalizePoint
from gradindex.indexer.errors import TaskError


class SequenceModel(nn.Module):
    """Token-wise layers over ``[B, T, D]`` with a shared layer called twice, then a head."""

    def __init__(self, d_in: int = 6, hidden: int = 10, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.shared = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))  # weight sharing: its gradients add up
        return self.head(h).mean(dim=1)


class SequenceTask:
    """Classify random sequences ``[T, D]``; payload ``{"x": [[...], ...], "y": int}``."""

    def __init__(self, n: int = 24, t: int = 5, d_in: int = 6, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, t, d_in)).astype(np.float32)
        self.y = rng.integers(0, 3, size=n)
        torch.manual_seed(seed)
        self._model = SequenceModel(d_in).eval()

    def model(self) -> nn.Module:
        return self._model

    def examples(self) -> list[tuple[str, dict[str, Any]]]:
        return [(f"s{i}", {"x": self.x[i].tolist(), "y": int(self.y[i])})
                for i in range(len(self.x))]

    def collate(self, payloads: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x = torch.tensor([p["x"] for p in payloads], dtype=torch.float32)
            y = torch.tensor([p["y"] for p in payloads], dtype=torch.long)
        except (KeyError, TypeError, ValueError) as exc:
            raise TaskError(f"bad sequence payload: {exc}") from exc
        return x, y

    def logits(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = model(batch[0])
        return out

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        logits = self.logits(model, batch)
        target = batch[1]
        if sample:
            target = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(1)
        return F.cross_entropy(logits, target, reduction="none")


class PositionMetaTask(SequenceTask):
    """Sequences whose metadata is a function of their position, :meth:`meta_of` (payloads
    carry the position as ``n``)."""

    @staticmethod
    def meta_of(n: int) -> dict[str, Any]:
        return {"n": n}

    def examples(self) -> list[tuple[str, dict[str, Any]]]:
        return [(i, {**p, "n": n}) for n, (i, p) in enumerate(super().examples())]

    def collate(self, payloads: list[dict[str, Any]]) -> Any:
        return super().collate([{"x": p["x"], "y": p["y"]} for p in payloads])

    def metadata(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.meta_of(payload["n"])


class MeanLossTask(SequenceTask):
    """Breaks the contract: returns the batch mean, not per-example losses."""

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        return super().loss(model, batch).mean()


class NanLossTask(SequenceTask):
    """Breaks on one example: the loss of any example whose label is 2 is NaN."""

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        losses = super().loss(model, batch)
        return torch.where(batch[1] == 2, torch.full_like(losses, float("nan")), losses)


class StreamedTask(SequenceTask):
    """``examples()`` is a generator (no length), but the task says how many there are."""

    def examples(self) -> Iterator[tuple[str, dict[str, Any]]]:  # type: ignore[override]
        yield from super().examples()

    def __len__(self) -> int:
        return len(self.x)


class DuplicateIdsTask(SequenceTask):
    """Yields some ids twice: ``copies`` maps a position to the position whose id it repeats."""

    def __init__(self, copies: dict[int, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.copies = copies

    def examples(self) -> list[tuple[str, dict[str, Any]]]:
        examples = super().examples()
        return [(examples[self.copies.get(i, i)][0], payload)
                for i, (_, payload) in enumerate(examples)]


class NumpyPayloadTask(SequenceTask):
    """Example ``bad`` carries a numpy value under ``field`` (the others are plain JSON)."""

    def __init__(self, bad: int, field: str, value: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bad, self.field, self.value = bad, field, value

    def examples(self) -> list[tuple[str, dict[str, Any]]]:
        examples = super().examples()
        ext_id, payload = examples[self.bad]
        examples[self.bad] = (ext_id, {**payload, self.field: self.value})
        return examples


# ----------------------------------------------------------------------------- build hooks

PAUSED_MARK = "GRADINDEX_TEST_PAUSED"
"""What :class:`PausingHooks` prints to stderr when it stops, for the test to kill it."""


class PausingHooks(BuildHooks):
    """Stops the build at one point until the process is killed: after the ``after_chunks``-th
    chunk of this run, or at finalize point ``at``. Announces it on stderr first."""

    def __init__(self, *, after_chunks: int | None = None, at: FinalizePoint | None = None,
                 sleep_s: float = 3600.0) -> None:
        self.after_chunks = after_chunks
        self.at = at
        self.sleep_s = sleep_s

    def after_chunk(self, chunks: int) -> None:
        if chunks == self.after_chunks:
            self._pause(f"chunk {chunks}")

    def in_finalize(self, point: FinalizePoint) -> None:
        if point == self.at:
            self.at = None  # once: "rows" comes once per window
            self._pause(point)

    def _pause(self, where: str) -> None:
        os.write(2, f"{PAUSED_MARK} {where}\n".encode())
        time.sleep(self.sleep_s)


class RecordingHooks(BuildHooks):
    """Records every hook call, in order: ``("chunk", n)`` and ``("finalize", point)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def after_chunk(self, chunks: int) -> None:
        self.calls.append(("chunk", chunks))

    def in_finalize(self, point: FinalizePoint) -> None:
        self.calls.append(("finalize", point))
