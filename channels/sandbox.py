"""Sandbox push/SMS provider: records what it would have sent in PostgreSQL.

It stands where a real HTTP provider will (same interface), so development and tests
exercise the whole path; the dev stack shows the recorded messages at /dev/outbox.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from channels.base import OutboundMessage, ProviderReceipt
from core.models import SandboxMessage


class SandboxProvider:
    def __init__(self, engine: AsyncEngine, channel: str) -> None:
        self.name = f"sandbox-{channel}"
        self._engine = engine

    async def send(self, message: OutboundMessage) -> ProviderReceipt:
        table = SandboxMessage.__table__  # type: ignore[attr-defined]
        payload = {"title": message.title, "body": message.body, "data": message.data}
        statement = (
            insert(table)
            .values(
                channel=message.channel,
                address=message.address,
                idempotency_key=message.idempotency_key,
                payload=payload,
            )
            .on_conflict_do_nothing(index_elements=["idempotency_key"])
        )
        async with self._engine.begin() as conn:
            await conn.execute(statement)
            row_id = await conn.scalar(sa.select(table.c.id).where(table.c.idempotency_key == message.idempotency_key))
        return ProviderReceipt(provider=self.name, message_id=f"sandbox-{row_id or uuid.uuid4()}")

    async def close(self) -> None:
        return None
