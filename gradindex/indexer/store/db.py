"""The SQL side of an index: SQLAlchemy 2 models, engines and Alembic migrations.

Tables: ``indexes``, ``index_versions`` (manifest, status, current flag, per-index number and
build id), ``examples`` (one row per training example of a version; its id is the example's
FAISS id), ``build_progress`` and ``api_keys`` (hashed server keys).
The schema itself is owned by the Alembic migrations shipped as ``gradindex.migrations``.

Identities are never reused (DESIGN §3): ids come from PostgreSQL sequences, and on SQLite from
``AUTOINCREMENT`` tables (a plain ``INTEGER PRIMARY KEY`` hands a freed id out again, so a
deleted index's ids would come back for the next build).
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from ..errors import IndexNotFound, StorageError
from ..settings import Settings

__all__ = [
    "ApiKey",
    "BuildProgress",
    "ExampleRow",
    "IndexRow",
    "IndexVersion",
    "StorageError",
    "connect",
    "current_version",
    "downgrade",
    "get_index",
    "migrations_dir",
    "upgrade",
]

log = logging.getLogger(__name__)

# Ids are 64-bit (FAISS ids are int64); SQLite autoincrements only an INTEGER primary key.
Id = BigInteger().with_variant(Integer(), "sqlite")
# JSONB on PostgreSQL so metadata filters compare JSON values (`@>`), plain JSON elsewhere.
Json = JSON().with_variant(JSONB(), "postgresql")


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class IndexRow(Base):
    """A named index; its vectors live in versions."""

    __tablename__ = "indexes"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class IndexVersion(Base):
    """One finalized (or finalizing) build of an index; at most one per index is current."""

    __tablename__ = "index_versions"
    __table_args__ = (
        UniqueConstraint("index_id", "number", name="uq_index_versions_number"),
        UniqueConstraint("build_id", name="uq_index_versions_build_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    """Global id: owns the FAISS ids of its rows and names its folder ``v<id>``."""
    index_id: Mapped[int] = mapped_column(ForeignKey("indexes.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    """The version number users see: 1, 2, 3, ... within each index, in publishing order."""
    build_id: Mapped[str] = mapped_column(String(32))
    """32 random hex digits drawn by each finalize, also written into the manifest, so a reader
    can tell that a folder's files and these rows come from the same build."""
    status: Mapped[str] = mapped_column(String(16), default="building")
    """``building`` while finalize writes it, ``ready`` once published, ``retired`` after."""
    current: Mapped[bool] = mapped_column(Boolean, default=False)
    path: Mapped[str] = mapped_column(String(512), default="")
    """Version folder relative to the data directory."""
    manifest: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ExampleRow(Base):
    """A training example of one version; ``id`` is its FAISS id."""

    __tablename__ = "examples"
    __table_args__ = (
        UniqueConstraint("version_id", "external_id", name="uq_examples_version_external"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    version_id: Mapped[int] = mapped_column(
        ForeignKey("index_versions.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(BigInteger)
    """Position in ``task.examples()``, and the row of ``vectors.npy``."""
    external_id: Mapped[str] = mapped_column(String(512))
    payload: Mapped[Any] = mapped_column(Json)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", Json, default=dict)
    self_influence: Mapped[float] = mapped_column(Float)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class BuildProgress(Base):
    """How far featurize got, per index, staging key and shard (the chunks are the truth)."""

    __tablename__ = "build_progress"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    index_name: Mapped[str] = mapped_column(String(128), index=True)
    staging_key: Mapped[str] = mapped_column(String(64))
    shard: Mapped[int] = mapped_column(Integer)
    shards: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(BigInteger, default=0)
    total: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="featurizing")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ApiKey(Base):
    """A server API key: only the SHA-256 of its secret is stored, never the secret."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    scope: Mapped[str] = mapped_column(String(16))
    """``read`` (queries and look-ups) or ``admin`` (also deletes)."""
    prefix: Mapped[str] = mapped_column(String(16))
    """The secret's first characters, shown by ``gradindex keys list`` to tell keys apart."""
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


# ----------------------------------------------------------------------------- engines

_ENGINES: dict[str, Engine] = {}
_LOCK = threading.Lock()


def migrations_dir() -> Path:
    """The Alembic folder, shipped inside the package as ``gradindex.migrations``."""
    return Path(str(resources.files("gradindex.migrations")))


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config(str(migrations_dir() / "alembic.ini"))
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def _safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _make_engine(settings: Settings) -> Engine:
    url = settings.url
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for a publishing writer
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except (ImportError, SQLAlchemyError) as exc:
        raise StorageError(f"cannot use database URL {_safe_url(url)!r}: {exc}") from exc


def _revision(engine: Engine) -> tuple[str | None, str]:
    """(the database's Alembic revision, the head revision of ``migrations/``)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, str(head)


def connect(settings: Settings, *, migrate: bool | None = None) -> Engine:
    """The engine for ``settings``, checked to be reachable and at the latest schema.

    A SQLite database is created and migrated on first use; PostgreSQL is migrated only by
    ``gradindex db upgrade`` (or ``migrate=True``), since deployments decide when.

    Raises:
        StorageError: the database is unreachable or its schema is older than this code.
    """
    url = settings.url
    with _LOCK:
        engine = _ENGINES.get(url)
        if engine is not None:
            return engine
        engine = _make_engine(settings)
        try:
            current, head = _revision(engine)
            if current != head:
                if migrate or (migrate is None and settings.is_sqlite):
                    upgrade(settings, engine=engine)
                else:
                    raise StorageError(
                        f"the database {_safe_url(url)} is at schema revision {current}, this "
                        f"code needs {head}; run `gradindex db upgrade`"
                    )
        except StorageError:
            engine.dispose()
            raise
        except OperationalError as exc:
            engine.dispose()
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise StorageError(
                f"cannot reach the database {_safe_url(url)}: {reason}; check "
                "GRADINDEX_DATABASE_URL and that the server is running"
            ) from exc
        _ENGINES[url] = engine
        return engine


def dispose_engines() -> None:
    """Close every cached engine (tests, and before forking)."""
    with _LOCK:
        for engine in _ENGINES.values():
            engine.dispose()
        _ENGINES.clear()


def upgrade(settings: Settings, revision: str = "head", *, engine: Engine | None = None) -> None:
    """Run the Alembic migrations up to ``revision``."""
    _migrate(settings, engine, "upgrade", revision)


def downgrade(settings: Settings, revision: str = "-1", *, engine: Engine | None = None) -> None:
    """Revert the Alembic migrations down to ``revision`` (default: one step)."""
    _migrate(settings, engine, "downgrade", revision)


def _migrate(settings: Settings, engine: Engine | None, direction: str, revision: str) -> None:
    from alembic import command

    own = engine is None
    engine = engine or _make_engine(settings)
    try:
        cfg = _alembic_config(engine)
        with engine.connect() as conn:
            if settings.is_sqlite:
                _sqlite_foreign_keys(conn, on=False)
            try:
                with conn.begin():
                    cfg.attributes["connection"] = conn
                    getattr(command, direction)(cfg, revision)
                    if settings.is_sqlite:
                        _check_foreign_keys(conn)
            finally:
                if settings.is_sqlite:
                    _sqlite_foreign_keys(conn, on=True)
    except OperationalError as exc:
        raise StorageError(f"cannot reach the database {_safe_url(settings.url)}: {exc}") from exc
    finally:
        if own:
            engine.dispose()
    log.info("database %s: %s to %s", _safe_url(settings.url), direction, revision)


def _sqlite_foreign_keys(conn: Connection, *, on: bool) -> None:
    """Switch SQLite's foreign-key enforcement (only possible outside a transaction).

    Migrations recreate tables (SQLite cannot alter a primary key or add a constraint), and
    dropping a parent table with enforcement on would cascade-delete every child row.
    """
    conn.exec_driver_sql(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    conn.commit()


def _check_foreign_keys(conn: Connection) -> None:
    """Refuse (and roll back) a migration that left a row pointing at nothing."""
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise StorageError(f"a migration broke foreign keys (table, row, parent): {broken[:5]}")


def tables(engine: Engine) -> list[str]:
    """Names of the tables in the database (for checks and tests)."""
    return sorted(inspect(engine).get_table_names())


# ----------------------------------------------------------------------------- queries


def get_index(*, session: Session, name: str) -> IndexRow:
    """The index row named ``name``.

    Raises:
        IndexNotFound: there is none.
    """
    row = session.scalar(select(IndexRow).where(IndexRow.name == name))
    if row is None:
        raise IndexNotFound(f"no index named {name!r}; `gradindex list` shows the indexes")
    return row


def current_version(*, session: Session, name: str) -> IndexVersion:
    """The published version readers use.

    Raises:
        IndexNotFound: no such index, or it has no published version yet.
    """
    index = get_index(session=session, name=name)
    version = session.scalar(
        select(IndexVersion).where(IndexVersion.index_id == index.id, IndexVersion.current)
    )
    if version is None:
        raise IndexNotFound(
            f"index {name!r} has no published version yet; finish its build with "
            f"`gradindex build` or `gradindex finalize {name}`"
        )
    return version
