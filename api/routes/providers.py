"""Channel providers: configuration, circuit breakers and test sends (admin only to change).

The admin panel's provider pages call the same functions (`save_audited`, `set_enabled`,
`remove`, `reset_breaker`, `send_test`), so both edges validate, audit and answer alike.
Secrets are write-only: answers name the secret fields that are set, never their values,
and the audit log records which fields changed, never what they changed to.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from api.deps import ConnectionDep, SettingsDep, require
from api.problems import Problem
from channels.base import OutboundMessage, SendError
from channels.registry import build_provider
from core.auth import Principal, Role
from core.config import Settings
from core.secretbox import SecretsUnreadable, unseal
from services import audit
from services import breaker as breakers
from services.providers import (
    ProviderInvalid,
    ProviderRecord,
    check_provider,
    delete_provider,
    get_provider,
    providers,
    save_provider,
    task_queue_for,
)

router = APIRouter(prefix="/v1/providers", tags=["providers"])

ProviderAdmin = Annotated[Principal, Depends(require())]  # admin is always allowed, and only admin here
ProviderReader = Annotated[Principal, Depends(require(Role.campaign_manager, Role.analyst))]

ENTITY = "provider"
COMPARED_FIELDS = ("channel", "kind", "priority", "rate_limit_per_second", "max_concurrency", "cost_per_message",
                   "enabled")  # fmt: skip
TOP_LEVEL_FIELDS = frozenset({*COMPARED_FIELDS, "name", "settings", "secrets"})
FIELD_PREFIX = re.compile(r"^([a-z_][\w.-]*): (.+)$", re.DOTALL)


class ProviderWrite(BaseModel):
    """A provider's whole definition (PUT replaces it); only `secrets` may be left out to keep them."""

    model_config = ConfigDict(extra="forbid")

    channel: str = Field(description="email, push or sms")
    kind: str = Field(description="smtp, fcm, sms-json, twilio or sandbox")
    priority: int = Field(default=100, description="Lower is tried first within the channel")
    settings: dict[str, Any] = Field(default_factory=dict, description="The kind's settings (not secret)")
    secrets: dict[str, Any] | None = Field(
        default=None,
        description='Write-only. Left out: the stored secrets stay; a field set to "" is removed; '
        "other fields given replace the stored ones.",
    )
    rate_limit_per_second: float | None = Field(default=None, description="Across all workers; empty = no limit")
    max_concurrency: int = Field(default=10, description="Sends in flight at once, per worker")
    cost_per_message: float = Field(default=0.0)
    enabled: bool = True


class BreakerOut(BaseModel):
    state: str = "closed"
    consecutive_failures: int = 0
    last_error: str | None = None
    opened_at: datetime | None = None


class ProviderOut(BaseModel):
    name: str
    channel: str
    kind: str
    priority: int
    enabled: bool
    rate_limit_per_second: float | None
    max_concurrency: int
    cost_per_message: float
    task_queue: str
    breaker: BreakerOut
    # Shown to admins only (None for other roles): the settings and the names of the secrets set.
    settings: dict[str, Any] | None = None
    secrets_set: list[str] | None = None
    secrets_unreadable: bool = Field(
        default=False, description="The stored secrets do not decrypt with MARQUEE_SECRETS_KEY (was it changed?)"
    )
    updated_at: datetime


class ProviderTestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str = Field(min_length=1, max_length=4096, description="Email address, E.164 phone number or push token")
    title: str = Field(default="Marquee test message", max_length=255)
    body: str = Field(default="This is a test message sent from Marquee.", max_length=4000)


class ProviderTestResult(BaseModel):
    ok: bool
    provider: str
    provider_message_id: str


@dataclass(frozen=True)
class ProviderTestOutcome:
    ok: bool
    provider_message_id: str | None = None
    error: str | None = None


class ProviderNotFound(Exception):
    pass


# --- reading ---------------------------------------------------------------------------


def _breaker_out(state: breakers.Breaker | None) -> BreakerOut:
    if state is None:
        return BreakerOut()
    return BreakerOut(state=state.state.value, consecutive_failures=state.consecutive_failures,
                      last_error=state.last_error, opened_at=state.opened_at)  # fmt: skip


