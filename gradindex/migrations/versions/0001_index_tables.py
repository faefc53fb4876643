"""Indexes, their versions, examples and build progress.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "indexes",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "index_versions",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column(
            "index_id", Id, sa.ForeignKey("indexes.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("current", sa.Boolean(), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("manifest", Json, nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_index_versions_index_id", "index_versions", ["index_id"])
    # At most one current version per index, enforced by the database.
    op.create_index(
        "uq_index_versions_current", "index_versions", ["index_id"], unique=True,
        sqlite_where=sa.text("current"), postgresql_where=sa.text("current"),
    )
    op.create_table(
        "examples",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column(
            "version_id", Id, sa.ForeignKey("index_versions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("external_id", sa.String(512), nullable=False),
        sa.Column("payload", Json, nullable=False),
        sa.Column("metadata", Json, nullable=False),
        sa.Column("self_influence", sa.Float(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_examples_version_id", "examples", ["version_id"])
    op.create_index("ix_examples_version_external", "examples", ["version_id", "external_id"])
    op.create_index("ix_examples_version_deleted", "examples", ["version_id", "deleted"])
    op.create_table(
        "build_progress",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("index_name", sa.String(128), nullable=False),
        sa.Column("staging_key", sa.String(64), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("shards", sa.Integer(), nullable=False),
        sa.Column("done", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("index_name", "staging_key", "shard", "shards"),
    )
    op.create_index("ix_build_progress_index_name", "build_progress", ["index_name"])


def downgrade() -> None:
    op.drop_table("build_progress")
    op.drop_table("examples")
    op.drop_table("index_versions")
    op.drop_table("indexes")
