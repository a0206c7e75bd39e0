"""The event catalogue: event types with their payload schemas, and the trigger rules on them.

A rule is checked whole when it is saved, against its event type's schema and its
templates' declared variables, and every problem is reported at once; an event that
passes its schema then always gives a rule what the rule was promised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import Conflict, Invalid, NotFound
from core.events import Delay, PayloadCondition, RuleDefinition, SegmentAudience, fill, placeholders
from core.models import EventType, TriggerRule
from core.segments import SegmentFilter
from core.templating import TemplateContent, VariableSpec
from services import templates as template_store
from services.audit import Actor, diff, record_action
from services.templates import TemplateNotFound

event_types = EventType.__table__  # type: ignore[attr-defined]
trigger_rules = TriggerRule.__table__  # type: ignore[attr-defined]

# Which JSON Schema types can feed a template variable of each type.
_FITS: dict[str, set[str]] = {
    "string": {"string"},
    "number": {"number", "integer"},
    "integer": {"integer"},
    "boolean": {"boolean"},
    "date": {"string"},
    "datetime": {"string"},
    "url": {"string"},
    "list": {"array"},
}
DIGEST_VARIABLES = ("events", "count")


# --- Event types -------------------------------------------------------------------------------


def check_schema(schema: dict[str, Any]) -> None:
    """Invalid unless `schema` is a JSON Schema (2020-12) for an object."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as err:
        where = ".".join(str(part) for part in err.absolute_path)
        raise Invalid.field(f"schema.{where}" if where else "schema", err.message) from err
    if schema.get("type") != "object":
        raise Invalid.field("schema.type", 'a payload schema must have "type": "object"')


def payload_problems(schema: dict[str, Any], payload: dict[str, Any]) -> list[tuple[str, str]]:
    """Every way `payload` breaks `schema`, each naming its field (payload.<path>)."""
    problems = []
    for error in sorted(Draft202012Validator(schema).iter_errors(payload), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(part) for part in error.absolute_path)
        problems.append((f"payload.{path}" if path else "payload", error.message))
    return problems


async def put_type(
    conn: AsyncConnection, actor: Actor, name: str, schema: dict[str, Any], description: str = ""
) -> sa.Row[Any]:
    """Register an event type or replace its schema. Commits."""
    check_schema(schema)
    old = (await conn.execute(sa.select(event_types).where(event_types.c.name == name))).first()
    before = old.schema if old is not None else None
    await conn.execute(
        insert(event_types)
        .values(name=name, schema=schema, description=description, created_by=actor.subject)
        .on_conflict_do_update(
            index_elements=[event_types.c.name],
            set_={"schema": schema, "description": description, "updated_at": sa.func.now()},
        )
    )
    if before is not None and before != schema:
        # Rules were checked against the old schema: a change that breaks one is refused.
        for rule in await _rules_of(conn, name):
            problems = await rule_problems(conn, RuleDefinition.model_validate(rule.definition), name)
            if problems:
                await conn.rollback()
                details = "; ".join(f"{field}: {message}" for field, message in problems)
                raise Conflict(f"the new schema breaks rule {rule.name!r}: {details}", title="Rule would break")
    action = "event_type.update" if before is not None else "event_type.create"
    changes = diff({"schema": old.schema, "description": old.description} if old is not None else {},
                   {"schema": schema, "description": description})  # fmt: skip
    await record_action(conn, actor, action, "event_type", name, {"description": description}, changes=changes)
    await conn.commit()
    return await get_type(conn, name)


async def get_type(conn: AsyncConnection, name: str) -> sa.Row[Any]:
    row = (await conn.execute(sa.select(event_types).where(event_types.c.name == name))).first()
    if row is None:
        raise NotFound(f"no event type {name!r}; register it with PUT /v1/event-types/{name}")
    return row


async def list_types(conn: AsyncConnection) -> list[sa.Row[Any]]:
    return list((await conn.execute(sa.select(event_types).order_by(event_types.c.name))).all())


