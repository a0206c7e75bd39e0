"""PostgreSQL tables (SQLModel). Migrations in migrations/ are the source of the schema."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlmodel import Field, SQLModel


class Channel(enum.StrEnum):
    email = "email"
    push = "push"
    sms = "sms"


class DeliveryStatus(enum.StrEnum):
    """Per-channel status. Order matters: a status never moves back to an earlier one."""

    pending = "pending"
    sent = "sent"
    delivered = "delivered"
    opened = "opened"
    clicked = "clicked"
    failed = "failed"
    bounced = "bounced"  # the provider took it, then reported it undeliverable
    suppressed = "suppressed"  # the recipient opted out, or the address is suppressed
    unreachable = "unreachable"  # no such recipient, or no contact for the channel
    cancelled = "cancelled"


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


class Recipient(SQLModel, table=True):
    __tablename__ = "recipients"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    user_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False, unique=True))
    name: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    email: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    phone: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    push_tokens: list[str] = Field(
        default_factory=list,
        sa_column=sa.Column(pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
    )
    locale: str = Field(default="en", sa_column=sa.Column(sa.Text, nullable=False))
    timezone: str = Field(default="UTC", sa_column=sa.Column(sa.Text, nullable=False))
    country: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    opted_out_channels: list[str] = Field(
        default_factory=list,
        sa_column=sa.Column(pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
    )
    attributes: dict[str, Any] = Field(
        default_factory=dict,
        sa_column=sa.Column(pg.JSONB, nullable=False, server_default="{}"),
    )
    tags: list[str] = Field(
        default_factory=list,
        sa_column=sa.Column(pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
    )
    last_active_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    # Push tokens the provider reported unregistered: never used again.
    dead_push_tokens: list[str] = Field(
        default_factory=list,
        sa_column=sa.Column(pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
    )
    # What the recipient follows ("series:42", "actor:7"): event rules address followers.
    follows: list[str] = Field(
        default_factory=list,
        sa_column=sa.Column(pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
    )
    # Non-urgent sends wait while the recipient's local clock is in [start, end), "HH:MM".
    quiet_hours_start: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    quiet_hours_end: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )
    updated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )


class RecipientPreference(SQLModel, table=True):
    """An opt-in or opt-out of one category ("*" = all) on one channel ("*" = all).
    The most specific row wins; transactional categories ignore the "*" category rows."""

    __tablename__ = "recipient_preferences"

    recipient_id: int = Field(
        sa_column=sa.Column(sa.BigInteger, sa.ForeignKey("recipients.id", ondelete="CASCADE"), primary_key=True)
    )
    category: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    channel: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    enabled: bool = Field(sa_column=sa.Column(sa.Boolean, nullable=False))
    source: str = Field(default="api", sa_column=sa.Column(sa.Text, nullable=False, server_default="api"))
    updated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )


class Suppression(SQLModel, table=True):
    """An address nothing is sent to any more: a hard bounce, a complaint, a dead number."""

    __tablename__ = "suppressions"

    channel: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    address: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    reason: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    source: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )


class Notification(SQLModel, table=True):
    __tablename__ = "notifications"

    id: uuid.UUID = Field(primary_key=True)
    idempotency_key: str = Field(sa_column=sa.Column(sa.Text, nullable=False, unique=True))
    request_hash: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    user_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    content_id: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    category: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    channels: list[str] = Field(sa_column=sa.Column(pg.ARRAY(sa.Text), nullable=False))
    title: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    body: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    data: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column(pg.JSONB, nullable=False, server_default="{}")
    )
    # Set when the notification was rendered from a template: the exact version used.
    template_key: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    template_version: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    variables: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(pg.JSONB))
    status: str = Field(
        default=DeliveryStatus.pending.value,
        sa_column=sa.Column(sa.Text, nullable=False, server_default="pending"),
    )
    requested_by: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    workflow_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    run_id: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )
    updated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )

    __table_args__ = (
        sa.Index("ix_notifications_created", "created_at", "id"),
        sa.Index("ix_notifications_user_created", "user_id", "created_at", "id"),
    )


class Delivery(SQLModel, table=True):
    """One channel of one notification: its address, status and attempts."""

    __tablename__ = "deliveries"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    notification_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True), sa.ForeignKey("notifications.id", ondelete="CASCADE"), nullable=False
        )
    )
    channel: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    address: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    status: str = Field(
        default=DeliveryStatus.pending.value,
        sa_column=sa.Column(sa.Text, nullable=False, server_default="pending"),
    )
    provider: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    provider_message_id: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    attempts: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    # Failures on the current provider (throttling is not one): the failover budget.
    failures: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    queued_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )
    sent_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    delivered_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    opened_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    clicked_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    failed_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    bounced_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    updated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )

    __table_args__ = (
        sa.UniqueConstraint("notification_id", "channel", name="uq_delivery_channel"),
        sa.Index("ix_deliveries_provider_message", "provider_message_id"),
    )


class DeadLetter(SQLModel, table=True):
    """A delivery that failed for good, kept with the original request for replay."""

    __tablename__ = "dead_letters"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    notification_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True), sa.ForeignKey("notifications.id", ondelete="CASCADE"), nullable=False
        )
    )
    channel: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    reason: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    last_error: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    attempts: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    request: dict[str, Any] = Field(sa_column=sa.Column(pg.JSONB, nullable=False))
    # open -> replayed | discarded; a replayed delivery that fails again reopens it.
    status: str = Field(default="open", sa_column=sa.Column(sa.Text, nullable=False, server_default="open"))
    replays: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    resolved_by: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    resolved_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )
    updated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )

    __table_args__ = (
        sa.UniqueConstraint("notification_id", "channel", name="uq_dead_letter_channel"),
        sa.Index("ix_dead_letters_status_created", "status", "created_at"),
    )


class ProviderConfig(SQLModel, table=True):
    """A channel provider, edited in the admin. Secrets are Fernet-encrypted at rest."""

    __tablename__ = "providers"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    # Also the provider's task queue suffix and its webhook path: /v1/webhooks/{name}.
    name: str = Field(sa_column=sa.Column(sa.Text, nullable=False, unique=True))
    channel: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    kind: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    priority: int = Field(default=100, sa_column=sa.Column(sa.Integer, nullable=False, server_default="100"))
    settings: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column(pg.JSONB, nullable=False, server_default="{}")
    )
    secrets: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    rate_limit_per_second: float | None = Field(default=None, sa_column=sa.Column(sa.Float))
    max_concurrency: int = Field(default=10, sa_column=sa.Column(sa.Integer, nullable=False, server_default="10"))
    cost_per_message: float = Field(default=0.0, sa_column=sa.Column(sa.Float, nullable=False, server_default="0"))
    # ISO 4217 code of cost_per_message; spend is summed per currency, never converted.
    currency: str = Field(default="USD", sa_column=sa.Column(sa.Text, nullable=False, server_default="USD"))
    enabled: bool = Field(default=True, sa_column=sa.Column(sa.Boolean, nullable=False, server_default="true"))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )
    updated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )

    __table_args__ = (sa.Index("ix_providers_channel_priority", "channel", "priority"),)


class ProviderBreaker(SQLModel, table=True):
    """A provider's circuit breaker, shared by every worker through PostgreSQL."""

    __tablename__ = "provider_breakers"

    provider: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    state: str = Field(default="closed", sa_column=sa.Column(sa.Text, nullable=False, server_default="closed"))
    consecutive_failures: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    opened_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    last_failure_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    last_success_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    updated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )


