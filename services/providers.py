"""Channel providers stored in PostgreSQL: reading, validating and writing their rows.

Settings are plain JSON; secrets are one Fernet-sealed JSON object, decrypted only when a
worker builds the provider (or a webhook checks a signature). A channel with no enabled
row falls back to the provider configured by environment (MARQUEE_SMTP_*, sandbox).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

# KINDS re-exported: the admin's forms show each kind's settings and secrets, through services.
from channels.registry import KINDS as KINDS
from channels.registry import validate_config
from core.models import ProviderBreaker, ProviderConfig
from core.secretbox import seal, unseal

providers = ProviderConfig.__table__  # type: ignore[attr-defined]
breakers = ProviderBreaker.__table__  # type: ignore[attr-defined]

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CURRENCY_PATTERN = re.compile(r"^[A-Z]{3}$")


@dataclass(frozen=True)
class ProviderRecord:
    id: int
    name: str
    channel: str
    kind: str
    priority: int
    settings: dict[str, Any]
    secrets: dict[str, Any] = field(repr=False)
    rate_limit_per_second: float | None
    max_concurrency: int
    cost_per_message: float
    enabled: bool
    updated_at: datetime
    currency: str = "USD"

    @property
    def version(self) -> tuple[Any, ...]:
        """What a worker compares to know it must rebuild this provider's worker."""
        return (self.updated_at, self.enabled)


class ProviderInvalid(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def task_queue_for(base_queue: str, provider_name: str) -> str:
    """Each stored provider's sends run on a task queue of their own, so its rate limit
    (`max_task_queue_activities_per_second`) holds across all workers."""
    return f"{base_queue}.provider.{provider_name}"


def bulk_queue_for(provider_queue: str) -> str:
    """The queue of a provider's campaign batches: paced at its rate divided by the batch size."""
    return f"{provider_queue}.bulk"


def provider_record(row: sa.Row[Any], key: bytes) -> ProviderRecord:
    return ProviderRecord(
        id=row.id,
        name=row.name,
        channel=row.channel,
        kind=row.kind,
        priority=row.priority,
        settings=dict(row.settings),
        secrets=unseal(key, row.secrets),
        rate_limit_per_second=row.rate_limit_per_second,
        max_concurrency=row.max_concurrency,
        cost_per_message=row.cost_per_message,
        enabled=row.enabled,
        updated_at=row.updated_at,
        currency=row.currency,
    )


def message_cost(record: ProviderRecord | None) -> dict[str, Any]:
    """The cost and currency a `sent` history event carries (none for built-in providers)."""
    if record is None:
        return {}
    return {"cost": Decimal(str(record.cost_per_message)), "currency": record.currency}


async def get_provider(conn: AsyncConnection, key: bytes, name: str) -> ProviderRecord | None:
    row = (await conn.execute(sa.select(providers).where(providers.c.name == name))).first()
    return provider_record(row, key) if row is not None else None


def validate(values: dict[str, Any]) -> list[str]:
    """Every problem of a provider definition, each naming its field."""

    problems: list[str] = []
    name = values.get("name", "")
    if not NAME_PATTERN.match(str(name)):
        problems.append("name: use 1-63 lowercase letters, digits and dashes, starting with a letter or digit")
    if values.get("channel") not in ("email", "push", "sms"):
        problems.append("channel: must be one of email, push, sms")
    rate = values.get("rate_limit_per_second")
    if rate is not None and rate <= 0:
        problems.append("rate_limit_per_second: must be greater than 0 (or empty for no limit)")
    if values.get("max_concurrency", 10) < 1:
        problems.append("max_concurrency: must be at least 1")
    if values.get("cost_per_message", 0) < 0:
        problems.append("cost_per_message: must not be negative")
    if not CURRENCY_PATTERN.match(str(values.get("currency", "USD"))):
        problems.append("currency: must be a three-letter ISO 4217 code in capitals, such as USD or EUR")
    if values.get("channel") in ("email", "push", "sms"):
        # The kind's own checks too, so that one answer lists everything to fix.
        kind_problems = validate_config(
            str(values.get("kind")), str(values["channel"]), values.get("settings") or {}, values.get("secrets") or {}
        )
        problems += [problem for problem in kind_problems if problem not in problems]
    return problems


def _definition(existing: ProviderRecord | None, values: dict[str, Any]) -> dict[str, Any]:
    """What a save would store: defaults, then `values`. Secrets left out (None) keep the
    stored ones, a field given as "" removes one, and a provider that changes kind drops
    stored secrets the new kind does not have (an sms-json api_key means nothing to twilio)."""

    stored = dict(existing.secrets) if existing is not None else {}
    spec = KINDS.get(str(values.get("kind")))
    if existing is not None and spec is not None and existing.kind != values.get("kind"):
        stored = {name: value for name, value in stored.items() if name in spec.secrets.model_fields}
    given = values.get("secrets")
    secrets = stored if given is None else {**stored, **given}
    merged = {"max_concurrency": 10, "cost_per_message": 0.0, "currency": "USD", "priority": 100, "enabled": True,
              **values}  # fmt: skip
    merged["secrets"] = {name: value for name, value in secrets.items() if value not in ("", None)}
    return merged


async def check_provider(conn: AsyncConnection, key: bytes, values: dict[str, Any]) -> list[str]:
    """Every problem save_provider would report for `values`, without writing."""
    existing = await get_provider(conn, key, str(values.get("name", "")))
    return validate(_definition(existing, values))


async def save_provider(conn: AsyncConnection, key: bytes, values: dict[str, Any]) -> ProviderRecord:
    """Create or replace a provider by name (secrets as in `_definition`). Raises
    ProviderInvalid listing every problem, and writes nothing then."""
    existing = await get_provider(conn, key, str(values.get("name", "")))
    merged = _definition(existing, values)
    secrets = merged["secrets"]
    problems = validate(merged)
    if problems:
        raise ProviderInvalid(problems)
    row = {
        "name": merged["name"],
        "channel": merged["channel"],
        "kind": merged["kind"],
        "priority": merged["priority"],
        "settings": merged.get("settings") or {},
        "secrets": seal(key, secrets),
        "rate_limit_per_second": merged.get("rate_limit_per_second"),
        "max_concurrency": merged["max_concurrency"],
        "cost_per_message": merged["cost_per_message"],
        "currency": merged["currency"],
        "enabled": merged["enabled"],
        "updated_at": sa.func.clock_timestamp(),
    }
    if existing is None:
        await conn.execute(sa.insert(providers).values(row))
    else:
        await conn.execute(providers.update().where(providers.c.id == existing.id).values(row))
    saved = await get_provider(conn, key, merged["name"])
    assert saved is not None
    return saved


async def delete_provider(conn: AsyncConnection, name: str) -> bool:
    deleted = await conn.scalar(sa.delete(providers).where(providers.c.name == name).returning(providers.c.id))
    await conn.execute(sa.delete(breakers).where(breakers.c.provider == name))
    return deleted is not None
