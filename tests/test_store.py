"""Storage pieces: migrations, manifest, settings, FAISS helpers and the consistency check."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import (
    Engine,
    column,
    create_engine,
    delete,
    insert,
    inspect,
    select,
    table,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gradindex import (
    BuildConfig,
    CompressionConfig,
    FaissConfig,
    Featurizer,
    PreconditionerConfig,
    Settings,
    build,
    open_index,
)
from gradindex.indexer.build import parse_shard, shard_from_env
from gradindex.indexer.errors import ConfigError, StorageError
from gradindex.indexer.query import featurizer_for
from gradindex.indexer.store import (
    ExampleRow,
    begin_version,
    build_faiss,
    connect,
    downgrade,
    exact_topk,
    insert_examples,
    load_manifest,
    measure_recall,
    save_manifest,
    search_faiss,
    upgrade,
)
from gradindex.indexer.store.db import dispose_engines, tables
from gradindex.indexer.task import TaskAdapter
from gradindex.indexer.tasks import DigitsTask

from .conftest import STORE_TASK, STORE_TASK_ARGS

TABLES = ["build_progress", "examples", "index_versions", "indexes"]


@pytest.fixture()
def empty_settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings on a database with no table at all."""
    url = None
    if backend == "postgresql":
        make: Callable[[], str] = request.getfixturevalue("pg_databases")
        url = make()
    return Settings(data_dir=tmp_path / "data", database_url=url)


def schema(engine: Engine) -> dict[str, object]:
    """What migration 0003 changes: columns and unique constraints of the index tables, and
    (SQLite) which of them are AUTOINCREMENT."""
    inspector = inspect(engine)
    autoincrement: list[str] = []
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            autoincrement = sorted(conn.scalars(text(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND sql LIKE "
                "'%AUTOINCREMENT%'")))
    return {
        "columns": sorted(c["name"] for c in inspector.get_columns("index_versions")),
        "unique": sorted(u["name"] or "" for t in ("index_versions", "examples")
                         for u in inspector.get_unique_constraints(t)),
        "autoincrement": autoincrement,
    }


def test_migrations_upgrade_from_empty_and_downgrade_one_step(empty_settings: Settings) -> None:
    engine = create_engine(empty_settings.url) if not empty_settings.is_sqlite else None
    if engine is not None:
        assert tables(engine) == []
        with pytest.raises(StorageError, match="gradindex db upgrade"):
            connect(empty_settings)  # PostgreSQL is never migrated behind the user's back
    upgrade(empty_settings)
    engine = engine or create_engine(empty_settings.url)
    sqlite = empty_settings.is_sqlite
    try:
        assert set(TABLES) | {"api_keys"} <= set(tables(engine))
        head = schema(engine)
        assert {"number", "build_id"} <= set(head["columns"])  # type: ignore[arg-type]
        assert head["unique"] == ["uq_examples_version_external", "uq_index_versions_build_id",
                                  "uq_index_versions_number"]
        # PostgreSQL's sequences never reuse an id; SQLite needs AUTOINCREMENT for that.
        assert head["autoincrement"] == (["examples", "index_versions", "indexes"] if sqlite
                                         else [])
        downgrade(empty_settings)  # one step: 0003's columns, constraints and AUTOINCREMENT go
        before = schema(engine)
        assert not {"number", "build_id"} & set(before["columns"])  # type: ignore[arg-type]
        assert before["unique"] == [] and before["autoincrement"] == []
        assert set(TABLES) | {"api_keys"} <= set(tables(engine))
        downgrade(empty_settings)  # and 0002's table
        assert "api_keys" not in tables(engine) and set(TABLES) <= set(tables(engine))
        downgrade(empty_settings, "base")
        assert not (set(TABLES) | {"api_keys"}) & set(tables(engine))
        upgrade(empty_settings)
        assert set(TABLES) | {"api_keys"} <= set(tables(engine))
        assert schema(engine) == head
    finally:
        engine.dispose()
        dispose_engines()


