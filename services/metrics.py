"""What /metrics reports, of two kinds.

- Readings of PostgreSQL (`read`): providers and their breakers, deliveries by status, open
  dead letters, campaign runs in progress, the history outbox. Every process answers the
  same (they are the database's), so any API replica can be scraped for them.
- This process's own counts (`PROCESS`): messages accepted, sent and failed, and the
  latency of each provider call, counted where the send services run, the worker. A
  worker serves them on its health port (`marquee worker --health-port`); in the dev stack
  the API and the worker share one process and /metrics carries both.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, gc_collector, platform_collector, process_collector
from sqlalchemy.ext.asyncio import AsyncConnection

from channels.base import InvalidAddressError, PermanentSendError, ThrottledError
from core.models import HistoryOutbox
from core.queries import dead_letters, deliveries
from services.breaker import BreakerState
from services.campaign_store import campaign_runs, campaigns
from services.providers import breakers, providers

# A registry of its own rather than prometheus_client's global one: exactly what this module
# defines, plus the usual process figures (CPU, memory, file descriptors, GC).
PROCESS = CollectorRegistry(auto_describe=True)
process_collector.ProcessCollector(registry=PROCESS)
platform_collector.PlatformCollector(registry=PROCESS)
gc_collector.GCCollector(registry=PROCESS)

# `kind`: instant (one notification's channel) or campaign (one recipient's channel in a batch).
ACCEPTED = Counter("marquee_notifications_accepted", "Messages planned for sending, by the provider first in line",
                   ["channel", "provider", "kind"], registry=PROCESS)  # fmt: skip
SENT = Counter("marquee_notifications_sent", "Messages a provider accepted", ["channel", "provider", "kind"],
               registry=PROCESS)  # fmt: skip
FAILED = Counter("marquee_notifications_failed", "Messages failed for good (a dead letter, or a campaign's failed row)",
                 ["channel", "provider", "kind"], registry=PROCESS)  # fmt: skip
EVENTS_ACCEPTED = Counter("marquee_events_accepted", "Events accepted (first delivery of an id)", ["type", "source"],
                          registry=PROCESS)  # fmt: skip
EVENTS_REJECTED = Counter("marquee_events_rejected", "Events refused: unknown_type, invalid_payload, conflict, "
                          "unavailable, malformed", ["source", "reason"], registry=PROCESS)  # fmt: skip
PROVIDER_LATENCY = Histogram(
    "marquee_provider_send_seconds",
    "One call to a provider, by outcome: ok, throttled, rejected (the message) or error (the provider's fault)",
    ["channel", "provider", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=PROCESS,
)


def _outcome(error: BaseException) -> str:
    if isinstance(error, ThrottledError):
        return "throttled"
    if isinstance(error, InvalidAddressError | PermanentSendError):
        return "rejected"
    return "error"


@contextmanager
def provider_call(channel: str, provider: str) -> Iterator[None]:
    """Time one provider.send into PROVIDER_LATENCY, labelled with how it ended."""
    started = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except BaseException as err:
        outcome = _outcome(err)
        raise
    finally:
        PROVIDER_LATENCY.labels(channel, provider, outcome).observe(time.perf_counter() - started)


@dataclass(frozen=True)
class ProviderReading:
    provider: str
    channel: str | None  # None: a breaker without a stored provider (the environment's fallback)
    enabled: bool | None  # None: no stored provider to switch
    state: BreakerState
    consecutive_failures: int


RUN_STATUSES = ("sent", "failed", "suppressed", "unreachable", "skipped_duplicate")


@dataclass(frozen=True)
class RunReading:
    """A campaign run in progress (its run row is `running`)."""

    campaign_id: str
    run_id: str
    campaign_status: str  # running, or paused (a paused run makes no progress on purpose)
    targeted: int  # recipients; each is sent on every channel of the campaign
    channels: int
    recorded: dict[str, int]  # RUN_STATUSES -> count
    seconds: float  # since the run started

    @property
    def progress(self) -> float:
        """Recorded (recipient, channel) pairs over those to record, at most 1."""
        expected = self.targeted * max(self.channels, 1)
        return min(sum(self.recorded.values()) / expected, 1.0) if expected else 0.0

    @property
    def rate(self) -> float:
        """Messages recorded a second since the run started."""
        return sum(self.recorded.values()) / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Reading:
    providers: list[ProviderReading]
    deliveries: dict[tuple[str, str], int]  # (channel, status) -> count
    dead_letters_open: int
    runs: list[RunReading]
    outbox_rows: int  # status changes the API queued for ClickHouse, not yet shipped by a worker
    outbox_oldest_seconds: float  # age of the oldest of them (0 when none)


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


def _running_runs() -> sa.Select[Any]:
    return (
        sa.select(
            campaign_runs.c.campaign_id,
            campaign_runs.c.id,
            campaigns.c.status.label("campaign_status"),
            campaign_runs.c.targeted,
            sa.func.cardinality(campaigns.c.channels).label("channels"),
            *(campaign_runs.c[name] for name in RUN_STATUSES),
            sa.extract("epoch", sa.func.now() - campaign_runs.c.started_at).label("seconds"),
        )
        .join(campaigns, campaigns.c.id == campaign_runs.c.campaign_id)
        .where(campaign_runs.c.status == "running")
    )


def _outbox() -> sa.Select[int, Any]:
    outbox = HistoryOutbox.__table__  # type: ignore[attr-defined]
    return sa.select(sa.func.count(), sa.extract("epoch", sa.func.now() - sa.func.min(outbox.c.created_at)))


async def read(conn: AsyncConnection) -> Reading:
    """Providers with their breakers and switches, deliveries by channel and status, open
    dead letters, runs in progress and the outbox backlog: four queries."""
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
    runs = [
        RunReading(
            campaign_id=str(row.campaign_id),
            run_id=row.id,
            campaign_status=row.campaign_status,
            targeted=row.targeted,
            channels=row.channels or 0,
            recorded={name: row._mapping[name] for name in RUN_STATUSES},
            seconds=float(row.seconds or 0),
        )
        for row in await conn.execute(_running_runs())
    ]
    outbox_rows, oldest = (await conn.execute(_outbox())).one()
    return Reading(
        providers=provider_readings,
        deliveries=by_status,
        dead_letters_open=open_letters,
        runs=runs,
        outbox_rows=outbox_rows,
        outbox_oldest_seconds=float(oldest or 0),
    )
