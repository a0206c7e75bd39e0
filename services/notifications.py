"""Instant notifications: submit one (idempotently), cancel it, read it.

Whatever the intake (HTTP today; events and the admin later), a notification is
submitted here: the request is checked, its template version pinned, its row written and
its NotificationWorkflow started in one transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from core.auth import Principal
from core.config import Settings
from core.contracts import NOTIFICATION_WORKFLOW, NotificationInput, RetryOptions, workflow_id_for
from core.errors import Conflict, Invalid, NotFound, StillRunning, Unavailable
from core.models import DeliveryStatus
from core.queries import deliveries, notification_row, notifications, recipients
from core.templating import coerce_variables
from services import templates as template_store
from services.audit import Actor, diff, record_action
from services.delivery import CONTACT_FIELD, contact_for
from services.templates import TemplateNotFound

# Keys are scoped to the caller, so two services choosing the same key never collide.
_KEY_NAMESPACE = uuid.UUID("6f6b1c5e-6d61-7271-7565-650000000001")

logger = structlog.get_logger("marquee.notifications")
# One statement, its values bound as parameters: compiled once, not per request.
_INSERT = insert(notifications).on_conflict_do_nothing().returning(notifications.c.id)


@dataclass(frozen=True)
class Submission:
    """A notification as any intake asks for it (the API's NotificationCreate, an event)."""

    user_id: str
    category: str
    channels: list[str]
    content_id: str | None = None
    title: str | None = None
    body: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    template_version: int | None = None
    variables: dict[str, Any] = field(default_factory=dict)
    priority: str = "normal"
    # What the request hash covers: the caller's request as it gave it, so a replay with
    # the same key and body is recognised whatever the intake.
    request: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Submitted:
    notification_id: uuid.UUID
    replayed: bool  # the key was used before: this is the notification it made
    # A new notification's row as accepted (no channel planned yet): what the caller can
    # answer with without reading it back. None for a replay.
    accepted: Page | None = None


@dataclass(frozen=True)
class Page:
    rows: list[sa.Row[Any]]
    channels: dict[uuid.UUID, list[sa.Row[Any]]]
    next_cursor: tuple[datetime, uuid.UUID] | None


def notification_id_for(scoped_key: str) -> uuid.UUID:
    return uuid.uuid5(_KEY_NAMESPACE, scoped_key)


def request_hash(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def retry_options(settings: Settings) -> RetryOptions:
    """The retry settings a notification runs with, carried in its input (a later change of
    settings never changes a running workflow's decisions)."""
    return RetryOptions(
        initial_seconds=settings.send_retry_initial_seconds,
        max_seconds=settings.send_retry_max_seconds,
        max_attempts=settings.send_retry_max_attempts,
        timeout_seconds=settings.send_timeout_seconds,
        failover_after=settings.send_failover_after,
        queue_timeout_seconds=settings.provider_queue_timeout_seconds,
    )


async def submit(
    conn: AsyncConnection,
    temporal: Client,
    settings: Settings,
    principal: Principal,
    submission: Submission,
    idempotency_key: str | None,
) -> Submitted:
    """Accept a notification, or find the one this key made. Commits.

    A replay answers with what the first request made, even if the recipient or the
    template changed since: only a new notification is validated."""
    notification_id = notification_id_for(f"{principal.subject}:{idempotency_key}") if idempotency_key else uuid.uuid4()
    scoped_key = f"{principal.subject}:{idempotency_key}" if idempotency_key else str(notification_id)
    digest = request_hash(submission.request)
    if idempotency_key and await _replay(conn, notification_id, digest, idempotency_key):
        return Submitted(notification_id, replayed=True)
    await _check_recipient(conn, submission)
    template_version = await _pin_template(conn, submission)
    workflow_input = NotificationInput(
        notification_id=notification_id,
        idempotency_key=scoped_key,
        request_hash=digest,
        requested_by=principal.subject,
        user_id=submission.user_id,
        content_id=submission.content_id,
        category=submission.category,
        channels=submission.channels,
        title=submission.title,
        body=submission.body,
        data=submission.data,
        template_key=submission.template,
        template_version=template_version,
        variables=submission.variables,
        retry=retry_options(settings),
        priority=submission.priority,
        send_locally=True,
    )
    accepted = await _create(conn, temporal, settings, workflow_input)
    if accepted is not None:
        return Submitted(notification_id, replayed=False, accepted=Page([accepted], {notification_id: []}, None))
    # A concurrent request with the same key won the insert.
    await conn.rollback()
    await _replay(conn, notification_id, digest, idempotency_key)
    return Submitted(notification_id, replayed=True)


async def start_workflow(
    temporal: Client, settings: Settings, workflow_input: NotificationInput, workflow_id: str | None = None
) -> str:
    """Start a notification's run under its deterministic id (the notification's, or a
    dead letter replay's), once ever: a closed run is not started again. Returns the run id."""
    handle = await temporal.start_workflow(
        NOTIFICATION_WORKFLOW,
        workflow_input,
        id=workflow_id or workflow_id_for(workflow_input.notification_id),
        task_queue=settings.temporal_task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        # Where this process also runs a worker on the queue (`marquee dev`), the server hands
        # the first workflow task straight back: no poll round trip. Elsewhere it has no effect.
        request_eager_start=True,
    )
    return handle.result_run_id or ""


async def cancel(
    conn: AsyncConnection,
    temporal: Client,
    notification_id: uuid.UUID,
    actor: Actor | None = None,
    reason: str | None = None,
) -> None:
    """Cancel a notification still in progress; channels already sent stay sent. Returns
    once the run recorded its cancellation (or after 10 s). The audit row is written in the
    caller's transaction before the run is cancelled: the caller commits it."""
    row = await _row(conn, notification_id)
    if row.status != DeliveryStatus.pending.value:
        raise Conflict(f"notification is already {row.status}", title="Not cancellable")
    await record_action(conn, actor, "notification.cancel", "notification", notification_id,
                        {"workflow_id": row.workflow_id}, reason=reason,
                        changes=diff({"status": row.status}, {"status": "cancelled"}))  # fmt: skip
    await temporal.get_workflow_handle(row.workflow_id).cancel()
    await wait_for_outcome(temporal, row.workflow_id, 10.0)


async def wait_for_outcome(temporal: Client, workflow_id: str, seconds: float) -> None:
    """Until the run ends (its outcome is on the rows); StillRunning after `seconds`."""
    try:
        await asyncio.wait_for(temporal.get_workflow_handle(workflow_id).result(), timeout=seconds)
    except WorkflowFailureError:
        pass  # the failure is recorded on the rows
    except TimeoutError as err:
        raise StillRunning(f"not finished within {seconds:g} s; poll the notification") from err


async def get(conn: AsyncConnection, notification_id: uuid.UUID) -> Page:
    """One notification with its channels (NotFound if there is none)."""
    row = await _row(conn, notification_id)
    return Page([row], await _channels(conn, [row]), None)


async def search(
    conn: AsyncConnection,
    *,
    user_id: str | None = None,
    status: DeliveryStatus | None = None,
    limit: int = 50,
    after: tuple[datetime, uuid.UUID] | None = None,
) -> Page:
    """Newest first, in keyset pages: `after` is the previous page's next_cursor."""
    query = sa.select(notifications).order_by(notifications.c.created_at.desc(), notifications.c.id.desc())
    if user_id is not None:
        query = query.where(notifications.c.user_id == user_id)
    if status is not None:
        query = query.where(notifications.c.status == status.value)
    if after is not None:
        query = query.where(
            sa.tuple_(notifications.c.created_at, notifications.c.id)
            < sa.tuple_(sa.literal(after[0]), sa.literal(after[1]))
        )
    rows = (await conn.execute(query.limit(limit + 1))).all()
    page = rows[:limit]
    cursor = (page[-1].created_at, page[-1].id) if len(rows) > limit else None
    return Page(list(page), await _channels(conn, page), cursor)


async def _row(conn: AsyncConnection, notification_id: uuid.UUID) -> sa.Row[Any]:
    row = (await conn.execute(sa.select(notifications).where(notifications.c.id == notification_id))).first()
    if row is None:
        raise NotFound(f"no notification {notification_id}")
    return row


async def _channels(conn: AsyncConnection, rows: Sequence[sa.Row[Any]]) -> dict[uuid.UUID, list[sa.Row[Any]]]:
    """The rows' deliveries, in one query."""
    found: dict[uuid.UUID, list[sa.Row[Any]]] = {row.id: [] for row in rows}
    if rows:
        for channel in await conn.execute(
            sa.select(deliveries)
            .where(deliveries.c.notification_id.in_(list(found)))
            .order_by(deliveries.c.notification_id, deliveries.c.channel)
        ):
            found[channel.notification_id].append(channel)
    return found


async def _replay(conn: AsyncConnection, notification_id: uuid.UUID, digest: str, key: str | None) -> bool:
    """True if this key made a notification already; Conflict if it was for another request."""
    existing = await conn.scalar(sa.select(notifications.c.request_hash).where(notifications.c.id == notification_id))
    if existing is None:
        return False
    if existing != digest:
        raise Conflict(f"key {key!r} was already used with a different request", title="Idempotency key reused")
    return True


async def _create(
    conn: AsyncConnection, temporal: Client, settings: Settings, workflow_input: NotificationInput
) -> sa.Row[Any] | None:
    """Insert the row and start its workflow in one transaction: the row as committed, or
    None if the key exists."""
    notification_id = workflow_input.notification_id
    inserted = await conn.scalar(_INSERT, notification_row(workflow_input, workflow_id_for(notification_id)))
    if inserted is None:
        return None
    # Start inside the transaction: if the start fails, the row is rolled back and the
    # caller may retry; if the commit fails after the start, the workflow writes the row.
    try:
        run_id = await start_workflow(temporal, settings, workflow_input)
    except WorkflowAlreadyStartedError as err:
        # The run exists and is closed but its row was lost (say, a database restore).
        await conn.rollback()
        raise Conflict(f"notification {notification_id} already ran", title="Already processed") from err
    except RPCError as err:
        await conn.rollback()
        raise Unavailable(f"could not start the notification: {err.message}", title="Temporal unavailable") from err
    accepted = (
        await conn.execute(
            notifications.update()
            .where(notifications.c.id == notification_id)
            .values(run_id=run_id)
            .returning(*notifications.c)
        )
    ).one()
    await conn.commit()
    logger.info("notification accepted", notification_id=str(notification_id), channels=workflow_input.channels,
                workflow_id=workflow_id_for(notification_id), category=workflow_input.category)  # fmt: skip
    return accepted


async def _check_recipient(conn: AsyncConnection, submission: Submission) -> None:
    """Refuse up front what can never be delivered: unknown user, missing contact."""
    row = (await conn.execute(sa.select(recipients).where(recipients.c.user_id == submission.user_id))).first()
    if row is None:
        raise Invalid.field(
            "user_id", f"no recipient with user_id {submission.user_id!r}; create it with POST /v1/recipients"
        )
    for index, channel in enumerate(submission.channels):
        if contact_for(channel, row) is None:
            contact = CONTACT_FIELD[channel]
            raise Invalid.field(
                f"channels.{index}", f"recipient {submission.user_id!r} has no {contact} for channel {channel!r}"
            )


async def _pin_template(conn: AsyncConnection, submission: Submission) -> int | None:
    """Resolve the template version this notification will use, and check its inputs now."""
    if submission.template is None:
        return None
    try:
        record = await template_store.get(conn, submission.template, submission.template_version)
    except TemplateNotFound as err:
        field_name = "template_version" if submission.template_version else "template"
        raise Invalid.field(field_name, f"no template {err}") from err
    available = record.content.channels()
    for index, channel in enumerate(submission.channels):
        if channel not in available:
            raise Invalid.field(f"channels.{index}", f"template {submission.template!r} has no {channel} part")
    _, problems = coerce_variables(record.content.variables, submission.variables)
    if problems:
        raise Invalid([(problem.part, problem.message) for problem in problems])
    return record.version
