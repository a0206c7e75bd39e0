"""The audit log: who changed what, written in the same transaction as the change."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from core.models import AuditEntry

audit_log = AuditEntry.__table__  # type: ignore[attr-defined]


async def record(
    conn: AsyncConnection,
    *,
    actor: str,
    role: str,
    action: str,
    entity: str,
    entity_id: str | int,
    details: dict[str, Any] | None = None,
) -> None:
    await conn.execute(
        sa.insert(audit_log).values(
            actor=actor, role=role, action=action, entity=entity, entity_id=str(entity_id), details=details or {}
        )
    )
