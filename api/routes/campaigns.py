"""Campaigns: bulk sends to segments, now, at a time or recurring (FR-002, FR-003)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, status

from api.deps import AnyRole, ConnectionDep, ScheduledSender, SettingsDep, TemplateEditor, TemporalDep
from core.config import Settings
from core.models import CampaignStatus
from core.schemas import CampaignAction, CampaignCancel, CampaignCreate, CampaignOut, ScheduledSend
from services import campaigns as control
from services.campaigns import CampaignRequest

router = APIRouter(prefix="/v1/campaigns", tags=["campaigns"])
aliases = APIRouter(tags=["campaigns"])


async def _describe(conn: Any, temporal: Any, settings: Settings, campaign_id: uuid.UUID) -> CampaignOut:
    return CampaignOut.model_validate(await control.describe(conn, temporal, settings, campaign_id))


class Change:
    """What a request that changes a campaign has at hand; `done` commits the change and
    answers with the campaign as it is now."""

    def __init__(
        self, conn: ConnectionDep, temporal: TemporalDep, settings: SettingsDep, editor: TemplateEditor
    ) -> None:
        self.conn, self.temporal, self.settings, self.editor = conn, temporal, settings, editor

    async def done(self, campaign_id: uuid.UUID) -> CampaignOut:
        await self.conn.commit()
        return await _describe(self.conn, self.temporal, self.settings, campaign_id)


class ScheduledChange(Change):
    """Scheduled sends sit under /v1/notifications, where services may book them too."""

    def __init__(
        self, conn: ConnectionDep, temporal: TemporalDep, settings: SettingsDep, editor: ScheduledSender
    ) -> None:
        super().__init__(conn, temporal, settings, editor)


Editing = Annotated[Change, Depends()]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=CampaignOut)
async def create_campaign(body: CampaignCreate, change: Editing) -> Any:
    """A draft: template version pinned now, nothing sent until launch."""
    request = CampaignRequest.of(body, body.segment_id, body.name)
    return await change.done(await control.create(change.conn, request, change.editor.subject, change.editor))


@router.get("", response_model=list[CampaignOut])
async def list_campaigns(
    conn: ConnectionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    _: AnyRole,
    status_: Annotated[CampaignStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> Any:
    status_value = status_.value if status_ else None
    return await control.list_campaigns(conn, temporal, settings, status_value, limit)


@router.get("/{campaign_id}", response_model=CampaignOut)
async def get_campaign(
    campaign_id: uuid.UUID, conn: ConnectionDep, temporal: TemporalDep, settings: SettingsDep, _: AnyRole
) -> Any:
    """With live progress: counters are exact at any moment (written with each chunk sent)."""
    return await _describe(conn, temporal, settings, campaign_id)


@router.post("/{campaign_id}/launch", response_model=CampaignOut)
async def launch_campaign(campaign_id: uuid.UUID, change: Editing) -> Any:
    await control.launch(change.conn, change.temporal, change.settings, campaign_id, change.editor)
    return await change.done(campaign_id)


@router.post("/{campaign_id}/pause", response_model=CampaignOut)
async def pause_campaign(campaign_id: uuid.UUID, change: Editing, body: CampaignAction | None = None) -> Any:
    await control.pause(change.conn, change.temporal, campaign_id, body.reason if body else None, change.editor)
    return await change.done(campaign_id)


@router.post("/{campaign_id}/resume", response_model=CampaignOut)
async def resume_campaign(campaign_id: uuid.UUID, change: Editing, body: CampaignAction | None = None) -> Any:
    await control.resume(change.conn, change.temporal, campaign_id, body.reason if body else None, change.editor)
    return await change.done(campaign_id)


@router.post("/{campaign_id}/cancel", response_model=CampaignOut)
async def cancel_campaign(campaign_id: uuid.UUID, body: CampaignCancel, change: Editing) -> Any:
    """Stops new batches; batches in flight record what they sent; counters stay exact."""
    await control.cancel(change.conn, change.temporal, campaign_id, body.reason, change.editor)
    return await change.done(campaign_id)


@router.post("/{campaign_id}/trigger", response_model=CampaignOut)
async def trigger_campaign(campaign_id: uuid.UUID, change: Editing) -> Any:
    """Run a recurring campaign once now, outside its schedule."""
    await control.trigger(change.conn, change.temporal, campaign_id, change.editor)
    return await change.done(campaign_id)


@aliases.post("/admin/bulk", status_code=status.HTTP_202_ACCEPTED, response_model=CampaignOut)
async def bulk_send(body: CampaignCreate, change: Editing) -> Any:
    """The spec's bulk endpoint: create a campaign and launch it in one call."""
    request = CampaignRequest.of(body, body.segment_id, body.name)
    return await change.done(
        await control.create_and_launch(change.conn, change.temporal, change.settings, request, change.editor)
    )


@aliases.post("/v1/notifications/scheduled", status_code=status.HTTP_202_ACCEPTED, response_model=CampaignOut)
async def scheduled_send(body: ScheduledSend, change: Annotated[ScheduledChange, Depends()]) -> Any:
    """A one-off ("at") or recurring send of a template to user_ids or a segment."""
    return await change.done(
        await control.schedule_send(change.conn, change.temporal, change.settings, body, change.editor)
    )