def _public(row: sa.Row[Any], key: bytes, breaker: breakers.Breaker | None, base_queue: str, full: bool) -> ProviderOut:
    secrets_set: list[str] | None = None
    unreadable = False
    if full:
        try:
            secrets_set = sorted(unseal(key, row.secrets))
        except SecretsUnreadable:
            secrets_set, unreadable = [], True
    return ProviderOut(
        name=row.name,
        channel=row.channel,
        kind=row.kind,
        priority=row.priority,
        enabled=row.enabled,
        rate_limit_per_second=row.rate_limit_per_second,
        max_concurrency=row.max_concurrency,
        cost_per_message=row.cost_per_message,
        task_queue=task_queue_for(base_queue, row.name),
        breaker=_breaker_out(breaker),
        settings=dict(row.settings) if full else None,
        secrets_set=secrets_set,
        secrets_unreadable=unreadable,
        updated_at=row.updated_at,
    )


async def read_providers(
    conn: AsyncConnection, settings: Settings, *, full: bool, name: str | None = None
) -> list[ProviderOut]:
    """Providers by channel and priority with their breakers; `full` adds settings and
    the names of the secrets set. A row whose secrets do not decrypt is still listed."""
    query = sa.select(providers).order_by(providers.c.channel, providers.c.priority, providers.c.name)
    if name is not None:
        query = query.where(providers.c.name == name)
    rows = (await conn.execute(query)).all()
    states = await breakers.states(conn)
    key = settings.fernet_key()
    return [_public(row, key, states.get(row.name), settings.temporal_task_queue, full) for row in rows]


async def read_provider(conn: AsyncConnection, settings: Settings, name: str) -> ProviderOut:
    found = await read_providers(conn, settings, full=True, name=name)
    if not found:
        raise ProviderNotFound(name)
    return found[0]


# --- writing (each in the caller's transaction, with its audit row) ----------------------


def problem_field(problem: str) -> tuple[str, str]:
    """(field, message) of a problem: "settings.port: must be ..." names settings.port;
    "kind 'x' is unknown ..." names kind (and keeps its whole text as the message)."""
    placed = FIELD_PREFIX.match(problem)
    if placed:
        return placed[1], placed[2]
    first = problem.split(" ", 1)[0]
    return (first if first in TOP_LEVEL_FIELDS else "provider"), problem


def problem_fields(problems: list[str]) -> list[dict[str, str]]:
    """The problems as the API's error entries: {"field": "settings.port", "message": "..."}."""
    return [dict(zip(("field", "message"), problem_field(problem), strict=True)) for problem in problems]


def changed_fields(before: ProviderRecord | None, after: ProviderRecord) -> list[str]:
    """Names of what a save changed ("settings.port", "secrets.password"): never values."""
    changed = [name for name in COMPARED_FIELDS if before is None or getattr(before, name) != getattr(after, name)]
    for part, old, new in (
        ("settings", before.settings if before else {}, after.settings),
        ("secrets", before.secrets if before else {}, after.secrets),
    ):
        changed += [f"{part}.{name}" for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]
    return changed


async def check_definition(conn: AsyncConnection, key: bytes, name: str, values: dict[str, Any]) -> list[str]:
    """Every problem save_audited would report, without writing (the admin's form checks
    this after its own parsing, so that all problems show at once)."""
    return await check_provider(conn, key, {**values, "name": name})


async def save_audited(
    conn: AsyncConnection, key: bytes, name: str, values: dict[str, Any], *, actor: str, role: str
) -> tuple[ProviderRecord, bool]:
    """Create or replace `name`; returns (record, created). Raises ProviderInvalid with
    every problem (nothing written), or SecretsUnreadable for a row sealed with another key."""
    existing = await get_provider(conn, key, name)
    saved = await save_provider(conn, key, {**values, "name": name})
    details = {"changed": changed_fields(existing, saved), "kind": saved.kind, "channel": saved.channel}
    action = "provider.create" if existing is None else "provider.update"
    await audit.record(conn, actor=actor, role=role, action=action, entity=ENTITY, entity_id=name, details=details)
    return saved, existing is None


