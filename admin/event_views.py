"""Events in the admin: the event types (payload schemas), the trigger rules on them, and
the events received with what each rule made of them.

Types and rules are saved through services.event_rules, as the API saves them: the same
checks (every problem of a rule at once, listed above the form), the same audit rows with
the signed-in user as the actor. Campaign managers and admins change them; other roles look.
The events list is a SQLAdmin table (paged, sortable, filtered by type); an event's page
comes from services.events.get.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from markupsafe import Markup
from pydantic import TypeAdapter, ValidationError
from sqladmin import expose
from sqladmin.filters import AllUniqueStringValuesFilter
from sqladmin.flash import Flash
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from admin.pages import (
    AdminPage,
    FormErrors,
    ReadOnlyView,
    form_text,
    not_found,
    parse_json,
    pretty_json,
    reason_of,
    when,
)
from core.errors import Conflict, Invalid, NotFound
from core.events import Delay, Digest, EventTypeName, RuleDefinition
from core.models import Event
from core.schemas import EventTypeIn, TriggerRuleIn
from services import event_rules
from services import events as event_store
from services.event_rules import RuleRecord

# Permission identities: RolePermissions maps them to the permission table's actions.
EVENT_TYPES = "event-types"
TRIGGER_RULES = "trigger-rules"
EVENTS = "event"  # the same as the events list (a ModelView of Event)

TYPE_NAME_HINT = "lowercase words joined by dots, e.g. episode.released (at most 100 characters)"
STARTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["user_id"],
    "properties": {"user_id": {"type": "string"}},
}
# What a new rule's definition starts from: every field a rule has, with its default.
STARTER_RULE: dict[str, Any] = {
    "template": "",
    "template_version": None,
    "channels": ["email"],
    "category": "",
    "priority": "normal",
    "audience": {"kind": "user", "field": "user_id"},
    "condition": [],
    "variables": {},
    "delay": None,
    "cancel_on": [],
    "correlate_on": "user_id",
    "digest": None,
}
RULE_HEAD = ("name", "event_type", "enabled")  # the rule's own inputs, beside its definition
STATUS_COLOURS = {"waiting": "blue", "sent": "green", "digested": "teal", "cancelled": "secondary",
                  "skipped": "secondary", "failed": "red"}  # fmt: skip
_type_name: TypeAdapter[str] = TypeAdapter(EventTypeName)


# --- Summaries -----------------------------------------------------------------------------------


def duration(seconds: int) -> str:
    """A span as people read it: 90 -> "1 min 30 s", 259200 -> "3 d"."""
    parts, left = [], abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size} {unit}")
            left %= size
    return " ".join(parts) or "0 s"


def delay_summary(delay: Delay | None) -> str:
    if delay is None:
        return "at once"
    base = f"{delay.from_field}" if delay.from_field else "the event"
    if delay.offset_seconds == 0:
        text = f"at {base}" if delay.from_field else "at once"
    else:
        text = f"{duration(delay.offset_seconds)} {'before' if delay.offset_seconds < 0 else 'after'} {base}"
    if delay.at_local_time is not None:
        text += f", then at {delay.at_local_time} local time"
    return text


def digest_summary(digest: Digest | None) -> str:
    if digest is None:
        return ""
    window = digest.window_seconds
    cadence = f"every {duration(window)}" if window else f"daily at {digest.at_local_time}"
    version = f"@v{digest.template_version}" if digest.template_version else ""
    return f"digest {cadence} with {digest.template}{version}"


def template_label(key: str, version: int | None) -> str:
    return f"{key}@v{version}" if version else f"{key} (active version)"


def audience_summary(rule: RuleDefinition) -> str:
    audience = rule.audience
    return f"user in payload.{audience.field}" if audience.kind == "user" else "segment (fan-out)"


def status_badge(status: str) -> Markup:
    colour = STATUS_COLOURS.get(status, "secondary")
    return Markup('<span class="badge bg-{0}-lt action-status">{1}</span>').format(colour, status)


# The form's hint for the definition's fields the model leaves undescribed.
FIELD_HINTS = {
    "template": "The template's key",
    "channels": "1 to 3 of email, push, sms; the template must have each",
    "priority": "normal or urgent",
    "audience": "Who gets it (below); default: the user in payload.user_id",
    "delay": "When to send (below); null: at once",
    "cancel_on": "Event types whose arrival cancels a send still waiting",
    "digest": "Collect a recipient's events into one message (below)",
}


def rule_fields() -> list[tuple[str, bool, str]]:
    """A definition's fields for the form's hint: name, required, description."""
    return [
        (name, info.is_required(), info.description or FIELD_HINTS.get(name, ""))
        for name, info in RuleDefinition.model_fields.items()
    ]


def _summaries() -> dict[str, Callable[..., Any]]:
    return {"delay_summary": delay_summary, "digest_summary": digest_summary, "template_label": template_label,
            "audience_summary": audience_summary}  # fmt: skip


# --- Event types -----------------------------------------------------------------------------------


class EventTypePages(AdminPage):
    name = "Event types"
    icon = "fa-solid fa-tags"
    permission = EVENT_TYPES

    # The first exposed route is the one the menu links to.
    @expose("/event-types", identity="event-types")
    async def list_page(self, request: Request) -> Response:
        async with self.connect() as conn:
            rows = await event_rules.list_types(conn)
            rules = await event_rules.list_rules(conn)
        used = {row.name: sum(1 for rule in rules if rule.event_type == row.name) for row in rows}
        context = {"title": "Event types", "rows": rows, "used": used}
        return await self.render(request, "marquee/event_types/list.html", context)

    @expose("/event-types/view/{name}", identity="event-type")
    async def detail_page(self, request: Request) -> Response:
        name = request.path_params["name"]
        async with self.connect() as conn:
            row = await self._type(conn, name)
            rules = await event_rules.list_rules(conn, name)
        context = {"title": f"Event type {name}", "row": row, "rules": rules, **_summaries()}
        return await self.render(request, "marquee/event_types/detail.html", context)

    @expose("/event-types/new", methods=["GET", "POST"], identity="event-type-new")
    async def create_page(self, request: Request) -> Response:
        self.require_change(request)
        if request.method == "GET":
            form = {"name": "", "description": "", "schema": pretty_json(STARTER_SCHEMA)}
            return await self._form(request, None, form, FormErrors())
        return await self._save(request, None)

    @expose("/event-types/change/{name}", methods=["GET", "POST"], identity="event-type-edit")
    async def edit_page(self, request: Request) -> Response:
        self.require_change(request)
        name = request.path_params["name"]
        async with self.connect() as conn:
            row = await self._type(conn, name)
        if request.method == "GET":
            form = {"name": row.name, "description": row.description, "schema": pretty_json(row.schema)}
            return await self._form(request, row, form, FormErrors())
        return await self._save(request, row)

    async def _save(self, request: Request, row: sa.Row[Any] | None) -> Response:
        """Check the name, the JSON and the schema together; save only if all is well."""
        submitted = await request.form()
        form = {field: form_text(submitted, field) for field in ("name", "description", "schema")}
        if row is not None:
            form["name"] = row.name  # a type's name is its key: it cannot change
        errors = FormErrors()
        if not form["name"]:
            errors.add("name", "required")
        else:
            try:
                _type_name.validate_python(form["name"])
            except ValidationError:
                errors.add("name", TYPE_NAME_HINT)
        schema = parse_json(errors, "schema", form["schema"] or "{}", want=dict)
        try:
            EventTypeIn.model_validate({"description": form["description"], "schema": schema or {}})
        except ValidationError as err:
            errors.add_validation(err, skip=["schema"] if schema is None else ())
        if schema is not None:
            try:
                event_rules.check_schema(schema)
            except Invalid as err:
                for field, message in err.problems:
                    errors.add(field, message)
        async with self.connect() as conn:
            if row is None and not errors.has("name"):
                try:
                    await event_rules.get_type(conn, form["name"])
                    errors.add("name", f"an event type named {form['name']!r} exists already")
                except NotFound:
                    pass
            if not errors and schema is not None:
                try:
                    await event_rules.put_type(conn, self.actor(request), form["name"], schema, form["description"])
                except Invalid as err:
                    for field, message in err.problems:
                        errors.add(field, message)
                except Conflict as err:  # the new schema would break a rule on it
                    errors.add("schema", err.detail)
                else:
                    Flash.success(request, f"Event type {form['name']} {'registered' if row is None else 'saved'}.")
                    return self.redirect(request.url_for("admin:view-event-type", name=form["name"]))
        return await self._form(request, row, form, errors, status_code=400)

    async def _form(
        self,
        request: Request,
        row: sa.Row[Any] | None,
        form: dict[str, str],
        errors: FormErrors,
        status_code: int = 200,
    ) -> Response:
        context = {"title": f"Edit event type {row.name}" if row else "New event type", "row": row, "form": form,
                   "errors": errors, "name_hint": TYPE_NAME_HINT}  # fmt: skip
        return await self.render(request, "marquee/event_types/form.html", context, status_code)

    @expose("/event-types/delete/{name}", methods=["GET", "POST"], identity="event-type-delete")
    async def delete_page(self, request: Request) -> Response:
        """Confirm, then delete; refused (with the rules named) while a rule uses the type."""
        self.require_change(request)
        name = request.path_params["name"]
        errors = FormErrors()
        reason = ""
        async with self.connect() as conn:
            row = await self._type(conn, name)
            if request.method == "POST":
                submitted = await request.form()
                reason = form_text(submitted, "reason")
                checked = reason_of(submitted, errors)  # audited, as the API requires it
                try:
                    if not errors:
                        await event_rules.delete_type(conn, self.actor(request), name, checked)
                except Conflict as err:
                    errors.add("event_type", err.detail)
                except NotFound as err:  # deleted meanwhile
                    raise not_found(f"event type {name!r}") from err
                else:
                    if not errors:
                        Flash.success(request, f"Event type {name} deleted.")
                        return self.redirect(request.url_for("admin:view-event-types"))
            rules = await event_rules.list_rules(conn, name)
        context = {"title": f"Delete event type {name}", "row": row, "rules": rules, "errors": errors,
                   "reason": reason}  # fmt: skip
        # In use: 409 whatever else is missing; only a missing reason: 400.
        code = 409 if errors and (rules or errors.has("event_type")) else 400 if errors else 200
        return await self.render(request, "marquee/event_types/delete.html", context, code)

    @staticmethod
    async def _type(conn: AsyncConnection, name: str) -> sa.Row[Any]:
        try:
            return await event_rules.get_type(conn, name)
        except NotFound as err:
            raise not_found(f"event type {name!r}") from err


# --- Trigger rules ---------------------------------------------------------------------------------


class TriggerRulePages(AdminPage):
    name = "Trigger rules"
    icon = "fa-solid fa-diagram-project"
    permission = TRIGGER_RULES

    @expose("/trigger-rules", identity="trigger-rules")
    async def list_page(self, request: Request) -> Response:
        event_type = request.query_params.get("event_type", "").strip()
        async with self.connect() as conn:
            rules = await event_rules.list_rules(conn, event_type or None)
            types = [row.name for row in await event_rules.list_types(conn)]
        context = {"title": "Trigger rules", "rules": rules, "types": types, "event_type": event_type,
                   **_summaries()}  # fmt: skip
        return await self.render(request, "marquee/event_rules/list.html", context)

    @expose("/trigger-rules/view/{rule_id:int}", identity="trigger-rule")
    async def detail_page(self, request: Request) -> Response:
        async with self.connect() as conn:
            rule = await self._rule(conn, request.path_params["rule_id"])
        context = {"title": f"Trigger rule {rule.name}", "rule": rule,
                   "definition": pretty_json(rule.definition.model_dump(mode="json")), **_summaries()}  # fmt: skip
        return await self.render(request, "marquee/event_rules/detail.html", context)

    @expose("/trigger-rules/new", methods=["GET", "POST"], identity="trigger-rule-new")
    async def create_page(self, request: Request) -> Response:
        self.require_change(request)
        if request.method == "GET":
            form = {"name": "", "event_type": request.query_params.get("event_type", ""),
                    "definition": pretty_json(STARTER_RULE)}  # fmt: skip
            return await self._form(request, None, form, True, FormErrors())
        return await self._save(request, None)

    @expose("/trigger-rules/change/{rule_id:int}", methods=["GET", "POST"], identity="trigger-rule-edit")
    async def edit_page(self, request: Request) -> Response:
        self.require_change(request)
        async with self.connect() as conn:
            rule = await self._rule(conn, request.path_params["rule_id"])
        if request.method == "GET":
            form = {"name": rule.name, "event_type": rule.event_type,
                    "definition": pretty_json(rule.definition.model_dump(mode="json"))}  # fmt: skip
            return await self._form(request, rule, form, rule.enabled, FormErrors())
        return await self._save(request, rule)

    async def _save(self, request: Request, rule: RuleRecord | None) -> Response:
        """Every problem at once: the inputs, the definition's shape, then what the service
        finds against the event type's schema and the templates. Saved only if none."""
        submitted = await request.form()
        form = {field: form_text(submitted, field) for field in ("name", "event_type", "definition")}
        enabled = submitted.get("enabled") == "on"
        errors = FormErrors()
        parsed = parse_json(errors, "definition", form["definition"] or "{}", want=dict)
        for field in RULE_HEAD:
            if parsed is not None and field in parsed:
                errors.add("definition", f"{field!r} has its own input above; leave it out of the definition")
        body: TriggerRuleIn | None = None
        try:
            head = {"name": form["name"], "event_type": form["event_type"], "enabled": enabled}
            body = TriggerRuleIn.model_validate({**(parsed or {}), **head})
        except ValidationError as err:
            # JSON that did not parse is reported once, not as every definition field missing.
            skip = [] if parsed is not None else [field for field in RuleDefinition.model_fields]
            errors.add_validation(err, empty={field for field in ("name", "event_type") if not form[field]}, skip=skip)
        definition = self._definition(body, parsed)
        async with self.connect() as conn:
            taken = {other.name: other.id for other in await event_rules.list_rules(conn)}
            if form["name"] in taken and (rule is None or taken[form["name"]] != rule.id):
                errors.add("name", f"a rule named {form['name']!r} exists (id {taken[form['name']]})")
            # The service's check needs a definition of the right shape and a plausible type;
            # everything it finds is listed (the definition's shape was fine, so none repeats).
            if definition is not None and form["event_type"] and not errors.has("event_type"):
                for field, message in await event_rules.rule_problems(conn, definition, form["event_type"]):
                    errors.add(field, message)
            if not errors and body is not None and definition is not None:
                try:
                    saved = await event_rules.save_rule(
                        conn, self.actor(request), name=body.name, event_type=body.event_type, enabled=body.enabled,
                        definition=definition, rule_id=rule.id if rule else None,
                    )  # fmt: skip
                except Invalid as err:  # changed since the check (a template, the type): nothing saved
                    for field, message in err.problems:
                        errors.add(field, message)
                except Conflict as err:
                    errors.add("name", err.detail)
                else:
                    Flash.success(request, f"Trigger rule {saved.name} {'created' if rule is None else 'saved'}.")
                    return self.redirect(request.url_for("admin:view-trigger-rule", rule_id=saved.id))
        return await self._form(request, rule, form, enabled, errors, status_code=400)

    @staticmethod
    def _definition(body: TriggerRuleIn | None, parsed: dict[str, Any] | None) -> RuleDefinition | None:
        """The definition to check against the service, also when only a head input is wrong."""
        if body is not None:
            return RuleDefinition.model_validate(body.model_dump(exclude=set(RULE_HEAD)))
        if parsed is None:
            return None
        try:
            return RuleDefinition.model_validate({key: value for key, value in parsed.items() if key not in RULE_HEAD})
        except ValidationError:
            return None  # already listed

    async def _form(
        self,
        request: Request,
        rule: RuleRecord | None,
        form: dict[str, str],
        enabled: bool,
        errors: FormErrors,
        status_code: int = 200,
    ) -> Response:
        async with self.connect() as conn:
            types = {row.name: pretty_json(row.schema) for row in await event_rules.list_types(conn)}
        context = {"title": f"Edit trigger rule {rule.name}" if rule else "New trigger rule", "rule": rule,
                   "form": form, "enabled": enabled, "errors": errors, "types": types, "fields": rule_fields(),
                   "head": RULE_HEAD}  # fmt: skip
        return await self.render(request, "marquee/event_rules/form.html", context, status_code)

    @expose("/trigger-rules/delete/{rule_id:int}", methods=["GET", "POST"], identity="trigger-rule-delete")
    async def delete_page(self, request: Request) -> Response:
        self.require_change(request)
        errors = FormErrors()
        reason = ""
        async with self.connect() as conn:
            rule = await self._rule(conn, request.path_params["rule_id"])
            if request.method == "POST":
                submitted = await request.form()
                reason = form_text(submitted, "reason")
                checked = reason_of(submitted, errors)  # audited, as the API requires it
                if not errors:
                    try:
                        await event_rules.delete_rule(conn, self.actor(request), rule.id, checked)
                    except NotFound as err:
                        raise not_found(f"trigger rule {rule.id}") from err
                    Flash.success(request, f"Trigger rule {rule.name} deleted.")
                    return self.redirect(request.url_for("admin:view-trigger-rules"))
        context = {"title": f"Delete trigger rule {rule.name}", "rule": rule, "errors": errors, "reason": reason,
                   **_summaries()}  # fmt: skip
        return await self.render(request, "marquee/event_rules/delete.html", context, 400 if errors else 200)

    @staticmethod
    async def _rule(conn: AsyncConnection, rule_id: int) -> RuleRecord:
        try:
            return await event_rules.get_rule(conn, rule_id)
        except NotFound as err:
            raise not_found(f"trigger rule {rule_id}") from err


