"""Events: accept a published fact once, decide what each rule makes of it, and do it.

Intake (HTTP and the NATS consumer alike) calls `accept`: the payload is checked against
its type's schema, the event row committed and its EventWorkflow started before the answer
(202, or the NATS ack), so an accepted event is never lost and the same id is never
processed twice.
The workflow then asks `plan` which rules apply (and which waiting sends it cancels), waits
out any delay on a durable timer, and calls `dispatch` per rule:
- a user audience submits a notification through services.notifications, under a key
  derived from (event, rule), so a retry or a redelivery finds the same notification;
- a segment audience becomes one campaign run (batched and resumable), its id derived from
  (event, rule);
- a digest rule adds the event to the recipient's digest (a row, once per event) and
  signals-with-start the digest's workflow, which lists what the rows hold when it closes.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from pydantic import ValidationError
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from core.auth import Principal, Role
from core.clock import next_local_time
from core.config import Settings
from core.contracts import (
    DIGEST_ADD,
    DIGEST_WORKFLOW,
    EVENT_WORKFLOW,
    ActionOutcome,
    CancelTarget,
    DigestInput,
    DigestSent,
    EventInput,
    EventPlan,
    RuleAction,
    digest_workflow_id,
    event_workflow_id,
)
from core.errors import Conflict, DomainError, Invalid, NotFound, Unavailable
from core.events import BadTime, RuleDefinition, fill, fire_at, holds, template_variables, value_at
from core.models import DigestItem, Event, EventAction
from core.queries import recipients
from core.schemas import CampaignSchedule, EventIn
from core.segments import Filter, SegmentFilter
from services import campaign_store, campaigns, notifications, segments
from services import templates as template_store
from services.event_rules import (
    RuleRecord,
    get_rule,
    get_type,
    payload_problems,
    rules_cancelled_by,
    rules_for,
    trigger_rules,
)
from services.metrics import EVENTS_ACCEPTED, EVENTS_REJECTED

events = Event.__table__  # type: ignore[attr-defined]
event_actions = EventAction.__table__  # type: ignore[attr-defined]
digest_items = DigestItem.__table__  # type: ignore[attr-defined]

# Rules act as this principal: its keys (events:...) never collide with a service's own.
RULES = Principal(subject="events", role=Role.service)
_CAMPAIGN_NAMESPACE = uuid.UUID("6f6b1c5e-6d61-7271-7565-650000000002")
FINAL = ("sent", "digested", "cancelled", "skipped", "failed")

logger = structlog.get_logger("marquee.events")


@dataclass(frozen=True)
class Accepted:
    event_id: str
    replayed: bool  # this id was accepted before: nothing new was started


def _hash(event: EventIn) -> str:
    canonical = {
        "type": event.type,
        "occurred_at": event.occurred_at.astimezone(UTC).isoformat(),
        "payload": event.payload,
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


async def accept(
    conn: AsyncConnection, temporal: Client, settings: Settings, received_by: str, event: EventIn, source: str
) -> Accepted:
    """Record the event and start its workflow, in one transaction; the same id again is a
    replay (Conflict if its content differs). Commits."""
    try:
        accepted = await _accept(conn, temporal, settings, received_by, event, source)
    except DomainError as err:
        EVENTS_REJECTED.labels(source=source, reason=rejection_reason(err)).inc()
        raise
    if not accepted.replayed:
        EVENTS_ACCEPTED.labels(type=event.type, source=source).inc()
    return accepted


def rejection_reason(err: DomainError) -> str:
    """Why an event was refused, as /metrics and the NATS dead letters name it."""
    if isinstance(err, Invalid):
        return "unknown_type" if err.problems[0][0] == "type" else "invalid_payload"
    return {Conflict: "conflict", Unavailable: "unavailable"}.get(type(err), "error")


async def _accept(
    conn: AsyncConnection, temporal: Client, settings: Settings, received_by: str, event: EventIn, source: str
) -> Accepted:
    digest = _hash(event)
    if await _seen(conn, event.id, digest):
        await _start(temporal, settings, event.id)  # a delivery whose start failed is finished by a later one
        return Accepted(event.id, replayed=True)
    try:
        event_type = await get_type(conn, event.type)
    except NotFound as err:
        raise Invalid.field("type", f"{err.detail}") from err
    problems = payload_problems(event_type.schema, event.payload)
    if problems:
        raise Invalid(problems, title="Payload does not match its event type")
    inserted = await conn.scalar(
        insert(events)
        .values(
            id=event.id,
            type=event.type,
            occurred_at=event.occurred_at,
            payload=event.payload,
            payload_hash=digest,
            source=source,
            received_by=received_by,
            workflow_id=event_workflow_id(event.id),
        )
        .on_conflict_do_nothing()
        .returning(events.c.id)
    )
    if inserted is None:  # a concurrent delivery of the same id won
        await conn.rollback()
        await _seen(conn, event.id, digest)
        await _start(temporal, settings, event.id)
        return Accepted(event.id, replayed=True)
    # The row first: the workflow's first step reads it. If the start then fails, the row goes
    # too and the publisher is told to retry (503; NATS redelivers): nothing is half-made.
    await conn.commit()
    try:
        await _start(temporal, settings, event.id)
    except Unavailable:
        await conn.execute(events.delete().where(events.c.id == event.id))
        await conn.commit()
        raise
    logger.info("event accepted", event_id=event.id, type=event.type, source=source)
    return Accepted(event.id, replayed=False)


async def _start(temporal: Client, settings: Settings, event_id: str) -> None:
    """Start the event's workflow unless it runs or ran; a failed run (its row was missing)
    may be started again."""
    try:
        await temporal.start_workflow(
            EVENT_WORKFLOW,
            EventInput(event_id=event_id),
            id=event_workflow_id(event_id),
            task_queue=settings.temporal_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
        )
    except WorkflowAlreadyStartedError:
        pass  # it completed: the event was processed
    except RPCError as err:
        raise Unavailable(f"could not start the event's workflow: {err.message}", title="Temporal unavailable") from err


async def _seen(conn: AsyncConnection, event_id: str, digest: str) -> bool:
    existing = await conn.scalar(sa.select(events.c.payload_hash).where(events.c.id == event_id))
    if existing is None:
        return False
    if existing != digest:
        raise Conflict(f"event {event_id!r} was already accepted with different content", title="Event id reused")
    return True


async def get(conn: AsyncConnection, event_id: str) -> tuple[sa.Row[Any], list[sa.Row[Any]]]:
    """The event and what each rule made of it (rule names joined)."""
    row = (await conn.execute(sa.select(events).where(events.c.id == event_id))).first()
    if row is None:
        raise NotFound(f"no event {event_id!r}")
    actions = (
        await conn.execute(
            sa.select(event_actions, trigger_rules.c.name.label("rule"))
            .join(trigger_rules, trigger_rules.c.id == event_actions.c.rule_id)
            .where(event_actions.c.event_id == event_id)
            .order_by(event_actions.c.rule_id)
        )
    ).all()
    return row, list(actions)


# --- Planning ----------------------------------------------------------------------------------


async def plan(conn: AsyncConnection, event_id: str, now: datetime) -> EventPlan:
    """Which rules act on the event and when, recorded once (a retried plan returns the same),
    and which waiting sends of earlier events it cancels. Commits."""
    event = await _event(conn, event_id)
    recorded = await _actions(conn, event_id)
    if not recorded:
        for rule in await rules_for(conn, event.type):
            await conn.execute(
                insert(event_actions)
                .values(event_id=event_id, rule_id=rule.id, **await _decide(conn, rule, event, now))
                .on_conflict_do_nothing()
            )
        await conn.commit()
        recorded = await _actions(conn, event_id)
    actions = [RuleAction(rule_id=row.rule_id, fire_at=row.fire_at) for row in recorded if row.status == "waiting"]
    return EventPlan(actions=actions, cancels=await _cancels(conn, event))


async def _decide(conn: AsyncConnection, rule: RuleRecord, event: sa.Row[Any], now: datetime) -> dict[str, Any]:
    """The action row one rule makes of the event: waiting (until fire_at) or skipped."""
    definition = rule.definition
    correlation = value_at(event.payload, definition.correlate_on)
    row: dict[str, Any] = {"correlation": None if correlation is None else str(correlation)}
    if not holds(definition.condition, event.payload):
        return {**row, "status": "skipped", "reason": "the rule's condition does not hold"}
    delay = definition.delay
    zone = "UTC"
    if delay is not None and delay.at_local_time is not None:
        if definition.audience.kind == "segment":
            delay = delay.model_copy(update={"at_local_time": None})  # the campaign delivers by local time
        else:
            zone = await _time_zone(conn, value_at(event.payload, definition.audience.field))
    try:
        due = fire_at(delay, event.occurred_at, event.payload, zone)
    except BadTime as err:
        return {**row, "status": "failed", "reason": str(err)}
    return {**row, "status": "waiting", "fire_at": due if due is not None and due > now else None}


async def _time_zone(conn: AsyncConnection, user_id: Any) -> str:
    zone = await conn.scalar(sa.select(recipients.c.timezone).where(recipients.c.user_id == str(user_id)))
    return zone or "UTC"


async def _cancels(conn: AsyncConnection, event: sa.Row[Any]) -> list[CancelTarget]:
    """Waiting sends of rules that this event's type cancels, for the same correlation value,
    of events that happened before it."""
    targets: list[CancelTarget] = []
    for rule in await rules_cancelled_by(conn, event.type):
        value = value_at(event.payload, rule.definition.correlate_on)
        if value is None:
            continue
        rows = await conn.execute(
            sa.select(event_actions.c.event_id)
            .join(events, events.c.id == event_actions.c.event_id)
            .where(
                event_actions.c.rule_id == rule.id,
                event_actions.c.correlation == str(value),
                event_actions.c.status == "waiting",
                events.c.occurred_at <= event.occurred_at,
            )
        )
        targets += [CancelTarget(event_id=found.event_id, rule_id=rule.id) for found in rows]
    return targets


# --- Acting ------------------------------------------------------------------------------------


async def settle(conn: AsyncConnection, event_id: str, rule_id: int, status: str, reason: str | None) -> None:
    """Record an action's end, unless it ended already. Commits."""
    await conn.execute(
        event_actions.update()
        .where(
            event_actions.c.event_id == event_id,
            event_actions.c.rule_id == rule_id,
            event_actions.c.status.not_in(FINAL),
        )
        .values(status=status, reason=reason, updated_at=sa.func.now())
    )
    await conn.commit()


