"""Finding notifications and campaign sends for people (the admin's notifications screen),
and one send's timeline put together from every store that saw it.

Searches are keyset pages, newest first, on indexes (migration 0011): a page costs the
same on the millionth row as on the first, and nothing counts the whole table. The
timeline merges PostgreSQL (the delivery rows' timestamps, dead letters, audit rows) with
the status events of ClickHouse's history.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import NotFound, Unavailable
from core.queries import dead_letters, deliveries, notifications, recipients
from core.templating import Rendered, RenderError, checked_variables, render_for_recipient
from services import templates as template_store
from services.audit import audit_log
from services.campaign_store import campaign_deliveries, campaign_runs, campaigns
from services.history import HistoryReader, campaign_send_id
from services.preferences import stored_address, suppressions
from services.templates import TemplateNotFound

PAGE_SIZE = 50
# History rows shown for one send at most (a send has a handful; a runaway retry loop more).
HISTORY_LIMIT = 500
# History is read from a little before the send was accepted (clocks of workers differ).
HISTORY_SKEW = timedelta(minutes=5)
# The delivery row's timestamps, in the order a send passes them.
DELIVERY_STAMPS = (("queued_at", "queued"), ("sent_at", "sent"), ("delivered_at", "delivered"),
                   ("opened_at", "opened"), ("clicked_at", "clicked"), ("failed_at", "failed"),
                   ("bounced_at", "bounced"))  # fmt: skip
CAMPAIGN_STAMPS = (("delivered_at", "delivered"), ("opened_at", "opened"), ("clicked_at", "clicked"),
                   ("bounced_at", "bounced"))  # fmt: skip
# Final statuses without a timestamp column of their own: the row's last change is when.
UNSTAMPED = ("suppressed", "unreachable", "cancelled")


class InvalidCursor(ValueError):
    field = "cursor"


@dataclass(frozen=True)
class Filters:
    """What the screen searches by; every given criterion must hold. `since` inclusive,
    `until` exclusive, both on when the send was accepted."""

    user_id: str | None = None
    status: str | None = None
    channel: str | None = None
    campaign_id: uuid.UUID | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class Page:
    rows: list[sa.Row[Any]]
    next_cursor: str | None
    # Notifications only: each one's deliveries, by notification id.
    channels: dict[uuid.UUID, list[sa.Row[Any]]]


def _cursor(*parts: object) -> str:
    return base64.urlsafe_b64encode("|".join(str(part) for part in parts).encode()).decode()


def _parts(cursor: str, count: int) -> list[str]:
    try:
        parts = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidCursor("not a cursor of this page") from err
    if len(parts) != count:
        raise InvalidCursor("not a cursor of this page")
    return parts


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


# --- Notifications -------------------------------------------------------------------------------


async def search_notifications(
    conn: AsyncConnection, filters: Filters, *, cursor: str | None = None, limit: int = PAGE_SIZE
) -> Page:
    """Instant notifications, newest first (created_at, id): by user on
    ix_notifications_user_created, by status on ix_notifications_status_created, otherwise
    on ix_notifications_created; the channel is checked on the rows the index yields."""
    n = notifications
    query = sa.select(n).order_by(n.c.created_at.desc(), n.c.id.desc())
    if filters.user_id:
        query = query.where(n.c.user_id == filters.user_id)
    if filters.status:
        query = query.where(n.c.status == filters.status)
    if filters.channel:
        query = query.where(n.c.channels.contains([filters.channel]))
    if filters.since is not None:
        query = query.where(n.c.created_at >= _aware(filters.since))
    if filters.until is not None:
        query = query.where(n.c.created_at < _aware(filters.until))
    if cursor is not None:
        moment, row_id = _parts(cursor, 2)
        try:
            after = (datetime.fromisoformat(moment), uuid.UUID(row_id))
        except ValueError as err:
            raise InvalidCursor("not a cursor of this page") from err
        query = query.where(
            sa.tuple_(n.c.created_at, n.c.id)
            < sa.tuple_(sa.literal(after[0], sa.DateTime(timezone=True)), sa.literal(after[1], n.c.id.type))
        )
    rows = list((await conn.execute(query.limit(limit + 1))).all())
    page = rows[:limit]
    next_cursor = _cursor(page[-1].created_at.isoformat(), page[-1].id) if len(rows) > limit else None
    return Page(page, next_cursor, await channels_of(conn, [row.id for row in page]))


async def channels_of(conn: AsyncConnection, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[sa.Row[Any]]]:
    """The notifications' delivery rows, in one query (uq_delivery_channel)."""
    found: dict[uuid.UUID, list[sa.Row[Any]]] = {notification_id: [] for notification_id in ids}
    if ids:
        query = sa.select(deliveries).where(deliveries.c.notification_id.in_(list(ids)))
        for row in await conn.execute(query.order_by(deliveries.c.notification_id, deliveries.c.channel)):
            found[row.notification_id].append(row)
    return found


