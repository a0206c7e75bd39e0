"""Suppressed addresses: nothing is sent to them. Providers' refusals and bounce or
complaint webhooks add them; an admin lists them, adds one by hand, or lifts one (for
example after a mailbox was fixed). Every change is audited in the same transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Response, status
from pydantic import BaseModel, ConfigDict, StringConstraints
from sqlalchemy.dialects.postgresql import insert

from api.deps import ConnectionDep, require
from api.problems import Problem
from core.auth import Principal, Role
from services import audit
from services.preferences import stored_address, suppressions

router = APIRouter(prefix="/v1/suppressions", tags=["suppressions"])

Admin = Annotated[Principal, Depends(require())]  # admin only
Viewer = Annotated[Principal, Depends(require(Role.campaign_manager, Role.analyst))]
ChannelName = Literal["email", "push", "sms"]
ENTITY = "suppression"


class SuppressionOut(BaseModel):
    channel: str
    address: str
    reason: str
    source: str
    created_at: datetime


class SuppressionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channel: ChannelName
    address: Annotated[str, StringConstraints(min_length=1, max_length=4096, strip_whitespace=True)]
    reason: Annotated[str, StringConstraints(min_length=3, max_length=500, strip_whitespace=True)]


@router.get("", response_model=list[SuppressionOut])
async def list_suppressions(
    conn: ConnectionDep,
    _: Viewer,
    channel: ChannelName | None = None,
    address: Annotated[str | None, Query(description="part of the address")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Any:
    """Newest first."""
    query = sa.select(suppressions).order_by(suppressions.c.created_at.desc()).limit(limit)
    if channel is not None:
        query = query.where(suppressions.c.channel == channel)
    if address:
        query = query.where(suppressions.c.address.icontains(address, autoescape=True))
    return [row._mapping for row in await conn.execute(query)]


@router.post("", response_model=SuppressionOut, status_code=status.HTTP_201_CREATED)
async def add_suppression(body: SuppressionIn, conn: ConnectionDep, principal: Admin) -> Any:
    address = stored_address(body.channel, body.address)
    row = (
        await conn.execute(
            insert(suppressions)
            .values(channel=body.channel, address=address, reason=body.reason, source=f"admin:{principal.subject}")
            .on_conflict_do_nothing()
            .returning(*suppressions.c)
        )
    ).first()
    if row is None:
        raise Problem(409, "Already suppressed", f"{body.channel} address {address!r} is suppressed already")
    await audit.record(
        conn,
        actor=principal.subject,
        role=principal.role.value,
        action="suppression.add",
        entity=ENTITY,
        entity_id=f"{body.channel}:{address}",
        details={"reason": body.reason},
    )
    await conn.commit()
    return row._mapping


@router.delete("/{channel}/{address}", status_code=status.HTTP_204_NO_CONTENT)
async def lift_suppression(channel: ChannelName, address: str, conn: ConnectionDep, principal: Admin) -> Response:
    """Send to the address again."""
    address = stored_address(channel, address)
    lifted = (
        await conn.execute(
            sa.delete(suppressions)
            .where(suppressions.c.channel == channel, suppressions.c.address == address)
            .returning(suppressions.c.reason, suppressions.c.source)
        )
    ).first()
    if lifted is None:
        raise Problem(404, "Not found", f"{channel} address {address!r} is not suppressed")
    await audit.record(
        conn,
        actor=principal.subject,
        role=principal.role.value,
        action="suppression.lift",
        entity=ENTITY,
        entity_id=f"{channel}:{address}",
        details={"reason": lifted.reason, "source": lifted.source},
    )
    await conn.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
