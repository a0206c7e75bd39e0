"""GET /metrics: Prometheus text format, read from PostgreSQL at each scrape.

Every API process answers the same numbers (they are the database's, not a process's),
so any replica can be scraped. A registry of its own is built per scrape: no process
globals, nothing stale after a provider is deleted. Two queries per scrape.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from sqlalchemy.ext.asyncio import AsyncConnection

from api.deps import ConnectionDep
from core.models import DeadLetter, Delivery
from services.breaker import STATE_VALUE, BreakerState
from services.providers import breakers, providers

router = APIRouter(tags=["metrics"])

deliveries = Delivery.__table__  # type: ignore[attr-defined]
dead_letters = DeadLetter.__table__  # type: ignore[attr-defined]


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


async def collect(conn: AsyncConnection) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    state = Gauge("marquee_provider_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
                  ["provider", "channel"], registry=registry)  # fmt: skip
    failures = Gauge("marquee_provider_consecutive_failures", "Failures in a row counted by the breaker",
                     ["provider"], registry=registry)  # fmt: skip
    enabled = Gauge("marquee_provider_enabled", "1 if the stored provider is enabled", ["provider", "channel"],
                    registry=registry)  # fmt: skip
    letters = Gauge("marquee_dead_letters_open", "Dead letters waiting for a replay or a discard", registry=registry)
    by_status = Gauge("marquee_deliveries", "Deliveries by channel and current status", ["channel", "status"],
                      registry=registry)  # fmt: skip

    for row in await conn.execute(_provider_rows()):
        channel = row.channel or ""
        state.labels(row.provider, channel).set(STATE_VALUE[BreakerState(row.state or BreakerState.closed)])
        failures.labels(row.provider).set(row.consecutive_failures or 0)
        if row.enabled is not None:
            enabled.labels(row.provider, channel).set(1 if row.enabled else 0)
    for metric, channel, status, count in await conn.execute(_counts()):
        if metric == "dead_letters_open":
            letters.set(count)
        else:
            by_status.labels(channel, status).set(count)
    return registry


@router.get("/metrics", include_in_schema=False)
async def metrics(conn: ConnectionDep) -> Response:
    """Provider breakers and switches, delivery counts by status, open dead letters."""
    registry = await collect(conn)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