async def dispatch(
    conn: AsyncConnection, temporal: Client, settings: Settings, event_id: str, rule_id: int, now: datetime
) -> ActionOutcome:
    """Do what the rule says with the event, once: a retry finds what the first attempt made.
    Domain errors about the recipient or the rule end the action as failed; Unavailable
    (Temporal) is left to the caller to retry."""
    action = (
        await conn.execute(
            sa.select(event_actions).where(event_actions.c.event_id == event_id, event_actions.c.rule_id == rule_id)
        )
    ).first()
    if action is None:
        return ActionOutcome(status="skipped", reason="the rule was deleted")
    if action.status in FINAL:
        return ActionOutcome(status=action.status, reason=action.reason)
    event = await _event(conn, event_id)
    try:
        rule = await get_rule(conn, rule_id)
    except NotFound:
        return ActionOutcome(status="skipped", reason="the rule was deleted")
    if not rule.enabled:
        return await _end(conn, event_id, rule_id, "skipped", "the rule was disabled before the send was due")
    cancelled_by = await _cancelled_by(conn, rule.definition, event, action.correlation)
    if cancelled_by is not None:
        return await _end(conn, event_id, rule_id, "cancelled", f"cancelled by event {cancelled_by!r}")
    try:
        if rule.definition.audience.kind == "segment":
            return await _fan_out(conn, temporal, settings, rule, event)
        user_id = str(value_at(event.payload, rule.definition.audience.field))
        if rule.definition.digest is not None:
            return await _join_digest(conn, temporal, settings, rule, event, user_id, now)
        return await _notify(conn, temporal, settings, rule, event, user_id)
    except (Invalid, NotFound, Conflict, campaigns.CampaignInvalid) as err:
        await conn.rollback()
        reason = err.detail if isinstance(err, DomainError) else str(err)
        logger.warning("event rule failed", event_id=event_id, rule_id=rule_id, reason=reason)
        return await _end(conn, event_id, rule_id, "failed", reason)


