"""Instant notifications: each one is a NotificationWorkflow run."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Header, Query, Request, Response, status
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from activities.notifications import contact_for
from api.deps import AnyRole, ConnectionDep, Sender, SettingsDep, TemporalDep
from api.problems import InvalidInput, Problem
from core.auth import Principal
from core.config import Settings
from core.contracts import NOTIFICATION_WORKFLOW, NotificationInput, RetryOptions, workflow_id_for
from core.models import DeliveryStatus
from core.queries import deliveries, notification_row, notifications, recipients
from core.schemas import DeliveryOut, NotificationCreate, NotificationOut, NotificationPage
from core.templating import coerce_variables
from services import templates as template_store
from services.templates import TemplateNotFound

router = APIRouter(prefix="/v1/notifications", tags=["notifications"])

# Keys are scoped to the caller, so two services choosing the same key never collide.
_KEY_NAMESPACE = uuid.UUID("6f6b1c5e-6d61-7271-7565-650000000001")


def notification_id_for(scoped_key: str) -> uuid.UUID:
    return uuid.uuid5(_KEY_NAMESPACE, scoped_key)


def request_hash(body: NotificationCreate) -> str:
    payload = body.model_dump(mode="json", exclude={"idempotency_key"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _retry_options(settings: Settings) -> RetryOptions:
    return RetryOptions(
        initial_seconds=settings.send_retry_initial_seconds,
        max_seconds=settings.send_retry_max_seconds,
        max_attempts=settings.send_retry_max_attempts,
        timeout_seconds=settings.send_timeout_seconds,
        queue_timeout_seconds=settings.provider_queue_timeout_seconds,
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=NotificationOut,
    responses={200: {"description": "With ?wait=true: the outcome once every channel is sent or failed"}},
)
async def create_notification(
    body: NotificationCreate,
    request: Request,
    response: Response,
    conn: ConnectionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    principal: Sender,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
    wait: Annotated[bool, Query(description="Answer only once the provider accepted or it failed")] = False,
) -> Any:
    """Send a notification now. The same idempotency key always means the same notification."""
    if idempotency_key and body.idempotency_key and idempotency_key != body.idempotency_key:
        raise InvalidInput(["idempotency_key"], "differs from the Idempotency-Key header")
    key = idempotency_key or body.idempotency_key
    notification_id = notification_id_for(f"{principal.subject}:{key}") if key else uuid.uuid4()
    scoped_key = f"{principal.subject}:{key}" if key else str(notification_id)
    digest = request_hash(body)

    # A replay answers with what the first request made, even if the recipient or the
    # template changed since: only a new notification is validated.
    replayed = await _replay(conn, notification_id, digest, key) if key else False
    if not replayed:
        await _check_recipient(conn, body)
        template_version = await _pin_template(conn, body)
        created = await _create(
            conn, temporal, settings, principal, body, notification_id, scoped_key, digest, template_version
        )
        replayed = not created
        if replayed:  # a concurrent request with the same key won the insert
            await conn.rollback()
            await _replay(conn, notification_id, digest, key)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"

    if wait:
        await _wait_for_outcome(temporal, workflow_id_for(notification_id), settings.wait_timeout_seconds)
        response.status_code = status.HTTP_200_OK
    found = await _load(conn, notification_id, _base_url(request))
    assert found is not None
    response.headers["Location"] = found.links["self"]
    return found


@router.get("/{notification_id}", response_model=NotificationOut)
async def get_notification(notification_id: uuid.UUID, request: Request, conn: ConnectionDep, _: AnyRole) -> Any:
    found = await _load(conn, notification_id, _base_url(request))
    if found is None:
        raise Problem(404, "Not found", f"no notification {notification_id}")
    return found


@router.post("/{notification_id}/cancel", response_model=NotificationOut)
async def cancel_notification(
    notification_id: uuid.UUID, request: Request, conn: ConnectionDep, temporal: TemporalDep, _: Sender
) -> Any:
    """Cancel a notification still in progress; channels already sent stay sent."""
    found = await _load(conn, notification_id, _base_url(request))
    if found is None:
        raise Problem(404, "Not found", f"no notification {notification_id}")
    if found.status != "pending":
        raise Problem(409, "Not cancellable", f"notification is already {found.status}")
    handle = temporal.get_workflow_handle(found.workflow_id)
    await handle.cancel()
    await _wait_for_outcome(temporal, found.workflow_id, 10.0)
    return await _load(conn, notification_id, _base_url(request))


@router.get("", response_model=NotificationPage)
async def list_notifications(
    request: Request,
    conn: ConnectionDep,
    _: AnyRole,
    user_id: str | None = None,
    status_: Annotated[DeliveryStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> Any:
    """Newest first, in keyset pages: pass next_cursor back as ?cursor=."""
    query = sa.select(notifications).order_by(notifications.c.created_at.desc(), notifications.c.id.desc())
    if user_id is not None:
        query = query.where(notifications.c.user_id == user_id)
    if status_ is not None:
        query = query.where(notifications.c.status == status_.value)
    if cursor is not None:
        created_at, last_id = _decode_cursor(cursor)
        query = query.where(
            sa.tuple_(notifications.c.created_at, notifications.c.id)
            < sa.tuple_(sa.literal(created_at), sa.literal(last_id))
        )
    rows = (await conn.execute(query.limit(limit + 1))).all()
    page = rows[:limit]
    next_cursor = _encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
    return NotificationPage(items=await _present(conn, page, _base_url(request)), next_cursor=next_cursor)


async def _replay(conn: AsyncConnection, notification_id: uuid.UUID, digest: str, key: str | None) -> bool:
    """True if this key made a notification already; 409 if it was for another request."""
    existing = await conn.scalar(sa.select(notifications.c.request_hash).where(notifications.c.id == notification_id))
    if existing is None:
        return False
    if existing != digest:
        raise Problem(409, "Idempotency key reused", f"key {key!r} was already used with a different request")
    return True


async def _create(
    conn: AsyncConnection,
    temporal: Client,
    settings: Settings,
    principal: Principal,
    body: NotificationCreate,
    notification_id: uuid.UUID,
    scoped_key: str,
    digest: str,
    template_version: int | None,
) -> bool:
    """Insert the row and start its workflow in one transaction; False if the key exists."""
    workflow_id = workflow_id_for(notification_id)
    workflow_input = NotificationInput(
        notification_id=notification_id,
        idempotency_key=scoped_key,
        request_hash=digest,
        requested_by=principal.subject,
        user_id=body.user_id,
        content_id=body.content_id,
        category=body.type,
        channels=[channel.value for channel in body.channels],
        title=body.title,
        body=body.body,
        data=body.data,
        template_key=body.template,
        template_version=template_version,
        variables=body.variables,
        retry=_retry_options(settings),
        priority=body.priority,
    )
    inserted = await conn.scalar(
        insert(notifications)
        .values(notification_row(workflow_input, workflow_id))
        .on_conflict_do_nothing()
        .returning(notifications.c.id)
    )
    if inserted is None:
        return False
    # Start inside the transaction: if the start fails, the row is rolled back and the
    # caller may retry; if the commit fails after the start, the workflow writes the row.
    try:
        handle = await temporal.start_workflow(
            NOTIFICATION_WORKFLOW,
            workflow_input,
            id=workflow_id,
            task_queue=settings.temporal_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        )
    except WorkflowAlreadyStartedError as err:
        # The run exists and is closed but its row was lost (say, a database restore).
        await conn.rollback()
        raise Problem(409, "Already processed", f"notification {notification_id} already ran") from err
    except RPCError as err:
        await conn.rollback()
        raise Problem(503, "Temporal unavailable", f"could not start the notification: {err.message}") from err
    await conn.execute(
        notifications.update().where(notifications.c.id == notification_id).values(run_id=handle.result_run_id)
    )
    await conn.commit()
    return True


async def _check_recipient(conn: AsyncConnection, body: NotificationCreate) -> None:
    """Refuse up front what can never be delivered: unknown user, missing contact."""
    row = (await conn.execute(sa.select(recipients).where(recipients.c.user_id == body.user_id))).first()
    if row is None:
        raise InvalidInput(
            ["user_id"], f"no recipient with user_id {body.user_id!r}; create it with POST /v1/recipients"
        )
    for index, channel in enumerate(body.channels):
        if contact_for(channel.value, row.email, row.phone, row.push_tokens) is None:
            contact = {"email": "email", "sms": "phone", "push": "push_tokens"}[channel.value]
            raise InvalidInput(
                ["channels", index], f"recipient {body.user_id!r} has no {contact} for channel {channel.value!r}"
            )


async def _pin_template(conn: AsyncConnection, body: NotificationCreate) -> int | None:
    """Resolve the template version this notification will use, and check its inputs now."""
    if body.template is None:
        return None
    try:
        record = await template_store.get(conn, body.template, body.template_version)
    except TemplateNotFound as err:
        field = "template_version" if body.template_version else "template"
        raise InvalidInput([field], f"no template {err}") from err
    available = record.content.channels()
    for index, channel in enumerate(body.channels):
        if channel.value not in available:
            raise InvalidInput(["channels", index], f"template {body.template!r} has no {channel.value} part")
    _, problems = coerce_variables(record.content.variables, body.variables)
    if problems:
        errors = [{"field": problem.part, "message": problem.message} for problem in problems]
        raise Problem(422, "Invalid request", "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors)
    return record.version


async def _wait_for_outcome(temporal: Client, workflow_id: str, seconds: float) -> None:
    handle = temporal.get_workflow_handle(workflow_id)
    try:
        await asyncio.wait_for(handle.result(), timeout=seconds)
    except WorkflowFailureError:
        pass  # the failure is recorded on the rows that we read next
    except TimeoutError as err:
        raise Problem(504, "Still in progress", f"not finished within {seconds:g} s; poll the notification") from err


async def _load(conn: AsyncConnection, notification_id: uuid.UUID, base_url: str) -> NotificationOut | None:
    row = (await conn.execute(sa.select(notifications).where(notifications.c.id == notification_id))).first()
    if row is None:
        return None
    [found] = await _present(conn, [row], base_url)
    return found


async def _present(conn: AsyncConnection, rows: Sequence[sa.Row[Any]], base_url: str) -> list[NotificationOut]:
    """Notification rows with their channels: one query for all the rows' deliveries."""
    by_notification: dict[uuid.UUID, list[DeliveryOut]] = {row.id: [] for row in rows}
    if rows:
        channel_rows = await conn.execute(
            sa.select(deliveries)
            .where(deliveries.c.notification_id.in_(list(by_notification)))
            .order_by(deliveries.c.notification_id, deliveries.c.channel)
        )
        for channel in channel_rows:
            by_notification[channel.notification_id].append(
                DeliveryOut.model_validate(channel._mapping, from_attributes=False)
            )
    return [
        NotificationOut(
            id=row.id,
            status=row.status,
            user_id=row.user_id,
            content_id=row.content_id,
            type=row.category,
            title=row.title,
            template=row.template_key,
            template_version=row.template_version,
            channels=by_notification[row.id],
            workflow_id=row.workflow_id,
            run_id=row.run_id,
            created_at=row.created_at,
            updated_at=row.updated_at,
            links={"self": f"{base_url}/v1/notifications/{row.id}"},
        )
        for row in rows
    ]


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _encode_cursor(created_at: datetime, notification_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{notification_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created_at, notification_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(created_at), uuid.UUID(notification_id)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidInput(["cursor"], "not a cursor returned by this API") from err
