"""The audit log: who changed what, written in the same transaction as the change."""

from __future__ import annotations

from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from core.models import AuditEntry

audit_log = AuditEntry.__table__  # type: ignore[attr-defined]


class Actor(Protocol):
    """Who acts: an API principal, or an admin panel user (email and role)."""

    @property
    def subject(self) -> str: ...

    @property
    def role(self) -> str: ...


async def record_action(
    conn: AsyncConnection,
    actor: Actor | None,
    action: str,
    entity: str,
    entity_id: object,
    details: dict[str, Any] | None = None,
) -> None:
    """Audit what a person did; None (a schedule, a benchmark) is not a person's action."""
    if actor is not None:
        await record(conn, actor=actor.subject, role=str(actor.role), action=action, entity=entity,
                     entity_id=entity_id, details=details)  # fmt: skip


async def record(
    conn: AsyncConnection,
    *,
    actor: str,
    role: str,
    action: str,
    entity: str,
    entity_id: object,
    details: dict[str, Any] | None = None,
) -> None:
    await conn.execute(
        sa.insert(audit_log).values(
            actor=actor, role=role, action=action, entity=entity, entity_id=str(entity_id), details=details or {}
        )
    )
