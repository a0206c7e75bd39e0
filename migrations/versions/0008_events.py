"""events: event types with payload schemas, trigger rules, events, what each rule made of
each event, digest items; recipients' follows

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    tz = sa.DateTime(timezone=True)
    op.add_column("recipients", sa.Column("follows", pg.ARRAY(sa.Text()), server_default="{}", nullable=False))
    # Followers of a series are found by `follows @> ARRAY['series:42']`.
    op.create_index("ix_recipients_follows", "recipients", ["follows"], postgresql_using="gin")
    op.create_table(
        "event_types",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("schema", pg.JSONB(), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", tz, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", tz, server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "trigger_rules",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text(), nullable=False, unique=True),
        sa.Column("event_type", sa.Text(), sa.ForeignKey("event_types.name", ondelete="RESTRICT"), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("definition", pg.JSONB(), nullable=False),
        sa.Column("cancel_on", pg.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", tz, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", tz, server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_trigger_rules_event_type", "trigger_rules", ["event_type"])
    op.create_table(
        "events",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("occurred_at", tz, nullable=False),
        sa.Column("payload", pg.JSONB(), nullable=False),
        sa.Column("payload_hash", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("received_by", sa.Text(), nullable=False),
        sa.Column("workflow_id", sa.Text(), nullable=False),
        sa.Column("received_at", tz, server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_events_type_received", "events", ["type", "received_at"])
    op.create_table(
        "event_actions",
        sa.Column("event_id", sa.Text(), sa.ForeignKey("events.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("rule_id", sa.BigInteger(), sa.ForeignKey("trigger_rules.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("correlation", sa.Text()),
        sa.Column("fire_at", tz),
        sa.Column("notification_id", pg.UUID(as_uuid=True)),
        sa.Column("campaign_id", pg.UUID(as_uuid=True)),
        sa.Column("digest", sa.Text()),
        sa.Column("reason", sa.Text()),
        sa.Column("updated_at", tz, server_default=sa.func.now(), nullable=False),
    )
    op.create_index(
        "ix_event_actions_waiting",
        "event_actions",
        ["rule_id", "correlation"],
        postgresql_where=sa.text("status = 'waiting'"),
    )
    op.create_table(
        "digest_items",
        sa.Column("rule_id", sa.BigInteger(), sa.ForeignKey("trigger_rules.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("user_id", sa.Text(), primary_key=True),
        sa.Column("event_id", sa.Text(), primary_key=True),
        sa.Column("payload", pg.JSONB(), nullable=False),
        sa.Column("occurred_at", tz, nullable=False),
        sa.Column("batch", sa.Text()),
        sa.Column("created_at", tz, server_default=sa.func.now(), nullable=False),
    )
    op.create_index(
        "ix_digest_items_open", "digest_items", ["rule_id", "user_id"], postgresql_where=sa.text("batch IS NULL")
    )


def downgrade() -> None:
    for table in ("digest_items", "event_actions", "events", "trigger_rules", "event_types"):
        op.drop_table(table)
    op.drop_index("ix_recipients_follows", table_name="recipients")
    op.drop_column("recipients", "follows")