def test_migration_0003_keeps_existing_rows(empty_settings: Settings) -> None:
    """An index built before 0003: its versions get numbers and build ids, a duplicated
    external id is renamed (not dropped: the FAISS ids stay whole), and every row survives the
    tables' recreation, down and up again."""
    upgrade(empty_settings, "0002")
    engine = create_engine(empty_settings.url)
    indexes = table("indexes", column("id"), column("name"), column("created_at"))
    versions = table("index_versions", *map(column, (
        "id", "index_id", "status", "current", "path", "manifest", "count", "created_at")))
    examples = table("examples", *map(column, (
        "id", "version_id", "position", "external_id", "payload", "metadata",
        "self_influence", "deleted")))
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(insert(indexes), [{"id": i, "name": n, "created_at": now}
                                       for i, n in ((1, "a"), (2, "b"))])
        conn.execute(insert(versions), [
            {"id": v, "index_id": i, "status": "ready", "current": c, "path": f"v{v}",
             "manifest": "{}", "count": 0, "created_at": now}
            for v, i, c in ((1, 1, False), (2, 2, True), (3, 1, True))])
        conn.execute(insert(examples), [
            {"id": r, "version_id": v, "position": r, "external_id": e, "payload": "{}",
             "metadata": "{}", "self_influence": 0.0, "deleted": False}
            for r, v, e in ((1, 3, "x"), (2, 3, "x"), (3, 3, "y"), (4, 1, "x"), (5, 2, "x"))])
    try:
        upgrade(empty_settings)
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT id, index_id, number, build_id FROM index_versions ORDER BY id")).all()
            assert [(v, i, n) for v, i, n, _ in rows] == [(1, 1, 1), (2, 2, 1), (3, 1, 2)]
            assert len({b for *_, b in rows}) == 3 and all(len(b) == 32 for *_, b in rows)
            assert conn.execute(text(
                "SELECT id, external_id FROM examples ORDER BY id")).all() == \
                [(1, "x"), (2, "x#dup2"), (3, "y"), (4, "x"), (5, "x")]
        downgrade(empty_settings, "0002")
        upgrade(empty_settings)
        with engine.begin() as conn:
            assert conn.scalar(text("SELECT count(*) FROM examples")) == 5
            # The foreign keys survived the recreation: deleting an index cascades.
            if empty_settings.is_sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.execute(text("DELETE FROM indexes WHERE name = 'a'"))
            assert conn.scalar(text("SELECT count(*) FROM examples")) == 1
    finally:
        engine.dispose()
        dispose_engines()


def test_one_row_per_external_id_and_version(settings: Settings) -> None:
    """The database's own last line of defence against duplicated example ids."""
    engine = connect(settings)
    version = begin_version(engine=engine, name="dups")
    records = [{"id": "a", "payload": {}, "meta": {}}] * 2
    with pytest.raises(IntegrityError), engine.begin() as conn:
        insert_examples(conn=conn, version_id=version.id, start=0, records=records,
                        self_influence=np.zeros(2))


def test_sqlite_is_migrated_on_first_use(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "fresh")
    engine = connect(settings)
    assert (tmp_path / "fresh" / "gradindex.db").is_file()
    assert set(TABLES) <= set(tables(engine))
    dispose_engines()


def test_manifest_round_trip_and_old_format(tmp_path: Path) -> None:
    save_manifest(tmp_path, {"name": "x", "faiss": {"kind": "hnsw", "fp16": True}})
    data = load_manifest(tmp_path)
    assert data["format_version"] == 2 and data["faiss"]["kind"] == "hnsw"
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "old", "faiss_kind": "ivf"}))
    old = load_manifest(tmp_path)
    assert old["format_version"] == 2 and old["faiss"] == {"kind": "ivf", "fp16": False}
    assert old["checksums"] is None  # written before checksums: opened without the check
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(Exception, match="upgrade gradindex"):
        load_manifest(tmp_path)


