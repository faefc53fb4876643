"""Metadata filters as Milvus boolean expressions, with the meaning SQL gives them.

Metadata is stored typed, one small group of fields per key (:class:`MetadataLayout`):
``m<j>_t`` holds the JSON type of key ``j``'s value (0 when the key is absent, which tells a
missing key from an explicit null), and ``m<j>_b``, ``_i``, ``_f``, ``_s`` its value for each
scalar type the key holds. :func:`expression` translates a parsed filter (:mod:`..filters`);
a condition Milvus cannot decide exactly raises :class:`Untranslatable` and is matched in SQL.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..filters import Condition, Group, MetadataSchema, Node, json_type

__all__ = ["MAX_FIELDS", "VARCHAR_BYTES", "MetadataLayout", "Untranslatable", "expression",
           "ids_in"]

log = logging.getLogger(__name__)

MAX_FIELDS = 64
"""Fields a Milvus collection may hold (Milvus's default ``maxFieldNum``)."""
VARCHAR_BYTES = 65535
"""The longest string a Milvus VARCHAR field holds, in UTF-8 bytes."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_TYPE_CODES = {"null": 1, "boolean": 2, "integer": 3, "number": 4, "string": 5, "array": 6,
               "object": 7}
"""``m<j>_t``: the JSON type of a key's value; 0 is a missing key."""
_FALSE = "(id < 0)"
"""A condition no example meets (example ids are positive), in any Milvus's grammar."""


@dataclass
class MetadataLayout:
    """Which Milvus fields hold which metadata key, and what they hold exactly.

    ``keys`` maps a metadata key to ``{"field": "m<j>", "types": [...], "exact": bool}``:
    ``types`` are the scalar types with a value field, ``exact`` is False when some value did
    not fit (a string beyond :data:`VARCHAR_BYTES`, an integer beyond 64 bits): conditions on
    such a key are matched in SQL. Keys beyond :data:`MAX_FIELDS` have no entry.
    """

    keys: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, schema: MetadataSchema) -> MetadataLayout:
        layout = cls()
        used = 3  # id, vectors, relative
        for j, key in enumerate(schema.keys):
            types = [t for t in ("boolean", "integer", "number", "string")
                     if t in schema.types[key]]
            if used + 1 + len(types) > MAX_FIELDS:
                log.info("metadata key %r and those after it are filtered in SQL (a Milvus "
                         "collection holds at most %d fields)", key, MAX_FIELDS)
                break
            used += 1 + len(types)
            layout.keys[key] = {"field": f"m{j}", "types": types, "exact": True}
        return layout

    def to_json(self) -> dict[str, Any]:
        return {"keys": self.keys}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MetadataLayout:
        return cls(keys={str(k): dict(v) for k, v in (data.get("keys") or {}).items()})

    def add_fields(self, schema: Any, data_type: Any) -> None:
        """Add the metadata fields to a pymilvus collection schema."""
        kinds = {"boolean": ("b", data_type.BOOL), "integer": ("i", data_type.INT64),
                 "number": ("f", data_type.DOUBLE), "string": ("s", data_type.VARCHAR)}
        for entry in self.keys.values():
            schema.add_field(f"{entry['field']}_t", data_type.INT8)
            for t in entry["types"]:
                suffix, dtype = kinds[t]
                extra = {"max_length": VARCHAR_BYTES} if t == "string" else {}
                schema.add_field(f"{entry['field']}_{suffix}", dtype, **extra)

    def row(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """The metadata fields of one example (absent types hold their zero value); marks a
        key inexact when a value does not fit its field."""
        out: dict[str, Any] = {}
        for key, entry in self.keys.items():
            f, types = entry["field"], entry["types"]
            value: Any = meta.get(key)
            kind = json_type(value) if key in meta else None
            out[f"{f}_t"] = 0 if kind is None else _TYPE_CODES[kind]
            defaults = {"boolean": ("b", False), "integer": ("i", 0), "number": ("f", 0.0),
                        "string": ("s", "")}
            for t in types:
                suffix, zero = defaults[t]
                out[f"{f}_{suffix}"] = value if kind == t else zero
            if kind == "string" and len(value.encode("utf-8")) > VARCHAR_BYTES:
                out[f"{f}_s"] = ""
                entry["exact"] = False
            elif kind == "integer" and not INT64_MIN <= value <= INT64_MAX:
                out[f"{f}_i"] = 0
                entry["exact"] = False
        return out


# ------------------------------------------------------------------ filter → expression


class Untranslatable(Exception):
    """A filter condition Milvus cannot decide exactly (matched in SQL instead)."""


def _string(value: str) -> str:
    """A double-quoted Milvus string literal: backslashes, quotes and line breaks escaped,
    the escapes both Milvus's parser and milvus-lite's read."""
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


def _float(value: float) -> str:
    text = repr(float(value))
    return text if any(c in text for c in ".en") else text + ".0"


_RANGE_OPS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


def _int_bound(op: str, value: float) -> tuple[str, int] | bool:
    """``x op value`` over int64 ``x`` as ``(op, integer bound)``, or the constant it is."""
    if isinstance(value, int):
        bound = value
    else:
        bound = math.floor(value) if op in ("$gt", "$lte") else math.ceil(value)
    if bound > INT64_MAX:
        return op in ("$lt", "$lte")
    if bound < INT64_MIN:
        return op in ("$gt", "$gte")
    return _RANGE_OPS[op], bound


def _equal(entry: Mapping[str, Any], v: Any) -> str:
    """Present, of a type ``v`` compares with, and equal to ``v`` (JSON equality as SQL has it:
    ``true`` is not ``1``, ``1`` equals ``1.0``)."""
    f, types = entry["field"], entry["types"]
    if v is None:
        return f"({f}_t == {_TYPE_CODES['null']})"
    if isinstance(v, bool):
        if "boolean" not in types:
            return _FALSE
        return f"({f}_t == {_TYPE_CODES['boolean']} and {f}_b == {'true' if v else 'false'})"
    if isinstance(v, str):
        if "string" not in types:
            return _FALSE
        if len(v.encode("utf-8")) > VARCHAR_BYTES:
            raise Untranslatable(v)
        return f"({f}_t == {_TYPE_CODES['string']} and {f}_s == {_string(v)})"
    parts = []
    if "integer" in types and (isinstance(v, int) or float(v).is_integer()):
        iv = int(v)
        if INT64_MIN <= iv <= INT64_MAX:
            parts.append(f"({f}_t == {_TYPE_CODES['integer']} and {f}_i == {iv})")
    if "number" in types:
        parts.append(f"({f}_t == {_TYPE_CODES['number']} and {f}_f == {_float(v)})")
    return " or ".join(parts) if parts else _FALSE


def _range(entry: Mapping[str, Any], op: str, v: float) -> str:
    f, types = entry["field"], entry["types"]
    parts = []
    if "integer" in types:
        bound = _int_bound(op, v)
        if bound is True:
            parts.append(f"({f}_t == {_TYPE_CODES['integer']})")
        elif bound is not False:
            sym, b = bound
            parts.append(f"({f}_t == {_TYPE_CODES['integer']} and {f}_i {sym} {b})")
    if "number" in types:
        parts.append(f"({f}_t == {_TYPE_CODES['number']} and {f}_f {_RANGE_OPS[op]} "
                     f"{_float(v)})")
    return " or ".join(parts) if parts else _FALSE


def expression(node: Node, layout: MetadataLayout) -> str:
    """The Milvus boolean expression of a parsed filter, with the meaning
    :func:`..filters.filter_sql` gives it.

    Raises:
        Untranslatable: a condition names a key Milvus does not hold exactly.
    """
    if isinstance(node, Group):
        joiner = " and " if node.op == "all" else " or "
        return joiner.join(f"({expression(p, layout)})" for p in node.parts)
    assert isinstance(node, Condition)
    entry = layout.keys.get(node.key)
    if entry is None or not entry.get("exact", True):
        raise Untranslatable(node.key)
    f = entry["field"]
    if node.op == "$exists":
        return f"({f}_t != 0)" if node.values[0] else f"({f}_t == 0)"
    if node.op in _RANGE_OPS:
        return _range(entry, node.op, node.values[0])
    matched = " or ".join(f"({_equal(entry, v)})" for v in node.values)
    return f"not ({matched})" if node.op in ("$ne", "$nin") else matched


def ids_in(ids: np.ndarray) -> str:
    """``id in [...]``: the examples of ``ids``."""
    return f"id in [{', '.join(str(int(i)) for i in ids)}]"
