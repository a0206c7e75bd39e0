"""Segments: who a campaign goes to, with a count preview before launch."""

from __future__ import annotations

import csv
import io
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, status

from api.deps import AnyRole, ConnectionDep, TemplateEditor
from api.problems import InvalidInput, Problem
from core.models import Channel
from core.schemas import INT64_MAX, FilterCount, MembersResult, SegmentCount, SegmentCreate, SegmentOut
from services import segments

router = APIRouter(prefix="/v1/segments", tags=["segments"])

MAX_MEMBERS_PER_UPLOAD = 100_000


def _summary(counted: dict[str, Any]) -> str:
    noun = "recipient" if counted["matches"] == 1 else "recipients"
    parts = [f"matches {counted['matches']:,} {noun}"]
    parts += [f"{count:,} opted out of {channel}" for channel, count in counted["opted_out"].items()]
    return ", ".join(parts)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SegmentOut)
async def create_segment(body: SegmentCreate, conn: ConnectionDep, editor: TemplateEditor) -> Any:
    """A filter segment, or a static list of user_ids (unknown ids are reported, not fatal)."""
    created = await segments.create(conn, editor, name=body.name, description=body.description, filter=body.filter,
                                    user_ids=body.user_ids)  # fmt: skip
    await conn.commit()
    return created


@router.get("", response_model=list[SegmentOut])
async def list_segments(conn: ConnectionDep, _: AnyRole) -> Any:
    return await segments.list_segments(conn)


@router.get("/{segment_id}", response_model=SegmentOut)
async def get_segment(segment_id: Annotated[int, Path(ge=1, le=INT64_MAX)], conn: ConnectionDep, _: AnyRole) -> Any:
    return await segments.get(conn, segment_id)


# The route reads its body itself (JSON or CSV): the OpenAPI is told what it takes.
MEMBERS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["user_ids"],
                    "properties": {
                        "user_ids": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_MEMBERS_PER_UPLOAD,
                            "items": {"type": "string", "minLength": 1},
                        }
                    },
                }
            },
            "text/csv": {"schema": {"type": "string", "description": "one user_id per line, or a user_id column"}},
        },
    }
}


@router.post(
    "/{segment_id}/members",
    response_model=MembersResult,
    openapi_extra=MEMBERS_BODY,
    responses={415: {"description": "Neither application/json nor text/csv"}},
)
async def add_members(
    segment_id: Annotated[int, Path(ge=1, le=INT64_MAX)], request: Request, conn: ConnectionDep, editor: TemplateEditor
) -> Any:
    """Add user_ids to a static segment: JSON {"user_ids": [...]} or a CSV upload
    (text/csv, one user_id per line or a `user_id` column)."""
    await segments.load_static(conn, segment_id)  # a missing or filter segment is refused before the body is read
    result = await segments.add_members(conn, editor, segment_id, await _read_user_ids(request))
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
    segment_id: Annotated[int, Path(ge=1, le=INT64_MAX)],
    conn: ConnectionDep,
    _: AnyRole,
    channels: Annotated[list[Channel], Query()] = [Channel.email],  # noqa: B006 - FastAPI reads, never mutates
) -> Any:
    """E.g. "matches 12,345 recipients, 340 opted out of email"."""
    # A channel given twice is counted once (repeated, it made an ambiguous query: a 500).
    counted = await segments.count(conn, segment_id, [channel.value for channel in dict.fromkeys(channels)])
    return SegmentCount(**counted, summary=_summary(counted))


@router.post("/count", response_model=SegmentCount)
async def count_filter(body: FilterCount, conn: ConnectionDep, _: AnyRole) -> Any:
    """Count a filter before saving it (the admin's live count)."""
    counted = await segments.count_filter(conn, body.filter, [c.value for c in body.channels])
    return SegmentCount(**counted, summary=_summary(counted))