class WebhookEvent(SQLModel, table=True):
    """A provider's delivery event, stored once per (provider, event id)."""

    __tablename__ = "webhook_events"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    provider: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    event_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    type: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    provider_message_id: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    payload: dict[str, Any] = Field(sa_column=sa.Column(pg.JSONB, nullable=False))
    outcome: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    received_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )

    __table_args__ = (
        sa.UniqueConstraint("provider", "event_id", name="uq_webhook_event"),
        # Events that came before their message was recorded, looked up on each send.
        sa.Index(
            "ix_webhook_events_early", "provider_message_id", postgresql_where=sa.text("outcome = 'unknown message'")
        ),
    )


class HistoryOutbox(SQLModel, table=True):
    """History rows for ClickHouse written where the API changes a status (webhooks,
    tracking), in the same transaction; workers ship them and delete them."""

    __tablename__ = "history_outbox"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    row: dict[str, Any] = Field(sa_column=sa.Column(pg.JSONB, nullable=False))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )


class AuditEntry(SQLModel, table=True):
    """Who did what to which object, from the API or the admin."""

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    actor: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    role: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    action: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    entity: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    entity_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    details: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column(pg.JSONB, nullable=False, server_default="{}")
    )
    # Why (required of destructive and risky actions), from where (the request's client
    # address, after trusted proxies), and what changed: {field: {"before": .., "after": ..}}.
    reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    client_address: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    changes: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column(pg.JSONB, nullable=False, server_default="{}")
    )
    at: datetime | None = Field(default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now()))

    # Append-only: migration 0009's trigger refuses UPDATE, DELETE and TRUNCATE.
    __table_args__ = (
        sa.Index("ix_audit_log_entity", "entity", "entity_id", "at"),
        sa.Index("ix_audit_log_at", "at", "id"),
        sa.Index("ix_audit_log_actor", "actor", "at"),
        sa.Index("ix_audit_log_action", "action", "at"),
    )


