"""Named queries for segments and campaigns, shared by the API and the activities."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import Invalid
from core.models import Campaign, CampaignDelivery, CampaignRun, Segment, SegmentMember
from core.queries import recipients
from core.segments import SegmentFilter, compile_filter

segments = Segment.__table__  # type: ignore[attr-defined]
segment_members = SegmentMember.__table__  # type: ignore[attr-defined]
campaigns = Campaign.__table__  # type: ignore[attr-defined]
campaign_runs = CampaignRun.__table__  # type: ignore[attr-defined]
campaign_deliveries = CampaignDelivery.__table__  # type: ignore[attr-defined]

CHANNEL_CONTACT = {"email": recipients.c.email, "sms": recipients.c.phone}


class SegmentNotFound(Exception):
    pass


def segment_condition(segment: sa.Row[Any]) -> sa.ColumnElement[bool]:
    """Which recipients belong to a segment, as a WHERE clause over `recipients`."""
    if segment.kind == "static":
        members = sa.select(segment_members.c.recipient_id).where(segment_members.c.segment_id == segment.id)
        member: sa.ColumnElement[bool] = recipients.c.id.in_(members)
        return member
    try:
        stored = SegmentFilter.model_validate({"root": segment.filter})
    except ValidationError as err:
        # Written around the API (SQL, an old release): refused by name, never a 500.
        problems = "; ".join(error["msg"] for error in err.errors())
        raise Invalid.field("segment_id", f"segment {segment.id} holds a filter that is not valid: {problems}") from err
    return compile_filter(stored.root)


def opted_out(channel: str) -> sa.ColumnElement[bool]:
    return sa.literal(channel) == sa.any_(recipients.c.opted_out_channels)


def reachable(channel: str) -> sa.ColumnElement[bool]:
    """Has a contact for the channel and has not opted out of it."""
    contact = (
        sa.func.cardinality(recipients.c.push_tokens) > 0
        if channel == "push"
        else CHANNEL_CONTACT[channel].is_not(None)
    )
    return sa.and_(contact, sa.not_(opted_out(channel)))


async def load_segment(conn: AsyncConnection, segment_id: int) -> sa.Row[Any]:
    row = (await conn.execute(sa.select(segments).where(segments.c.id == segment_id))).first()
    if row is None:
        raise SegmentNotFound(segment_id)
    return row


async def count_segment(conn: AsyncConnection, segment: sa.Row[Any], channels: list[str]) -> dict[str, Any]:
    return await count_matching(conn, segment_condition(segment), channels)


async def count_matching(
    conn: AsyncConnection, condition: sa.ColumnElement[bool], channels: list[str]
) -> dict[str, Any]:
    """How many recipients match, and per channel how many can be reached or opted out."""
    columns: list[sa.ColumnElement[Any]] = [sa.func.count().label("matches")]
    for channel in channels:
        opted = opted_out(channel)
        columns.append(sa.func.count().filter(opted).label(f"opted_out_{channel}"))
        columns.append(sa.func.count().filter(reachable(channel)).label(f"reachable_{channel}"))
    row = (await conn.execute(sa.select(*columns).select_from(recipients).where(condition))).one()
    return {
        "matches": row.matches,
        "opted_out": {channel: row._mapping[f"opted_out_{channel}"] for channel in channels},
        "reachable": {channel: row._mapping[f"reachable_{channel}"] for channel in channels},
    }


async def next_range_end(
    conn: AsyncConnection, segment: sa.Row[Any], after_id: int, limit: int, time_zone: str | None
) -> int | None:
    """The last recipient id of the next keyset page after `after_id` (None when done)."""
    query = sa.select(recipients.c.id).where(segment_condition(segment), recipients.c.id > after_id)
    if time_zone is not None:
        query = query.where(recipients.c.timezone == time_zone)
    page = query.order_by(recipients.c.id).limit(limit).subquery()
    value = await conn.scalar(sa.select(sa.func.max(page.c.id)))
    return int(value) if value is not None else None


async def segment_time_zones(conn: AsyncConnection, segment: sa.Row[Any]) -> list[str]:
    rows = await conn.execute(
        sa.select(recipients.c.timezone).where(segment_condition(segment)).distinct().order_by(recipients.c.timezone)
    )
    return [row.timezone for row in rows]


async def run_counters(conn: AsyncConnection, run_id: str) -> dict[str, int]:
    row = (await conn.execute(sa.select(campaign_runs).where(campaign_runs.c.id == run_id))).first()
    if row is None:
        return {"targeted": 0, "sent": 0, "failed": 0, "suppressed": 0, "unreachable": 0, "skipped_duplicate": 0}
    return {
        name: getattr(row, name)
        for name in ("targeted", "sent", "failed", "suppressed", "unreachable", "skipped_duplicate")
    }


async def set_campaign_status(
    conn: AsyncConnection, campaign_id: uuid.UUID, status: str, reason: str | None = None
) -> None:
    values: dict[str, Any] = {"status": status, "updated_at": sa.func.now()}
    if reason is not None:
        values["status_reason"] = reason
    await conn.execute(campaigns.update().where(campaigns.c.id == campaign_id).values(**values))
