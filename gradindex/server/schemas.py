"""Request and response models of contract version 1, one set per resource."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "CONTRACT_VERSION",
    "DeleteResult",
    "ErrorBody",
    "ErrorResponse",
    "Example",
    "ExamplePage",
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
    "Whoami",
]

CONTRACT_VERSION = 1
MAX_K = 1000

Filter = dict[str, Any]
"""A metadata filter (:mod:`gradindex.indexer.filters`), checked by the index it searches."""

FILTER_DESCRIPTION = (
    "Search only training examples whose metadata match. An object of metadata keys: a value "
    "(`{\"label\": 3}`: equality), a list (`{\"source\": [\"wiki\", \"books\"]}`: one of "
    "them) or operators (`{\"weight\": {\"$gte\": 0.5, \"$lt\": 2}}`): `$eq $ne $in $nin` "
    "on scalars, `$gt $gte $lt $lte` on numbers, `$exists` (true/false). Every key must "
    "match; combine filters with `{\"$and\": [...]}` and `{\"$or\": [...]}`. `$ne`/`$nin` also "
    "match examples without the key; `null` matches JSON null only. At most 4 levels deep "
    "and 256 values. A key the index's metadata lacks, or a value of a type the key never "
    "holds, is refused (422) with the known keys (see the index's `metadata_schema`).")
FILTER_EXAMPLES: list[Any] = [
    {"label": 3},
    {"source": ["wiki", "books"]},
    {"$or": [{"label": 3}, {"weight": {"$gte": 0.5, "$lt": 2}}], "flag": {"$exists": True}},
]

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
    prediction: int | None = Field(
        default=None,
        description="The model's predicted class, when asked for (`predict`) and the "
                    "task has `logits`.")
    confidence: float | None = Field(
        default=None, description="The predicted class's probability, when asked for.")
    loss: float | None = Field(
        default=None, description="The task's loss on the example, when asked for.")


class Example(TrainingExample):
    """A training example with its score against a query."""

    score: float = Field(description="Influence on the query: > 0 proponent, < 0 opponent; "
                                     "with `normalize`, the relative influence.")


class DeleteResult(BaseModel):
    deleted: TrainingExample


class ExamplePage(BaseModel):
    """One page of the live training examples in build order, and how many match."""

    index: str
    version: int
    total: int = Field(description="Live examples matching the filter (all pages).")
    limit: int
    offset: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")
    results: list[TrainingExample]


# ------------------------------------------------------------------ influence


class InfluenceRequest(_Request):
    """Most influential training examples of each test example, or of stored training
    examples (``ids``: train-to-train)."""

    examples: list[Payload] | None = Field(
        None, min_length=1, description="Test examples (task payloads). Give `examples` or "
                                        "`ids`, not both.")
    ids: list[str] | None = Field(
        None, min_length=1,
        description="Training example ids: their stored vectors are the queries (no model "
                    "pass), e.g. to find what drove a training example, or its near-duplicates. "
                    "Give `examples` or `ids`, not both.")
    include_self: bool = Field(
        False, description="With `ids`: let a training example appear in its own results "
                           "(left out by default).")
    k: int = Field(10, ge=1, le=MAX_K, strict=True,
                   description="Results per example and direction.")
    direction: Literal["proponents", "opponents", "both"] = "proponents"
    filter: Filter | None = Field(None, description=FILTER_DESCRIPTION,
                                  examples=FILTER_EXAMPLES)
    normalize: bool = Field(
        False, description="Rank by relative influence, score / sqrt(self-influence) (RelatIF).")
    render: bool = Field(False, description="Add each hit's `render` (how the task shows it).")

    @model_validator(mode="after")
    def _one_kind_of_query(self) -> InfluenceRequest:
        if (self.examples is None) == (self.ids is None):
            raise ValueError("give exactly one of `examples` (payloads) and `ids` (training "
                             "example ids)")
        return self


class InfluenceResult(BaseModel):
    """The top training examples of one query, strongest first, and what the model makes of
    the query."""

    id: str | None = Field(None, description="The training id queried (`ids` queries).")
    proponents: list[Example] = Field(
        default_factory=list, description="Score > 0, strongest first (fewer than `k` when "
                                          "fewer examples help).")
    opponents: list[Example] = Field(
        default_factory=list, description="Score < 0, strongest first.")
    positives: int | None = Field(
        None, description="How many searched training examples score > 0 (help the query); "
                          "null when not counted (a large index with at least `k` of them).")
    negatives: int | None = Field(
        None, description="How many score < 0 (hurt the query); null when not counted.")
    prediction: int | None = Field(
        default=None,
        description="The model's predicted class for the query (argmax of its logits); "
                    "null when the task has no `logits`.")
    confidence: float | None = Field(
        default=None,
        description="The predicted class's softmax probability; null without `logits`.")
    loss: float | None = Field(
        default=None,
        description="The task's loss on the query at its own target; null when the "
                    "task cannot compute it.")


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
    missing: Literal["error", "skip"] = Field(
        "error", description="An id that is not (or no longer) in the index: `error` (404) or "
                             "`skip` (scored without it, listed in the answer's `missing`).")


class ScoresResponse(BaseModel):
    index: str
    version: int
    ids: list[str] = Field(description="The ids scored, in the order asked.")
    scores: list[list[float]] = Field(description="[example][id]")
    missing: list[str] = Field(
        default_factory=list, description="Ids asked for that are not live (deleted or never "
                                          "indexed), with `missing: skip`.")


class SelectRequest(_Request):
    """Training examples ranked by their mean influence over a target set (data selection)."""

    examples: list[Payload] = Field(min_length=1, description="The target set.")
    k: int = Field(10, ge=1, le=MAX_K, strict=True)
    filter: Filter | None = Field(None, description=FILTER_DESCRIPTION, examples=FILTER_EXAMPLES)
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
    total: int | None = Field(
        None, description="Live examples matching the filter and bounds (all pages).")


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
    relative: bool = Field(description="Whether `normalize` (relative influence) is exact: an "
                                       "exact scan of the stored vectors, or a FAISS index of "
                                       "its own; false when it re-ranks an approximate index's "
                                       "candidates of raw influence.")
    device: str | None
    metadata_schema: dict[str, Any] | None = Field(
        None, description="The examples' metadata keys as recorded at build: `{\"count\": N, "
                          "\"keys\": {key: {\"types\": [JSON types], \"values\": [distinct "
                          "values] or null}}}`; what filters are checked against. Null for "
                          "indexes built before it was recorded.")


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


class Whoami(BaseModel):
    """What the caller's key may do."""

    scope: Literal["admin", "read", "keyless"] = Field(
        description="`admin` (read and delete), `read`, or `keyless` (the server needs no key: "
                    "everything is allowed).")
    auth: bool = Field(description="Whether the server requires keys.")
    key: str | None = Field(None, description="The key's name (never its secret).")


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
    meta: dict[str, Any] = Field(
        default_factory=dict, description="The task's metadata of the payload (its label...).")
    prediction: int | None = Field(
        default=None,
        description="The model's predicted class (with `predict`, tasks with `logits`).")
    confidence: float | None = Field(None, description="Its probability (with `predict`).")
    loss: float | None = Field(None, description="The task's loss (with `predict`).")


class GalleryPage(BaseModel):
    """One page of the task's query examples."""

    index: str
    total: int = Field(description="Examples in the gallery that match the filter (0 when the "
                                   "task offers none).")
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
