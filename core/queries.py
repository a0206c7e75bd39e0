"""Named SQL shared by the API and the activities."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.ext.asyncio import AsyncConnection

from core.contracts import NotificationInput
from core.models import DeadLetter, Delivery, Notification, Recipient

notifications = Notification.__table__  # type: ignore[attr-defined]
deliveries = Delivery.__table__  # type: ignore[attr-defined]
dead_letters = DeadLetter.__table__  # type: ignore[attr-defined]
recipients = Recipient.__table__  # type: ignore[attr-defined]


class DecodedTextArray(sa.types.UserDefinedType[list[str]]):
    """A text[] column read as the driver decodes it (asyncpg: a list of str). pg.ARRAY has a
    result processor that copies every value, and one column with a processor is enough for
    SQLAlchemy to run its processor loop over every row of the result."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "TEXT[]"


# What sending to a recipient reads of the row: delivery.decide (contacts, opted-out channels,
# quiet hours, time zone), a template's {{ recipient.* }} (core.templating.RECIPIENT_FIELDS)
# and its locale, the delivery and history rows (id, user_id, country). A campaign batch loads
# thousands of recipients at once: without what no send reads (follows, dead push tokens,
# timestamps), which can be most of a row, and with arrays as decoded.
SEND_COLUMNS = (
    "id", "user_id", "name", "email", "phone", "push_tokens", "locale", "timezone", "country",
    "opted_out_channels", "attributes", "tags", "quiet_hours_start", "quiet_hours_end",
)  # fmt: skip


def select_recipients_to_send() -> sa.Select[Any]:
    """SELECT of the recipients' SEND_COLUMNS (add the WHERE)."""
    return sa.select(*(_as_decoded(recipients.c[name]) for name in SEND_COLUMNS))


def _as_decoded(column: sa.Column[Any]) -> sa.ColumnElement[Any]:
    if isinstance(column.type, pg.ARRAY):
        return sa.type_coerce(column, DecodedTextArray()).label(column.name)
    return column


def notification_row(request: NotificationInput, workflow_id: str) -> dict[str, Any]:
    """The notifications row for a request (written by the API, and again by the workflow
    should the API's transaction have been lost after the start)."""
    return {
        "id": request.notification_id,
        "idempotency_key": request.idempotency_key,
        "request_hash": request.request_hash,
        "requested_by": request.requested_by,
        "user_id": request.user_id,
        "content_id": request.content_id,
        "category": request.category,
        "channels": request.channels,
        "title": request.title,
        "body": request.body,
        "data": request.data,
        "template_key": request.template_key,
        "template_version": request.template_version,
        "variables": request.variables if request.template_key else None,
        "workflow_id": workflow_id,
    }


# A notification's status summarises its channels: still pending while any channel is;
# otherwise the furthest any channel got; failed only when no channel got through
# (none of these, or no channel at all: suppressed).
SUMMARY_ORDER = ("pending", "clicked", "opened", "delivered", "sent", "bounced", "failed", "unreachable", "cancelled")


def notification_status_update(notification_id: uuid.UUID | sa.BindParameter[Any]) -> sa.Update:
    """The UPDATE that refreshes a notification's summary status; a statement of its own, or
    a data-modifying CTE of one that does more (the send's record)."""
    channel = deliveries.alias("d")
    summary = sa.case(
        *((sa.func.bool_or(channel.c.status == sa.literal_column(f"'{status}'")), sa.literal_column(f"'{status}'"))
          for status in SUMMARY_ORDER),
        else_=sa.literal_column("'suppressed'"),
    )  # fmt: skip
    status = sa.select(summary).where(channel.c.notification_id == notification_id).scalar_subquery()
    update: sa.Update = notifications.update()
    return update.where(notifications.c.id == notification_id).values(updated_at=sa.func.now(), status=status)


def notification_lock(notification_id: uuid.UUID | sa.BindParameter[Any]) -> sa.Select[Any]:
    """Serialise writers of one notification's channels: taken first in each transaction so
    that the status summary, read in a later statement, sees every channel committed."""
    return sa.select(notifications.c.id).where(notifications.c.id == notification_id).with_for_update()


# Built once with this parameter: a statement object reused keeps its SQLAlchemy cache key
# (worked out again by walking the statement each time one is built), and building costs too.
NOTIFICATION_ID = sa.bindparam("notification", type_=notifications.c.id.type)
LOCK_NOTIFICATION = notification_lock(NOTIFICATION_ID)
REFRESH_NOTIFICATION_STATUS = notification_status_update(NOTIFICATION_ID)


async def lock_notification(conn: AsyncConnection, notification_id: uuid.UUID) -> None:
    await conn.execute(LOCK_NOTIFICATION, {"notification": notification_id})


async def refresh_notification_status(conn: AsyncConnection, notification_id: uuid.UUID) -> None:
    await conn.execute(REFRESH_NOTIFICATION_STATUS, {"notification": notification_id})
