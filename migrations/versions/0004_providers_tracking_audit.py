"""providers, preferences, suppressions, tracking, audit

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 12:52:10.208898
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("entity", sa.Text(), nullable=False),
        sa.Column("entity_id", sa.Text(), nullable=False),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_log_entity", "audit_log", ["entity", "entity_id", "at"], unique=False)
    op.create_table(
        "provider_breakers",
        sa.Column("provider", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="closed", nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("provider"),
    )
    op.create_table(
        "providers",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), server_default="100", nullable=False),
        sa.Column("settings", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False),
        sa.Column("secrets", sa.Text(), nullable=True),
        sa.Column("rate_limit_per_second", sa.Float(), nullable=True),
        sa.Column("max_concurrency", sa.Integer(), server_default="10", nullable=False),
        sa.Column("cost_per_message", sa.Float(), server_default="0", nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_index("ix_providers_channel_priority", "providers", ["channel", "priority"], unique=False)
    op.create_table(
        "suppressions",
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("channel", "address"),
    )
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("provider", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("provider_message_id", sa.Text(), nullable=True),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("provider", "event_id", name="uq_webhook_event"),
    )
    op.create_index(
        "ix_webhook_events_early",
        "webhook_events",
        ["provider_message_id"],
        postgresql_where=sa.text("outcome = 'unknown message'"),
    )
    op.create_table(
        "recipient_preferences",
        sa.Column("recipient_id", sa.BigInteger(), nullable=False),
        sa.Column("category", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("source", sa.Text(), server_default="api", nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["recipient_id"], ["recipients.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("recipient_id", "category", "channel"),
    )
    op.add_column("campaign_deliveries", sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("campaign_deliveries", sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("campaign_deliveries", sa.Column("clicked_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("campaign_deliveries", sa.Column("bounced_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_campaign_deliveries_provider_message", "campaign_deliveries", ["provider_message_id"], unique=False
    )
    op.add_column("dead_letters", sa.Column("status", sa.Text(), server_default="open", nullable=False))
    op.add_column("dead_letters", sa.Column("replays", sa.Integer(), server_default="0", nullable=False))
    op.add_column("dead_letters", sa.Column("resolved_by", sa.Text(), nullable=True))
    op.add_column("dead_letters", sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "dead_letters",
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    )
    op.create_index("ix_dead_letters_status_created", "dead_letters", ["status", "created_at"], unique=False)
    op.add_column("deliveries", sa.Column("failures", sa.Integer(), server_default="0", nullable=False))
    op.add_column("deliveries", sa.Column("clicked_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("deliveries", sa.Column("bounced_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_deliveries_provider_message", "deliveries", ["provider_message_id"], unique=False)
    op.add_column(
        "recipients", sa.Column("dead_push_tokens", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False)
    )
    op.add_column("recipients", sa.Column("quiet_hours_start", sa.Text(), nullable=True))
    op.add_column("recipients", sa.Column("quiet_hours_end", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("recipients", "quiet_hours_end")
    op.drop_column("recipients", "quiet_hours_start")
    op.drop_column("recipients", "dead_push_tokens")
    op.drop_index("ix_deliveries_provider_message", table_name="deliveries")
    op.drop_column("deliveries", "bounced_at")
    op.drop_column("deliveries", "failures")
    op.drop_column("deliveries", "clicked_at")
    op.drop_index("ix_dead_letters_status_created", table_name="dead_letters")
    op.drop_column("dead_letters", "updated_at")
    op.drop_column("dead_letters", "resolved_at")
    op.drop_column("dead_letters", "resolved_by")
    op.drop_column("dead_letters", "replays")
    op.drop_column("dead_letters", "status")
    op.drop_index("ix_campaign_deliveries_provider_message", table_name="campaign_deliveries")
    op.drop_column("campaign_deliveries", "bounced_at")
    op.drop_column("campaign_deliveries", "clicked_at")
    op.drop_column("campaign_deliveries", "opened_at")
    op.drop_column("campaign_deliveries", "delivered_at")
    op.drop_table("recipient_preferences")
    op.drop_index("ix_webhook_events_early", table_name="webhook_events")
    op.drop_table("webhook_events")
    op.drop_table("suppressions")
    op.drop_index("ix_providers_channel_priority", table_name="providers")
    op.drop_table("providers")
    op.drop_table("provider_breakers")
    op.drop_index("ix_audit_log_entity", table_name="audit_log")
    op.drop_table("audit_log")
