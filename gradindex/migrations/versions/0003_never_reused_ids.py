"""Identities that are never reused: AUTOINCREMENT ids on SQLite, version numbers per index,
a random build id per version, and one row per external id in each version.

SQLite hands a freed ``INTEGER PRIMARY KEY`` out again, so after ``gradindex delete`` a rebuild
got the ids of the deleted versions and rows back; ``AUTOINCREMENT`` needs the tables recreated
(batch mode). PostgreSQL's sequences never reuse a value, so there only columns and
constraints are added. Ids freed before this migration cannot be known and may still come back
once; none after it will.

Revision ID: 0003
Revises: 0002
Create Date: 2025-02-01
"""

from __future__ import annotations

import logging
import secrets
from typing import Literal

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

log = logging.getLogger("gradindex.migrations")

EXTERNAL_ID_LENGTH = 512


def _recreate() -> Literal["always", "auto"]:
    """SQLite: recreate the table (the only way to get AUTOINCREMENT or a new constraint);
    PostgreSQL: plain ALTERs."""
    return "always" if op.get_bind().dialect.name == "sqlite" else "auto"


def _number_existing_versions(conn: sa.Connection) -> None:
    """Give every existing version a number (1, 2, ... per index, by id) and a build id."""
    versions = sa.table("index_versions", sa.column("id"), sa.column("index_id"),
                        sa.column("number"), sa.column("build_id"))
    rows = conn.execute(
        sa.select(versions.c.id, versions.c.index_id).order_by(versions.c.index_id, versions.c.id)
    ).all()
    numbers: dict[int, int] = {}
    for version_id, index_id in rows:
        numbers[index_id] = numbers.get(index_id, 0) + 1
        conn.execute(
            sa.update(versions).where(versions.c.id == version_id)
            .values(number=numbers[index_id], build_id=secrets.token_hex(16))
        )


def _rename_duplicate_external_ids(conn: sa.Connection) -> None:
    """Make (version, external id) unique by renaming all but the first row of a duplicate.

    Builds used to accept duplicate ids (a look-up found one row, a delete removed them all).
    Refusing to migrate would lock the user out of every command, ``delete`` included, so the
    later rows are renamed ``<id>#dup<row id>`` instead, and a warning names them.
    """
    examples = sa.table("examples", sa.column("id"), sa.column("version_id"),
                        sa.column("external_id"))
    dup = (
        sa.select(examples.c.version_id, examples.c.external_id)
        .group_by(examples.c.version_id, examples.c.external_id)
        .having(sa.func.count() > 1)
        .subquery()
    )
    rows = conn.execute(
        sa.select(examples.c.id, examples.c.version_id, examples.c.external_id)
        .join(dup, sa.and_(dup.c.version_id == examples.c.version_id,
                           dup.c.external_id == examples.c.external_id))
        .order_by(examples.c.version_id, examples.c.external_id, examples.c.id)
    ).all()
    seen: set[tuple[int, str]] = set()
    renamed = []
    for row_id, version_id, external_id in rows:
        if (version_id, external_id) not in seen:
            seen.add((version_id, external_id))
            continue
        suffix = f"#dup{row_id}"
        new = external_id[: EXTERNAL_ID_LENGTH - len(suffix)] + suffix
        conn.execute(sa.update(examples).where(examples.c.id == row_id).values(external_id=new))
        renamed.append(f"{external_id!r} → {new!r} (version {version_id})")
    if renamed:
        log.warning("%d duplicated example ids renamed: %s", len(renamed), "; ".join(renamed[:10]))


def upgrade() -> None:
    conn = op.get_bind()
    # Batch mode copies the rows and keeps the indexes of a recreated table.
    recreate = _recreate()
    autoincrement = {"sqlite_autoincrement": True}

    with op.batch_alter_table("index_versions") as batch:
        batch.add_column(sa.Column("number", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("build_id", sa.String(32), nullable=True))
    _number_existing_versions(conn)
    _rename_duplicate_external_ids(conn)

    with op.batch_alter_table("indexes", recreate=recreate, table_kwargs=autoincrement):
        pass
    with op.batch_alter_table("index_versions", recreate=recreate,
                              table_kwargs=autoincrement) as batch:
        batch.alter_column("number", existing_type=sa.Integer(), nullable=False)
        batch.alter_column("build_id", existing_type=sa.String(32), nullable=False)
        batch.create_unique_constraint("uq_index_versions_number", ["index_id", "number"])
        batch.create_unique_constraint("uq_index_versions_build_id", ["build_id"])
    with op.batch_alter_table("examples", recreate=recreate, table_kwargs=autoincrement) as batch:
        # The unique constraint's own index replaces the plain one on the same columns.
        batch.drop_index("ix_examples_version_external")
        batch.create_unique_constraint("uq_examples_version_external",
                                       ["version_id", "external_id"])


def downgrade() -> None:
    recreate = _recreate()
    # Recreated without table_kwargs, the SQLite tables lose AUTOINCREMENT again.
    with op.batch_alter_table("examples", recreate=recreate) as batch:
        batch.drop_constraint("uq_examples_version_external", type_="unique")
        batch.create_index("ix_examples_version_external", ["version_id", "external_id"])
    with op.batch_alter_table("index_versions", recreate=recreate) as batch:
        batch.drop_constraint("uq_index_versions_build_id", type_="unique")
        batch.drop_constraint("uq_index_versions_number", type_="unique")
        batch.drop_column("build_id")
        batch.drop_column("number")
    with op.batch_alter_table("indexes", recreate=recreate):
        pass