async def _end(
    conn: AsyncConnection, event_id: str, rule_id: int, status: str, reason: str | None, **made: Any
) -> ActionOutcome:
    await conn.execute(
        event_actions.update()
        .where(event_actions.c.event_id == event_id, event_actions.c.rule_id == rule_id)
        .values(status=status, reason=reason, updated_at=sa.func.now(), **made)
    )
    await conn.commit()
    return ActionOutcome(status=status, reason=reason)


async def _cancelled_by(
    conn: AsyncConnection, rule: RuleDefinition, event: sa.Row[Any], correlation: str | None
) -> str | None:
    """The id of a cancelling event for this send, if one arrived (a signal may have been
    missed: the check at send time is what decides)."""
    if not rule.cancel_on or correlation is None:
        return None
    found: str | None = await conn.scalar(
        sa.select(events.c.id)
        .where(
            events.c.type.in_(rule.cancel_on),
            sa.func.jsonb_extract_path_text(events.c.payload, *rule.correlate_on.split(".")) == correlation,
            events.c.occurred_at >= event.occurred_at,
        )
        .limit(1)
    )
    return found


async def _variables(conn: AsyncConnection, rule: RuleDefinition, payload: dict[str, Any]) -> dict[str, Any]:
    record = await template_store.get(conn, rule.template, rule.template_version)
    return template_variables(rule, [spec.name for spec in record.content.variables], payload)