@dataclass(frozen=True)
class Moment:
    """One line of a timeline: what happened to which channel, when, and who says so."""

    at: datetime
    channel: str  # "" for the notification as a whole
    status: str
    source: str  # postgresql, clickhouse or audit
    detail: str = ""


@dataclass(frozen=True)
class NotificationDetail:
    row: sa.Row[Any]
    deliveries: list[sa.Row[Any]]
    dead_letters: list[sa.Row[Any]]
    audit: list[sa.Row[Any]]
    recipient: sa.Row[Any] | None
    timeline: list[Moment]
    history_problem: str | None  # why ClickHouse's part is missing, if it is


async def notification(
    conn: AsyncConnection, history: HistoryReader | None, notification_id: uuid.UUID
) -> NotificationDetail:
    """One notification with everything known about it; NotFound if there is none."""
    row = (await conn.execute(sa.select(notifications).where(notifications.c.id == notification_id))).first()
    if row is None:
        raise NotFound(f"no notification {notification_id}")
    channels = (await channels_of(conn, [notification_id]))[notification_id]
    letters = list(
        await conn.execute(
            sa.select(dead_letters).where(dead_letters.c.notification_id == notification_id).order_by(dead_letters.c.id)
        )
    )
    audited = list(
        await conn.execute(
            sa.select(audit_log)
            .where(audit_log.c.entity == "notification", audit_log.c.entity_id == str(notification_id))
            .order_by(audit_log.c.at)
        )
    )
    person = (await conn.execute(sa.select(recipients).where(recipients.c.user_id == row.user_id))).first()
    moments = [Moment(row.created_at, "", "accepted", "postgresql", f"requested by {row.requested_by}")]
    for channel in channels:
        moments.extend(_delivery_moments(channel, DELIVERY_STAMPS, channel.updated_at))
    for letter in letters:
        moments.append(Moment(letter.created_at, letter.channel, "dead-lettered", "postgresql",
                              f"{letter.reason}: {letter.last_error}"))  # fmt: skip
        if letter.resolved_at is not None:
            moments.append(Moment(letter.resolved_at, letter.channel, f"dead letter {letter.status}", "postgresql",
                                  f"by {letter.resolved_by}"))  # fmt: skip
    for entry in audited:
        moments.append(Moment(entry.at, "", entry.action, "audit", f"{entry.actor}: {entry.reason or ''}".strip()))
    found, problem = await _history(history, str(notification_id), row.created_at)
    moments.extend(found)
    return NotificationDetail(row, channels, letters, audited, person, _ordered(moments), problem)


def _delivery_moments(
    row: sa.Row[Any], stamps: Sequence[tuple[str, str]], last_change: datetime | None
) -> list[Moment]:
    mapping = row._mapping
    moments = []
    for column, status in stamps:
        if mapping.get(column) is not None:
            detail = ""
            if status in ("sent", "delivered") and mapping.get("provider"):
                detail = f"via {mapping['provider']}"
            if status in ("failed", "bounced") and mapping.get("error"):
                detail = str(mapping["error"])
            moments.append(Moment(mapping[column], row.channel, status, "postgresql", detail))
    if row.status in UNSTAMPED and last_change is not None:
        moments.append(Moment(last_change, row.channel, row.status, "postgresql", str(mapping.get("error") or "")))
    return moments


