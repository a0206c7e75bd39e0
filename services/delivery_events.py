"""What happens to a message after the provider took it: delivered, opened, clicked, bounced.

Provider webhooks and the tracking endpoints report these facts, often late, twice or out
of order. A delivery's status therefore only moves forward, by rank:

    pending 0 < sent 1 < delivered 2 < opened 3 = bounced 3 < clicked 4

failed, suppressed and cancelled (and any status not ranked) are terminal: events never
change them. An event that does not move the status forward still fills its own
timestamp if it is empty ("delivered" arriving after "opened" sets delivered_at only).

The same rules hold for instant notifications (`deliveries`) and campaign sends
(`campaign_deliveries`). Provider events are stored once per (provider, event id) in
`webhook_events`, in the same transaction as their effect, so a provider's retry of an
event already applied changes nothing.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from core.models import (
    Campaign,
    CampaignDelivery,
    CampaignRun,
    Delivery,
    HistoryOutbox,
    Notification,
    Recipient,
    WebhookEvent,
)
from core.queries import lock_notification, refresh_notification_status
from services.history import LATENCY_STATUSES, HistoryRow, HistorySubject, campaign_send_id
from services.preferences import opt_out, suppress

deliveries = Delivery.__table__  # type: ignore[attr-defined]
campaign_deliveries = CampaignDelivery.__table__  # type: ignore[attr-defined]
campaign_runs = CampaignRun.__table__  # type: ignore[attr-defined]
campaigns = Campaign.__table__  # type: ignore[attr-defined]
notifications = Notification.__table__  # type: ignore[attr-defined]
recipients = Recipient.__table__  # type: ignore[attr-defined]
webhook_events = WebhookEvent.__table__  # type: ignore[attr-defined]
history_outbox = HistoryOutbox.__table__  # type: ignore[attr-defined]

RANK: dict[str, int] = {"pending": 0, "sent": 1, "delivered": 2, "bounced": 3, "opened": 3, "clicked": 4}
# The statuses an event can set, and the timestamp column each one fills.
TIMESTAMP_COLUMN: dict[str, str] = {
    "delivered": "delivered_at",
    "opened": "opened_at",
    "clicked": "clicked_at",
    "bounced": "bounced_at",
}
EventType = Literal["delivered", "bounced", "complained", "opened", "clicked", "failed", "ignored"]


class Outcome(enum.StrEnum):
    """What an event did; stored as webhook_events.outcome."""

    advanced = "advanced"  # the status moved forward
    stale = "stale"  # not a step forward (or the delivery is terminal): at most a timestamp filled
    unknown = "unknown message"  # no delivery has this provider message id (yet)
    complaint = "complaint"  # the address is suppressed and the category opted out
    ignored = "ignored"  # an event that changes nothing here (Twilio "queued", "sent")


@dataclass(frozen=True)
class DeliveryRef:
    """One delivery row, with what a bounce or complaint needs to know about it."""

    kind: Literal["instant", "campaign"]
    id: int
    channel: str
    address: str | None  # campaign rows keep none: the recipient's current contact
    recipient_id: int | None
    category: str | None
    notification_id: uuid.UUID | None = None  # instant deliveries only


@dataclass(frozen=True)
class ProviderEvent:
    """A provider's report about one message, in our terms."""

    event_id: str
    type: EventType
    message_id: str
    at: datetime
    reason: str | None = None
    # For bounces: the address is dead (hard bounce, invalid number), so suppress it.
    permanent: bool = False

    def as_payload(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The stored form: enough to apply the event again later, plus what the provider sent."""
        return {
            "type": self.type,
            "message_id": self.message_id,
            "at": self.at.isoformat(),
            "reason": self.reason,
            "permanent": self.permanent,
            "raw": raw,
        }

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> ProviderEvent:
        payload = row.payload
        return cls(
            event_id=row.event_id,
            type=payload["type"],
            message_id=payload["message_id"],
            at=datetime.fromisoformat(payload["at"]),
            reason=payload.get("reason"),
            permanent=bool(payload.get("permanent")),
        )


def _rank(status: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """A status's rank as SQL; NULL for terminal statuses, so no comparison lets them move."""
    return sa.case(RANK, value=status, else_=sa.null())


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def message_id_forms(message_id: str) -> list[str]:
    """Email providers report Message-IDs with or without the angle brackets."""
    bare = message_id.strip().strip("<>")
    return sorted({message_id, bare, f"<{bare}>"})


def _instant_query() -> sa.Select[Any]:
    return (
        sa.select(
            deliveries.c.id,
            deliveries.c.channel,
            deliveries.c.address,
            deliveries.c.notification_id,
            notifications.c.category,
            recipients.c.id.label("recipient_id"),
        )
        .join(notifications, notifications.c.id == deliveries.c.notification_id)
        .outerjoin(recipients, recipients.c.user_id == notifications.c.user_id)
    )


def _campaign_query() -> sa.Select[Any]:
    return (
        sa.select(
            campaign_deliveries.c.id,
            campaign_deliveries.c.channel,
            campaign_deliveries.c.recipient_id,
            campaigns.c.category,
            recipients.c.email,
            recipients.c.phone,
            recipients.c.push_tokens,
        )
        .join(campaign_runs, campaign_runs.c.id == campaign_deliveries.c.run_id)
        .join(campaigns, campaigns.c.id == campaign_runs.c.campaign_id)
        .outerjoin(recipients, recipients.c.id == campaign_deliveries.c.recipient_id)
    )


def _instant_ref(row: sa.Row[Any]) -> DeliveryRef:
    return DeliveryRef(
        kind="instant",
        id=row.id,
        channel=row.channel,
        address=row.address,
        recipient_id=row.recipient_id,
        category=row.category,
        notification_id=row.notification_id,
    )


def _campaign_ref(row: sa.Row[Any]) -> DeliveryRef:
    contact = {"email": row.email, "sms": row.phone, "push": row.push_tokens[-1] if row.push_tokens else None}
    return DeliveryRef(
        kind="campaign",
        id=row.id,
        channel=row.channel,
        address=contact.get(row.channel),
        recipient_id=row.recipient_id,
        category=row.category,
    )


async def find_by_message_id(conn: AsyncConnection, message_id: str) -> DeliveryRef | None:
    """The delivery a provider message id belongs to: an instant one, else a campaign send."""
    forms = message_id_forms(message_id)
    row = (
        await conn.execute(
            _instant_query().where(deliveries.c.provider_message_id.in_(forms)).order_by(deliveries.c.id).limit(1)
        )
    ).first()
    if row is not None:
        return _instant_ref(row)
    row = (
        await conn.execute(
            _campaign_query()
            .where(campaign_deliveries.c.provider_message_id.in_(forms))
            .order_by(campaign_deliveries.c.id)
            .limit(1)
        )
    ).first()
    return _campaign_ref(row) if row is not None else None


async def find_instant(conn: AsyncConnection, notification_id: uuid.UUID, channel: str) -> DeliveryRef | None:
    row = (
        await conn.execute(
            _instant_query().where(deliveries.c.notification_id == notification_id, deliveries.c.channel == channel)
        )
    ).first()
    return _instant_ref(row) if row is not None else None


async def find_campaign(conn: AsyncConnection, run_id: str, recipient_id: int, channel: str) -> DeliveryRef | None:
    row = (
        await conn.execute(
            _campaign_query().where(
                campaign_deliveries.c.run_id == run_id,
                campaign_deliveries.c.recipient_id == recipient_id,
                campaign_deliveries.c.channel == channel,
            )
        )
    ).first()
    return _campaign_ref(row) if row is not None else None


async def advance(
    conn: AsyncConnection, *, target: DeliveryRef, status: str, at: datetime, provider: str | None = None
) -> Outcome:
    """Move a delivery forward to `status` (delivered, opened, clicked, bounced) if that is a
    step forward, and fill the status's timestamp if empty. A click implies an open.
    `provider`: the webhook's provider (campaign sends do not store theirs).

    Runs in the caller's transaction. For instant deliveries the notification is locked
    first and its summary status refreshed after a change, as the send activities do."""
    if status not in TIMESTAMP_COLUMN:
        raise ValueError(f"events cannot set status {status!r}")
    table = campaign_deliveries if target.kind == "campaign" else deliveries
    at_value = sa.literal(_aware(at), sa.DateTime(timezone=True))
    columns = [TIMESTAMP_COLUMN[status], *(["opened_at"] if status == "clicked" else [])]
    stamps: dict[str, Any] = {name: sa.func.coalesce(table.c[name], at_value) for name in columns}
    if target.kind == "instant":
        stamps["updated_at"] = sa.func.now()
        assert target.notification_id is not None
        await lock_notification(conn, target.notification_id)

    moved = await conn.scalar(
        table.update()
        .where(table.c.id == target.id, _rank(table.c.status) < RANK[status])
        .values(status=status, **stamps)
        .returning(table.c.id)
    )
    if moved is not None:
        if target.notification_id is not None:
            await refresh_notification_status(conn, target.notification_id)
        # A click implies an open: its history says so too (an open already stored has the
        # same event id, and the history writer keeps only the first).
        for implied in ("opened", status) if status == "clicked" else (status,):
            await _queue_history(conn, target, implied, _aware(at), provider)
        return Outcome.advanced
    # Not a step forward: the event's own timestamp is still a fact worth keeping.
    filled = await conn.scalar(
        table.update()
        .where(table.c.id == target.id, table.c.status.in_(list(RANK)))
        .values(**stamps)
        .returning(table.c.id)
    )
    if filled is not None:
        return Outcome.stale
    exists = await conn.scalar(sa.select(table.c.id).where(table.c.id == target.id))
    return Outcome.stale if exists is not None else Outcome.unknown


async def _queue_history(
    conn: AsyncConnection, target: DeliveryRef, status: str, at: datetime, provider: str | None
) -> None:
    """The status change as a ClickHouse history row, queued in this transaction for the
    workers to ship (the API process does not write to ClickHouse itself). Delivered,
    opened and clicked carry the time since the provider accepted the message."""
    place = [recipients.c.country, recipients.c.timezone]
    if target.kind == "instant":
        found = (
            await conn.execute(
                sa.select(notifications.c.id, notifications.c.user_id, notifications.c.category,
                          notifications.c.run_id, notifications.c.template_key, notifications.c.template_version,
                          deliveries.c.provider, deliveries.c.sent_at, *place)
                .join(notifications, notifications.c.id == deliveries.c.notification_id)
                .outerjoin(recipients, recipients.c.user_id == notifications.c.user_id)
                .where(deliveries.c.id == target.id)
            )
        ).one()  # fmt: skip
        subject = HistorySubject(str(found.id), found.user_id, found.category, run_id=found.run_id or "",
                                 template_key=found.template_key or "", template_version=found.template_version or 0,
                                 country=found.country or "", timezone=found.timezone or "")  # fmt: skip
        provider = found.provider or ""
    else:
        found = (
            await conn.execute(
                sa.select(campaign_deliveries.c.run_id, campaign_deliveries.c.recipient_id, campaign_runs.c.campaign_id,
                          campaign_deliveries.c.created_at.label("sent_at"), campaigns.c.category,
                          campaigns.c.template_key, campaigns.c.template_version, recipients.c.user_id, *place)
                .join(campaign_runs, campaign_runs.c.id == campaign_deliveries.c.run_id)
                .join(campaigns, campaigns.c.id == campaign_runs.c.campaign_id)
                .outerjoin(recipients, recipients.c.id == campaign_deliveries.c.recipient_id)
                .where(campaign_deliveries.c.id == target.id)
            )
        ).one()  # fmt: skip
        send_id = campaign_send_id(found.campaign_id, found.run_id, found.recipient_id, target.channel)
        subject = HistorySubject(send_id, found.user_id or "", found.category, str(found.campaign_id),
                                 run_id=found.run_id, template_key=found.template_key,
                                 template_version=found.template_version, country=found.country or "",
                                 timezone=found.timezone or "")  # fmt: skip
        provider = provider or ""
    latency = 0
    if status in LATENCY_STATUSES and found.sent_at is not None:
        latency = max(0, round((at - found.sent_at).total_seconds() * 1000))
    await queue_history(conn, [subject.event(target.channel, status, event_time=at, provider=provider,
                                             latency_ms=latency)])  # fmt: skip


async def queue_history(conn: AsyncConnection, events: list[HistoryRow]) -> None:
    """Queue history events in the transaction that records what they say: the workers' outbox
    shipper moves them to ClickHouse in large batches (services.history.ship_outbox), so no
    step waits for a ClickHouse insert, and none is lost if the process dies after the commit.
    A step run twice queues the same events again; ClickHouse drops them by event id."""
    if events:
        await conn.execute(HISTORY_INSERT, {"history_rows": history_rows(events)})


def history_rows(events: list[HistoryRow]) -> list[dict[str, Any]]:
    """HISTORY_INSERT's parameter `history_rows`."""
    return [event.as_json() for event in events]


# queue_history's statement, also a CTE of statements doing more (the instant send's record):
# the rows as one array parameter, so that it is built and compiled once (SQLAlchemy compiles
# a multi-row VALUES anew every time).
HISTORY_INSERT = sa.insert(history_outbox).from_select(
    ["row"], sa.select(sa.func.unnest(sa.bindparam("history_rows", type_=pg.ARRAY(pg.JSONB))))
)


async def apply_event(conn: AsyncConnection, provider: str, event: ProviderEvent) -> Outcome:
    """Apply one provider event to its delivery (no deduplication: see record_event)."""
    if event.type == "ignored":
        return Outcome.ignored
    target = await find_by_message_id(conn, event.message_id)
    if target is None:
        return Outcome.unknown
    source = f"webhook:{provider}"
    if event.type == "complained":
        if target.address:
            await suppress(conn, target.channel, target.address, "complaint", source)
        if target.recipient_id is not None and target.category:
            await opt_out(
                conn,
                recipient_id=target.recipient_id,
                category=target.category,
                channel=target.channel,
                source="complaint",
            )
        await _queue_history(conn, target, "complained", _aware(event.at), provider)
        return Outcome.complaint
    status = "bounced" if event.type in ("bounced", "failed") else event.type
    outcome = await advance(conn, target=target, status=status, at=event.at, provider=provider)
    if status == "bounced" and event.permanent and target.address:
        await suppress(conn, target.channel, target.address, f"bounce: {event.reason or 'hard bounce'}", source)
    return outcome


async def record_event(
    conn: AsyncConnection, provider: str, event: ProviderEvent, raw: dict[str, Any]
) -> Outcome | None:
    """Store the event once per (provider, event id) and apply it, in the caller's
    transaction; None if this event was stored before (a provider's retry)."""
    stored = await conn.scalar(
        insert(webhook_events)
        .values(
            provider=provider,
            event_id=event.event_id,
            type=event.type,
            provider_message_id=event.message_id,
            payload=event.as_payload(raw),
            outcome="received",
        )
        .on_conflict_do_nothing(constraint="uq_webhook_event")
        .returning(webhook_events.c.id)
    )
    if stored is None:
        return None
    outcome = await apply_event(conn, provider, event)
    await conn.execute(webhook_events.update().where(webhook_events.c.id == stored).values(outcome=outcome.value))
    return outcome


async def apply_early_events(conn: AsyncConnection, message_id: str) -> int:
    """Apply the events that arrived before their message was recorded as sent (a fast
    provider can report "delivered" before our transaction that stores its message id
    commits). Call it in the transaction that records the provider message id; returns
    how many events it applied."""
    return await apply_early_events_for(conn, [message_id])


async def apply_early_events_for(conn: AsyncConnection, message_ids: Sequence[str]) -> int:
    """apply_early_events for many messages (a campaign chunk) in one indexed query."""
    forms = early_event_forms(message_ids)
    if not forms:
        return 0
    return await apply_early_rows(conn, (await conn.execute(EARLY_EVENTS, {"message_id_forms": forms})).all())


def early_event_forms(message_ids: Sequence[str]) -> list[str]:
    """EARLY_EVENTS' parameter `message_id_forms`."""
    return sorted({form for message_id in message_ids for form in message_id_forms(message_id)})


# The stored events of some messages (all their id forms) that found no delivery yet, locked.
EARLY_EVENTS = (
    sa.select(webhook_events)
    .where(
        webhook_events.c.provider_message_id == sa.any_(sa.bindparam("message_id_forms", type_=pg.ARRAY(sa.Text))),
        webhook_events.c.outcome == Outcome.unknown.value,
    )
    .order_by(webhook_events.c.id)
    .with_for_update(skip_locked=True)
)


async def apply_early_rows(conn: AsyncConnection, rows: Sequence[sa.Row[Any]]) -> int:
    """Apply the rows EARLY_EVENTS found; returns how many it applied."""
    applied = 0
    for row in rows:
        outcome = await apply_event(conn, row.provider, ProviderEvent.from_row(row))
        if outcome is not Outcome.unknown:
            applied += 1
            await conn.execute(
                webhook_events.update().where(webhook_events.c.id == row.id).values(outcome=outcome.value)
            )
    return applied
