"""GET /metrics: Prometheus text format.

Two parts (services.metrics): gauges read from PostgreSQL at each scrape, the same from
every API replica, in a registry built per scrape (no process globals, nothing stale after
a provider is deleted or a run ends); then this process's own counters and histograms,
which carry sends only where a worker runs in the same process (the dev stack). A separate
worker serves its own on its health port.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from sqlalchemy.ext.asyncio import AsyncConnection

from api.deps import ConnectionDep
from services import metrics as readings
from services.breaker import STATE_VALUE

router = APIRouter(tags=["metrics"])
RUN_LABELS = ["campaign_id", "run_id", "campaign_status"]


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
    targeted = Gauge("marquee_campaign_run_targeted", "Recipients a running campaign run addresses", RUN_LABELS,
                     registry=registry)  # fmt: skip
    recorded = Gauge("marquee_campaign_run_recorded", "A running run's recorded (recipient, channel) outcomes",
                     [*RUN_LABELS, "status"], registry=registry)  # fmt: skip
    progress = Gauge("marquee_campaign_run_progress_ratio", "Recorded over (targeted x channels), 0 to 1",
                     RUN_LABELS, registry=registry)  # fmt: skip
    rate = Gauge("marquee_campaign_run_rate", "Outcomes recorded a second, averaged since the run started",
                 RUN_LABELS, registry=registry)  # fmt: skip
    age = Gauge("marquee_campaign_run_age_seconds", "Seconds since the run started", RUN_LABELS, registry=registry)
    outbox = Gauge("marquee_history_outbox_rows", "Status changes queued for ClickHouse, not yet shipped",
                   registry=registry)  # fmt: skip
    outbox_age = Gauge("marquee_history_outbox_oldest_seconds", "Age of the oldest queued status change (0: none)",
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
    for run in reading.runs:
        labels = (run.campaign_id, run.run_id, run.campaign_status)
        targeted.labels(*labels).set(run.targeted)
        for status, count in run.recorded.items():
            recorded.labels(*labels, status).set(count)
        progress.labels(*labels).set(run.progress)
        rate.labels(*labels).set(run.rate)
        age.labels(*labels).set(run.seconds)
    outbox.set(reading.outbox_rows)
    outbox_age.set(reading.outbox_oldest_seconds)
    return registry


@router.get("/metrics", include_in_schema=False)
async def metrics(conn: ConnectionDep) -> Response:
    """The database's readings, then this process's own counters and latencies."""
    registry = await collect(conn)
    body = generate_latest(registry) + generate_latest(readings.PROCESS)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
