"""Suppressed addresses by hand: list, add, lift, each change audited in its transaction.

Providers' refusals and bounce or complaint webhooks add suppressions too (preferences.suppress);
these are the operations a person does, from the API or the admin panel. The caller commits.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import Conflict, NotFound
from services import audit
from services.audit import Actor
from services.preferences import stored_address, suppress, suppressions

ENTITY = "suppression"


def _entity_id(channel: str, address: str) -> str:
    return f"{channel}:{address}"


async def list_suppressions(
    conn: AsyncConnection, *, channel: str | None = None, address: str | None = None, limit: int = 100
) -> Sequence[RowMapping]:
    """Newest first; `address` matches part of the address, in any case."""
    query = sa.select(suppressions).order_by(suppressions.c.created_at.desc()).limit(limit)
    if channel is not None:
        query = query.where(suppressions.c.channel == channel)
    if address:
        query = query.where(suppressions.c.address.icontains(address, autoescape=True))
    return (await conn.execute(query)).mappings().all()


async def add(conn: AsyncConnection, actor: Actor, channel: str, address: str, reason: str) -> RowMapping:
    """Suppress an address by hand; Conflict if it is suppressed already."""
    address = stored_address(channel, address)
    if not await suppress(conn, channel, address, reason, source=f"admin:{actor.subject}"):
        raise Conflict(f"{channel} address {address!r} is suppressed already", title="Already suppressed")
    await audit.record_action(
        conn,
        actor,
        "suppression.add",
        ENTITY,
        _entity_id(channel, address),
        {"reason": reason},
        reason=reason,
        changes=audit.diff({"suppressed": False}, {"suppressed": True}),
    )
    row = await conn.execute(
        sa.select(suppressions).where(suppressions.c.channel == channel, suppressions.c.address == address)
    )
    return row.mappings().one()


async def lift(conn: AsyncConnection, actor: Actor, channel: str, address: str, reason: str | None = None) -> None:
    """Send to the address again; NotFound if it is not suppressed."""
    address = stored_address(channel, address)
    lifted = (
        await conn.execute(
            sa.delete(suppressions)
            .where(suppressions.c.channel == channel, suppressions.c.address == address)
            .returning(suppressions.c.reason, suppressions.c.source)
        )
    ).first()
    if lifted is None:
        raise NotFound(f"{channel} address {address!r} is not suppressed")
    details = {"reason": lifted.reason, "source": lifted.source}
    await audit.record_action(
        conn,
        actor,
        "suppression.lift",
        ENTITY,
        _entity_id(channel, address),
        details,
        reason=reason,
        changes=audit.diff({"suppressed": True}, {"suppressed": False}),
    )