async def _submit(
    conn: AsyncConnection,
    temporal: Client,
    settings: Settings,
    rule: RuleDefinition,
    user_id: str,
    template: tuple[str, int | None],
    variables: dict[str, Any],
    key: str,
) -> uuid.UUID:
    """A rule's notification to one user, under a key a retry finds again."""
    submitted = await notifications.submit(
        conn,
        temporal,
        settings,
        RULES,
        notifications.Submission(
            user_id=user_id,
            category=rule.category,
            channels=[channel.value for channel in rule.channels],
            template=template[0],
            template_version=template[1],
            variables=variables,
            priority=rule.priority,
            request={"key": key},
        ),
        key,
    )
    return submitted.notification_id


async def _notify(
    conn: AsyncConnection, temporal: Client, settings: Settings, rule: RuleRecord, event: sa.Row[Any], user_id: str
) -> ActionOutcome:
    definition = rule.definition
    notification_id = await _submit(
        conn,
        temporal,
        settings,
        definition,
        user_id,
        (definition.template, definition.template_version),
        await _variables(conn, definition, event.payload),
        f"event:{event.id}:rule:{rule.id}",
    )
    return await _end(conn, event.id, rule.id, "sent", None, notification_id=notification_id)


async def _fan_out(
    conn: AsyncConnection, temporal: Client, settings: Settings, rule: RuleRecord, event: sa.Row[Any]
) -> ActionOutcome:
    """One campaign run to the rule's audience, made once per (event, rule)."""
    definition = rule.definition
    assert definition.audience.kind == "segment"
    campaign_id = uuid.uuid5(_CAMPAIGN_NAMESPACE, f"{event.id}:{rule.id}")
    existing = await conn.scalar(
        sa.select(campaign_store.campaigns.c.status).where(campaign_store.campaigns.c.id == campaign_id)
    )
    if existing is None:
        name = f"event {event.id} / rule {rule.name}"
        segment = await segments.create(
            conn,
            RULES,
            name=f"{name} ({campaign_id.hex[:8]})",
            description=f"the audience trigger rule {rule.name!r} chose for event {event.id!r}",
            filter=_audience(fill(definition.audience.filter, event.payload)),
        )
        local_time = definition.delay.at_local_time if definition.delay else None
        schedule = CampaignSchedule(kind="now", local_time=local_time).model_dump(mode="json")
        request = campaigns.CampaignRequest(
            name=name,
            category=definition.category,
            template=definition.template,
            template_version=definition.template_version,
            segment_id=segment.id,
            channels=[channel.value for channel in definition.channels],
            variables=await _variables(conn, definition, event.payload),
            schedule={**schedule, "cron": None},
            throttle_per_second=None,
        )
        await campaigns.create(conn, request, RULES.subject, None, campaign_id)
        await conn.commit()  # the run reads its campaign as soon as it starts
        existing = "draft"
    if existing == "draft":
        await campaigns.launch(conn, temporal, settings, campaign_id)
    return await _end(conn, event.id, rule.id, "sent", None, campaign_id=campaign_id)