async def _history(history: HistoryReader | None, send_id: str, since: datetime) -> tuple[list[Moment], str | None]:
    """ClickHouse's status events of one send; an empty list and why, when it cannot answer.
    The month partitions before `since` are skipped, and the rows of one send are few."""
    if history is None:
        return [], "ClickHouse history is not available to this API process"
    try:
        rows = await history.query(
            "SELECT event_time, channel, status, provider, attempt, error FROM notification_history "
            "WHERE notification_id = {id:UUID} AND event_time >= {since:DateTime64(3, 'UTC')} "
            f"ORDER BY event_time, channel LIMIT {HISTORY_LIMIT}",
            {"id": send_id, "since": _aware(since) - HISTORY_SKEW},
        )
    except Unavailable as err:
        return [], err.detail
    moments = []
    for found in rows:
        at = found["event_time"]
        moment = datetime.fromisoformat(at).replace(tzinfo=UTC) if isinstance(at, str) else _aware(at)
        parts = [
            f"via {found['provider']}" if found.get("provider") else "",
            f"attempt {found['attempt']}" if found.get("attempt") else "",
            str(found.get("error") or ""),
        ]
        moments.append(Moment(moment, str(found["channel"]), str(found["status"]), "clickhouse",
                              ", ".join(part for part in parts if part)))  # fmt: skip
    return moments, None


def _ordered(moments: list[Moment]) -> list[Moment]:
    order = {"postgresql": 0, "audit": 1, "clickhouse": 2}
    return sorted(moments, key=lambda m: (_aware(m.at), m.channel, order.get(m.source, 3)))


# --- Campaign sends ------------------------------------------------------------------------------


def _campaign_send_query() -> sa.Select[Any]:
    cd = campaign_deliveries
    return (
        sa.select(
            cd,
            campaign_runs.c.campaign_id,
            campaigns.c.name.label("campaign_name"),
            campaigns.c.category,
            recipients.c.user_id,
        )
        .join(campaign_runs, campaign_runs.c.id == cd.c.run_id)
        .join(campaigns, campaigns.c.id == campaign_runs.c.campaign_id)
        .outerjoin(recipients, recipients.c.id == cd.c.recipient_id)
    )


async def search_campaign_sends(
    conn: AsyncConnection, filters: Filters, *, cursor: str | None = None, limit: int = PAGE_SIZE
) -> Page:
    """Campaign deliveries, newest first (by id, which grows with time): by campaign on
    ix_campaign_deliveries_run (its runs' ids looked up first), by user on
    ix_campaign_deliveries_recipient, otherwise on the primary key."""
    cd = campaign_deliveries
    query = _campaign_send_query().order_by(cd.c.id.desc())
    if filters.campaign_id is not None:
        runs = sa.select(campaign_runs.c.id).where(campaign_runs.c.campaign_id == filters.campaign_id)
        run_ids = list((await conn.execute(runs)).scalars())
        if not run_ids:
            return Page([], None, {})
        query = query.where(cd.c.run_id.in_(run_ids))
    if filters.user_id:
        owner = await conn.scalar(sa.select(recipients.c.id).where(recipients.c.user_id == filters.user_id))
        if owner is None:
            return Page([], None, {})
        query = query.where(cd.c.recipient_id == owner)
    if filters.status:
        query = query.where(cd.c.status == filters.status)
    if filters.channel:
        query = query.where(cd.c.channel == filters.channel)
    if filters.since is not None:
        query = query.where(cd.c.created_at >= _aware(filters.since))
    if filters.until is not None:
        query = query.where(cd.c.created_at < _aware(filters.until))
    if cursor is not None:
        [last] = _parts(cursor, 1)
        try:
            query = query.where(cd.c.id < int(last))
        except ValueError as err:
            raise InvalidCursor("not a cursor of this page") from err
    rows = list((await conn.execute(query.limit(limit + 1))).all())
    page = rows[:limit]
    return Page(page, _cursor(page[-1].id) if len(rows) > limit else None, {})