async def delete_type(conn: AsyncConnection, actor: Actor, name: str, reason: str | None = None) -> None:
    old = await get_type(conn, name)
    rules = await _rules_of(conn, name)
    if rules:
        names = ", ".join(rule.name for rule in rules)
        raise Conflict(f"rules still use event type {name!r}: {names}", title="Event type in use")
    await conn.execute(event_types.delete().where(event_types.c.name == name))
    await record_action(conn, actor, "event_type.delete", "event_type", name, reason=reason,
                        changes=diff({"schema": old.schema, "description": old.description}, {}))  # fmt: skip
    await conn.commit()


# --- Rules -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleRecord:
    id: int
    name: str
    event_type: str
    enabled: bool
    definition: RuleDefinition
    created_by: str
    updated_at: Any


def _record(row: sa.Row[Any]) -> RuleRecord:
    return RuleRecord(
        row.id,
        row.name,
        row.event_type,
        row.enabled,
        RuleDefinition.model_validate(row.definition),
        row.created_by,
        row.updated_at,
    )


async def _rules_of(conn: AsyncConnection, event_type: str) -> list[sa.Row[Any]]:
    query = sa.select(trigger_rules).where(trigger_rules.c.event_type == event_type).order_by(trigger_rules.c.id)
    return list((await conn.execute(query)).all())


async def rules_for(conn: AsyncConnection, event_type: str) -> list[RuleRecord]:
    """The enabled rules an event of this type triggers."""
    return [_record(row) for row in await _rules_of(conn, event_type) if row.enabled]


async def rules_cancelled_by(conn: AsyncConnection, event_type: str) -> list[RuleRecord]:
    """The enabled rules whose waiting sends an event of this type cancels."""
    query = sa.select(trigger_rules).where(
        trigger_rules.c.enabled, sa.literal(event_type) == sa.any_(trigger_rules.c.cancel_on)
    )
    return [_record(row) for row in await conn.execute(query)]


async def get_rule(conn: AsyncConnection, rule_id: int) -> RuleRecord:
    row = (await conn.execute(sa.select(trigger_rules).where(trigger_rules.c.id == rule_id))).first()
    if row is None:
        raise NotFound(f"no trigger rule {rule_id}")
    return _record(row)


async def list_rules(conn: AsyncConnection, event_type: str | None = None) -> list[RuleRecord]:
    query = sa.select(trigger_rules).order_by(trigger_rules.c.id)
    if event_type is not None:
        query = query.where(trigger_rules.c.event_type == event_type)
    return [_record(row) for row in await conn.execute(query)]


async def save_rule(
    conn: AsyncConnection,
    actor: Actor,
    *,
    name: str,
    event_type: str,
    enabled: bool,
    definition: RuleDefinition,
    rule_id: int | None = None,
) -> RuleRecord:
    """Create a rule (rule_id None) or replace one, after checking all of it. Commits."""
    problems = await rule_problems(conn, definition, event_type)
    if problems:
        raise Invalid(problems, title="Invalid trigger rule")
    taken = await conn.scalar(sa.select(trigger_rules.c.id).where(trigger_rules.c.name == name))
    if taken is not None and taken != rule_id:
        raise Conflict(f"a rule named {name!r} exists (id {taken})", title="Rule exists")
    values = {
        "name": name,
        "event_type": event_type,
        "enabled": enabled,
        "definition": definition.model_dump(mode="json"),
        "cancel_on": list(definition.cancel_on),
    }
    old: dict[str, Any] = {}
    if rule_id is None:
        rule_id = await conn.scalar(
            trigger_rules.insert().values(**values, created_by=actor.subject).returning(trigger_rules.c.id)
        )
        action = "trigger_rule.create"
    else:
        before = await get_rule(conn, rule_id)
        await conn.execute(
            trigger_rules.update().where(trigger_rules.c.id == rule_id).values(**values, updated_at=sa.func.now())
        )
        action = "trigger_rule.update"
        previous = {"enabled": before.enabled, "definition": before.definition.model_dump(mode="json")}
        values["before"] = previous
        old = {"name": before.name, "event_type": before.event_type, **previous}
    new = {field: values[field] for field in ("name", "event_type", "enabled", "definition")}
    await record_action(conn, actor, action, "trigger_rule", rule_id, values, changes=diff(old, new))
    await conn.commit()
    assert rule_id is not None
    return await get_rule(conn, rule_id)


