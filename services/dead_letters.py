"""Dead letters an operator can act on: list, replay, discard; and the audit log they leave.

A replay starts a NotificationWorkflow for the dead letter's one channel with
`replay_of` set; the workflow resets that delivery from failed to pending and resends it
under the notification's own idempotency key. What makes a replay send once:

- the dead letter row is locked (`SELECT ... FOR UPDATE`) for the whole transaction, and
  only an `open` one is replayed, so concurrent replays of one row serialise and all but
  the first find it `replayed`;
- the workflow id is derived from the dead letter and its replay number, started with
  USE_EXISTING + REJECT_DUPLICATE, so a retried request reaches the same run instead of a
  second one;
- the status change and the audit row are written in the caller's transaction: all of it
  commits, or none of it does.
"""

from __future__ import annotations

import base64
import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.ext.asyncio import AsyncConnection
from temporalio.client import Client
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from core.config import Settings
from core.contracts import NotificationInput, workflow_id_for
from core.models import Channel
from core.queries import dead_letters, notifications
from services import audit
from services import notifications as notification_service

MAX_BULK = 500
ENTITY = "dead_letter"
# A replay number whose run exists already (its request's transaction was lost) moves on
# to the next one; the delivery row keeps the new run from sending what was sent.
_START_TRIES = 3


class DeadLetterStatus(enum.StrEnum):
    open = "open"  # waiting for an operator (or reopened: a replay failed again)
    replayed = "replayed"
    discarded = "discarded"


class Outcome(enum.StrEnum):
    replayed = "replayed"
    discarded = "discarded"
    not_open = "not open"
    not_found = "not found"


Actor = audit.Actor


