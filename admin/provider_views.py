"""Channel providers in the admin: list with breaker states, create/edit, enable/disable,
reset breaker, delete, send a test message.

The pages call the provider operations the API calls (validation, audit, test send), so
the admin accepts exactly what `PUT /v1/providers/{name}` accepts and audits alike. Secrets
are never shown: their inputs are password fields, empty keeps the stored value.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Iterable
from typing import Any

from markupsafe import Markup
from pydantic import BaseModel, ValidationError
from sqladmin import expose
from sqladmin.flash import Flash
from starlette.requests import Request
from starlette.responses import Response

from admin.pages import AdminPage, FormErrors, form_text, not_found, parse_json, pretty_json, reason_of
from core.models import Channel
from core.schemas import ProviderOut, ProviderTestRequest, ProviderWrite
from core.secretbox import SecretsUnreadable
from services.provider_operations import (
    ProviderNotFound,
    ProviderTestOutcome,
    check_definition,
    problem_field,
    provider_exists,
    read_provider,
    read_providers,
    remove,
    reset_breaker,
    save_audited,
    send_test,
    set_enabled,
)
from services.providers import KINDS, ProviderInvalid

PROVIDERS = "providers"  # the permission identity: only admins change providers

NUMBER_FIELDS = ("priority", "rate_limit_per_second", "max_concurrency", "cost_per_message")
FORM_FIELDS = ("name", "channel", "kind", *NUMBER_FIELDS, "currency", "settings")
# The list's one-click actions: the confirmation page's title and what the flash says was done.
ACTIONS = {"enable": ("Enable", "enabled"), "disable": ("Disable", "disabled"),
           "reset-breaker": ("Reset the breaker of", "breaker reset to closed")}  # fmt: skip
STORED_PLACEHOLDER = "stored — leave empty to keep"
BREAKER_COLOURS = {"closed": "green", "half_open": "yellow", "open": "red"}
# What a new provider's settings start from, per kind (the secrets go in their own fields).
EXAMPLES: dict[str, dict[str, Any]] = {
    "smtp": {"host": "smtp.example.com", "port": 587, "sender": "Marquee <news@example.com>",
             "username": "marquee", "start_tls": True},
    "fcm": {"project_id": "my-firebase-project"},
    "sms-json": {"base_url": "https://sms.example.com/api", "sender": "+15551234567"},
    "twilio": {"account_sid": "AC" + "0" * 32, "sender": "+15551234567"},
    "sandbox": {},
}  # fmt: skip
DEFAULT_KIND = {"email": "smtp", "push": "sandbox", "sms": "sandbox"}


def breaker_badge(breaker: Any) -> Markup:
    label = breaker.state.replace("_", "-")
    colour = BREAKER_COLOURS.get(breaker.state, "secondary")
    if breaker.state == "closed" and breaker.consecutive_failures:
        label += f" ({breaker.consecutive_failures} failure{'s' if breaker.consecutive_failures != 1 else ''})"
    return Markup('<span class="badge bg-{0}-lt breaker-state" data-state="{1}">{2}</span>').format(
        colour, breaker.state, label
    )


def _wants_json(model: type[BaseModel], field: str) -> bool:
    """A secret that is a JSON object (an FCM service account), not a string."""
    annotation = model.model_fields[field].annotation
    options = typing.get_args(annotation) or (annotation,)
    return any(isinstance(option, type) and issubclass(option, BaseModel) for option in options)


def secret_fields(kind: str) -> list[str]:
    """The kind's secret fields, its own first, the shared webhook_secret last."""
    fields = list(KINDS[kind].secrets.model_fields)
    return sorted(fields, key=lambda name: name == "webhook_secret")


def settings_hint(kind: str) -> str:
    fields = KINDS[kind].settings.model_fields
    return ", ".join(f"{name}{' (required)' if info.is_required() else ''}" for name, info in fields.items())


def kinds_context() -> dict[str, Any]:
    kinds = {kind: {"channels": sorted(spec.channels), "description": spec.description,
                    "secrets": [(field, _wants_json(spec.secrets, field)) for field in secret_fields(kind)],
                    "hint": settings_hint(kind)} for kind, spec in KINDS.items()}  # fmt: skip
    return {"kinds": kinds, "examples_json": json.dumps({kind: pretty_json(v) for kind, v in EXAMPLES.items()})}


