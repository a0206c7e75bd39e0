"""Suppressed addresses: nothing is sent to them. Providers' refusals and bounce or
complaint webhooks add them; an admin lists them, adds one by hand, or lifts one (for
example after a mailbox was fixed). Every change is audited in the same transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response, status
from pydantic import BaseModel, ConfigDict, StringConstraints

from api.deps import ConnectionDep, permit
from api.routes.audit import ReasonQuery
from core.auth import Principal
from services import suppressions as ops

router = APIRouter(prefix="/v1/suppressions", tags=["suppressions"])

Admin = Annotated[Principal, Depends(permit("suppressions.write"))]
Viewer = Annotated[Principal, Depends(permit("suppressions.read"))]
ChannelName = Literal["email", "push", "sms"]


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
    return await ops.list_suppressions(conn, channel=channel, address=address, limit=limit)


@router.post("", response_model=SuppressionOut, status_code=status.HTTP_201_CREATED)
async def add_suppression(body: SuppressionIn, conn: ConnectionDep, principal: Admin) -> Any:
    """409 if the address is suppressed already."""
    row = await ops.add(conn, principal, body.channel, body.address, body.reason)
    await conn.commit()
    return row


@router.delete("/{channel}/{address}", status_code=status.HTTP_204_NO_CONTENT)
async def lift_suppression(
    channel: ChannelName, address: str, reason: ReasonQuery, conn: ConnectionDep, principal: Admin
) -> Response:
    """Send to the address again."""
    await ops.lift(conn, principal, channel, address, reason)
    await conn.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