class InvalidFilter(Exception):
    """A filter or cursor that cannot be used; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ReplayUnavailable(Exception):
    """Temporal refused or could not be reached: nothing is committed, retry later."""


class ReplayImpossible(Exception):
    """A dead letter that cannot be replayed as stored; nothing of the request is done."""

    def __init__(self, dead_letter_id: int, message: str) -> None:
        super().__init__(f"dead letter {dead_letter_id} cannot be replayed: {message}")
        self.dead_letter_id = dead_letter_id


class DeadLetterFilter(BaseModel):
    """Which dead letters: every given criterion must hold."""

    model_config = ConfigDict(extra="forbid")

    status: DeadLetterStatus | None = None
    channel: Channel | None = None
    reason: str | None = Field(
        default=None, min_length=1, max_length=200, description="Text found in the reason or the last error"
    )
    created_after: datetime | None = None
    created_before: datetime | None = None
    user_id: str | None = Field(default=None, min_length=1, max_length=128)
    notification_id: uuid.UUID | None = None

    @field_validator("created_after", "created_before")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        # A time without an offset is taken as UTC rather than the server's zone.
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@dataclass(frozen=True)
class ActionResult:
    id: int
    outcome: Outcome
    status: str | None  # the dead letter's status afterwards; None when not found
    workflow_id: str | None = None  # replays: the run that resends


@dataclass(frozen=True)
class Page:
    rows: list[sa.Row[Any]]
    next_cursor: str | None


# --- Reading ------------------------------------------------------------------------------


def _columns() -> list[Any]:
    """A dead letter's columns with its recipient's user_id, taken from the stored request."""
    return [*dead_letters.c, dead_letters.c.request["user_id"].astext.label("user_id")]


def conditions(filters: DeadLetterFilter) -> list[sa.ColumnElement[bool]]:
    where: list[sa.ColumnElement[bool]] = []
    if filters.status is not None:
        where.append(dead_letters.c.status == filters.status.value)
    if filters.channel is not None:
        where.append(dead_letters.c.channel == filters.channel.value)
    if filters.reason:
        pattern = f"%{_escape_like(filters.reason)}%"
        where.append(
            sa.or_(
                dead_letters.c.reason.ilike(pattern, escape="\\"), dead_letters.c.last_error.ilike(pattern, escape="\\")
            )
        )
    if filters.created_after is not None:
        where.append(dead_letters.c.created_at >= filters.created_after)
    if filters.created_before is not None:
        where.append(dead_letters.c.created_at < filters.created_before)
    if filters.user_id is not None:
        # Through notifications' (user_id, created_at) index rather than the JSON.
        owned = sa.select(notifications.c.id).where(notifications.c.user_id == filters.user_id)
        where.append(dead_letters.c.notification_id.in_(owned))
    if filters.notification_id is not None:
        where.append(dead_letters.c.notification_id == filters.notification_id)
    return where


async def list_dead_letters(
    conn: AsyncConnection,
    *,
    status: DeadLetterStatus | str | None = None,
    channel: Channel | str | None = None,
    reason: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    user_id: str | None = None,
    notification_id: uuid.UUID | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page:
    """Newest first, in keyset pages: pass `next_cursor` back as `cursor`."""
    filters = DeadLetterFilter.model_validate(
        {"status": status, "channel": channel, "reason": reason, "created_after": created_after,
         "created_before": created_before, "user_id": user_id, "notification_id": notification_id}
    )  # fmt: skip
    query = sa.select(*_columns()).where(*conditions(filters))
    if cursor is not None:
        created_at, last_id = decode_cursor(cursor)
        query = query.where(
            sa.tuple_(dead_letters.c.created_at, dead_letters.c.id)
            < sa.tuple_(sa.literal(created_at, sa.DateTime(timezone=True)), sa.literal(last_id, sa.BigInteger))
        )
    query = query.order_by(dead_letters.c.created_at.desc(), dead_letters.c.id.desc()).limit(limit + 1)
    rows = list((await conn.execute(query)).all())
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
    return Page(page, next_cursor)


async def get_dead_letter(conn: AsyncConnection, dead_letter_id: int) -> sa.Row[Any] | None:
    return (await conn.execute(sa.select(*_columns()).where(dead_letters.c.id == dead_letter_id))).first()


async def matching_ids(
    conn: AsyncConnection, filters: DeadLetterFilter, limit: int = MAX_BULK
) -> tuple[list[int], bool]:
    """The ids of open dead letters matching `filters`, oldest first, at most `limit`; and
    whether more match (a bulk action by filter works in slices of `limit`)."""
    query = (
        sa.select(dead_letters.c.id)
        .where(*conditions(filters), dead_letters.c.status == DeadLetterStatus.open.value)
        .order_by(dead_letters.c.id)
        .limit(limit + 1)
    )
    ids = list((await conn.scalars(query)).all())
    return ids[:limit], len(ids) > limit


# --- Acting -------------------------------------------------------------------------------


async def _lock(conn: AsyncConnection, ids: Sequence[int]) -> dict[int, sa.Row[Any]]:
    """Lock the rows in id order (two bulk actions never deadlock) until the transaction ends."""
    query = sa.select(dead_letters).where(dead_letters.c.id.in_(sorted(set(ids)))).order_by(dead_letters.c.id)
    return {row.id: row for row in await conn.execute(query.with_for_update())}


def _unique(ids: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(ids))


def replay_workflow_id(notification_id: uuid.UUID, dead_letter_id: int, replay: int) -> str:
    return f"{workflow_id_for(notification_id)}-replay-{dead_letter_id}-{replay}"


async def replay(
    conn: AsyncConnection, temporal: Client, settings: Settings, ids: Sequence[int], actor: Actor, reason: str
) -> list[ActionResult]:
    """Resend each open dead letter's channel, once; one result per id, in the order given.
    The reason (required) goes to the audit log.

    Runs in the caller's transaction and leaves it uncommitted. On ReplayUnavailable the
    caller rolls back: runs started before the error are found again by a retry (same ids)."""
    reason = audit.required_reason(reason)
    if len(_unique(ids)) > MAX_BULK:
        raise InvalidFilter("ids", f"at most {MAX_BULK} at once")
    locked = await _lock(conn, ids)
    # Every input is built before the first start: a bad one stops the whole request
    # before anything is sent.
    inputs = {row.id: _replay_input(row) for row in locked.values() if row.status == DeadLetterStatus.open.value}
    results: list[ActionResult] = []
    for dead_letter_id in _unique(ids):
        row = locked.get(dead_letter_id)
        if row is None:
            results.append(ActionResult(dead_letter_id, Outcome.not_found, None))
        elif row.status != DeadLetterStatus.open.value:
            results.append(ActionResult(dead_letter_id, Outcome.not_open, row.status))
        else:
            results.append(await _replay_one(conn, temporal, settings, row, inputs[row.id], actor, reason))
    return results


def _replay_input(row: sa.Row[Any]) -> NotificationInput:
    """The original request, narrowed to the dead letter's channel and marked as its replay."""
    try:
        return NotificationInput.model_validate({**row.request, "channels": [row.channel], "replay_of": row.id})
    except ValidationError as err:
        raise ReplayImpossible(row.id, f"its stored request is not a valid notification: {err}") from err


