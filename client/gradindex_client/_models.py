"""Typed results of contract version 1 (fields the server adds later are kept, not refused)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pandas is optional
    import pandas

__all__ = [
    "Example",
    "ExamplePage",
    "Health",
    "IndexDetail",
    "IndexSummary",
    "InfluenceResponse",
    "InfluenceResult",
    "ScoresResponse",
    "SelectResponse",
    "SelfInfluencePage",
    "TrainingExample",
    "Whoami",
]


def _pandas() -> Any:
    try:
        import pandas
    except ImportError as exc:
        raise ImportError("to_pandas() needs pandas: `pip install pandas`") from exc
    return pandas


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class TrainingExample(_Model):
    """A training example: its id, payload, metadata and self-influence."""

    id: str
    payload: Any
    meta: dict[str, Any]
    self_influence: float
    render: dict[str, Any] | None = None
    """How the task shows the example, when the request asked for it."""
    prediction: int | None = None
    """The model's predicted class, when asked for (``predict``; tasks with ``logits``)."""
    confidence: float | None = None
    """Its probability, when asked for."""
    loss: float | None = None
    """The task's loss on the example, when asked for."""


class Example(TrainingExample):
    """A training example with its score against a test example (> 0: proponent)."""

    score: float


def _payload_columns(payload: Any) -> dict[str, Any]:
    """A payload as columns: a JSON object one ``payload.<key>`` column per key (as metadata
    become ``meta.<key>``), anything else (text, a list) one ``payload`` column."""
    if isinstance(payload, dict):
        return {f"payload.{k}": v for k, v in payload.items()}
    return {"payload": payload}


def _rows(examples: list[Example] | list[TrainingExample], payloads: bool = False,
          **extra: Any) -> list[dict[str, Any]]:
    return [{**extra, "rank": rank, "id": e.id, "score": getattr(e, "score", None),
             "self_influence": e.self_influence, **{f"meta.{k}": v for k, v in e.meta.items()},
             **(_payload_columns(e.payload) if payloads else {})}
            for rank, e in enumerate(examples)]


class InfluenceResult(_Model):
    """The strongest proponents (score > 0) and opponents (score < 0) of one query, how many
    training examples score on each side of zero, and what the model makes of the query."""

    id: str | None = None
    """The training id queried (``influence(ids=...)``); None for a payload."""
    proponents: list[Example] = []
    opponents: list[Example] = []
    positives: int | None = None
    """How many searched examples score > 0; None when the server did not count them (a large
    index, with at least ``k`` of them)."""
    negatives: int | None = None
    """How many score < 0; None when not counted."""
    prediction: int | None = None
    """The model's predicted class (tasks with ``logits``), else None."""
    confidence: float | None = None
    """The predicted class's probability, else None."""
    loss: float | None = None
    """The task's loss on the query at its own target, else None."""


class InfluenceResponse(_Model):
    """The answer to ``influence``: one result per test example, in order."""

    index: str
    version: int
    results: list[InfluenceResult]

    def to_pandas(self, payloads: bool = False) -> pandas.DataFrame:
        """One row per (test example, direction, rank): id, score, self-influence, metadata.

        Args:
            payloads: add the training examples' payloads: a JSON object as one
                ``payload.<key>`` column per key (``payload.text``, ``payload.label``), like
                the ``meta.<key>`` columns; any other payload as one ``payload`` column.

        Returns:
            Columns ``example`` (the test example's position), ``direction``, ``rank``,
            ``id``, ``score``, ``self_influence``, then ``meta.*`` (and ``payload.*``).
        """
        rows = [row for i, r in enumerate(self.results)
                for direction in ("proponents", "opponents")
                for row in _rows(getattr(r, direction), payloads, example=i,
                                 direction=direction)]
        columns = ["example", "direction", "rank", "id", "score", "self_influence"]
        return _pandas().DataFrame(rows, columns=None if rows else columns)


class ScoresResponse(_Model):
    """The answer to ``scores``: ``scores[example][j]`` is the score against ``ids[j]``."""

    index: str
    version: int
    ids: list[str]
    scores: list[list[float]]
    missing: list[str] = []
    """Ids asked for that are not live in the index (deleted, or never indexed): left out of
    ``ids`` and ``scores``."""

    def to_pandas(self) -> pandas.DataFrame:
        """Scores as a table: one row per test example, one column per training id."""
        return _pandas().DataFrame(self.scores, columns=self.ids)


class SelectResponse(_Model):
    """The answer to ``select``: training examples, highest mean influence first."""

    index: str
    version: int
    ids: list[str]
    results: list[Example]

    def to_pandas(self, payloads: bool = False) -> pandas.DataFrame:
        """One row per training example: rank, id, score (mean influence), self-influence,
        ``meta.*``.

        Args:
            payloads: add the payloads, as :meth:`InfluenceResponse.to_pandas` does.
        """
        return _pandas().DataFrame(_rows(self.results, payloads))


class SelfInfluencePage(_Model):
    """One page of ``self_influence``; ``next_offset`` is None on the last page."""

    index: str
    version: int
    limit: int
    offset: int
    next_offset: int | None
    results: list[TrainingExample]
    total: int | None = None
    """Live examples matching the filter and bounds, on all pages."""

    def to_pandas(self, payloads: bool = False) -> pandas.DataFrame:
        """One row per training example: rank (within the page), id, self-influence,
        ``meta.*``.

        Args:
            payloads: add the payloads, as :meth:`InfluenceResponse.to_pandas` does.
        """
        frame = _pandas().DataFrame(_rows(self.results, payloads))
        return frame.drop(columns="score", errors="ignore")


class IndexSummary(_Model):
    """An index: its published version, size and whether the server serves it."""

    name: str
    status: Literal["serving", "unavailable", "unpublished"] | str
    version: int | None
    count: int
    deleted: int
    dim: int | None
    published_at: datetime | None
    reason: str | None = None


class IndexDetail(IndexSummary):
    """An index with the settings it was built with and the device that serves it."""

    task: dict[str, Any]
    compression: dict[str, Any]
    preconditioner: dict[str, Any]
    faiss: dict[str, Any]
    relative: bool
    device: str | None
    metadata_schema: dict[str, Any] | None = None
    """Metadata keys, their JSON types and (few) values, as recorded at build: what filters
    are checked against. None for indexes built before it was recorded."""


class ExamplePage(_Model):
    """One page of ``examples`` (training examples in build order); ``total`` match."""

    index: str
    version: int
    total: int
    limit: int
    offset: int
    next_offset: int | None
    results: list[TrainingExample]

    def to_pandas(self, payloads: bool = False) -> pandas.DataFrame:
        """One row per training example, as :meth:`SelfInfluencePage.to_pandas`."""
        frame = _pandas().DataFrame(_rows(self.results, payloads))
        return frame.drop(columns="score", errors="ignore")


class Whoami(_Model):
    """What the client's key may do: scope ``admin``, ``read`` or ``keyless``."""

    scope: Literal["admin", "read", "keyless"] | str
    auth: bool
    key: str | None = None


class Health(_Model):
    """The server's liveness: status ``ok``, contract version, devices."""

    status: str
    contract: int
    version: str
    auth: bool
    indexes: int
    devices: list[str]
    workers: int = 0