def read_secrets(submitted: Any, kind: str, errors: FormErrors) -> dict[str, Any] | None:
    """The secret fields filled in for `kind` ("" for the ones ticked to remove), or None
    when none was touched (the stored secrets stay)."""
    if kind not in KINDS:
        return None
    spec = KINDS[kind]
    secrets: dict[str, Any] = {}
    for field in secret_fields(kind):
        if submitted.get(f"clear-{kind}-{field}") == "on":
            secrets[field] = ""
            continue
        raw = submitted.get(f"secret-{kind}-{field}")
        value = raw.strip() if isinstance(raw, str) else ""
        if not value:
            continue
        if _wants_json(spec.secrets, field):
            parsed = parse_json(errors, f"secrets.{field}", value, want=dict)
            if parsed is not None:
                secrets[field] = parsed
        else:
            secrets[field] = value
    return secrets or None


def _number(text: str) -> str | None:
    return text or None  # empty: left out (a default) or, for the rate limit, no limit


def add_problems(errors: FormErrors, problems: Iterable[str], *, skip: Iterable[str] = ()) -> None:
    """Domain problems ("settings.port: ...") as form problems, except under `skip`
    (fields whose input did not parse, where the check saw a stand-in value)."""
    skipped = tuple(skip)
    for problem in problems:
        field, message = problem_field(problem)
        if not any(field == name or field.startswith(f"{name}.") for name in skipped):
            errors.add(field, message)