class Template(SQLModel, table=True):
    """A template's identity; its content lives in immutable versions."""

    __tablename__ = "templates"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    key: str = Field(sa_column=sa.Column(sa.Text, nullable=False, unique=True))
    category: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    description: str = Field(default="", sa_column=sa.Column(sa.Text, nullable=False, server_default=""))
    active_version: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    archived_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )
    updated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )


class TemplateVersion(SQLModel, table=True):
    """One saved state of a template. Never updated: a rollback writes a new version."""

    __tablename__ = "template_versions"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    template_id: int = Field(
        sa_column=sa.Column(sa.BigInteger, sa.ForeignKey("templates.id", ondelete="CASCADE"), nullable=False)
    )
    version: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    content: dict[str, Any] = Field(sa_column=sa.Column(pg.JSONB, nullable=False))
    author: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    change_note: str = Field(default="", sa_column=sa.Column(sa.Text, nullable=False, server_default=""))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )

    __table_args__ = (sa.UniqueConstraint("template_id", "version", name="uq_template_version"),)


class SandboxMessage(SQLModel, table=True):
    """What a sandbox push/SMS provider would have sent (development and tests)."""

    __tablename__ = "sandbox_messages"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    channel: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    address: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    idempotency_key: str = Field(sa_column=sa.Column(sa.Text, nullable=False, unique=True))
    payload: dict[str, Any] = Field(sa_column=sa.Column(pg.JSONB, nullable=False))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )


class AdminUser(SQLModel, table=True):
    """A person who signs in to the admin panel."""

    __tablename__ = "admin_users"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    email: str = Field(sa_column=sa.Column(sa.Text, nullable=False, unique=True))
    password_hash: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    role: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    is_active: bool = Field(default=True, sa_column=sa.Column(sa.Boolean, nullable=False, server_default="true"))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )


class CampaignStatus(enum.StrEnum):
    draft = "draft"
    scheduled = "scheduled"
    running = "running"
    paused = "paused"
    completed = "completed"
    cancelled = "cancelled"
    failed = "failed"


class Segment(SQLModel, table=True):
    """Who a campaign goes to: a filter over recipients, or a static list of them."""

    __tablename__ = "segments"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    name: str = Field(sa_column=sa.Column(sa.Text, nullable=False, unique=True))
    description: str = Field(default="", sa_column=sa.Column(sa.Text, nullable=False, server_default=""))
    kind: str = Field(sa_column=sa.Column(sa.Text, nullable=False))  # "filter" or "static"
    filter: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(pg.JSONB))
    created_by: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )
    updated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )


class SegmentMember(SQLModel, table=True):
    __tablename__ = "segment_members"

    segment_id: int = Field(
        sa_column=sa.Column(sa.BigInteger, sa.ForeignKey("segments.id", ondelete="CASCADE"), primary_key=True)
    )
    recipient_id: int = Field(
        sa_column=sa.Column(sa.BigInteger, sa.ForeignKey("recipients.id", ondelete="CASCADE"), primary_key=True)
    )


class Campaign(SQLModel, table=True):
    """A bulk send: a pinned template version to a segment, now, at a time or on a cron."""

    __tablename__ = "campaigns"

    id: uuid.UUID = Field(primary_key=True)
    name: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    category: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    template_key: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    template_version: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    segment_id: int = Field(sa_column=sa.Column(sa.BigInteger, sa.ForeignKey("segments.id"), nullable=False))
    channels: list[str] = Field(sa_column=sa.Column(pg.ARRAY(sa.Text), nullable=False))
    variables: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column(pg.JSONB, nullable=False, server_default="{}")
    )
    schedule: dict[str, Any] = Field(sa_column=sa.Column(pg.JSONB, nullable=False))
    throttle_per_second: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    status: str = Field(sa_column=sa.Column(sa.Text, nullable=False, server_default="draft"))
    status_reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_by: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )
    updated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )


class CampaignRun(SQLModel, table=True):
    """One execution of a campaign (a recurring campaign has one per firing); counters are
    updated in the same transaction as the delivery rows they count."""

    __tablename__ = "campaign_runs"

    id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))  # the workflow id
    campaign_id: uuid.UUID = Field(
        sa_column=sa.Column(pg.UUID(as_uuid=True), sa.ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False)
    )
    status: str = Field(sa_column=sa.Column(sa.Text, nullable=False, server_default="running"))
    targeted: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    sent: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    failed: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    suppressed: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    unreachable: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    skipped_duplicate: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    started_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )
    finished_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))

    __table_args__ = (sa.Index("ix_campaign_runs_campaign", "campaign_id", "started_at"),)


class CampaignDelivery(SQLModel, table=True):
    """One (run, recipient, channel): the unique key is the idempotency key of the send."""

    __tablename__ = "campaign_deliveries"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    run_id: str = Field(
        sa_column=sa.Column(sa.Text, sa.ForeignKey("campaign_runs.id", ondelete="CASCADE"), nullable=False)
    )
    recipient_id: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    channel: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    status: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    provider_message_id: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )
    # Set by delivery webhooks and tracking after the send.
    delivered_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    opened_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    clicked_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    bounced_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))

    __table_args__ = (
        sa.UniqueConstraint("run_id", "recipient_id", "channel", name="uq_campaign_delivery"),
        sa.Index("ix_campaign_deliveries_provider_message", "provider_message_id"),
    )


class EventType(SQLModel, table=True):
    """A kind of fact other services publish, with the JSON Schema its payload must meet."""

    __tablename__ = "event_types"

    name: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    description: str = Field(default="", sa_column=sa.Column(sa.Text, nullable=False, server_default=""))
    payload_schema: dict[str, Any] = Field(sa_column=sa.Column("schema", pg.JSONB, nullable=False))
    created_by: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )
    updated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )


class TriggerRule(SQLModel, table=True):
    """Event type -> who hears it, with which template, when, and whether as a digest.
    `definition` is core.events.RuleDefinition as JSON."""

    __tablename__ = "trigger_rules"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    name: str = Field(sa_column=sa.Column(sa.Text, nullable=False, unique=True))
    event_type: str = Field(
        sa_column=sa.Column(sa.Text, sa.ForeignKey("event_types.name", ondelete="RESTRICT"), nullable=False)
    )
    enabled: bool = Field(default=True, sa_column=sa.Column(sa.Boolean, nullable=False, server_default="true"))
    definition: dict[str, Any] = Field(sa_column=sa.Column(pg.JSONB, nullable=False))
    # Event types whose arrival cancels this rule's pending (delayed) sends.
    cancel_on: list[str] = Field(
        default_factory=list, sa_column=sa.Column(pg.ARRAY(sa.Text), nullable=False, server_default="{}")
    )
    created_by: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )
    updated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )

    __table_args__ = (sa.Index("ix_trigger_rules_event_type", "event_type"),)