@dataclass(frozen=True)
class CampaignSendDetail:
    row: sa.Row[Any]
    run: sa.Row[Any]
    timeline: list[Moment]
    history_problem: str | None


async def campaign_send(conn: AsyncConnection, history: HistoryReader | None, send_id: int) -> CampaignSendDetail:
    """One campaign delivery with its run and timeline; NotFound if there is none."""
    row = (await conn.execute(_campaign_send_query().where(campaign_deliveries.c.id == send_id))).first()
    if row is None:
        raise NotFound(f"no campaign send {send_id}")
    run = (await conn.execute(sa.select(campaign_runs).where(campaign_runs.c.id == row.run_id))).one()
    first = "sent" if row.status not in ("failed", "suppressed", "unreachable") else row.status
    moments = [Moment(row.created_at, row.channel, first, "postgresql", str(row.error or "")),
               *_delivery_moments(row, CAMPAIGN_STAMPS, None)]  # fmt: skip
    key = campaign_send_id(row.campaign_id, row.run_id, row.recipient_id, row.channel)
    found, problem = await _history(history, key, row.created_at)
    return CampaignSendDetail(row, run, _ordered([*moments, *found]), problem)


# --- Content -------------------------------------------------------------------------------------


async def rendered(conn: AsyncConnection, row: sa.Row[Any], person: sa.Row[Any] | None) -> tuple[Rendered | None, str]:
    """A template notification's content per channel, rendered again from its pinned
    version for the recipient as stored now (the sent text is not kept: it may hold
    personal data); or None and why not. A notification without a template has its own
    title and body, the same on every channel."""
    if row.template_key is None or row.template_version is None:
        return None, ""
    if person is None:
        return None, f"recipient {row.user_id!r} no longer exists: the template cannot be rendered for them"
    try:
        content = await template_store.load_pinned(conn, row.template_key, row.template_version)
        variables = checked_variables(content, row.variables or {})
        return render_for_recipient(content, dict(person._mapping), variables, list(row.channels)), ""
    except (RenderError, TemplateNotFound, ValueError) as err:
        return None, f"template {row.template_key} v{row.template_version} does not render: {err}"


# --- Recipients ----------------------------------------------------------------------------------


async def search_recipients(
    conn: AsyncConnection, text: str | None, *, cursor: str | None = None, limit: int = PAGE_SIZE
) -> Page:
    """Recipients newest first (by id); `text` is a user_id, an email or a phone number,
    matched exactly (recipients' unique user_id, ix_recipients_email, ix_recipients_phone)."""
    r = recipients
    query = sa.select(r).order_by(r.c.id.desc())
    if text:
        query = query.where(sa.or_(r.c.user_id == text, r.c.email == text.lower(), r.c.phone == text))
    if cursor is not None:
        [last] = _parts(cursor, 1)
        try:
            query = query.where(r.c.id < int(last))
        except ValueError as err:
            raise InvalidCursor("not a cursor of this page") from err
    rows = list((await conn.execute(query.limit(limit + 1))).all())
    page = rows[:limit]
    return Page(page, _cursor(page[-1].id) if len(rows) > limit else None, {})


def addresses_of(person: sa.Row[Any]) -> list[tuple[str, str]]:
    """(channel, address) of every contact the recipient has, as suppressions store them."""
    found = [("email", person.email), ("sms", person.phone)]
    found += [("push", token) for token in [*person.push_tokens, *person.dead_push_tokens]]
    return [(channel, stored_address(channel, address)) for channel, address in found if address]


async def suppressions_of(conn: AsyncConnection, person: sa.Row[Any]) -> list[sa.Row[Any]]:
    """The suppressions of the recipient's addresses (primary key lookups)."""
    pairs = addresses_of(person)
    if not pairs:
        return []
    match = sa.tuple_(suppressions.c.channel, suppressions.c.address).in_(pairs)
    return list(await conn.execute(sa.select(suppressions).where(match).order_by(suppressions.c.created_at.desc())))