async def set_enabled(conn: AsyncConnection, name: str, enabled: bool, *, actor: str, role: str) -> None:
    found = await conn.scalar(
        providers.update()
        .where(providers.c.name == name)
        # updated_at is part of a provider's version: workers pick the change up.
        .values(enabled=enabled, updated_at=sa.func.clock_timestamp())
        .returning(providers.c.id)
    )
    if found is None:
        raise ProviderNotFound(name)
    action = "provider.enable" if enabled else "provider.disable"
    await audit.record(conn, actor=actor, role=role, action=action, entity=ENTITY, entity_id=name,
                       details={"enabled": enabled})  # fmt: skip


async def remove(conn: AsyncConnection, name: str, *, actor: str, role: str) -> None:
    kind = await conn.scalar(sa.select(providers.c.kind).where(providers.c.name == name))
    if kind is None or not await delete_provider(conn, name):
        raise ProviderNotFound(name)
    await audit.record(conn, actor=actor, role=role, action="provider.delete", entity=ENTITY, entity_id=name,
                       details={"kind": kind})  # fmt: skip


async def reset_breaker(conn: AsyncConnection, name: str, *, actor: str, role: str) -> None:
    """Close a provider's circuit by hand; also for a breaker whose provider has no row
    (a fallback provider configured by environment)."""
    known = await conn.scalar(sa.select(providers.c.id).where(providers.c.name == name))
    before = (await breakers.states(conn)).get(name)
    if known is None and before is None:
        raise ProviderNotFound(name)
    await breakers.reset(conn, name)
    details = {"previous_state": before.state.value if before else "closed",
               "consecutive_failures": before.consecutive_failures if before else 0}  # fmt: skip
    await audit.record(conn, actor=actor, role=role, action="provider.breaker_reset", entity=ENTITY, entity_id=name,
                       details=details)  # fmt: skip


async def send_test(
    conn: AsyncConnection,
    engine: AsyncEngine,
    settings: Settings,
    name: str,
    message: ProviderTestRequest,
    *,
    actor: str,
    role: str,
) -> ProviderTestOutcome:
    """Build the provider from its stored row, send one real message, close it; audited
    (and committed) whatever the outcome. The breaker is left alone: this is out of band."""
    record = await get_provider(conn, settings.fernet_key(), name)
    if record is None:
        raise ProviderNotFound(name)
    await conn.commit()  # no transaction held open while the provider answers
    outbound = OutboundMessage(channel=record.channel, address=message.to, title=message.title, body=message.body,
                               idempotency_key=f"test:{name}:{uuid.uuid4()}")  # fmt: skip
    try:
        provider = build_provider(name=record.name, channel=record.channel, kind=record.kind,
                                  settings=record.settings, secrets=record.secrets, engine=engine)  # fmt: skip
        try:
            async with asyncio.timeout(settings.send_timeout_seconds):
                receipt = await provider.send(outbound)
        finally:
            await provider.close()
    except SendError as err:
        outcome = ProviderTestOutcome(ok=False, error=f"{type(err).__name__}: {err}")
    except TimeoutError:
        outcome = ProviderTestOutcome(ok=False, error=f"no answer within {settings.send_timeout_seconds:g} s")
    except (ValueError, OSError) as err:  # a configuration the kind could not build from, a socket error
        outcome = ProviderTestOutcome(ok=False, error=f"{type(err).__name__}: {err}")
    else:
        outcome = ProviderTestOutcome(ok=True, provider_message_id=receipt.message_id)
    details: dict[str, Any] = {"to": message.to, "ok": outcome.ok}
    details.update({"provider_message_id": outcome.provider_message_id} if outcome.ok else {"error": outcome.error})
    await audit.record(conn, actor=actor, role=role, action="provider.test", entity=ENTITY, entity_id=name,
                       details=details)  # fmt: skip
    await conn.commit()
    return outcome


# --- routes ----------------------------------------------------------------------------


def _not_found(name: str) -> Problem:
    return Problem(404, "Not found", f"no provider {name!r}")


def _invalid(err: ProviderInvalid) -> Problem:
    detail = f"{len(err.problems)} problem(s): {err}"
    return Problem(422, "Provider is invalid", detail, problem_fields(err.problems))


def _unreadable(name: str) -> Problem:
    detail = (f"the stored secrets of {name!r} do not decrypt with MARQUEE_SECRETS_KEY (was it changed?): "
              "restore the key, or delete and recreate the provider")  # fmt: skip
    return Problem(409, "Secrets unreadable", detail)