class Event(SQLModel, table=True):
    """One published fact, once: the publisher's id is the key, whichever intake brought it."""

    __tablename__ = "events"

    id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    type: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    occurred_at: datetime = Field(sa_column=sa.Column(_tz(), nullable=False))
    payload: dict[str, Any] = Field(sa_column=sa.Column(pg.JSONB, nullable=False))
    payload_hash: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    source: str = Field(sa_column=sa.Column(sa.Text, nullable=False))  # http or nats
    received_by: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    workflow_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    received_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )

    __table_args__ = (sa.Index("ix_events_type_received", "type", "received_at"),)


class EventAction(SQLModel, table=True):
    """What one rule made of one event: waiting, sent (with what it started), cancelled, skipped."""

    __tablename__ = "event_actions"

    event_id: str = Field(
        sa_column=sa.Column(sa.Text, sa.ForeignKey("events.id", ondelete="CASCADE"), primary_key=True)
    )
    rule_id: int = Field(
        sa_column=sa.Column(sa.BigInteger, sa.ForeignKey("trigger_rules.id", ondelete="CASCADE"), primary_key=True)
    )
    status: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    # The payload value a cancelling event must carry to cancel this action (correlate_on).
    correlation: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    fire_at: datetime | None = Field(default=None, sa_column=sa.Column(_tz()))
    notification_id: uuid.UUID | None = Field(default=None, sa_column=sa.Column(pg.UUID(as_uuid=True)))
    campaign_id: uuid.UUID | None = Field(default=None, sa_column=sa.Column(pg.UUID(as_uuid=True)))
    digest: str | None = Field(default=None, sa_column=sa.Column(sa.Text))  # the digest workflow id
    reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    updated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )

    __table_args__ = (
        sa.Index("ix_event_actions_waiting", "rule_id", "correlation", postgresql_where=sa.text("status = 'waiting'")),
    )


class DigestItem(SQLModel, table=True):
    """An event waiting in a recipient's digest for a rule; `batch` is set by the send that
    lists it, so an event is listed once whatever is retried or redelivered."""

    __tablename__ = "digest_items"

    rule_id: int = Field(
        sa_column=sa.Column(sa.BigInteger, sa.ForeignKey("trigger_rules.id", ondelete="CASCADE"), primary_key=True)
    )
    user_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    event_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    payload: dict[str, Any] = Field(sa_column=sa.Column(pg.JSONB, nullable=False))
    occurred_at: datetime = Field(sa_column=sa.Column(_tz(), nullable=False))
    batch: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )

    __table_args__ = (
        sa.Index("ix_digest_items_open", "rule_id", "user_id", postgresql_where=sa.text("batch IS NULL")),
    )


class Erasure(SQLModel, table=True):
    """A GDPR erasure, kept as proof that it happened without saying of whom: the user_id
    only as an HMAC keyed by Settings.signing_key("gdpr-erasure") (services.gdpr), who
    erased, when, and how many rows or objects each store gave up. The reason is on the
    audit row (action recipient.erase, entity_id "erased:<subject_hash>")."""

    __tablename__ = "erasures"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True))
    subject_hash: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    actor: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    role: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    # {store: {what: count}}, e.g. {"postgresql": {"notifications": 3}, "clickhouse": {...}}.
    counts: dict[str, Any] = Field(sa_column=sa.Column(pg.JSONB, nullable=False))
    erased_at: datetime | None = Field(
        default=None, sa_column=sa.Column(_tz(), nullable=False, server_default=sa.func.now())
    )

    __table_args__ = (sa.Index("ix_erasures_subject", "subject_hash"),)
