"""Segments: who a campaign goes to, with a count preview before launch."""

from __future__ import annotations

import csv
import io
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query, Request, status
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from api.deps import AnyRole, ConnectionDep, TemplateEditor
from api.problems import InvalidInput, Problem
from core.models import Channel
from core.queries import recipients
from core.schemas import FilterCount, MembersResult, SegmentCount, SegmentCreate, SegmentOut
from core.segments import compile_filter
from services import campaign_store as store
from services.audit import record_action

router = APIRouter(prefix="/v1/segments", tags=["segments"])

MAX_MEMBERS_PER_UPLOAD = 100_000


def _summary(counted: dict[str, Any]) -> str:
    noun = "recipient" if counted["matches"] == 1 else "recipients"
    parts = [f"matches {counted['matches']:,} {noun}"]
    parts += [f"{count:,} opted out of {channel}" for channel, count in counted["opted_out"].items()]
    return ", ".join(parts)


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


async def _out(conn: AsyncConnection, row: sa.Row[Any], unknown: list[str] | None = None) -> SegmentOut:
    members = None
    if row.kind == "static":
        members = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(store.segment_members)
            .where(store.segment_members.c.segment_id == row.id)
        )
    return SegmentOut(**row._mapping, members=members, unknown_user_ids=unknown or [])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SegmentOut)
async def create_segment(body: SegmentCreate, conn: ConnectionDep, editor: TemplateEditor) -> Any:
    """A filter segment, or a static list of user_ids (unknown ids are reported, not fatal)."""
    exists = await conn.scalar(sa.select(store.segments.c.id).where(store.segments.c.name == body.name))
    if exists is not None:
        raise Problem(409, "Segment exists", f"a segment named {body.name!r} exists already")
    kind = "filter" if body.filter is not None else "static"
    segment_id = await conn.scalar(
        store.segments.insert()
        .values(
            name=body.name,
            description=body.description,
            kind=kind,
            filter=body.filter.model_dump(mode="json", by_alias=True) if body.filter is not None else None,
            created_by=editor.subject,
        )
        .returning(store.segments.c.id)
    )
    unknown: list[str] = []
    if body.user_ids is not None:
        unknown = (await _add_members(conn, segment_id, body.user_ids)).unknown_user_ids
    await record_action(conn, editor, "segment.create", "segment", segment_id,
                        {"name": body.name, "kind": kind, "members": len(body.user_ids or [])})  # fmt: skip
    await conn.commit()
    return await _out(conn, await store.load_segment(conn, segment_id), unknown)


@router.get("", response_model=list[SegmentOut])
async def list_segments(conn: ConnectionDep, _: AnyRole) -> Any:
    rows = (await conn.execute(sa.select(store.segments).order_by(store.segments.c.name))).all()
    return [await _out(conn, row) for row in rows]


@router.get("/{segment_id}", response_model=SegmentOut)
async def get_segment(segment_id: int, conn: ConnectionDep, _: AnyRole) -> Any:
    return await _out(conn, await store.load_segment(conn, segment_id))


@router.post("/{segment_id}/members", response_model=MembersResult)
async def add_members(segment_id: int, request: Request, conn: ConnectionDep, editor: TemplateEditor) -> Any:
    """Add user_ids to a static segment: JSON {"user_ids": [...]} or a CSV upload
    (text/csv, one user_id per line or a `user_id` column)."""
    segment = await store.load_segment(conn, segment_id)
    if segment.kind != "static":
        raise Problem(409, "Not a static segment", "members can be added to static segments only")
    user_ids = await _read_user_ids(request)
    result = await _add_members(conn, segment_id, user_ids)
    await record_action(conn, editor, "segment.add_members", "segment", segment_id, {"given": len(user_ids)})
    await conn.commit()
    return result


async def _read_user_ids(request: Request) -> list[str]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    raw = await request.body()
    if content_type == "text/csv":
        try:
            rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
        except (UnicodeDecodeError, csv.Error) as err:
            raise InvalidInput(["body"], f"not a UTF-8 CSV file: {err}") from err
        column = 0
        if rows and "user_id" in [cell.strip().lower() for cell in rows[0]]:
            column = [cell.strip().lower() for cell in rows[0]].index("user_id")
            rows = rows[1:]
        user_ids = [row[column].strip() for row in rows if len(row) > column and row[column].strip()]
    elif content_type == "application/json":
        try:
            data = await request.json()
        except ValueError as err:
            raise InvalidInput(["body"], "not valid JSON") from err
        given = data.get("user_ids") if isinstance(data, dict) else None
        if not isinstance(given, list) or not all(isinstance(item, str) and item for item in given):
            raise InvalidInput(["user_ids"], "expected a list of user_id strings")
        user_ids = given
    else:
        raise Problem(415, "Unsupported media type", "send application/json or text/csv")
    if not user_ids:
        raise InvalidInput(["user_ids"], "no user_id given")
    if len(user_ids) > MAX_MEMBERS_PER_UPLOAD:
        raise InvalidInput(["user_ids"], f"at most {MAX_MEMBERS_PER_UPLOAD:,} per upload")
    return user_ids


@router.get("/{segment_id}/count", response_model=SegmentCount)
async def count_segment(
    segment_id: int,
    conn: ConnectionDep,
    _: AnyRole,
    channels: Annotated[list[Channel], Query()] = [Channel.email],  # noqa: B006 - FastAPI reads, never mutates
) -> Any:
    """E.g. "matches 12,345 recipients, 340 opted out of email"."""
    segment = await store.load_segment(conn, segment_id)
    counted = await store.count_segment(conn, segment, [channel.value for channel in channels])
    return SegmentCount(**counted, summary=_summary(counted))


@router.post("/count", response_model=SegmentCount)
async def count_filter(body: FilterCount, conn: ConnectionDep, _: AnyRole) -> Any:
    """Count a filter before saving it (the admin's live count)."""
    counted = await store.count_matching(conn, compile_filter(body.filter), [c.value for c in body.channels])
    return SegmentCount(**counted, summary=_summary(counted))
