"""Campaigns: bulk sends to segments, now, at a time or recurring (FR-002, FR-003)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query, status

from api.deps import AnyRole, ConnectionDep, ScheduledSender, SettingsDep, TemplateEditor, TemporalDep
from core.auth import Principal
from core.models import CampaignStatus
from core.queries import recipients
from core.schemas import CampaignAction, CampaignCancel, CampaignCreate, CampaignOut, ScheduledSend
from services import campaign_store as store
from services import campaigns as control

router = APIRouter(prefix="/v1/campaigns", tags=["campaigns"])
aliases = APIRouter(tags=["campaigns"])


def _request(body: CampaignCreate | ScheduledSend, segment_id: int, name: str) -> control.CampaignRequest:
    schedule = body.schedule.model_dump(mode="json")
    schedule["cron"] = body.schedule.cron_expression()
    return control.CampaignRequest(
        name=name,
        category=body.category,
        template=body.template,
        template_version=body.template_version,
        segment_id=segment_id,
        channels=[channel.value for channel in body.channels],
        variables=body.variables,
        schedule=schedule,
        throttle_per_second=getattr(body, "throttle_per_second", None),
    )


async def _describe(conn: Any, temporal: Any, settings: Any, campaign_id: uuid.UUID) -> CampaignOut:
    return CampaignOut.model_validate(await control.describe(conn, temporal, settings, campaign_id))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=CampaignOut)
async def create_campaign(
    body: CampaignCreate, conn: ConnectionDep, temporal: TemporalDep, settings: SettingsDep, editor: TemplateEditor
) -> Any:
    """A draft: template version pinned now, nothing sent until launch."""
    campaign_id = await control.create(conn, _request(body, body.segment_id, body.name), editor.subject, editor)
    await conn.commit()
    return await _describe(conn, temporal, settings, campaign_id)


@router.get("", response_model=list[CampaignOut])
async def list_campaigns(
    conn: ConnectionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    _: AnyRole,
    status_: Annotated[CampaignStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> Any:
    query = sa.select(store.campaigns.c.id).order_by(store.campaigns.c.created_at.desc()).limit(limit)
    if status_:
        query = query.where(store.campaigns.c.status == status_.value)
    ids = (await conn.scalars(query)).all()
    return [await _describe(conn, temporal, settings, campaign_id) for campaign_id in ids]


@router.get("/{campaign_id}", response_model=CampaignOut)
async def get_campaign(
    campaign_id: uuid.UUID, conn: ConnectionDep, temporal: TemporalDep, settings: SettingsDep, _: AnyRole
) -> Any:
    """With live progress: counters are exact at any moment (written with each chunk sent)."""
    return await _describe(conn, temporal, settings, campaign_id)


@router.post("/{campaign_id}/launch", response_model=CampaignOut)
async def launch_campaign(
    campaign_id: uuid.UUID, conn: ConnectionDep, temporal: TemporalDep, settings: SettingsDep, editor: TemplateEditor
) -> Any:
    await control.launch(conn, temporal, settings, campaign_id, editor)
    await conn.commit()
    return await _describe(conn, temporal, settings, campaign_id)


@router.post("/{campaign_id}/pause", response_model=CampaignOut)
async def pause_campaign(
    campaign_id: uuid.UUID,
    conn: ConnectionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    editor: TemplateEditor,
    body: CampaignAction | None = None,
) -> Any:
    await control.pause(conn, temporal, campaign_id, body.reason if body else None, editor)
    await conn.commit()
    return await _describe(conn, temporal, settings, campaign_id)


@router.post("/{campaign_id}/resume", response_model=CampaignOut)
async def resume_campaign(
    campaign_id: uuid.UUID,
    conn: ConnectionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    editor: TemplateEditor,
    body: CampaignAction | None = None,
) -> Any:
    await control.resume(conn, temporal, campaign_id, body.reason if body else None, editor)
    await conn.commit()
    return await _describe(conn, temporal, settings, campaign_id)


@router.post("/{campaign_id}/cancel", response_model=CampaignOut)
async def cancel_campaign(
    campaign_id: uuid.UUID,
    body: CampaignCancel,
    conn: ConnectionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    editor: TemplateEditor,
) -> Any:
    """Stops new batches; batches in flight record what they sent; counters stay exact."""
    await control.cancel(conn, temporal, campaign_id, body.reason, editor)
    await conn.commit()
    return await _describe(conn, temporal, settings, campaign_id)


@router.post("/{campaign_id}/trigger", response_model=CampaignOut)
async def trigger_campaign(
    campaign_id: uuid.UUID, conn: ConnectionDep, temporal: TemporalDep, settings: SettingsDep, editor: TemplateEditor
) -> Any:
    """Run a recurring campaign once now, outside its schedule."""
    await control.trigger(conn, temporal, campaign_id, editor)
    await conn.commit()
    return await _describe(conn, temporal, settings, campaign_id)


@aliases.post("/admin/bulk", status_code=status.HTTP_202_ACCEPTED, response_model=CampaignOut)
async def bulk_send(
    body: CampaignCreate, conn: ConnectionDep, temporal: TemporalDep, settings: SettingsDep, editor: TemplateEditor
) -> Any:
    """The spec's bulk endpoint: create a campaign and launch it in one call."""
    campaign_id = await control.create(conn, _request(body, body.segment_id, body.name), editor.subject, editor)
    await control.launch(conn, temporal, settings, campaign_id, editor)
    await conn.commit()
    return await _describe(conn, temporal, settings, campaign_id)


@aliases.post("/v1/notifications/scheduled", status_code=status.HTTP_202_ACCEPTED, response_model=CampaignOut)
async def scheduled_send(
    body: ScheduledSend, conn: ConnectionDep, temporal: TemporalDep, settings: SettingsDep, editor: ScheduledSender
) -> Any:
    """A one-off ("at") or recurring send of a template to user_ids or a segment."""
    name = body.name or f"scheduled {body.template} {uuid.uuid4().hex[:8]}"
    segment_id = body.segment_id
    if body.user_ids is not None:
        segment_id = await _static_segment(conn, name, body.user_ids, editor)
    assert segment_id is not None
    campaign_id = await control.create(conn, _request(body, segment_id, name), editor.subject, editor)
    await control.launch(conn, temporal, settings, campaign_id, editor)
    await conn.commit()
    return await _describe(conn, temporal, settings, campaign_id)


async def _static_segment(conn: Any, name: str, user_ids: list[str], editor: Principal) -> int:
    segment_id: int = await conn.scalar(
        store.segments.insert()
        .values(name=f"{name} (recipients {uuid.uuid4().hex[:8]})", kind="static", created_by=editor.subject)
        .returning(store.segments.c.id)
    )
    found = (await conn.scalars(sa.select(recipients.c.id).where(recipients.c.user_id.in_(user_ids)))).all()
    if found:
        await conn.execute(
            store.segment_members.insert().values([{"segment_id": segment_id, "recipient_id": rid} for rid in found])
        )
    return segment_id