# --- Events ------------------------------------------------------------------------------------------


def event_link(event: Event, request: Request) -> Markup:
    url = request.url_for("admin:view-event").include_query_params(id=event.id)
    return Markup('<a href="{0}" class="event-link">{1}</a>').format(url, event.id)


def type_link(event: Event, request: Request) -> Markup:
    url = request.url_for("admin:view-event-type", name=event.type)
    return Markup('<a href="{0}">{1}</a>').format(url, event.type)


class RegisteredTypeFilter(AllUniqueStringValuesFilter):
    """By type, offered from the registered types: a DISTINCT over the events would read them all."""

    async def lookups(self, request: Request, model: Any, run_query: Callable[[Any], Any]) -> list[tuple[str, str]]:
        names = await run_query(sa.select(event_rules.event_types.c.name).order_by(event_rules.event_types.c.name))
        return [("__all", "All"), *((row[0], row[0]) for row in names)]


class EventAdmin(ReadOnlyView, model=Event):
    name = "Event"
    name_plural = "Events"
    icon = "fa-solid fa-bolt"
    can_view_details = False  # an event's page is EventPages', with what each rule made of it
    column_list = ["id", "type", "source", "received_at"]
    column_searchable_list = ["id"]
    column_sortable_list = ["received_at", "occurred_at", "type"]
    column_default_sort = ("received_at", True)
    column_filters = [RegisteredTypeFilter(Event.type, title="Type")]
    column_export_exclude_list = ["payload_hash"]
    column_formatters = {
        "id": lambda m, a, request: event_link(m, request),
        "type": lambda m, a, request: type_link(m, request),
        "received_at": lambda m, a: when(m.received_at),
    }


class EventPages(AdminPage):
    """An event's page; the list is EventAdmin's."""

    name = "Event pages"
    permission = EVENTS

    def is_visible(self, request: Request) -> bool:
        return False  # reached from the events list, not the menu

    # By query parameter: a publisher's id may hold any printable character, "/" and "?" too.
    @expose("/events/view", identity="event")
    async def detail_page(self, request: Request) -> Response:
        event_id = request.query_params.get("id", "")
        async with self.connect() as conn:
            try:
                row, actions = await event_store.get(conn, event_id)
            except NotFound as err:
                raise not_found(f"event {event_id!r}") from err
        settings = self.settings()
        temporal_ui = f"{settings.temporal_ui_base()}/namespaces/{settings.temporal_namespace}/workflows"
        context = {"title": f"Event {row.id}", "row": row, "actions": actions, "status_badge": status_badge,
                   "temporal_ui": temporal_ui}  # fmt: skip
        return await self.render(request, "marquee/events/detail.html", context)
