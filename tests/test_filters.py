"""The metadata filter language: every operator, the limits and the 422 cases, with the same
results on SQLite and PostgreSQL (one index built per backend, every case run on both)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from gradindex import BuildConfig, CompressionConfig, build, open_index
from gradindex.indexer.errors import ConfigError
from gradindex.indexer.filters import (
    MAX_DEPTH,
    MAX_VALUES,
    MetadataSchema,
    matches,
    parse_filter,
)
from gradindex.indexer.reader import Index
from gradindex.indexer.settings import Settings
from gradindex.indexer.store import upgrade

from .factories import PositionMetaTask

N = 24


def meta_of(n: int) -> dict[str, Any]:
    """Every JSON type, a key some examples lack, and one that is sometimes null."""
    meta: dict[str, Any] = {"label": n % 3, "src": ["wiki", "books", "news"][n % 3],
                            "flag": n % 4 == 0, "weight": [0.5, 1.25, 2.0, -1.0][n % 4],
                            "note": None if n % 5 == 0 else "kept"}
    if n % 2 == 0:
        meta["extra"] = n
    return meta


class MetaTask(PositionMetaTask):
    """Sequences whose metadata is :func:`meta_of` their position."""

    meta_of = staticmethod(meta_of)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Index]:
    """One small index per backend, built once for the module."""
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_databases")()
    settings = Settings(data_dir=tmp_path_factory.mktemp("filters") / "data", database_url=url)
    if url is not None:
        upgrade(settings)
    build(BuildConfig(name="meta", task="tests.test_filters:MetaTask",
                      compression=CompressionConfig(batch_size=8)), settings)
    yield open_index("meta", settings)
    from gradindex.indexer.store.db import dispose_engines

    dispose_engines()


def _n(index: Index, filter: Any) -> list[int]:
    """Positions of the live examples ``filter`` matches, sorted."""
    ids = index.examples.matching(filter)
    assert ids is not None
    return sorted(int(p) for p in np.searchsorted(index.ids, ids))


def _expected(test: Callable[[dict[str, Any]], bool]) -> list[int]:
    return [n for n in range(N) if test(meta_of(n))]


CASES: list[tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
    ({"label": 1}, lambda m: m["label"] == 1),
    ({"label": 1.0}, lambda m: m["label"] == 1),  # numbers compare as numbers
    ({"src": "wiki"}, lambda m: m["src"] == "wiki"),
    ({"flag": True}, lambda m: m["flag"] is True),
    ({"note": None}, lambda m: m["note"] is None),
    ({"label": {"$eq": 2}}, lambda m: m["label"] == 2),
    ({"src": {"$ne": "wiki"}}, lambda m: m["src"] != "wiki"),
    ({"extra": {"$ne": 4}}, lambda m: m.get("extra") != 4),  # a missing key is not equal
    ({"src": ["books", "news"]}, lambda m: m["src"] in ("books", "news")),
    ({"label": {"$in": [0, 2]}}, lambda m: m["label"] in (0, 2)),
    ({"label": {"$nin": [0, 2]}}, lambda m: m["label"] not in (0, 2)),
    ({"extra": {"$nin": [0, 2]}}, lambda m: m.get("extra") not in (0, 2)),
    ({"weight": {"$gt": 0.5}}, lambda m: m["weight"] > 0.5),
    ({"weight": {"$gte": 0.5}}, lambda m: m["weight"] >= 0.5),
    ({"weight": {"$lt": 1.25}}, lambda m: m["weight"] < 1.25),
    ({"weight": {"$lte": 1.25}}, lambda m: m["weight"] <= 1.25),
    ({"weight": {"$gte": 0, "$lt": 2}}, lambda m: 0 <= m["weight"] < 2),
    ({"extra": {"$gt": 10}}, lambda m: m.get("extra", -1) > 10),
    ({"extra": {"$exists": True}}, lambda m: "extra" in m),
    ({"extra": {"$exists": False}}, lambda m: "extra" not in m),
    ({"note": {"$exists": True}}, lambda m: True),  # null exists
    ({"$and": [{"label": 0}, {"flag": True}]}, lambda m: m["label"] == 0 and m["flag"]),
    ({"$or": [{"label": 0}, {"weight": {"$lt": 0}}]},
     lambda m: m["label"] == 0 or m["weight"] < 0),
    ({"src": "news", "$or": [{"note": None}, {"flag": True}]},
     lambda m: m["src"] == "news" and (m["note"] is None or m["flag"])),
    ({"$or": [{"$and": [{"label": 1}, {"extra": {"$exists": True}}]},
              {"$and": [{"label": 2}, {"weight": {"$gte": 2}}]}]},
     lambda m: (m["label"] == 1 and "extra" in m) or (m["label"] == 2 and m["weight"] >= 2)),
]


@pytest.mark.parametrize("filter,test", CASES, ids=[str(c[0]) for c in CASES])
def test_every_operator_matches_its_meaning(index: Index, filter: dict[str, Any],
                                            test: Callable[[dict[str, Any]], bool]) -> None:
    want = _expected(test)
    assert want, "a case that matches nothing tells nothing"
    assert _n(index, filter) == want
    node = parse_filter(filter, index.metadata_schema)  # the gallery's in-memory twin
    assert [n for n in range(N) if matches(node, meta_of(n))] == want


def test_a_filtered_search_is_the_top_k_of_the_matching_examples(index: Index) -> None:
    filter = {"$or": [{"label": 0}, {"weight": {"$lt": 0}}]}
    keep = np.array([n in _expected(lambda m: m["label"] == 0 or m["weight"] < 0)
                     for n in range(N)])
    q = index.stored_queries(["s1", "s2"])[1]
    every = q @ np.asarray(index.vectors).T
    for direction, sign in (("proponents", 1.0), ("opponents", -1.0)):
        for i, ranked in enumerate(index.rank(q, 5, direction=direction, filter=filter)):
            masked = np.where(keep, sign * every[i], -np.inf)
            want = [f"s{n}" for n in np.argsort(-masked, kind="stable")[:5] if masked[n] > 0]
            assert [h.external_id for h in ranked.hits] == want
            assert ranked.positives == int((keep & (every[i] > 0)).sum())
            assert ranked.negatives == int((keep & (every[i] < 0)).sum())


def test_self_influence_pages_and_counts_take_filters(index: Index) -> None:
    filter = {"weight": {"$gt": 0}, "extra": {"$exists": True}}
    want = _expected(lambda m: m["weight"] > 0 and "extra" in m)
    assert index.examples.count(filter) == len(want)
    page = index.self_influence(100, filter=filter)
    assert sorted(int(h.external_id[1:]) for h in page) == want


def test_the_schema_records_keys_types_and_few_values(index: Index) -> None:
    schema = index.metadata_schema
    assert schema is not None and schema.count == N
    assert schema.keys == ["extra", "flag", "label", "note", "src", "weight"]
    assert schema.types["note"] == {"null", "string"}
    assert schema.types["weight"] == {"number"}
    assert schema.values["src"] == ["books", "news", "wiki"]
    assert schema.values["weight"] is None  # floats are not listed


# ------------------------------------------------------------------ refused filters

REFUSED: list[tuple[Any, str]] = [
    ({"color": "red"}, r"'color' is not in this index's metadata; known keys: \['extra', "),
    ({"label": "1"}, "'label' holds integer values, got string \"1\""),
    ({"flag": 1}, "'flag' holds boolean values, got integer 1"),
    ({"src": {"$in": ["wiki", 3]}}, "'src' holds string values, got integer 3"),
    ({"src": {"$gt": "a"}}, r"\$gt compares numbers"),
    ({"flag": {"$lte": True}}, r"\$lte compares numbers"),
    ({"label": {"$near": 1}}, r"unknown operator '\$near'"),
    ({"$not": {"label": 1}}, r"unknown operator '\$not'"),
    ({"label": {}}, "empty object"),
    ({"$or": []}, "non-empty list"),
    ({"$and": {"label": 1}}, "non-empty list"),
    ({"label": {"$in": []}}, "non-empty list"),
    ({"label": {"$in": 1}}, "non-empty list"),
    ({"label": {"$exists": 1}}, "true or false"),
    ({"label": {"$eq": [1]}}, "compares scalars"),
    ({"label": {"$eq": {"a": 1}}}, "compares scalars"),
    ({"weight": float("nan")}, "finite"),
    ({"label": 2**63}, "64-bit"),
    ('{"label": 1}', "must be an object"),
    ({'a"b': 1}, "not a valid metadata key"),
    ({"la\ud800bel": 1}, "not a valid metadata key"),
    ({"src": "wi\x00ki"}, "NUL characters or unpaired surrogates"),
    ({"src": {"$in": ["\udfff"]}}, "NUL characters or unpaired surrogates"),
]


@pytest.mark.parametrize("filter,message", REFUSED, ids=[str(r[0]) for r in REFUSED])
def test_a_bad_filter_is_refused_naming_the_problem(index: Index, filter: Any,
                                                    message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        index.examples.matching(filter)


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"label": 1}
    for _ in range(depth - 1):
        node = {"$or": [node]}
    return node


def test_depth_and_size_are_bounded() -> None:
    schema = MetadataSchema.of([{"label": 1}])
    assert parse_filter(_nested(MAX_DEPTH), schema) is not None
    with pytest.raises(ConfigError, match=f"deeper than {MAX_DEPTH} levels"):
        parse_filter(_nested(MAX_DEPTH + 1), schema)
    assert parse_filter({"label": list(range(MAX_VALUES))}, schema) is not None
    with pytest.raises(ConfigError, match=f"more than {MAX_VALUES} values"):
        parse_filter({"label": list(range(MAX_VALUES + 1))}, schema)
    with pytest.raises(ConfigError, match=f"more than {MAX_VALUES} values"):
        parse_filter({"$or": [{"label": {"$in": list(range(200))}}] * 2}, schema)


def test_without_a_schema_filters_are_checked_for_shape_only() -> None:
    """Versions built before schemas: an unknown key matches nothing instead of a 422."""
    assert parse_filter({"color": "red"}, None) is not None
    with pytest.raises(ConfigError, match="compares numbers"):
        parse_filter({"color": {"$gt": "red"}}, None)
    assert parse_filter({}, None) is None and parse_filter(None, None) is None
