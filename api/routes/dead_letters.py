"""Dead letters (notifications that failed for good): list, read, replay, discard.

Replays and discards are for admins; admins, campaign managers and analysts may look.
Each action and its audit row are one transaction: an error leaves nothing half-written.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.ext.asyncio import AsyncConnection

from api.deps import ConnectionDep, SettingsDep, TemporalDep, permit
from api.problems import InvalidInput, Problem
from api.routes.audit import REASON_HELP, AuditOut, Reason, WithReason, audit_out
from core.auth import Principal
from core.models import Channel
from core.schemas import INT64_MAX, DateTime, RowId
from services import dead_letters as ops
from services.dead_letters import DeadLetterFilter, DeadLetterStatus, Outcome

Operator = Annotated[Principal, Depends(permit("dead_letters.resolve"))]
Viewer = Annotated[Principal, Depends(permit("dead_letters.read"))]

Ids = Annotated[list[RowId], Field(min_length=1, max_length=ops.MAX_BULK)]


class DeadLetterOut(BaseModel):
    id: int
    notification_id: uuid.UUID
    user_id: str | None
    channel: str
    status: str
    reason: str
    last_error: str
    attempts: int
    replays: int
    resolved_by: str | None
    resolved_at: datetime | None
    created_at: datetime
    updated_at: datetime


class DeadLetterDetail(DeadLetterOut):
    request: dict[str, Any] = Field(description="The original request, as the workflow received it")
    history: list[AuditOut] = Field(description="What operators did to it, oldest first")


class DeadLetterPage(BaseModel):
    items: list[DeadLetterOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end")


class ActionResultOut(BaseModel):
    id: int
    outcome: Outcome
    status: str | None = Field(description="The dead letter's status afterwards; null when not found")
    workflow_id: str | None = Field(default=None, description="Replays: the run that resends")


class BulkResult(BaseModel):
    results: list[ActionResultOut]
    more: bool = Field(default=False, description="By filter: more open dead letters match; send it again")


class Selection(BaseModel):
    """Which dead letters a bulk action is for: ids, or a filter (open ones only, at most 500)."""

    # oneOf: the OpenAPI states "ids or filter, not both" (the validator below enforces it).
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["ids"], "properties": {"ids": {"type": "array"}}},
                {"required": ["filter"], "properties": {"filter": {"type": "object"}}},
            ]
        },
    )

    ids: Ids | None = None
    filter: DeadLetterFilter | None = None

    @model_validator(mode="after")
    def _one(self) -> Selection:
        if (self.ids is None) == (self.filter is None):
            raise ValueError("give either ids or filter")
        return self


class ReasonedSelection(Selection):
    reason: Reason = Field(description=REASON_HELP)


dead_letter_router = APIRouter(prefix="/v1/dead-letters", tags=["dead letters"])


@dead_letter_router.get("", response_model=DeadLetterPage)
async def list_dead_letters(
    conn: ConnectionDep,
    _: Viewer,
    status: DeadLetterStatus | None = None,
    channel: Channel | None = None,
    reason: Annotated[str | None, Query(min_length=1, max_length=200, description="Text in reason or error")] = None,
    user_id: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    notification_id: uuid.UUID | None = None,
    created_after: DateTime | None = None,
    created_before: DateTime | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> Any:
    """Newest first, in keyset pages."""
    try:
        page = await ops.list_dead_letters(
            conn, status=status, channel=channel, reason=reason, user_id=user_id, notification_id=notification_id,
            created_after=created_after, created_before=created_before, limit=limit, cursor=cursor,
        )  # fmt: skip
    except ops.InvalidFilter as err:
        raise InvalidInput([err.field], err.message) from err
    return DeadLetterPage(items=[_out(row) for row in page.rows], next_cursor=page.next_cursor)


@dead_letter_router.get("/{dead_letter_id}", response_model=DeadLetterDetail)
async def get_dead_letter(
    dead_letter_id: Annotated[int, Path(ge=1, le=INT64_MAX)], conn: ConnectionDep, _: Viewer
) -> Any:
    return await _detail(conn, dead_letter_id)


@dead_letter_router.post("/replay", response_model=BulkResult)
async def replay_many(
    body: ReasonedSelection, conn: ConnectionDep, temporal: TemporalDep, settings: SettingsDep, operator: Operator
) -> Any:
    """Replay each open one; the others are reported ("not open", "not found"), never resent."""
    ids, more = await _selected(conn, body)
    results = await _act(conn, ops.replay(conn, temporal, settings, ids, operator, body.reason))
    await conn.commit()
    return BulkResult(results=[_result(result) for result in results], more=more)


@dead_letter_router.post("/discard", response_model=BulkResult)
async def discard_many(body: ReasonedSelection, conn: ConnectionDep, operator: Operator) -> Any:
    ids, more = await _selected(conn, body)
    results = await _act(conn, ops.discard(conn, ids, operator, body.reason))
    await conn.commit()
    return BulkResult(results=[_result(result) for result in results], more=more)


@dead_letter_router.post("/{dead_letter_id}/replay", response_model=ActionResultOut)
async def replay_one(
    dead_letter_id: Annotated[int, Path(ge=1, le=INT64_MAX)],
    body: WithReason,
    conn: ConnectionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    operator: Operator,
) -> Any:
    """Resend its channel once. 409 unless it is open."""
    [result] = await _act(conn, ops.replay(conn, temporal, settings, [dead_letter_id], operator, body.reason))
    _single(result, "replayed")
    await conn.commit()
    return _result(result)


@dead_letter_router.post("/{dead_letter_id}/discard", response_model=ActionResultOut)
async def discard_one(
    dead_letter_id: Annotated[int, Path(ge=1, le=INT64_MAX)], body: WithReason, conn: ConnectionDep, operator: Operator
) -> Any:
    """Close it without resending; the reason is kept in the audit log. 409 unless it is open."""
    [result] = await _act(conn, ops.discard(conn, [dead_letter_id], operator, body.reason))
    _single(result, "discarded")
    await conn.commit()
    return _result(result)


router = APIRouter()
router.include_router(dead_letter_router)


async def _selected(conn: AsyncConnection, body: Selection) -> tuple[list[int], bool]:
    if body.ids is not None:
        return body.ids, False
    assert body.filter is not None
    if body.filter.status not in (None, DeadLetterStatus.open):
        raise InvalidInput(["filter", "status"], "only open dead letters can be acted on; leave it out or use open")
    return await ops.matching_ids(conn, body.filter)


async def _act(conn: AsyncConnection, action: Awaitable[list[ops.ActionResult]]) -> list[ops.ActionResult]:
    """Run a replay or discard; its domain errors become problems (and the transaction,
    never committed, is rolled back when the connection closes)."""
    try:
        results = await action
    except ops.InvalidFilter as err:
        raise InvalidInput([err.field], err.message) from err
    except ops.ReplayImpossible as err:
        raise Problem(409, "Cannot replay", f"{err}; nothing was changed") from err
    except ops.ReplayUnavailable as err:
        await conn.rollback()
        detail = f"{err}; nothing was recorded: retry the request (runs it started already are reused, not repeated)"
        raise Problem(503, "Temporal unavailable", detail) from err
    return results


def _single(result: ops.ActionResult, done: str) -> None:
    if result.outcome is Outcome.not_found:
        raise Problem(404, "Not found", f"no dead letter {result.id}")
    if result.outcome is Outcome.not_open:
        raise Problem(409, "Not open", f"dead letter {result.id} is {result.status}; only open ones can be {done}")


async def _detail(conn: AsyncConnection, dead_letter_id: int) -> DeadLetterDetail:
    row = await ops.get_dead_letter(conn, dead_letter_id)
    if row is None:
        raise Problem(404, "Not found", f"no dead letter {dead_letter_id}")
    history = [audit_out(entry) for entry in await ops.history(conn, dead_letter_id)]
    return DeadLetterDetail(**_out(row).model_dump(), request=row.request, history=history)


def _out(row: Any) -> DeadLetterOut:
    return DeadLetterOut.model_validate(dict(row._mapping))


def _result(result: ops.ActionResult) -> ActionResultOut:
    return ActionResultOut(id=result.id, outcome=result.outcome, status=result.status, workflow_id=result.workflow_id)