async def _replay_one(
    conn: AsyncConnection,
    temporal: Client,
    settings: Settings,
    row: sa.Row[Any],
    request: NotificationInput,
    actor: Actor,
    reason: str,
) -> ActionResult:
    number = row.replays + 1
    for _ in range(_START_TRIES):
        workflow_id = replay_workflow_id(row.notification_id, row.id, number)
        try:
            run_id = await notification_service.start_workflow(temporal, settings, request, workflow_id)
            break
        except WorkflowAlreadyStartedError:
            number += 1  # that run finished, but the request that started it was not committed
        except RPCError as err:
            raise ReplayUnavailable(f"could not start the replay of dead letter {row.id}: {err.message}") from err
    else:
        raise ReplayUnavailable(f"replay runs of dead letter {row.id} exist up to number {number - 1}")
    details = {"workflow_id": workflow_id, "run_id": run_id, "replay": number}
    await _resolve(conn, row, DeadLetterStatus.replayed, actor, reason, details, replays=number)
    return ActionResult(row.id, Outcome.replayed, DeadLetterStatus.replayed.value, workflow_id)


async def _resolve(
    conn: AsyncConnection,
    row: sa.Row[Any],
    status: DeadLetterStatus,
    actor: Actor,
    reason: str,
    details: dict[str, Any],
    **values: Any,
) -> None:
    """Close a dead letter and audit it, in the caller's transaction."""
    await conn.execute(
        dead_letters.update()
        .where(dead_letters.c.id == row.id)
        .values(status=status.value, resolved_by=actor.subject, resolved_at=sa.func.now(),
                updated_at=sa.func.now(), **values)
    )  # fmt: skip
    action = {DeadLetterStatus.replayed: "dead_letter.replay", DeadLetterStatus.discarded: "dead_letter.discard"}
    await audit.record(
        conn,
        actor=actor.subject,
        role=str(actor.role),
        action=action[status],
        entity=ENTITY,
        entity_id=row.id,
        details={**details, "notification_id": str(row.notification_id), "channel": row.channel},
        reason=reason,
        changes=audit.diff({"status": row.status, "replays": row.replays},
                           {"status": status.value, "replays": values.get("replays", row.replays)}),
    )  # fmt: skip


async def discard(conn: AsyncConnection, ids: Sequence[int], actor: Actor, reason: str) -> list[ActionResult]:
    """Close open dead letters without resending; the reason goes to the audit log."""
    reason = audit.required_reason(reason)
    if len(_unique(ids)) > MAX_BULK:
        raise InvalidFilter("ids", f"at most {MAX_BULK} at once")
    locked = await _lock(conn, ids)
    results: list[ActionResult] = []
    for dead_letter_id in _unique(ids):
        row = locked.get(dead_letter_id)
        if row is None:
            results.append(ActionResult(dead_letter_id, Outcome.not_found, None))
            continue
        if row.status != DeadLetterStatus.open.value:
            results.append(ActionResult(dead_letter_id, Outcome.not_open, row.status))
            continue
        await _resolve(conn, row, DeadLetterStatus.discarded, actor, reason, {})
        results.append(ActionResult(row.id, Outcome.discarded, DeadLetterStatus.discarded.value))
    return results


# --- The audit log ------------------------------------------------------------------------


async def audit_entries(
    conn: AsyncConnection,
    *,
    entity: str | None = None,
    entity_id: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page:
    """Audit rows newest first, in keyset pages (services.audit.search)."""
    filters = audit.AuditFilter(actor=actor, action=action, entity=entity, entity_id=entity_id, since=since,
                                until=until)  # fmt: skip
    try:
        page = await audit.search(conn, filters, limit=limit, cursor=cursor)
    except audit.InvalidFilter as err:
        raise InvalidFilter(err.field, err.message) from err
    return Page(page.rows, page.next_cursor)


async def history(conn: AsyncConnection, dead_letter_id: int) -> list[sa.Row[Any]]:
    """What was done to one dead letter, oldest first."""
    log = audit.audit_log
    query = (
        sa.select(log)
        .where(log.c.entity == ENTITY, log.c.entity_id == str(dead_letter_id))
        .order_by(log.c.at, log.c.id)
    )
    return list((await conn.execute(query)).all())


# --- Cursors ------------------------------------------------------------------------------


def encode_cursor(moment: datetime, row_id: int) -> str:
    return base64.urlsafe_b64encode(f"{moment.isoformat()}|{row_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        moment, row_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(moment), int(row_id)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidFilter("cursor", "not a cursor returned by this API") from err


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
