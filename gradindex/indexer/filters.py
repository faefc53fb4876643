"""Metadata filters: a small query language, checked against the index's metadata schema and
translated to SQL with the same meaning on SQLite and PostgreSQL.

A filter is a JSON object. Each field names a metadata key and what its value must be:

* ``{"label": 3}``: equality (a scalar: string, number, boolean or null);
* ``{"source": ["wiki", "books"]}``: membership (same as ``$in``);
* ``{"weight": {"$gte": 0.5, "$lt": 2}}``: operators, all of which must hold:
  ``$eq $ne $in $nin`` (scalars), ``$gt $gte $lt $lte`` (numbers only), ``$exists`` (boolean).

Fields of one object must all match; ``{"$and": [f, ...]}`` and ``{"$or": [f, ...]}`` combine
filters. ``$ne`` and ``$nin`` also match examples that lack the key; ``null`` matches an
explicit JSON null only (``{"$exists": false}`` finds a missing key). Numbers compare as
numbers (``1`` equals ``1.0``), never as strings or booleans. A filter nests at most
:data:`MAX_DEPTH` levels and holds at most :data:`MAX_VALUES` values.

The :class:`MetadataSchema` recorded at build (keys and the JSON types seen under each) lets
:func:`parse_filter` refuse an unknown key or a value of a type the key never holds, instead of
silently matching nothing. Versions built before the schema existed are checked for shape only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, and_, cast, false, func, literal, not_, or_, type_coerce
from sqlalchemy.dialects.postgresql import JSONB

from .errors import ConfigError

__all__ = [
    "MAX_DEPTH",
    "MAX_VALUES",
    "OPERATORS",
    "Condition",
    "Group",
    "MetadataSchema",
    "Node",
    "filter_sql",
    "matches",
    "parse_filter",
]

MAX_DEPTH = 4
"""Levels a filter may nest (an object of fields is one level; each ``$and``/``$or`` one more)."""
MAX_VALUES = 256
"""Values a filter may hold in all (each scalar, each ``$in`` item, each ``$exists``)."""
MAX_KEY_LENGTH = 256
SCHEMA_VALUES = 64
"""A key's distinct scalar values the schema lists (for the page's pickers), at most."""

OPERATORS = ("$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte", "$exists")
LOGICAL = ("$and", "$or")
RANGES = {"$gt": "gt", "$gte": "ge", "$lt": "lt", "$lte": "le"}
INT64 = 2**63

# ------------------------------------------------------------------ JSON types


def json_type(value: Any) -> str:
    """The JSON type of a decoded value: string, integer, number, boolean, null, array, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    return "object"


def _numeric(kind: str) -> bool:
    return kind in ("integer", "number")


@dataclass
class MetadataSchema:
    """The metadata keys of an index's examples, the JSON types seen under each, and (for keys
    with few distinct scalar values) those values.

    Recorded at build (:meth:`observe` on every example) and stored in the manifest under
    ``metadata_schema``.
    """

    types: dict[str, set[str]] = field(default_factory=dict)
    values: dict[str, list[Any] | None] = field(default_factory=dict)
    """Per key, its distinct scalar values (sorted), or None beyond :data:`SCHEMA_VALUES`
    (floats are never listed)."""
    count: int = 0
    """Examples observed."""
    _known: dict[str, set[tuple[str, Any]]] = field(default_factory=dict, repr=False,
                                                   compare=False)
    """Per listed key, ``(JSON type, value)`` of its values: a set lookup per example instead
    of a scan of the list (``True`` and ``1`` stay apart)."""

    def observe(self, meta: Mapping[str, Any]) -> None:
        """Record one example's metadata."""
        self.count += 1
        for key, value in meta.items():
            kind = json_type(value)
            self.types.setdefault(key, set()).add(kind)
            seen = self.values.setdefault(key, [])
            if seen is None:
                continue
            if kind in ("string", "integer", "boolean"):
                known = self._known.get(key)
                if known is None:
                    known = self._known[key] = {(json_type(s), s) for s in seen}
                if (kind, value) not in known:
                    known.add((kind, value))
                    seen.append(value)
                    if len(seen) > SCHEMA_VALUES:
                        self.values[key] = None
                        del self._known[key]
            elif kind != "null":
                self.values[key] = None

    @property
    def keys(self) -> list[str]:
        return sorted(self.types)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self.keys:
            values = self.values.get(key)
            if values is not None:
                values = sorted(values, key=lambda v: (json_type(v), v))
            out[key] = {"types": sorted(self.types[key]), "values": values}
        return {"count": self.count, "keys": out}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> MetadataSchema | None:
        """The schema a manifest recorded, or None for a version built before schemas."""
        if not isinstance(data, Mapping) or not isinstance(data.get("keys"), Mapping):
            return None
        schema = cls(count=int(data.get("count") or 0))
        for key, entry in data["keys"].items():
            schema.types[str(key)] = set(entry.get("types") or [])
            schema.values[str(key)] = entry.get("values")
        return schema

    @classmethod
    def of(cls, metas: Iterable[Mapping[str, Any]]) -> MetadataSchema:
        schema = cls()
        for meta in metas:
            schema.observe(meta)
        return schema