@router.get("", response_model=list[ProviderOut], response_model_exclude_none=False)
async def list_all(conn: ConnectionDep, settings: SettingsDep, reader: ProviderReader) -> Any:
    """Every provider with its breaker; admins also see settings and which secrets are set."""
    return await read_providers(conn, settings, full=reader.role == Role.admin)


@router.get("/{name}", response_model=ProviderOut)
async def get_one(name: str, conn: ConnectionDep, settings: SettingsDep, _: ProviderAdmin) -> Any:
    try:
        return await read_provider(conn, settings, name)
    except ProviderNotFound as err:
        raise _not_found(name) from err


@router.put("/{name}", response_model=ProviderOut, responses={201: {"model": ProviderOut}})
async def put_provider(
    name: str, body: ProviderWrite, response: Response, conn: ConnectionDep, settings: SettingsDep, admin: ProviderAdmin
) -> Any:
    """Create (201) or replace (200) a provider. Every problem comes back at once (422)."""
    try:
        _, created = await save_audited(conn, settings.fernet_key(), name, body.model_dump(),
                                        actor=admin.subject, role=admin.role.value)  # fmt: skip
    except ProviderInvalid as err:
        raise _invalid(err) from None
    except SecretsUnreadable as err:
        raise _unreadable(name) from err
    except sa.exc.IntegrityError as err:  # the same name created at the same moment
        raise Problem(409, "Conflict", f"provider {name!r} was created concurrently; retry") from err
    await conn.commit()
    if created:
        response.status_code = status.HTTP_201_CREATED
    return await read_provider(conn, settings, name)


async def _toggle(name: str, enabled: bool, conn: AsyncConnection, settings: Settings, admin: Principal) -> Any:
    try:
        await set_enabled(conn, name, enabled, actor=admin.subject, role=admin.role.value)
    except ProviderNotFound as err:
        raise _not_found(name) from err
    await conn.commit()
    return await read_provider(conn, settings, name)


@router.post("/{name}/enable", response_model=ProviderOut)
async def enable(name: str, conn: ConnectionDep, settings: SettingsDep, admin: ProviderAdmin) -> Any:
    return await _toggle(name, True, conn, settings, admin)


@router.post("/{name}/disable", response_model=ProviderOut)
async def disable(name: str, conn: ConnectionDep, settings: SettingsDep, admin: ProviderAdmin) -> Any:
    """Senders skip a disabled provider (the next by priority, or the channel's fallback)."""
    return await _toggle(name, False, conn, settings, admin)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete(name: str, conn: ConnectionDep, admin: ProviderAdmin) -> Response:
    try:
        await remove(conn, name, actor=admin.subject, role=admin.role.value)
    except ProviderNotFound as err:
        raise _not_found(name) from err
    await conn.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{name}/breaker/reset", response_model=BreakerOut)
async def breaker_reset(name: str, conn: ConnectionDep, admin: ProviderAdmin) -> Any:
    """Close the circuit now (e.g. after fixing the provider's credentials)."""
    try:
        await reset_breaker(conn, name, actor=admin.subject, role=admin.role.value)
    except ProviderNotFound as err:
        raise _not_found(name) from err
    await conn.commit()
    return _breaker_out((await breakers.states(conn)).get(name))


@router.post("/{name}/test", response_model=ProviderTestResult)
async def test_send(
    name: str,
    body: ProviderTestRequest,
    request: Request,
    conn: ConnectionDep,
    settings: SettingsDep,
    admin: ProviderAdmin,
) -> Any:
    """Send one real message through the stored provider (enabled or not); 502 names its error."""
    try:
        outcome = await send_test(conn, request.app.state.engine, settings, name, body,
                                  actor=admin.subject, role=admin.role.value)  # fmt: skip
    except ProviderNotFound as err:
        raise _not_found(name) from err
    except SecretsUnreadable as err:
        raise _unreadable(name) from err
    if not outcome.ok:
        raise Problem(502, "Provider error", f"provider {name!r} failed: {outcome.error}",
                      errors=[{"field": "provider", "message": outcome.error or "failed"}])  # fmt: skip
    return ProviderTestResult(ok=True, provider=name, provider_message_id=outcome.provider_message_id or "")
