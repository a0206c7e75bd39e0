"""Instant notifications: each one is a NotificationWorkflow run."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Header, Query, Request, Response, status

from api.deps import AnyRole, ConnectionDep, Sender, SettingsDep, TemporalDep
from api.problems import InvalidInput
from api.routes.audit import WithReason
from core.contracts import workflow_id_for
from core.models import DeliveryStatus
from core.schemas import DeliveryOut, NotificationCreate, NotificationOut, NotificationPage
from services import notifications as service

router = APIRouter(prefix="/v1/notifications", tags=["notifications"])


def submission(body: NotificationCreate) -> service.Submission:
    return service.Submission(
        user_id=body.user_id,
        category=body.type,
        channels=[channel.value for channel in body.channels],
        content_id=body.content_id,
        title=body.title,
        body=body.body,
        data=body.data,
        template=body.template,
        template_version=body.template_version,
        variables=body.variables,
        priority=body.priority,
        request=body.model_dump(mode="json", exclude={"idempotency_key"}),
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
    submitted = await service.submit(conn, temporal, settings, principal, submission(body), key)
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if wait:
        await service.wait_for_outcome(
            temporal, workflow_id_for(submitted.notification_id), settings.wait_timeout_seconds
        )
        response.status_code = status.HTTP_200_OK
    page = submitted.accepted if submitted.accepted is not None and not wait else None
    [found] = _present(page or await service.get(conn, submitted.notification_id), _base_url(request))
    response.headers["Location"] = found.links["self"]
    return found


@router.get("/{notification_id}", response_model=NotificationOut)
async def get_notification(notification_id: uuid.UUID, request: Request, conn: ConnectionDep, _: AnyRole) -> Any:
    [found] = _present(await service.get(conn, notification_id), _base_url(request))
    return found


@router.post("/{notification_id}/cancel", response_model=NotificationOut)
async def cancel_notification(
    notification_id: uuid.UUID,
    body: WithReason,
    request: Request,
    conn: ConnectionDep,
    temporal: TemporalDep,
    principal: Sender,
) -> Any:
    """Cancel a notification still in progress; channels already sent stay sent. Audited
    with its reason."""
    await service.cancel(conn, temporal, notification_id, principal, body.reason)
    await conn.commit()
    [found] = _present(await service.get(conn, notification_id), _base_url(request))
    return found


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
    after = _decode_cursor(cursor) if cursor is not None else None
    page = await service.search(conn, user_id=user_id, status=status_, limit=limit, after=after)
    next_cursor = _encode_cursor(*page.next_cursor) if page.next_cursor else None
    return NotificationPage(items=_present(page, _base_url(request)), next_cursor=next_cursor)


def _present(page: service.Page, base_url: str) -> list[NotificationOut]:
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
            channels=_channels(page.channels[row.id]),
            workflow_id=row.workflow_id,
            run_id=row.run_id,
            created_at=row.created_at,
            updated_at=row.updated_at,
            links={"self": f"{base_url}/v1/notifications/{row.id}"},
        )
        for row in page.rows
    ]


def _channels(rows: Sequence[sa.Row[Any]]) -> list[DeliveryOut]:
    return [DeliveryOut.model_validate(row._mapping, from_attributes=False) for row in rows]


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