# ------------------------------------------------------------------ the parsed filter


@dataclass(frozen=True)
class Condition:
    """One test on one key: ``op`` in :data:`OPERATORS`, with its values."""

    key: str
    op: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Group:
    """``all`` (``$and``, and the fields of one object) or ``any`` (``$or``) of its parts."""

    op: str
    parts: tuple[Node, ...]


Node = Condition | Group


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _storable(text: str) -> bool:
    """Whether a string survives both databases (PostgreSQL's jsonb refuses NUL; neither
    takes an unpaired surrogate)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class _Parser:
    def __init__(self, schema: MetadataSchema | None) -> None:
        self.schema = schema
        self.values = 0

    def count(self, n: int = 1) -> None:
        self.values += n
        if self.values > MAX_VALUES:
            raise ConfigError(f"`filter` holds more than {MAX_VALUES} values; a filter may hold "
                              f"at most {MAX_VALUES} (split the query, or filter on a coarser key)")

    def node(self, obj: Any, depth: int, where: str) -> Node:
        if depth > MAX_DEPTH:
            raise ConfigError(f"`filter` nests deeper than {MAX_DEPTH} levels at {where}; a "
                              f"filter may nest at most {MAX_DEPTH} levels of $and/$or")
        if not isinstance(obj, Mapping):
            raise ConfigError(f"`filter` at {where} must be an object of metadata keys, got "
                              f"{_describe(obj)}")
        if not obj:
            raise ConfigError(f"`filter` at {where} is an empty object")
        parts: list[Node] = []
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ConfigError(f"`filter` keys must be strings, got {key!r}")
            if key in LOGICAL:
                parts.append(self.logical(key, value, depth, f"{where}.{key}"))
            elif key.startswith("$"):
                raise ConfigError(f"`filter` has unknown operator {key!r} at {where}; combine "
                                  f"with {list(LOGICAL)}, test a key with {list(OPERATORS)}")
            else:
                parts.extend(self.field(key, value))
        return parts[0] if len(parts) == 1 else Group("all", tuple(parts))

    def logical(self, op: str, value: Any, depth: int, where: str) -> Group:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"`filter` {op} at {where} must be a non-empty list of filters, "
                              f"got {_describe(value)}")
        parts = tuple(self.node(v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value))
        return Group("all" if op == "$and" else "any", parts)

    def field(self, key: str, value: Any) -> list[Node]:
        self.check_key(key)
        if isinstance(value, list):  # shorthand of $in
            return [self.condition(key, "$in", value)]
        if isinstance(value, Mapping):
            if not value:
                raise ConfigError(f"`filter` key {key!r} maps to an empty object; give a value "
                                  f"or operators {list(OPERATORS)}")
            out: list[Node] = []
            for op, operand in value.items():
                if op not in OPERATORS:
                    raise ConfigError(f"`filter` key {key!r} has unknown operator {op!r}; "
                                      f"operators: {list(OPERATORS)}")
                out.append(self.condition(key, op, operand))
            return out
        return [self.condition(key, "$eq", value)]

    def condition(self, key: str, op: str, operand: Any) -> Condition:
        if op == "$exists":
            if not isinstance(operand, bool):
                raise ConfigError(f"`filter` key {key!r}: $exists takes true or false, got "
                                  f"{_describe(operand)}")
            self.count()
            return Condition(key, op, (operand,))
        if op in ("$in", "$nin"):
            if not isinstance(operand, list) or not operand:
                raise ConfigError(f"`filter` key {key!r}: {op} takes a non-empty list of "
                                  f"values, got {_describe(operand)}")
            self.count(len(operand))
            for v in operand:
                self.check_value(key, op, v)
            return Condition(key, op, tuple(operand))
        self.count()
        self.check_value(key, op, operand)
        return Condition(key, op, (operand,))

    def check_key(self, key: str) -> None:
        if (not key or len(key) > MAX_KEY_LENGTH or any(c in key for c in '"\\')
                or any(ord(c) < 32 for c in key) or not _storable(key)):
            raise ConfigError(f"`filter` key {_describe(key)} is not a valid metadata key "
                              f"(1-{MAX_KEY_LENGTH} characters, no quotes, backslashes or "
                              "control characters)")
        if self.schema is not None and key not in self.schema.types:
            raise ConfigError(f"`filter` key {key!r} is not in this index's metadata; known "
                              f"keys: {self.schema.keys}")

    def check_value(self, key: str, op: str, value: Any) -> None:
        if not _scalar(value):
            raise ConfigError(f"`filter` key {key!r}: {op} compares scalars (string, number, "
                              f"boolean, null), got {_describe(value)}")
        kind = json_type(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"`filter` key {key!r}: {op} needs a finite number, got {value}")
        if kind == "integer" and not -INT64 <= value < INT64:
            raise ConfigError(f"`filter` key {key!r}: {value} is out of the 64-bit integer range")
        if kind == "string" and not _storable(value):
            raise ConfigError(f"`filter` key {key!r}: strings cannot hold NUL characters or "
                              f"unpaired surrogates, got {_describe(value)}")
        if op in RANGES and not _numeric(kind):
            raise ConfigError(f"`filter` key {key!r}: {op} compares numbers, got "
                              f"{_describe(value)}")
        if self.schema is None:
            return
        seen = self.schema.types[key]
        if kind in seen or (_numeric(kind) and any(_numeric(s) for s in seen)):
            return
        raise ConfigError(f"`filter` key {key!r} holds {' or '.join(sorted(seen))} values, got "
                          f"{kind} {_describe(value)}; known keys: {self.schema.keys}")


def parse_filter(filter: Any, schema: MetadataSchema | None = None) -> Node | None:
    """Check a filter and return its parsed form (None for no filter or ``{}``).

    Args:
        filter: the filter (JSON), see the module's description.
        schema: the index's metadata schema; None checks the filter's shape only.

    Raises:
        ConfigError: the filter is malformed, too deep or too large, names a key the index's
            metadata lacks, or compares a key with a value of a type it never holds.
    """
    if filter is None or (isinstance(filter, Mapping) and not filter):
        return None
    return _Parser(schema).node(filter, 1, "the top")


# ------------------------------------------------------------------ SQL


def _sqlite_leaf(meta: Any, key: str, op: str, v: Any) -> ColumnElement[bool]:
    path = f'$."{key}"'
    typed = func.json_type(meta, path)
    value = func.json_extract(meta, path)
    if op == "$exists":
        return typed.is_not(None) if v else typed.is_(None)
    if op in RANGES:
        return and_(typed.in_(["integer", "real"]), getattr(value, f"__{RANGES[op]}__")(v))
    # equality
    if v is None:
        return typed == "null"
    if isinstance(v, bool):  # before int: JSON true is not 1
        return typed == ("true" if v else "false")
    if isinstance(v, str):
        return and_(typed == "text", value == v)
    return and_(typed.in_(["integer", "real"]), value == v)


def _postgres_leaf(meta: Any, key: str, op: str, v: Any) -> ColumnElement[bool]:
    doc = type_coerce(meta, JSONB)
    if op == "$exists":
        has: ColumnElement[bool] = doc.has_key(key)
        return has if v else not_(has)
    value = doc[key]
    other = cast(literal(json.dumps(v)), JSONB)
    if op in RANGES:  # jsonb orders numbers numerically
        return and_(func.jsonb_typeof(value) == "number",
                    getattr(value, f"__{RANGES[op]}__")(other))
    if v is None:
        return func.jsonb_typeof(value) == "null"
    result: ColumnElement[bool] = value == other  # jsonb equality: 1 = 1.0, "1" != 1
    return result


def filter_sql(node: Node, dialect: str, meta: Any) -> ColumnElement[bool]:
    """SQL for ``node`` on the JSON column ``meta``; never NULL, so ``NOT`` stays exact.

    Args:
        node: a parsed filter (:func:`parse_filter`).
        dialect: ``sqlite`` or ``postgresql``.
        meta: the metadata column.
    """
    if isinstance(node, Group):
        parts = [filter_sql(p, dialect, meta) for p in node.parts]
        return and_(*parts) if node.op == "all" else or_(*parts)
    leaf = _postgres_leaf if dialect == "postgresql" else _sqlite_leaf
    if node.op == "$exists":
        return leaf(meta, node.key, "$exists", node.values[0])
    op = "$eq" if node.op in ("$eq", "$ne", "$in", "$nin") else node.op
    tests = [func.coalesce(leaf(meta, node.key, op, v), false()) for v in node.values]
    matched = or_(*tests) if len(tests) > 1 else tests[0]
    return not_(matched) if node.op in ("$ne", "$nin") else matched


# ------------------------------------------------------------------ in Python


def _equal(value: Any, v: Any) -> bool:
    """JSON equality as the SQL has it: types must agree (true is not 1), numbers compare as
    numbers (1 equals 1.0)."""
    kind, other = json_type(value), json_type(v)
    if _numeric(kind) and _numeric(other):
        return bool(value == v)
    return kind == other and kind in ("string", "boolean", "null") and value == v


def _compare(value: Any, op: str, v: Any) -> bool:
    if not _numeric(json_type(value)):
        return False
    return bool(getattr(value, f"__{RANGES[op]}__")(v))


def matches(node: Node | None, meta: Mapping[str, Any]) -> bool:
    """Whether metadata ``meta`` matches a parsed filter, with the meaning :func:`filter_sql`
    gives it in SQL (for what lives outside the database: the task's query gallery)."""
    if node is None:
        return True
    if isinstance(node, Group):
        parts = (matches(p, meta) for p in node.parts)
        return all(parts) if node.op == "all" else any(parts)
    present = node.key in meta
    value = meta.get(node.key)
    if node.op == "$exists":
        return present == node.values[0]
    if node.op in RANGES:
        return present and _compare(value, node.op, node.values[0])
    hit = present and any(_equal(value, v) for v in node.values)
    return not hit if node.op in ("$ne", "$nin") else hit
