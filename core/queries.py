"""Named SQL shared by the API and the activities."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from core.models import DeadLetter, Delivery, Notification, Recipient

notifications = Notification.__table__  # type: ignore[attr-defined]
deliveries = Delivery.__table__  # type: ignore[attr-defined]
dead_letters = DeadLetter.__table__  # type: ignore[attr-defined]
recipients = Recipient.__table__  # type: ignore[attr-defined]

# A notification's status summarises its channels: still pending while any channel is;
# otherwise the furthest any channel got; failed only when no channel got through.
REFRESH_NOTIFICATION_STATUS = sa.text(
    """
    UPDATE notifications SET updated_at = now(), status = (
        SELECT CASE
            WHEN bool_or(d.status = 'pending') THEN 'pending'
            WHEN bool_or(d.status = 'opened') THEN 'opened'
            WHEN bool_or(d.status = 'delivered') THEN 'delivered'
            WHEN bool_or(d.status = 'sent') THEN 'sent'
            WHEN bool_or(d.status = 'failed') THEN 'failed'
            WHEN bool_or(d.status = 'cancelled') THEN 'cancelled'
            ELSE 'suppressed'
        END
        FROM deliveries d WHERE d.notification_id = :id
    )
    WHERE id = :id
    """
)


async def lock_notification(conn: AsyncConnection, notification_id: uuid.UUID) -> None:
    """Serialise writers of one notification's channels: taken first in each transaction so
    that the status summary, read in a later statement, sees every channel committed."""
    await conn.execute(sa.select(notifications.c.id).where(notifications.c.id == notification_id).with_for_update())


async def refresh_notification_status(conn: AsyncConnection, notification_id: uuid.UUID) -> None:
    await conn.execute(REFRESH_NOTIFICATION_STATUS, {"id": notification_id})