def test_settings_and_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRADINDEX_DATABASE_URL", raising=False)
    monkeypatch.delenv("GRADINDEX_DATA_DIR", raising=False)
    assert Settings.from_env().data_dir == Path(".gradindex").absolute()
    monkeypatch.setenv("GRADINDEX_DATA_DIR", str(tmp_path))
    s = Settings.from_env()
    assert s.data_dir == tmp_path and s.url == f"sqlite:///{tmp_path}/gradindex.db"
    monkeypatch.setenv("GRADINDEX_RETAIN_VERSIONS", "0")
    with pytest.raises(ConfigError, match="`retain_versions` \\(GRADINDEX_RETAIN_VERSIONS\\)"):
        Settings.from_env()
    with pytest.raises(ConfigError, match="`database_url`"):
        Settings(database_url="localhost")
    with pytest.raises(ConfigError, match="`name`"):
        s.index_dir("../x")
    assert parse_shard("1/4") == (1, 4)
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    assert shard_from_env({}) is None
    with pytest.raises(ConfigError):
        parse_shard("4/4")
    with pytest.raises(ConfigError, match="`shard`"):
        BuildConfig(name="x", task=STORE_TASK, shard=2, shards=2)


def test_example_metadata(store_task: DigitsTask) -> None:
    class WithMeta(DigitsTask):
        def metadata(self, payload: dict[str, object]) -> dict[str, object]:
            return {"source": payload["src"]}

    class Plain:  # the four required methods, nothing optional
        model = examples = collate = loss = staticmethod(lambda *a, **k: None)

    assert TaskAdapter(WithMeta.__new__(WithMeta)).metadata({"src": "wiki"}) == {"source": "wiki"}
    assert TaskAdapter(Plain()).metadata({"x": [1], "y": 4}) == {"label": 4}
    assert TaskAdapter(Plain()).metadata({"text": "a"}) == {}


def test_exact_topk_and_recall() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, 32)).astype(np.float32)
    ids = np.arange(100, 2100, dtype=np.int64)
    q = rng.normal(size=(5, 32)).astype(np.float32)
    scores, rows = exact_topk(vectors, None, q, 7, window=300)
    truth = np.argsort(-(q @ vectors.T), axis=1)[:, :7]
    np.testing.assert_array_equal(rows, truth)
    sub = np.arange(0, 2000, 3)
    _, rows = exact_topk(vectors, sub, q, 4, window=100)
    np.testing.assert_array_equal(rows, sub[np.argsort(-(q @ vectors[sub].T), axis=1)[:, :4]])
    flat = build_faiss(FaissConfig(), vectors, ids)
    assert measure_recall(flat, FaissConfig(), vectors, ids)["recall_at_10"] == 1.0
    cfg = FaissConfig(kind="hnsw", fp16=True)
    hnsw = build_faiss(cfg, vectors, ids, window=500)
    recall = measure_recall(hnsw, cfg, vectors, ids)
    assert 0.5 < recall["recall_at_10"] <= recall["recall_at_10_reranked"] <= 1.0
    _, got = search_faiss(flat, FaissConfig(), q, 3, include=ids[:10], exclude=ids[:2])
    assert set(got.ravel()) <= set(ids[2:10].tolist())


@pytest.mark.parametrize("backend", ["sqlite"])
def test_open_refuses_an_index_whose_rows_and_faiss_disagree(
    settings: Settings, store_task: DigitsTask
) -> None:
    feat = Featurizer(store_task, CompressionConfig(batch_size=64))
    build(BuildConfig(name="digits", task=STORE_TASK, task_args=dict(STORE_TASK_ARGS),
                      compression=feat.config,
                      preconditioner=PreconditionerConfig(shape="identity")),
          settings, featurizer=feat)
    index = open_index("digits", settings)
    assert featurizer_for(index).dim == index.dim  # rebuilt from the manifest, fingerprint checked
    with Session(connect(settings)) as session, session.begin():
        first = session.scalar(select(ExampleRow.id).order_by(ExampleRow.id).limit(1))
        session.execute(delete(ExampleRow).where(ExampleRow.id == first))
    with pytest.raises(StorageError, match="inconsistent"):
        open_index("digits", settings)
