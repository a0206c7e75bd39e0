"""Segment operations: create (a filter or a static list), add members, count, describe.

Used by the API, the admin and scheduled sends; the queries they stand on (who belongs to a
segment, how many are reachable) are campaign_store's, shared with the campaign activities.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from core.queries import recipients
from core.schemas import MembersResult, SegmentOut
from core.segments import Filter, compile_filter
from services import campaign_store as store
from services.audit import Actor, record_action


class SegmentExists(Exception):
    """Another segment has this name (HTTP 409)."""


class NotStatic(Exception):
    """Members can be listed in static segments only (HTTP 409)."""


async def create(
    conn: AsyncConnection,
    actor: Actor,
    *,
    name: str,
    description: str = "",
    filter: Filter | None = None,
    user_ids: list[str] | None = None,
    audited: bool = True,
) -> SegmentOut:
    """A filter segment, or a static list of user_ids (unknown ids are reported, not fatal).
    `audited=False`: part of a larger action whose own audit row names it."""
    exists = await conn.scalar(sa.select(store.segments.c.id).where(store.segments.c.name == name))
    if exists is not None:
        raise SegmentExists(name)
    kind = "filter" if filter is not None else "static"
    segment_id = await conn.scalar(
        store.segments.insert()
        .values(
            name=name,
            description=description,
            kind=kind,
            filter=filter.model_dump(mode="json", by_alias=True) if filter is not None else None,
            created_by=actor.subject,
        )
        .returning(store.segments.c.id)
    )
    unknown: list[str] = []
    if user_ids is not None:
        unknown = (await _add_members(conn, segment_id, user_ids)).unknown_user_ids
    await record_action(conn, actor if audited else None, "segment.create", "segment", segment_id,
                        {"name": name, "kind": kind, "members": len(user_ids or [])})  # fmt: skip
    return await describe(conn, await store.load_segment(conn, segment_id), unknown)


async def load_static(conn: AsyncConnection, segment_id: int) -> sa.Row[Any]:
    segment = await store.load_segment(conn, segment_id)
    if segment.kind != "static":
        raise NotStatic(segment_id)
    return segment


async def add_members(conn: AsyncConnection, actor: Actor, segment_id: int, user_ids: list[str]) -> MembersResult:
    await load_static(conn, segment_id)
    result = await _add_members(conn, segment_id, user_ids)
    await record_action(conn, actor, "segment.add_members", "segment", segment_id, {"given": len(user_ids)})
    return result


async def _add_members(conn: AsyncConnection, segment_id: int, user_ids: list[str]) -> MembersResult:
    wanted = list(dict.fromkeys(user_ids))
    found = {
        row.user_id: row.id
        for row in await conn.execute(
            sa.select(recipients.c.user_id, recipients.c.id).where(recipients.c.user_id.in_(wanted))
        )
    }
    added = 0
    if found:
        result = await conn.execute(
            insert(store.segment_members)
            .values([{"segment_id": segment_id, "recipient_id": rid} for rid in found.values()])
            .on_conflict_do_nothing()
            .returning(store.segment_members.c.recipient_id)
        )
        added = len(result.all())
    unknown = [user_id for user_id in wanted if user_id not in found]
    return MembersResult(added=added, already_members=len(found) - added, unknown_user_ids=unknown)


async def describe(conn: AsyncConnection, row: sa.Row[Any], unknown: list[str] | None = None) -> SegmentOut:
    members = None
    if row.kind == "static":
        members = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(store.segment_members)
            .where(store.segment_members.c.segment_id == row.id)
        )
    return SegmentOut(**row._mapping, members=members, unknown_user_ids=unknown or [])


async def get(conn: AsyncConnection, segment_id: int) -> SegmentOut:
    return await describe(conn, await store.load_segment(conn, segment_id))


async def rows_by_name(conn: AsyncConnection) -> list[sa.Row[Any]]:
    return list((await conn.execute(sa.select(store.segments).order_by(store.segments.c.name))).all())


async def list_segments(conn: AsyncConnection) -> list[SegmentOut]:
    return [await describe(conn, row) for row in await rows_by_name(conn)]


async def count(conn: AsyncConnection, segment_id: int, channels: list[str]) -> dict[str, Any]:
    """How many recipients the segment matches, and per channel how many are reachable or opted out."""
    return await store.count_segment(conn, await store.load_segment(conn, segment_id), channels)


async def count_filter(conn: AsyncConnection, filter: Filter, channels: list[str]) -> dict[str, Any]:
    """The same count for a filter not saved yet."""
    return await store.count_matching(conn, compile_filter(filter), channels)