async def delete_rule(conn: AsyncConnection, actor: Actor, rule_id: int, reason: str | None = None) -> None:
    rule = await get_rule(conn, rule_id)
    await conn.execute(trigger_rules.delete().where(trigger_rules.c.id == rule_id))
    old = {"name": rule.name, "event_type": rule.event_type, "enabled": rule.enabled}
    await record_action(conn, actor, "trigger_rule.delete", "trigger_rule", rule_id, {"name": rule.name},
                        reason=reason, changes=diff(old, {}))  # fmt: skip
    await conn.commit()


# --- Checking a rule ---------------------------------------------------------------------------


def schema_at(schema: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The sub-schema of a dotted payload field, or None if the schema has no such property."""
    node: dict[str, Any] = schema
    for part in path.split("."):
        properties = node.get("properties")
        if not isinstance(properties, dict) or part not in properties:
            return None
        node = properties[part] if isinstance(properties[part], dict) else {}
    return node


def always_present(schema: dict[str, Any], path: str) -> bool:
    """Whether the schema requires the field (and every object on the way to it)."""
    node: dict[str, Any] = schema
    for part in path.split("."):
        if part not in node.get("required", []):
            return False
        node = node.get("properties", {}).get(part, {})
    return True


def _types(node: dict[str, Any]) -> set[str]:
    declared = node.get("type")
    if declared is None:
        return set()
    return {declared} if isinstance(declared, str) else set(declared)


async def rule_problems(conn: AsyncConnection, rule: RuleDefinition, event_type: str) -> list[tuple[str, str]]:
    """Every reason this rule could not work on events of `event_type`, each naming its field."""
    try:
        schema: dict[str, Any] = (await get_type(conn, event_type)).schema
    except NotFound as err:
        return [("event_type", err.detail)]
    problems: list[tuple[str, str]] = []

    def need(field: str, path: str, what: str, *, required: bool = False) -> None:
        if schema_at(schema, path) is None:
            problems.append((field, f"event type {event_type!r} has no payload field {path!r} ({what})"))
        elif required and not always_present(schema, path):
            problems.append((field, f"payload field {path!r} is optional in {event_type!r}, but {what}"))

    content = await _template(conn, rule.template, rule.template_version, "template", problems)
    if content is not None:
        _check_channels(content, rule, "template", problems)
        problems += _variable_problems(rule, content.variables, schema, event_type, "variables")
    for target in rule.variables.values():
        need("variables", target, "a template variable is taken from it")
    if rule.audience.kind == "user":
        need("audience.field", rule.audience.field, "it names the recipient", required=True)
    else:
        problems += _filter_problems(rule.audience, schema, event_type)
    for index, condition in enumerate(rule.condition):
        need(f"condition.{index}.field", condition.field, "the condition reads it")
        problems += _condition_problems(condition, schema, index)
    if rule.delay is not None:
        problems += _delay_problems(rule.delay, schema, event_type)
    if rule.cancel_on:
        need("correlate_on", rule.correlate_on, "a cancelling event is matched on it", required=True)
        known = {row.name for row in await list_types(conn)}
        for index, name in enumerate(rule.cancel_on):
            if name not in known:
                problems.append((f"cancel_on.{index}", f"no event type {name!r}"))
    if rule.digest is not None:
        digest = await _template(conn, rule.digest.template, rule.digest.template_version, "digest.template", problems)
        if digest is not None:
            _check_channels(digest, rule, "digest.template", problems)
            declared = {spec.name: spec for spec in digest.variables}
            if "events" not in declared or declared["events"].type != "list":
                problems.append(
                    ("digest.template", "the digest template must declare a variable 'events' of type list")
                )
            for spec in digest.variables:
                if spec.name not in DIGEST_VARIABLES and spec.required and spec.default is None:
                    problems.append(
                        (
                            "digest.template",
                            f"variable {spec.name!r} is required, but a digest gives only events and count",
                        )
                    )
    return problems


async def _template(
    conn: AsyncConnection, key: str, version: int | None, field: str, problems: list[tuple[str, str]]
) -> TemplateContent | None:
    try:
        return (await template_store.get(conn, key, version)).content
    except TemplateNotFound as err:
        problems.append((f"{field}_version" if version else field, f"no template {err}"))
        return None


def _check_channels(
    content: TemplateContent, rule: RuleDefinition, field: str, problems: list[tuple[str, str]]
) -> None:
    for index, channel in enumerate(rule.channels):
        if channel.value not in content.channels():
            problems.append((f"channels.{index}", f"the {field.replace('.', ' ')} has no {channel.value} part"))


def _variable_problems(
    rule: RuleDefinition, specs: list[VariableSpec], schema: dict[str, Any], event_type: str, field: str
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    declared = {spec.name for spec in specs}
    for name in rule.variables:
        if name not in declared:
            problems.append((f"{field}.{name}", f"template {rule.template!r} declares no variable {name!r}"))
    for spec in specs:
        source = rule.variables.get(spec.name, spec.name)
        node = schema_at(schema, source)
        optional = not spec.required or spec.default is not None
        if node is None:
            if not optional:
                problems.append(
                    (
                        f"{field}.{spec.name}",
                        f"required by template {rule.template!r}, but event type "
                        f"{event_type!r} has no payload field {source!r}; map one in variables",
                    )
                )
            continue
        if not optional and not always_present(schema, source):
            problems.append(
                (
                    f"{field}.{spec.name}",
                    f"required by template {rule.template!r}, but payload field "
                    f"{source!r} is optional in {event_type!r}",
                )
            )
        types = _types(node)
        if types and not types & _FITS[spec.type]:
            problems.append(
                (
                    f"{field}.{spec.name}",
                    f"template variable is a {spec.type}, payload field {source!r} is {'/'.join(sorted(types))}",
                )
            )
    return problems


def _filter_problems(audience: SegmentAudience, schema: dict[str, Any], event_type: str) -> list[tuple[str, str]]:
    problems = [
        ("audience.filter", f"${{{name}}}: event type {event_type!r} has no payload field {name!r}")
        for name in placeholders(audience.filter)
        if schema_at(schema, name) is None
    ]
    # The filter must hold whatever the payload quoted: check it with a sample value each.
    sample = fill(audience.filter, _Sample())
    try:
        SegmentFilter.model_validate({"root": sample})
    except ValueError as err:
        problems.append(("audience.filter", str(err).split("\n", 1)[-1].strip()))
    return problems


class _Sample(dict[str, Any]):
    """A payload where every field is present, as the text "sample"."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> Any:
        return "sample"


def _condition_problems(condition: PayloadCondition, schema: dict[str, Any], index: int) -> list[tuple[str, str]]:
    node = schema_at(schema, condition.field)
    if node is None or condition.op not in ("gt", "gte", "lt", "lte"):
        return []
    types = _types(node)
    numeric = isinstance(condition.value, int | float) and not isinstance(condition.value, bool)
    if types and numeric and not types & {"number", "integer"}:
        return [(f"condition.{index}.value", f"a number, but payload field {condition.field!r} is {'/'.join(types)}")]
    return []


def _delay_problems(delay: Delay, schema: dict[str, Any], event_type: str) -> list[tuple[str, str]]:
    if delay.from_field is None:
        return []
    node = schema_at(schema, delay.from_field)
    if node is None:
        return [("delay.from_field", f"event type {event_type!r} has no payload field {delay.from_field!r}")]
    if node.get("format") != "date-time":
        return [
            (
                "delay.from_field",
                f'payload field {delay.from_field!r} must be {{"type": "string", '
                '"format": "date-time"}} to time a send',
            )
        ]
    if not always_present(schema, delay.from_field):
        return [("delay.from_field", f"payload field {delay.from_field!r} must be required to time a send")]
    return []
