"""The recipient directory: contacts, locale, time zone and opt-outs per user."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, status
from pydantic import BaseModel, Field

from api.deps import AnyRole, ConnectionDep, RecipientWriter, SettingsDep, TemporalDep, permit
from api.routes.audit import ReasonQuery, WithReason
from core.auth import Principal
from core.schemas import (
    BatchResult,
    FollowsPut,
    PreferenceOut,
    PreferencesPut,
    RecipientBatch,
    RecipientFields,
    RecipientOut,
    RecipientUpsert,
    UserId,
)
from services import gdpr
from services import recipients as service

router = APIRouter(prefix="/v1/recipients", tags=["recipients"])

Exporter = Annotated[Principal, Depends(permit("recipients.export"))]
Eraser = Annotated[Principal, Depends(permit("recipients.erase"))]


class ErasureOut(BaseModel):
    erasure_id: int = Field(description="The erasures row: the record that it was done")
    subject_hash: str = Field(description="HMAC-SHA256 of the user_id (docs/gdpr.md); the record holds no user_id")
    counts: dict[str, dict[str, int]] = Field(description="What each store gave up: {store: {what: count}}")


@router.post("", status_code=status.HTTP_200_OK, response_model=RecipientOut)
async def upsert_recipient(body: RecipientUpsert, conn: ConnectionDep, _: RecipientWriter) -> Any:
    """Create a recipient, or replace the one with this user_id."""
    [row] = await service.upsert(conn, [body])
    return row._mapping


@router.put("/{user_id}", response_model=RecipientOut)
async def put_recipient(user_id: UserId, body: RecipientFields, conn: ConnectionDep, _: RecipientWriter) -> Any:
    [row] = await service.upsert(conn, [RecipientUpsert(user_id=user_id, **body.model_dump())])
    return row._mapping


@router.post("/batch", response_model=BatchResult)
async def upsert_recipients(body: RecipientBatch, conn: ConnectionDep, _: RecipientWriter) -> BatchResult:
    """Upsert up to 1,000 recipients in one statement: all of them or, on error, none."""
    return BatchResult(upserted=len(await service.upsert(conn, body.recipients)))


@router.get("/{user_id}", response_model=RecipientOut)
async def get_recipient(user_id: str, conn: ConnectionDep, _: AnyRole) -> Any:
    return (await service.get(conn, user_id))._mapping


@router.get("/{user_id}/preferences", response_model=list[PreferenceOut])
async def get_preferences(user_id: str, conn: ConnectionDep, _: AnyRole) -> Any:
    """The recipient's opt-ins and opt-outs by category and channel ("*" = all)."""
    return [row._mapping for row in await service.preferences_of(conn, user_id)]


@router.put("/{user_id}/preferences", response_model=list[PreferenceOut])
async def put_preferences(user_id: str, body: PreferencesPut, conn: ConnectionDep, _: RecipientWriter) -> Any:
    """Set preferences (others stay as they are). The most specific one wins when sending."""
    await service.set_preferences(conn, user_id, body.preferences)
    return [row._mapping for row in await service.preferences_of(conn, user_id)]


@router.delete("/{user_id}/preferences/{category}/{channel}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_preference(
    user_id: str, category: str, channel: str, conn: ConnectionDep, _: RecipientWriter
) -> Response:
    await service.delete_preference(conn, user_id, category, channel)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{user_id}/follows", response_model=FollowsPut)
async def get_follows(user_id: str, conn: ConnectionDep, _: AnyRole) -> Any:
    return FollowsPut(follows=(await service.get(conn, user_id)).follows)


@router.put("/{user_id}/follows", response_model=FollowsPut)
async def put_follows(user_id: str, body: FollowsPut, conn: ConnectionDep, _: RecipientWriter) -> Any:
    """Replace what the recipient follows, e.g. ["series:42"]: rules reach followers with a
    segment filter such as {"field": "follows", "op": "contains", "value": "series:${series_id}"}."""
    return FollowsPut(follows=await service.set_follows(conn, user_id, body.follows))


@router.delete("/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_recipient(
    user_id: str, reason: ReasonQuery, conn: ConnectionDep, principal: RecipientWriter
) -> Response:
    """Delete the recipient (their notifications stay); audited with the reason."""
    await service.delete(conn, user_id, principal, reason)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{user_id}/export", response_model=dict[str, Any])
async def export_recipient(user_id: str, request: Request, conn: ConnectionDep, principal: Exporter) -> Any:
    """GDPR export: everything held about the person as one JSON document (docs/gdpr.md);
    404 when nothing is. Admins only; audited."""
    return await gdpr.export(conn, request.app.state.history, user_id, actor=principal)


@router.post("/{user_id}/erase", response_model=ErasureOut)
async def erase_recipient(
    user_id: str,
    body: WithReason,
    request: Request,
    conn: ConnectionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    principal: Eraser,
) -> ErasureOut:
    """GDPR erasure: the person removed from PostgreSQL, ClickHouse, Temporal and captured
    dev mail; an erasure record and an audit row (with the reason, which must not name the
    person) are what remains (docs/gdpr.md). Admins only; 404 when nothing is held."""
    report = await gdpr.erase(conn, request.app.state.history, temporal, settings, user_id, principal, body.reason)
    return ErasureOut(erasure_id=report.erasure_id, subject_hash=report.subject_hash, counts=report.counts)
