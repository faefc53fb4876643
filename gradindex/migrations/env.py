"""Alembic environment: migrates the database gradindex is configured for.

The library passes an open connection in ``config.attributes["connection"]``; run from the
``alembic`` command line, the URL comes from ``sqlalchemy.url`` or ``GRADINDEX_*``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from gradindex.indexer.settings import Settings
from gradindex.indexer.store.db import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or Settings.from_env().url


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url())
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
