"""What admins do to channel providers: read them with their breakers, create or replace,
enable or disable, delete, reset a breaker, send a test message.

The API and the admin panel both call these, so both edges validate, audit and answer
alike. Secrets are write-only: answers name the secret fields that are set, never their
values, and the audit log records which fields changed, never what they changed to.
Each change runs in the caller's transaction with its audit row (the caller commits);
only the test send commits itself. Kept apart from services.providers (the records),
which services.breaker imports.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from channels.base import OutboundMessage, SendError
from channels.registry import build_provider
from core.auth import Principal
from core.config import Settings
from core.errors import Conflict, NotFound
from core.schemas import BreakerOut, ProviderOut, ProviderTestRequest
from core.secretbox import SecretsUnreadable, unseal
from services import breaker as breakers
from services.audit import diff, record_action
from services.providers import (
    ProviderRecord,
    check_provider,
    delete_provider,
    get_provider,
    providers,
    save_provider,
    task_queue_for,
)

ENTITY = "provider"
COMPARED_FIELDS = ("channel", "kind", "priority", "rate_limit_per_second", "max_concurrency", "cost_per_message",
                   "currency", "enabled")  # fmt: skip
TOP_LEVEL_FIELDS = frozenset({*COMPARED_FIELDS, "name", "settings", "secrets"})
FIELD_PREFIX = re.compile(r"^([a-z_][\w.-]*): (.+)$", re.DOTALL)


@dataclass(frozen=True)
class ProviderTestOutcome:
    ok: bool
    provider_message_id: str | None = None
    error: str | None = None


class ProviderNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"no provider {name!r}")


class ProviderConflict(Conflict):
    """The same name was created by someone else at the same moment."""

    def __init__(self, name: str) -> None:
        super().__init__(f"provider {name!r} was created concurrently; retry")


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
        currency=row.currency,
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


async def read_breaker(conn: AsyncConnection, name: str) -> BreakerOut:
    """A provider's breaker; closed when it never failed (no row)."""
    return _breaker_out((await breakers.states(conn)).get(name))


async def provider_exists(conn: AsyncConnection, name: str) -> bool:
    return await conn.scalar(sa.select(providers.c.id).where(providers.c.name == name)) is not None


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
    """The problems as error entries: {"field": "settings.port", "message": "..."}."""
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


def provider_changes(before: ProviderRecord | None, after: ProviderRecord | None) -> dict[str, Any]:
    """The audit's before/after of a save or removal: values of the plain fields and settings;
    secrets only as set or not (their values never reach the log)."""

    def flat(record: ProviderRecord | None) -> dict[str, Any]:
        if record is None:
            return {}
        values = {name: getattr(record, name) for name in COMPARED_FIELDS}
        values |= {f"settings.{name}": value for name, value in record.settings.items()}
        return values | {f"secrets.{name}": "(set)" for name, value in record.secrets.items() if value}

    changes = diff(flat(before), flat(after))
    if before is not None and after is not None:  # a secret replaced by another value
        for name in sorted(before.secrets.keys() & after.secrets.keys()):
            if before.secrets[name] != after.secrets[name] and after.secrets[name]:
                changes[f"secrets.{name}"] = {"before": "(set)", "after": "(changed)"}
    return changes


async def check_definition(conn: AsyncConnection, key: bytes, name: str, values: dict[str, Any]) -> list[str]:
    """Every problem save_audited would report, without writing (the admin's form checks
    this after its own parsing, so that all problems show at once)."""
    return await check_provider(conn, key, {**values, "name": name})


async def save_audited(
    conn: AsyncConnection, key: bytes, name: str, values: dict[str, Any], actor: Principal, reason: str | None = None
) -> tuple[ProviderRecord, bool]:
    """Create or replace `name`; returns (record, created). Raises ProviderInvalid with
    every problem (nothing written), SecretsUnreadable for a row sealed with another key,
    or ProviderConflict when the same name was created concurrently."""
    existing = await get_provider(conn, key, name)
    try:
        saved = await save_provider(conn, key, {**values, "name": name})
    except sa.exc.IntegrityError as err:
        raise ProviderConflict(name) from err
    details = {"changed": changed_fields(existing, saved), "kind": saved.kind, "channel": saved.channel}
    action = "provider.create" if existing is None else "provider.update"
    await record_action(conn, actor, action, ENTITY, name, details, reason=reason,
                        changes=provider_changes(existing, saved))  # fmt: skip
    return saved, existing is None


async def set_enabled(
    conn: AsyncConnection, name: str, enabled: bool, actor: Principal, reason: str | None = None
) -> None:
    was = await conn.scalar(sa.select(providers.c.enabled).where(providers.c.name == name))
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
    await record_action(conn, actor, action, ENTITY, name, {"enabled": enabled}, reason=reason,
                        changes=diff({"enabled": was}, {"enabled": enabled}))  # fmt: skip


async def remove(conn: AsyncConnection, name: str, actor: Principal, reason: str | None = None) -> None:
    row = (await conn.execute(sa.select(providers).where(providers.c.name == name))).first()
    if row is None or not await delete_provider(conn, name):
        raise ProviderNotFound(name)
    # What was removed, secrets aside (they are sealed, and never logged).
    before = {field: getattr(row, field) for field in COMPARED_FIELDS}
    before |= {f"settings.{key}": value for key, value in (row.settings or {}).items()}
    await record_action(conn, actor, "provider.delete", ENTITY, name, {"kind": row.kind}, reason=reason,
                        changes=diff(before, {}))  # fmt: skip


async def reset_breaker(conn: AsyncConnection, name: str, actor: Principal, reason: str | None = None) -> None:
    """Close a provider's circuit by hand; also for a breaker whose provider has no row
    (a fallback provider configured by environment)."""
    known = await conn.scalar(sa.select(providers.c.id).where(providers.c.name == name))
    before = (await breakers.states(conn)).get(name)
    if known is None and before is None:
        raise ProviderNotFound(name)
    await breakers.reset(conn, name)
    details = {"previous_state": before.state.value if before else "closed",
               "consecutive_failures": before.consecutive_failures if before else 0}  # fmt: skip
    await record_action(conn, actor, "provider.breaker_reset", ENTITY, name, details, reason=reason,
                        changes=diff({"state": details["previous_state"]}, {"state": "closed"}))  # fmt: skip


async def send_test(
    conn: AsyncConnection,
    engine: AsyncEngine,
    settings: Settings,
    name: str,
    message: ProviderTestRequest,
    actor: Principal,
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
    await record_action(conn, actor, "provider.test", ENTITY, name, details)
    await conn.commit()
    return outcome
