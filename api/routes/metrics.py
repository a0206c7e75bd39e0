"""GET /metrics: Prometheus text format, read from PostgreSQL at each scrape.

Every API process answers the same numbers (services.metrics reads them from the
database), so any replica can be scraped. A registry of its own is built per scrape: no
process globals, nothing stale after a provider is deleted.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from sqlalchemy.ext.asyncio import AsyncConnection

from api.deps import ConnectionDep
from services import metrics as readings
from services.breaker import STATE_VALUE

router = APIRouter(tags=["metrics"])


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

    reading = await readings.read(conn)
    for provider in reading.providers:
        channel = provider.channel or ""
        state.labels(provider.provider, channel).set(STATE_VALUE[provider.state])
        failures.labels(provider.provider).set(provider.consecutive_failures)
        if provider.enabled is not None:
            enabled.labels(provider.provider, channel).set(1 if provider.enabled else 0)
    letters.set(reading.dead_letters_open)
    for (channel, status), count in reading.deliveries.items():
        by_status.labels(channel, status).set(count)
    return registry


@router.get("/metrics", include_in_schema=False)
async def metrics(conn: ConnectionDep) -> Response:
    """Provider breakers and switches, delivery counts by status, open dead letters."""
    registry = await collect(conn)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
