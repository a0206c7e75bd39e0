"""Events: other services publish facts; event types and trigger rules decide who hears what."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response, status

from api.deps import (
    ConnectionDep,
    EventPublisher,
    EventReader,
    RuleEditor,
    RuleReader,
    SettingsDep,
    TemporalDep,
)
from api.routes.audit import ReasonQuery
from core.events import EventTypeName, RuleDefinition
from core.schemas import EventActionOut, EventIn, EventOut, EventTypeIn, EventTypeOut, TriggerRuleIn, TriggerRuleOut
from services import event_rules, events
from services.event_rules import RuleRecord

router = APIRouter(tags=["events"])
TypeName = Annotated[EventTypeName, Path(description="e.g. episode.released")]


@router.post("/v1/events", status_code=status.HTTP_202_ACCEPTED, response_model=EventOut)
async def publish_event(
    body: EventIn,
    request: Request,
    response: Response,
    conn: ConnectionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    publisher: EventPublisher,
) -> Any:
    """Accept a fact once: the same id again answers with the first one (Idempotent-Replayed)."""
    accepted = await events.accept(conn, temporal, settings, publisher.subject, body, "http")
    if accepted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    found = await _present(conn, accepted.event_id, request)
    response.headers["Location"] = found.links["self"]
    return found


@router.get("/v1/events/{event_id}", response_model=EventOut)
async def get_event(event_id: str, request: Request, conn: ConnectionDep, _: EventReader) -> Any:
    """What the event became: each matching rule's send, waiting, sent, digested or cancelled."""
    return await _present(conn, event_id, request)


async def _present(conn: ConnectionDep, event_id: str, request: Request) -> EventOut:
    row, actions = await events.get(conn, event_id)
    base = str(request.base_url).rstrip("/")
    return EventOut(
        id=row.id,
        type=row.type,
        occurred_at=row.occurred_at,
        received_at=row.received_at,
        source=row.source,
        workflow_id=row.workflow_id,
        actions=[EventActionOut.model_validate(dict(action._mapping)) for action in actions],
        links={"self": f"{base}/v1/events/{row.id}"},
    )


# --- Event types ---------------------------------------------------------------------------------


def _type_out(row: Any) -> EventTypeOut:
    return EventTypeOut(name=row.name, description=row.description, payload_schema=row.schema,
                        created_by=row.created_by, updated_at=row.updated_at)  # fmt: skip


@router.put("/v1/event-types/{name}", response_model=EventTypeOut, response_model_by_alias=True)
async def put_event_type(name: TypeName, body: EventTypeIn, conn: ConnectionDep, editor: RuleEditor) -> Any:
    """Register an event type with its payload's JSON Schema, or replace it (refused if a rule would break)."""
    return _type_out(await event_rules.put_type(conn, editor, name, body.payload_schema, body.description))


@router.get("/v1/event-types", response_model=list[EventTypeOut], response_model_by_alias=True)
async def list_event_types(conn: ConnectionDep, _: RuleReader) -> Any:
    return [_type_out(row) for row in await event_rules.list_types(conn)]


@router.get("/v1/event-types/{name}", response_model=EventTypeOut, response_model_by_alias=True)
async def get_event_type(name: TypeName, conn: ConnectionDep, _: RuleReader) -> Any:
    return _type_out(await event_rules.get_type(conn, name))


@router.delete("/v1/event-types/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_event_type(name: TypeName, reason: ReasonQuery, conn: ConnectionDep, editor: RuleEditor) -> None:
    """Refused while a rule uses it."""
    await event_rules.delete_type(conn, editor, name, reason)


# --- Trigger rules -------------------------------------------------------------------------------


def _rule_out(rule: RuleRecord) -> TriggerRuleOut:
    return TriggerRuleOut(
        **rule.definition.model_dump(),
        id=rule.id,
        name=rule.name,
        event_type=rule.event_type,
        enabled=rule.enabled,
        created_by=rule.created_by,
        updated_at=rule.updated_at,
    )


async def _save(conn: ConnectionDep, editor: Any, body: TriggerRuleIn, rule_id: int | None) -> TriggerRuleOut:
    definition = RuleDefinition.model_validate(body.model_dump(exclude={"name", "event_type", "enabled"}))
    saved = await event_rules.save_rule(conn, editor, name=body.name, event_type=body.event_type,
                                        enabled=body.enabled, definition=definition, rule_id=rule_id)  # fmt: skip
    return _rule_out(saved)


@router.post("/v1/trigger-rules", status_code=status.HTTP_201_CREATED, response_model=TriggerRuleOut)
async def create_rule(body: TriggerRuleIn, conn: ConnectionDep, editor: RuleEditor) -> Any:
    """A rule is checked whole against its event type's schema and its templates: every problem is listed."""
    return await _save(conn, editor, body, None)


@router.get("/v1/trigger-rules", response_model=list[TriggerRuleOut])
async def list_rules(
    conn: ConnectionDep, _: RuleReader, event_type: Annotated[EventTypeName | None, Query()] = None
) -> Any:
    return [_rule_out(rule) for rule in await event_rules.list_rules(conn, event_type)]


@router.get("/v1/trigger-rules/{rule_id}", response_model=TriggerRuleOut)
async def get_rule(rule_id: Annotated[int, Path(ge=1, le=2**63 - 1)], conn: ConnectionDep, _: RuleReader) -> Any:
    return _rule_out(await event_rules.get_rule(conn, rule_id))


@router.put("/v1/trigger-rules/{rule_id}", response_model=TriggerRuleOut)
async def replace_rule(
    rule_id: Annotated[int, Path(ge=1, le=2**63 - 1)], body: TriggerRuleIn, conn: ConnectionDep, editor: RuleEditor
) -> Any:
    await event_rules.get_rule(conn, rule_id)
    return await _save(conn, editor, body, rule_id)


@router.delete("/v1/trigger-rules/{rule_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_rule(
    rule_id: Annotated[int, Path(ge=1, le=2**63 - 1)], reason: ReasonQuery, conn: ConnectionDep, editor: RuleEditor
) -> None:
    await event_rules.delete_rule(conn, editor, rule_id, reason)