class ProviderPages(AdminPage):
    name = "Providers"
    icon = "fa-solid fa-plug"
    permission = PROVIDERS

    # The first exposed route is the one the menu links to.
    @expose("/providers", identity="providers")
    async def list_page(self, request: Request) -> Response:
        settings = self.settings()
        async with self.connect() as conn:
            rows = await read_providers(conn, settings, full=self.can_change(request))
        groups = {channel.value: [row for row in rows if row.channel == channel.value] for channel in Channel}
        fallback = {"email": f"SMTP at {settings.smtp_host}:{settings.smtp_port} (MARQUEE_SMTP_*)",
                    "push": f"{settings.push_provider} (MARQUEE_PUSH_PROVIDER)",
                    "sms": f"{settings.sms_provider} (MARQUEE_SMS_PROVIDER)"}  # fmt: skip
        # Stored providers all disabled and only the sandbox behind them: sends wait for one
        # (services.delivery), rather than report sandbox messages as sent.
        waits = {"email": False, "push": settings.push_provider == "sandbox", "sms": settings.sms_provider == "sandbox"}
        context = {"title": "Providers", "groups": groups, "fallback": fallback, "waits": waits,
                   "breaker_badge": breaker_badge,
                   "threshold": settings.breaker_failure_threshold,
                   "cooldown": settings.breaker_cooldown_seconds}  # fmt: skip
        return await self.render(request, "marquee/providers/list.html", context)

    @expose("/providers/new", methods=["GET", "POST"], identity="provider-new")
    async def create_page(self, request: Request) -> Response:
        self.require_change(request)
        if request.method == "GET":
            channel = request.query_params.get("channel", "email")
            kind = DEFAULT_KIND.get(channel, "smtp")
            form = {"name": "", "channel": channel, "kind": kind, "priority": "100", "rate_limit_per_second": "",
                    "max_concurrency": "10", "cost_per_message": "0", "currency": "USD",
                    "settings": pretty_json(EXAMPLES[kind])}  # fmt: skip
            return await self._form(request, None, form, True, FormErrors())
        return await self._save(request, None)

    @expose("/providers/change/{name}", methods=["GET", "POST"], identity="provider-edit")
    async def edit_page(self, request: Request) -> Response:
        self.require_change(request)
        name = request.path_params["name"]
        async with self.connect() as conn:
            try:
                record = await read_provider(conn, self.settings(), name)
            except ProviderNotFound as err:
                raise not_found(f"provider {name!r}") from err
        if request.method == "GET":
            form = {"name": record.name, "channel": record.channel, "kind": record.kind,
                    "priority": str(record.priority),
                    "rate_limit_per_second": "" if record.rate_limit_per_second is None
                    else f"{record.rate_limit_per_second:g}",
                    "max_concurrency": str(record.max_concurrency), "cost_per_message": f"{record.cost_per_message:g}",
                    "currency": record.currency, "settings": pretty_json(record.settings or {})}  # fmt: skip
            return await self._form(request, record, form, record.enabled, FormErrors())
        return await self._save(request, record)

    async def _save(self, request: Request, record: ProviderOut | None) -> Response:
        """Validate everything (form parsing, then the kind's checks), save only if all is well."""
        submitted = await request.form()
        form = {name: form_text(submitted, name) for name in FORM_FIELDS}
        if record is not None:
            form["name"] = record.name
        enabled = submitted.get("enabled") == "on"
        errors = FormErrors()
        # A provider change is risky (where messages go): audited with its reason, as in the API.
        form["reason"] = form_text(submitted, "reason")
        reason = reason_of(submitted, errors)
        settings_value = parse_json(errors, "settings", form["settings"] or "{}", want=dict)
        secrets = read_secrets(submitted, form["kind"], errors)
        payload: dict[str, Any] = {"channel": form["channel"], "kind": form["kind"],
                                   "settings": settings_value if settings_value is not None else {},
                                   "secrets": secrets, "enabled": enabled,
                                   "currency": form["currency"].strip().upper() or "USD"}  # fmt: skip
        payload.update({field: _number(form[field]) for field in NUMBER_FIELDS if _number(form[field]) is not None})
        body: ProviderWrite | None = None
        try:
            body = ProviderWrite.model_validate(payload)
        except ValidationError as err:
            errors.add_validation(err, skip=[name for name in ("settings", "secrets") if errors.has(name)])
        # The kind's own checks too, with stand-ins for what did not parse: every problem at once.
        stand_in = body.model_dump() if body is not None else self._stand_in(payload, errors)
        key = self.settings().fernet_key()
        name = form["name"]
        async with self.connect() as conn:
            try:
                if record is None and await provider_exists(conn, name):
                    errors.add("name", f"a provider named {name!r} exists already")
                if stand_in is not None:
                    add_problems(errors, await check_definition(conn, key, name, stand_in),
                                 skip=[problem.part.split(".")[0] for problem in errors.problems])  # fmt: skip
                if not errors and body is not None:
                    await save_audited(conn, key, name, body.model_dump(), self.actor(request), reason)
                    await conn.commit()
                    Flash.success(request, f"Provider {name} {'created' if record is None else 'saved'}.")
                    return self.redirect(request.url_for("admin:view-providers"))
            except ProviderInvalid as err:  # changed since the check (another admin): still nothing saved
                add_problems(errors, err.problems)
            except SecretsUnreadable:
                errors.add("secrets", "the stored secrets do not decrypt with MARQUEE_SECRETS_KEY: restore the key, "
                           "or delete and recreate the provider")  # fmt: skip
        return await self._form(request, record, form, enabled, errors, status_code=400)

    @staticmethod
    def _stand_in(payload: dict[str, Any], errors: FormErrors) -> dict[str, Any] | None:
        """The payload with defaults in place of the fields that did not validate."""
        try:
            valid = {name: value for name, value in payload.items() if not errors.has(name)}
            return ProviderWrite.model_validate(valid).model_dump()
        except ValidationError:
            return None

    async def _form(
        self,
        request: Request,
        record: ProviderOut | None,
        form: dict[str, str],
        enabled: bool,
        errors: FormErrors,
        status_code: int = 200,
    ) -> Response:
        stored = set(record.secrets_set or []) if record is not None else set()
        context = {"title": f"Edit provider {record.name}" if record else "New provider", "record": record,
                   "form": form, "enabled": enabled, "errors": errors, "channels": [c.value for c in Channel],
                   "stored": stored, "stored_kind": record.kind if record else None,
                   "placeholder": STORED_PLACEHOLDER, **kinds_context()}  # fmt: skip
        return await self.render(request, "marquee/providers/form.html", context, status_code)

    @expose("/providers/act/{name}/{operation}", methods=["GET", "POST"], identity="provider-act")
    async def act(self, request: Request) -> Response:
        """Enable, disable or reset the breaker, after asking why (audited): the outcome
        comes back to the list as a flash message; without a reason, the form again."""
        self.require_change(request)
        name, operation = request.path_params["name"], request.path_params["operation"]
        if operation not in ACTIONS:
            raise not_found(f"action {operation!r}")
        errors = FormErrors()
        reason = ""
        async with self.connect() as conn:
            try:
                record = await read_provider(conn, self.settings(), name)
                if request.method == "POST":
                    submitted = await request.form()
                    reason = form_text(submitted, "reason")
                    checked = reason_of(submitted, errors)
                    if not errors:
                        if operation == "reset-breaker":
                            await reset_breaker(conn, name, self.actor(request), checked)
                        else:
                            await set_enabled(conn, name, operation == "enable", self.actor(request), checked)
                        await conn.commit()
                        Flash.success(request, f"Provider {name}: {ACTIONS[operation][1]}.")
                        return self.redirect(request.url_for("admin:view-providers"))
            except ProviderNotFound as err:
                raise not_found(f"provider {name!r}") from err
        context = {"title": f"{ACTIONS[operation][0]} provider {name}", "record": record, "operation": operation,
                   "action_label": ACTIONS[operation][0], "reason": reason, "errors": errors,
                   "breaker_badge": breaker_badge}  # fmt: skip
        return await self.render(request, "marquee/providers/act.html", context, 400 if errors else 200)

    @expose("/providers/delete/{name}", methods=["GET", "POST"], identity="provider-delete")
    async def delete_page(self, request: Request) -> Response:
        self.require_change(request)
        name = request.path_params["name"]
        errors = FormErrors()
        reason = ""
        async with self.connect() as conn:
            try:
                record = await read_provider(conn, self.settings(), name)
                if request.method == "POST":
                    submitted = await request.form()
                    reason = form_text(submitted, "reason")
                    checked = reason_of(submitted, errors)
                    if not errors:
                        await remove(conn, name, self.actor(request), checked)
                        await conn.commit()
                        Flash.success(request, f"Provider {name} deleted.")
                        return self.redirect(request.url_for("admin:view-providers"))
            except ProviderNotFound as err:
                raise not_found(f"provider {name!r}") from err
        context = {"title": f"Delete provider {name}", "record": record, "breaker_badge": breaker_badge,
                   "reason": reason, "errors": errors}  # fmt: skip
        return await self.render(request, "marquee/providers/delete.html", context, 400 if errors else 200)

    @expose("/providers/test/{name}", methods=["GET", "POST"], identity="provider-test")
    async def test_page(self, request: Request) -> Response:
        """Send one real message through the stored provider and show what it answered."""
        self.require_change(request)
        name = request.path_params["name"]
        settings = self.settings()
        errors = FormErrors()
        outcome: ProviderTestOutcome | None = None
        defaults = ProviderTestRequest.model_fields
        form = {"to": "", "title": str(defaults["title"].default), "body": str(defaults["body"].default)}
        async with self.connect() as conn:
            try:
                record = await read_provider(conn, settings, name)
                if request.method == "POST":
                    submitted = await request.form()
                    form = {field: form_text(submitted, field) for field in form}
                    try:
                        message = ProviderTestRequest.model_validate(form)
                    except ValidationError as err:
                        errors.add_validation(err, empty={field for field, value in form.items() if not value})
                    else:
                        outcome = await send_test(conn, self._app_state().engine, settings, name, message,
                                                  self.actor(request))  # fmt: skip
            except ProviderNotFound as err:
                raise not_found(f"provider {name!r}") from err
            except SecretsUnreadable:
                errors.add("secrets", "the stored secrets do not decrypt with MARQUEE_SECRETS_KEY")
        context = {"title": f"Send a test message through {name}", "record": record, "form": form,
                   "errors": errors, "outcome": outcome}  # fmt: skip
        return await self.render(request, "marquee/providers/test.html", context, 400 if errors else 200)
