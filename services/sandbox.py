"""What the sandbox push/SMS providers (channels.sandbox) recorded instead of sending."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from core.models import SandboxMessage

sandbox_messages = SandboxMessage.__table__  # type: ignore[attr-defined]


async def recent_messages(
    conn: AsyncConnection, *, channel: str | None = None, limit: int = 100
) -> Sequence[RowMapping]:
    """Newest first; every channel unless one is named."""
    query = sa.select(sandbox_messages).order_by(sandbox_messages.c.id.desc()).limit(limit)
    if channel:
        query = query.where(sandbox_messages.c.channel == channel)
    return (await conn.execute(query)).mappings().all()
