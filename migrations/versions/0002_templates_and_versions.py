"""templates and versions

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 10:46:35.661633
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "templates",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("category", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("active_version", sa.Integer(), nullable=False),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_table(
        "template_versions",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("template_id", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("content", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("author", sa.Text(), nullable=False),
        sa.Column("change_note", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["template_id"], ["templates.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("template_id", "version", name="uq_template_version"),
    )
    op.add_column("notifications", sa.Column("template_key", sa.Text(), nullable=True))
    op.add_column("notifications", sa.Column("template_version", sa.Integer(), nullable=True))
    op.add_column("notifications", sa.Column("variables", postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column("recipients", sa.Column("name", sa.Text(), nullable=True))
    # A templated notification has no raw title/body of its own.
    op.alter_column("notifications", "title", nullable=True)
    op.alter_column("notifications", "body", nullable=True)


def downgrade() -> None:
    op.execute("UPDATE notifications SET title = coalesce(title, ''), body = coalesce(body, '')")
    op.alter_column("notifications", "body", nullable=False)
    op.alter_column("notifications", "title", nullable=False)
    op.drop_column("recipients", "name")
    op.drop_column("notifications", "variables")
    op.drop_column("notifications", "template_version")
    op.drop_column("notifications", "template_key")
    op.drop_table("template_versions")
    op.drop_table("templates")