def _audience(filled: dict[str, Any]) -> Filter:
    try:
        return SegmentFilter.model_validate({"root": filled}).root
    except ValidationError as err:
        problems = [(".".join(map(str, error["loc"][1:])) or "filter", error["msg"]) for error in err.errors()]
        raise Invalid([(f"audience.filter.{field}", message) for field, message in problems]) from err


async def _join_digest(
    conn: AsyncConnection,
    temporal: Client,
    settings: Settings,
    rule: RuleRecord,
    event: sa.Row[Any],
    user_id: str,
    now: datetime,
) -> ActionOutcome:
    """The event becomes a row of the recipient's open digest (once), then the digest's
    workflow is signalled, or started with the window's end if none is open."""
    digest = rule.definition.digest
    assert digest is not None
    await conn.execute(
        insert(digest_items)
        .values(
            rule_id=rule.id, user_id=user_id, event_id=event.id, payload=event.payload, occurred_at=event.occurred_at
        )
        .on_conflict_do_nothing()
    )
    await conn.commit()  # the row first: the digest lists rows, whatever its signals said
    if digest.window_seconds is not None:
        closes_at = now + timedelta(seconds=digest.window_seconds)
    else:
        assert digest.at_local_time is not None
        closes_at = next_local_time(now, await _time_zone(conn, user_id), digest.at_local_time)
    workflow_id = digest_workflow_id(rule.id, user_id)
    try:
        await temporal.start_workflow(
            DIGEST_WORKFLOW,
            DigestInput(rule_id=rule.id, user_id=user_id, closes_at=closes_at),
            id=workflow_id,
            task_queue=settings.temporal_task_queue,
            start_signal=DIGEST_ADD,
            start_signal_args=[event.id],
        )
    except RPCError as err:
        raise Unavailable(f"could not reach the digest: {err.message}") from err
    return await _end(conn, event.id, rule.id, "digested", None, digest=workflow_id)


async def send_digest(
    conn: AsyncConnection, temporal: Client, settings: Settings, rule_id: int, user_id: str, batch: str
) -> DigestSent:
    """Claim the recipient's open digest rows for this send (a retry keeps the same claim) and
    send one notification listing them; none claimed sends nothing. Commits."""
    await conn.execute(
        digest_items.update()
        .where(digest_items.c.rule_id == rule_id, digest_items.c.user_id == user_id, digest_items.c.batch.is_(None))
        .values(batch=batch)
    )
    await conn.commit()
    items = (
        await conn.execute(
            sa.select(digest_items)
            .where(digest_items.c.rule_id == rule_id, digest_items.c.user_id == user_id, digest_items.c.batch == batch)
            .order_by(digest_items.c.occurred_at, digest_items.c.event_id)
        )
    ).all()
    if not items:
        return DigestSent(listed=0)
    rule = (await get_rule(conn, rule_id)).definition
    assert rule.digest is not None
    if len(items) == 1 and rule.digest.single_as_message:
        template, version = rule.template, rule.template_version
        variables = await _variables(conn, rule, items[0].payload)
    else:
        template, version = rule.digest.template, rule.digest.template_version
        listed = [
            {**item.payload, "event_id": item.event_id, "occurred_at": item.occurred_at.isoformat()} for item in items
        ]
        declared = {spec.name for spec in (await template_store.get(conn, template, version)).content.variables}
        variables = {name: value for name, value in (("events", listed), ("count", len(items))) if name in declared}
    try:
        await _submit(conn, temporal, settings, rule, user_id, (template, version), variables, f"digest:{batch}")
    except (Invalid, Conflict) as err:
        logger.warning("digest not sent", rule_id=rule_id, batch=batch, reason=err.detail)
    return DigestSent(listed=len(items))


async def _event(conn: AsyncConnection, event_id: str) -> sa.Row[Any]:
    row = (await conn.execute(sa.select(events).where(events.c.id == event_id))).first()
    if row is None:
        raise NotFound(f"no event {event_id!r}")
    return row


async def _actions(conn: AsyncConnection, event_id: str) -> list[sa.Row[Any]]:
    query = sa.select(event_actions).where(event_actions.c.event_id == event_id).order_by(event_actions.c.rule_id)
    return list((await conn.execute(query)).all())
