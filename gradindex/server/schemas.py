"""Request and response models of contract version 1, one set per resource."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CONTRACT_VERSION",
    "DeleteResult",
    "ErrorBody",
    "ErrorResponse",
    "Example",
    "Filter",
    "Health",
    "IndexDetail",
    "IndexList",
    "IndexSummary",
    "Readiness",
    "InfluenceRequest",
    "InfluenceResponse",
    "InfluenceResult",
    "ScoresRequest",
    "ScoresResponse",
    "SelectRequest",
    "SelectResponse",
    "SelfInfluencePage",
    "TrainingExample",
]

CONTRACT_VERSION = 1
MAX_K = 1000

Scalar = str | int | float | bool | None
Filter = dict[str, Scalar | list[Scalar]]
"""``{"field": value}`` or ``{"field": [v1, v2]}`` on the examples' metadata; all must match."""

Payload = dict[str, Any]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------ training examples


class TrainingExample(BaseModel):
    """A training example of an index."""

    id: str = Field(description="The id the task gave the example.")
    payload: Any = Field(description="The example as the task stores it (JSON).")
    meta: dict[str, Any] = Field(description="Its metadata (what filters match on).")
    self_influence: float = Field(description="g̃ᵀ(F̃+λI)⁻¹g̃: high for outliers and mislabels.")
    render: dict[str, Any] | None = Field(
        None, description="How the task shows the example (its `render`), when asked for.")


class Example(TrainingExample):
    """A training example with its score against a query."""

    score: float = Field(description="Influence on the query: > 0 proponent, < 0 opponent; "
                                     "with `normalize`, the relative influence.")


class DeleteResult(BaseModel):
    deleted: TrainingExample


# ------------------------------------------------------------------ influence


class InfluenceRequest(_Request):
    """Most influential training examples of each test example."""

    examples: list[Payload] = Field(min_length=1, description="Test examples (task payloads).")
    k: int = Field(10, ge=1, le=MAX_K, strict=True,
                   description="Results per example and direction.")
    direction: Literal["proponents", "opponents", "both"] = "proponents"
    filter: Filter | None = Field(
        None, description="Search only training examples whose metadata match.")
    normalize: bool = Field(
        False, description="Rank by relative influence, score / sqrt(self-influence) (RelatIF).")
    render: bool = Field(False, description="Add each hit's `render` (how the task shows it).")


class InfluenceResult(BaseModel):
    """The top training examples of one test example, strongest first."""

    proponents: list[Example] = Field(default_factory=list)
    opponents: list[Example] = Field(default_factory=list)


class InfluenceResponse(BaseModel):
    index: str
    version: int
    results: list[InfluenceResult] = Field(description="One per example, in order.")


# ------------------------------------------------------------------ scores and selection


class ScoresRequest(_Request):
    """Exact scores of test examples against given (or all live) training examples."""

    examples: list[Payload] = Field(min_length=1)
    ids: list[str] | None = Field(
        None, description="Training example ids; null means every live example.")


class ScoresResponse(BaseModel):
    index: str
    version: int
    ids: list[str]
    scores: list[list[float]] = Field(description="[example][id]")


class SelectRequest(_Request):
    """Training examples ranked by their mean influence over a target set (data selection)."""

    examples: list[Payload] = Field(min_length=1, description="The target set.")
    k: int = Field(10, ge=1, le=MAX_K, strict=True)
    filter: Filter | None = None
    normalize: bool = False


class SelectResponse(BaseModel):
    index: str
    version: int
    ids: list[str] = Field(description="Training ids, highest mean influence first.")
    results: list[Example]


class SelfInfluencePage(BaseModel):
    """Training examples by self-influence: outlier and mislabel candidates first."""

    index: str
    version: int
    limit: int
    offset: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")
    results: list[TrainingExample]


# ------------------------------------------------------------------ indexes and health


class IndexSummary(BaseModel):
    name: str
    status: Literal["serving", "unavailable", "unpublished"]
    version: int | None
    count: int = Field(description="Live (not deleted) examples.")
    deleted: int
    dim: int | None
    published_at: datetime | None
    reason: str | None = Field(None, description="Why an unavailable index is not served.")


class IndexDetail(IndexSummary):
    task: dict[str, Any]
    compression: dict[str, Any]
    preconditioner: dict[str, Any]
    faiss: dict[str, Any]
    relative: bool = Field(description="Whether `normalize` searches its own FAISS index "
                                       "(else an exact scan).")
    device: str | None


class IndexList(BaseModel):
    indexes: list[IndexSummary]


class Health(BaseModel):
    status: Literal["ok"]
    contract: int
    version: str
    auth: bool
    indexes: int
    devices: list[str]
    workers: int = Field(0, description="Device workers running (one per served model).")


class Readiness(BaseModel):
    """Whether the server can serve now (``/v1/health/ready``): its database answers; and the
    state of each index it knows."""

    status: Literal["ready", "unavailable"]
    database: Literal["ok", "unavailable"]
    indexes: dict[str, Literal["serving", "unavailable"]] = Field(
        description="Each index this server has opened or refused, by name.")


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# ------------------------------------------------------------------ browsing (the web page)


class GalleryItem(BaseModel):
    """A held-out example the task offers to query with (``task.queries()``)."""

    id: str
    payload: Any
    render: dict[str, Any] | None = None


class GalleryPage(BaseModel):
    """One page of the task's query examples."""

    index: str
    total: int = Field(description="Examples in the gallery (0 when the task offers none).")
    limit: int
    offset: int
    next_offset: int | None
    results: list[GalleryItem]


class Histogram(BaseModel):
    """Histogram of the live examples' self-influence."""

    index: str
    version: int
    count: int = Field(description="Live examples counted (with `log`, the positive ones).")
    log: bool = Field(False, description="Whether the bins are evenly spaced in log10.")
    edges: list[float] = Field(description="bins + 1 bin edges.")
    counts: list[int]
