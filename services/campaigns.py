"""Campaign lifecycle: create, launch, pause, resume, cancel, trigger, describe, preview.

Used by the API and the admin alike. One-off campaigns are a CampaignWorkflow run (a
campaign "at" a time sleeps in its run until then); recurring ones are a Temporal
Schedule whose every firing starts a run.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleHandle,
    ScheduleSpec,
    ScheduleState,
    WorkflowExecutionStatus,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError

from core.config import Settings
from core.contracts import (
    CAMPAIGN_PAUSE,
    CAMPAIGN_PROGRESS,
    CAMPAIGN_RESUME,
    CAMPAIGN_WORKFLOW,
    CampaignInput,
    CampaignProgress,
    campaign_workflow_id,
    schedule_id_for,
)
from core.queries import recipients
from core.schemas import CampaignCreate, ScheduledSend
from core.templating import Problem, Rendered, RenderError, checked_variables, coerce_variables, render_for_recipient
from services import campaign_store as store
from services import segments
from services import templates as template_store
from services.audit import Actor, diff, record_action, required_reason
from services.templates import TemplateNotFound


class CampaignNotFound(Exception):
    pass


class CampaignStateError(Exception):
    """The action does not apply in the campaign's current state (HTTP 409)."""


class CampaignInvalid(Exception):
    """Bad input for a campaign, naming the field (HTTP 422)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class CampaignRequest:
    name: str
    category: str
    template: str
    template_version: int | None
    segment_id: int
    channels: list[str]
    variables: dict[str, Any]
    schedule: dict[str, Any]  # validated CampaignSchedule, as JSON, plus "cron" resolved
    throttle_per_second: int | None

    @classmethod
    def of(cls, body: CampaignCreate | ScheduledSend, segment_id: int, name: str) -> CampaignRequest:
        """The request an API body or the admin's wizard (both validated by the same model) makes."""
        schedule = body.schedule.model_dump(mode="json")
        schedule["cron"] = body.schedule.cron_expression()
        return cls(
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


async def create(
    conn: AsyncConnection,
    request: CampaignRequest,
    author: str,
    actor: Actor | None = None,
    campaign_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """A draft campaign with its template version pinned; every input checked first.
    `campaign_id` is given by a caller that must make the same campaign on a retry (an event)."""
    try:
        record = await template_store.get(conn, request.template, request.template_version)
    except TemplateNotFound as err:
        field = "template_version" if request.template_version else "template"
        raise CampaignInvalid(field, f"no template {err}") from err
    for index, channel in enumerate(request.channels):
        if channel not in record.content.channels():
            raise CampaignInvalid(f"channels.{index}", f"template {request.template!r} has no {channel} part")
    _, problems = coerce_variables(record.content.variables, request.variables)
    if problems:
        raise CampaignInvalid(problems[0].part, problems[0].message)
    try:
        await store.load_segment(conn, request.segment_id)
    except store.SegmentNotFound as err:
        raise CampaignInvalid("segment_id", f"no segment {request.segment_id}") from err
    campaign_id = campaign_id or uuid.uuid4()
    await conn.execute(
        store.campaigns.insert().values(
            id=campaign_id,
            name=request.name,
            category=request.category,
            template_key=request.template,
            template_version=record.version,
            segment_id=request.segment_id,
            channels=request.channels,
            variables=request.variables,
            schedule=request.schedule,
            throttle_per_second=request.throttle_per_second,
            status="draft",
            created_by=author,
        )
    )
    details = {"name": request.name, "template": request.template, "segment_id": request.segment_id}
    await record_action(conn, actor, "campaign.create", "campaign", campaign_id, details)
    return campaign_id


async def load(conn: AsyncConnection, campaign_id: uuid.UUID, *, lock: bool = False) -> sa.Row[Any]:
    query = sa.select(store.campaigns).where(store.campaigns.c.id == campaign_id)
    row = (await conn.execute(query.with_for_update() if lock else query)).first()
    if row is None:
        raise CampaignNotFound(campaign_id)
    return row


def _input(row: sa.Row[Any], settings: Settings, *, recurring: bool) -> CampaignInput:
    at = row.schedule.get("at") if row.schedule.get("kind") == "at" else None
    return CampaignInput(
        campaign_id=row.id,
        not_before=datetime.fromisoformat(at) if at else None,
        batch_size=settings.campaign_batch_size,
        window=settings.campaign_window,
        recurring=recurring,
    )


def _require(row: sa.Row[Any], action: str, *allowed: str) -> None:
    if row.status not in allowed:
        raise CampaignStateError(f"cannot {action} a campaign that is {row.status} (only when {' or '.join(allowed)})")


async def launch(
    conn: AsyncConnection, temporal: Client, settings: Settings, campaign_id: uuid.UUID, actor: Actor | None = None
) -> None:
    row = await load(conn, campaign_id, lock=True)
    _require(row, "launch", "draft")
    cron = row.schedule.get("cron")
    try:
        if cron:
            await temporal.create_schedule(
                schedule_id_for(row.id),
                Schedule(
                    action=ScheduleActionStartWorkflow(
                        CAMPAIGN_WORKFLOW,
                        _input(row, settings, recurring=True),
                        id=f"{campaign_workflow_id(row.id)}-run",
                        task_queue=settings.temporal_task_queue,
                    ),
                    spec=ScheduleSpec(cron_expressions=[cron], time_zone_name=row.schedule.get("timezone", "UTC")),
                    state=ScheduleState(note=f"campaign {row.name}"),
                ),
            )
        else:
            await temporal.start_workflow(
                CAMPAIGN_WORKFLOW,
                _input(row, settings, recurring=False),
                id=campaign_workflow_id(row.id),
                task_queue=settings.temporal_task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )
    except RPCError as err:
        if "cron" in err.message.lower() or "invalid" in err.message.lower():
            raise CampaignInvalid("schedule.cron", f"Temporal refused the schedule: {err.message}") from err
        raise
    status = "running" if row.schedule.get("kind") == "now" else "scheduled"
    await store.set_campaign_status(conn, row.id, status)
    await record_action(conn, actor, "campaign.launch", "campaign", row.id, {"schedule": row.schedule},
                        changes=diff({"status": row.status}, {"status": status}))  # fmt: skip


async def create_and_launch(
    conn: AsyncConnection,
    temporal: Client,
    settings: Settings,
    request: CampaignRequest,
    actor: Actor,
    details: dict[str, Any] | None = None,
) -> uuid.UUID:
    """One request, one audit row ("campaign.create_and_launch"), written with the launch: a
    launch that fails leaves an unaudited draft, which sends nothing until someone launches it."""
    campaign_id = await create(conn, request, actor.subject, None)
    # Committed before the run starts: its first activity reads the campaign (a launch that
    # fails leaves a draft to launch again, never a run without its campaign).
    await conn.commit()
    await launch(conn, temporal, settings, campaign_id, None)
    recorded = {"name": request.name, "template": request.template, "segment_id": request.segment_id,
                "schedule": request.schedule, **(details or {})}  # fmt: skip
    await record_action(conn, actor, "campaign.create_and_launch", "campaign", campaign_id, recorded)
    return campaign_id


async def schedule_send(
    conn: AsyncConnection, temporal: Client, settings: Settings, body: ScheduledSend, actor: Actor
) -> uuid.UUID:
    """A one-off or recurring send of a template to a segment, or to user_ids listed in a
    static segment made for it."""
    name = body.name or f"scheduled {body.template} {uuid.uuid4().hex[:8]}"
    segment_id = body.segment_id
    details: dict[str, Any] = {}
    if body.user_ids is not None:
        # Part of this send: the campaign's audit row names it rather than a row of its own.
        listed = await segments.create(conn, actor, name=f"{name} (recipients {uuid.uuid4().hex[:8]})",
                                       user_ids=body.user_ids, audited=False)  # fmt: skip
        segment_id = listed.id
        details = {"segment_made_for_it": listed.id, "user_ids": len(body.user_ids)}
    assert segment_id is not None  # ScheduledSend requires user_ids or a segment_id
    request = CampaignRequest.of(body, segment_id, name)
    return await create_and_launch(conn, temporal, settings, request, actor, details)


async def _running_runs(temporal: Client, row: sa.Row[Any]) -> list[str]:
    """Workflow ids of this campaign's runs that are open now."""
    if row.schedule.get("cron"):
        description = await temporal.get_schedule_handle(schedule_id_for(row.id)).describe()
        return [
            action.workflow_id
            for action in description.info.running_actions
            if isinstance(action, ScheduleActionExecutionStartWorkflow)
        ]
    return [campaign_workflow_id(row.id)]


async def pause(
    conn: AsyncConnection, temporal: Client, campaign_id: uuid.UUID, reason: str | None, actor: Actor | None = None
) -> None:
    row = await load(conn, campaign_id, lock=True)
    _require(row, "pause", "running", "scheduled")
    if row.schedule.get("cron"):
        await temporal.get_schedule_handle(schedule_id_for(row.id)).pause(note=reason or "paused")
    for workflow_id in await _running_runs(temporal, row):
        await temporal.get_workflow_handle(workflow_id).signal(CAMPAIGN_PAUSE)
    await store.set_campaign_status(conn, row.id, "paused", reason)
    await record_action(conn, actor, "campaign.pause", "campaign", row.id, {"reason": reason}, reason=reason,
                        changes=diff({"status": row.status}, {"status": "paused"}))  # fmt: skip


async def resume(
    conn: AsyncConnection, temporal: Client, campaign_id: uuid.UUID, reason: str | None, actor: Actor | None = None
) -> None:
    row = await load(conn, campaign_id, lock=True)
    _require(row, "resume", "paused")
    recurring = bool(row.schedule.get("cron"))
    if recurring:
        await temporal.get_schedule_handle(schedule_id_for(row.id)).unpause(note=reason or "resumed")
    for workflow_id in await _running_runs(temporal, row):
        await temporal.get_workflow_handle(workflow_id).signal(CAMPAIGN_RESUME)
    started = await conn.scalar(sa.select(sa.func.count()).where(store.campaign_runs.c.campaign_id == row.id))
    # A one-off campaign resumed before its time is still waiting for it.
    status = "running" if started and not recurring else "scheduled"
    await store.set_campaign_status(conn, row.id, status, reason)
    await record_action(conn, actor, "campaign.resume", "campaign", row.id, {"reason": reason}, reason=reason,
                        changes=diff({"status": row.status}, {"status": status}))  # fmt: skip


async def cancel(
    conn: AsyncConnection, temporal: Client, campaign_id: uuid.UUID, reason: str, actor: Actor | None = None
) -> None:
    """Stop new batches, let in-flight ones record what they sent, keep the counts. A person's
    cancel needs a reason (ReasonRequired)."""
    if actor is not None:
        reason = required_reason(reason)
    row = await load(conn, campaign_id, lock=True)
    _require(row, "cancel", "draft", "scheduled", "running", "paused")
    if row.status != "draft":
        runs = await _running_runs(temporal, row)
        if row.schedule.get("cron"):
            await temporal.get_schedule_handle(schedule_id_for(row.id)).delete()
        for workflow_id in runs:
            handle = temporal.get_workflow_handle(workflow_id)
            if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
                await handle.cancel()
    await store.set_campaign_status(conn, row.id, "cancelled", reason)
    await record_action(conn, actor, "campaign.cancel", "campaign", row.id, {"reason": reason},
                        reason=reason, changes=diff({"status": row.status}, {"status": "cancelled"}))  # fmt: skip


async def trigger(conn: AsyncConnection, temporal: Client, campaign_id: uuid.UUID, actor: Actor | None = None) -> None:
    """Run a recurring campaign now, outside its schedule."""
    row = await load(conn, campaign_id)
    if not row.schedule.get("cron"):
        raise CampaignStateError("only a recurring campaign can be triggered")
    _require(row, "trigger", "scheduled", "paused")
    await temporal.get_schedule_handle(schedule_id_for(row.id)).trigger()
    await record_action(conn, actor, "campaign.trigger", "campaign", row.id)


async def describe(
    conn: AsyncConnection, temporal: Client, settings: Settings, campaign_id: uuid.UUID
) -> dict[str, Any]:
    """The campaign with its runs' counters (exact, from PostgreSQL) and live progress."""
    row = await load(conn, campaign_id)
    runs = (
        await conn.execute(
            sa.select(store.campaign_runs)
            .where(store.campaign_runs.c.campaign_id == campaign_id)
            .order_by(store.campaign_runs.c.started_at.desc())
            .limit(20)
        )
    ).all()
    run_views = []
    for run in runs:
        view = dict(run._mapping)
        view["live"] = None
        if run.status == "running":
            try:
                progress = await temporal.get_workflow_handle(run.id).query(
                    CAMPAIGN_PROGRESS, result_type=CampaignProgress
                )
                view["live"] = progress.model_dump(mode="json")
            except RPCError:
                pass  # the run just ended, or its worker is down: the counters still hold
        run_views.append(view)
    next_runs: list[datetime] = []
    if row.schedule.get("cron") and row.status in ("scheduled", "paused"):
        next_runs = await next_run_times(temporal.get_schedule_handle(schedule_id_for(row.id)))
    workflow_id = schedule_id_for(row.id) if row.schedule.get("cron") else campaign_workflow_id(row.id)
    ui = settings.temporal_ui_base()
    kind = "schedules" if row.schedule.get("cron") else "workflows"
    return {
        **dict(row._mapping),
        "template": row.template_key,
        "runs": run_views,
        "next_run_times": next_runs,
        "links": {"temporal_ui": f"{ui}/namespaces/{settings.temporal_namespace}/{kind}/{workflow_id}"},
    }


async def list_campaigns(
    conn: AsyncConnection, temporal: Client, settings: Settings, status: str | None, limit: int
) -> list[dict[str, Any]]:
    """The newest first, each described."""
    query = sa.select(store.campaigns.c.id).order_by(store.campaigns.c.created_at.desc()).limit(limit)
    if status:
        query = query.where(store.campaigns.c.status == status)
    ids = (await conn.scalars(query)).all()
    return [await describe(conn, temporal, settings, campaign_id) for campaign_id in ids]


@dataclass(frozen=True)
class Preview:
    """The campaign's pinned template rendered for the first recipient of its segment."""

    campaign: sa.Row[Any]
    segment: sa.Row[Any]
    recipient: sa.Row[Any] | None
    rendered: Rendered | None
    problems: list[Problem]


async def preview(conn: AsyncConnection, campaign_id: uuid.UUID) -> Preview:
    row = await load(conn, campaign_id)
    content = await template_store.load_pinned(conn, row.template_key, row.template_version)
    segment = await store.load_segment(conn, row.segment_id)
    person = (
        await conn.execute(
            sa.select(recipients).where(store.segment_condition(segment)).order_by(recipients.c.id).limit(1)
        )
    ).first()
    if person is None:
        return Preview(
            row, segment, None, None, [Problem("segment", f"segment {segment.name!r} matches no recipient yet")]
        )
    try:
        variables = checked_variables(content, row.variables)
        rendered = render_for_recipient(content, dict(person._mapping), variables, list(row.channels))
    except RenderError as err:
        return Preview(row, segment, person, None, [Problem("render", f"rendering failed: {err}")])
    return Preview(row, segment, person, rendered, [])


async def next_run_times(handle: ScheduleHandle) -> list[datetime]:
    try:
        return list((await handle.describe()).info.next_action_times)
    except RPCError:
        return []
