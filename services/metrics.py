"""The numbers /metrics reports, read from PostgreSQL: every process answers the same
(they are the database's, not a process's). Two queries per reading."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from core.queries import dead_letters, deliveries
from services.breaker import BreakerState
from services.providers import breakers, providers


@dataclass(frozen=True)
class ProviderReading:
    provider: str
    channel: str | None  # None: a breaker without a stored provider (the environment's fallback)
    enabled: bool | None  # None: no stored provider to switch
    state: BreakerState
    consecutive_failures: int


@dataclass(frozen=True)
class Reading:
    providers: list[ProviderReading]
    deliveries: dict[tuple[str, str], int]  # (channel, status) -> count
    dead_letters_open: int


def _provider_rows() -> sa.Select[Any]:
    """Stored providers and breakers, also a breaker whose provider has no row (the
    channel's fallback provider, configured by environment)."""
    joined = providers.join(breakers, breakers.c.provider == providers.c.name, full=True)
    return sa.select(
        sa.func.coalesce(providers.c.name, breakers.c.provider).label("provider"),
        providers.c.channel,
        providers.c.enabled,
        breakers.c.state,
        breakers.c.consecutive_failures,
    ).select_from(joined)


def _counts() -> sa.CompoundSelect[Any]:
    """Deliveries by (channel, status), and the open dead letters, in one round trip."""
    by_status = sa.select(
        sa.literal("deliveries").label("metric"), deliveries.c.channel, deliveries.c.status, sa.func.count()
    ).group_by(deliveries.c.channel, deliveries.c.status)
    open_letters = sa.select(
        sa.literal("dead_letters_open"), sa.null(), sa.null(), sa.func.count()
    ).where(dead_letters.c.status == "open")  # fmt: skip
    return sa.union_all(by_status, open_letters)


async def read(conn: AsyncConnection) -> Reading:
    """Providers with their breakers and switches, deliveries by channel and status, open dead letters."""
    provider_readings = [
        ProviderReading(
            provider=row.provider,
            channel=row.channel,
            enabled=row.enabled,
            state=BreakerState(row.state or BreakerState.closed),  # no breaker row yet: closed
            consecutive_failures=row.consecutive_failures or 0,
        )
        for row in await conn.execute(_provider_rows())
    ]
    by_status: dict[tuple[str, str], int] = {}
    open_letters = 0
    for metric, channel, status, count in await conn.execute(_counts()):
        if metric == "dead_letters_open":
            open_letters = count
        else:
            by_status[(channel, status)] = count
    return Reading(providers=provider_readings, deliveries=by_status, dead_letters_open=open_letters)
