"""Analytics: the history writer's sustained insert rate, then every dashboard and report query.

Generates a realistic history (channels, providers, campaigns, templates, countries and time
zones, a notification's accepted -> sent -> delivered -> opened -> clicked with latencies,
failures, bounces, the providers' costs) spread over the last N days in time order, as
columns (a HistoryBatch, as a campaign chunk hands its events to the writer), and loads it
through the real writer path: `ChdbStore.insert` (the Arrow chunks, event ids and the
duplicate check in chDB, the materialized views into notification_stats and its rollups) in
batches of the HistoryWriter's flush_rows, into chDB in a temporary directory. Only the
inserts are timed (generating the rows is not the writer's work). Then each
services.analytics function runs a few times over the loaded store; the campaign report reads its campaign from a fresh
PostgreSQL database (127.0.0.1:5432, else an embedded server), dropped at the end.

    .venv/bin/python -m bench.analytics --rows 10000000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import drop_database, fresh_database
from core.config import Settings
from core.db import create_engine
from core.migrate import upgrade_async
from services import analytics
from services.analytics import Query
from services.campaign_store import campaign_runs, campaigns, segments
from services.history import ChdbStore, HistoryBatch, HistoryWriter, epoch_ms

COUNTRIES = [("RU", "Europe/Moscow", 30), ("DE", "Europe/Berlin", 12), ("FR", "Europe/Paris", 10),
             ("GB", "Europe/London", 10), ("US", "America/New_York", 9), ("US", "America/Los_Angeles", 6),
             ("KZ", "Asia/Almaty", 6), ("TR", "Europe/Istanbul", 5), ("BR", "America/Sao_Paulo", 4),
             ("IN", "Asia/Kolkata", 4), ("JP", "Asia/Tokyo", 2), ("AU", "Australia/Sydney", 2)]  # fmt: skip
# channel: share, [(provider, cost, currency)], delivered, opened, clicked, failed, bounced
CHANNELS = {
    "email": (0.70, [("ses", "0.0001", "USD"), ("smtp-relay", "0", "USD")], 0.95, 0.30, 0.05, 0.02, 0.02),
    "sms": (0.15, [("twilio", "0.0079", "USD"), ("smsc", "2.5", "RUB")], 0.92, 0.0, 0.0, 0.04, 0.02),
    "push": (0.15, [("fcm", "0", "USD"), ("apns", "0", "USD")], 0.85, 0.10, 0.02, 0.05, 0.0),
}
CATEGORIES = ["marketing", "transactional", "reminders", "news", "security"]
ERRORS = [("PermanentSendError", "550 mailbox unavailable"), ("retries exhausted", "timeout"),
          ("render failed", "undefined variable")]  # fmt: skip
CAMPAIGNS = [str(uuid.UUID(int=n, version=4)) for n in range(1, 41)]
TEMPLATES = [f"template-{n}" for n in range(20)]


def history(total: int, start: datetime, end: datetime, batch: int, seed: int = 7) -> Iterator[HistoryBatch]:
    """About `total` events, a notification's at a time, in time order over [start, end), in
    batches of `batch` or a few more, as columns: what a campaign chunk hands the writer."""
    rand = random.Random(seed)
    countries = rand.choices(COUNTRIES, weights=[share for *_, share in COUNTRIES], k=4096)
    channel_names = list(CHANNELS)
    channel_picks = rand.choices(channel_names, weights=[spec[0] for spec in CHANNELS.values()], k=4096)
    costs = {(name, provider): (Decimal(cost), currency) for name, spec in CHANNELS.items()
             for provider, cost, currency in spec[1]}  # fmt: skip
    notifications = total // 3  # about three events each
    step_ms = (end - start) / notifications / timedelta(milliseconds=1)
    start_ms = epoch_ms(start)
    no_cost = Decimal(0)
    columns: dict[str, list[Any]] = {name: [] for name in HistoryBatch.of([]).columns}
    subject_fields = ("notification_id", "channel", "user_id", "category", "campaign_id", "run_id", "template_key",
                      "template_version", "country", "timezone", "occurrence")  # fmt: skip
    event_fields = ("status", "provider", "attempt", "error", "error_class", "cost", "currency", "latency_ms",
                    "event_time")  # fmt: skip

    def add(subject: tuple[Any, ...], *event: Any) -> None:
        for name, value in zip(subject_fields, subject, strict=True):
            columns[name].append(value)
        for name, value in zip(event_fields, event, strict=True):
            columns[name].append(value)

    for n in range(notifications):
        at = start_ms + int(step_ms * n)
        channel = channel_picks[n % 4096]
        _, providers, delivered, opened, clicked, failed, bounced = CHANNELS[channel]
        provider = providers[n % 2 if channel != "email" else int(rand.random() < 0.2)][0]
        country, zone, _ = countries[(n * 7) % 4096]
        campaign = CAMPAIGNS[n % 40] if n % 10 < 7 else ""  # 70% of sends belong to a campaign
        category, run = (CATEGORIES[n % 5], "") if not campaign else ("marketing", f"run-{campaign[:8]}")
        subject = (f"5e1d0000-0000-4000-8000-{n:012x}", channel, f"user-{n % 1_000_000}", category, campaign, run,
                   TEMPLATES[n % 20], 1 + n % 3, country, zone, "")  # fmt: skip
        add(subject, "pending", "", 0, "", "", no_cost, "", 0, at)
        sent_at = at + int(rand.expovariate(1 / 800))
        roll = rand.random()
        if roll < failed:
            error_class, error = ERRORS[n % 3]
            add(subject, "failed", provider, 3, error, error_class, no_cost, "", 0, sent_at)
        else:
            cost, currency = costs[(channel, provider)]
            add(subject, "sent", provider, 1, "", "", cost, currency, 0, sent_at)
            if roll < failed + bounced:
                add(subject, "bounced", provider, 0, "", "", no_cost, "", 0, sent_at + 4000)
            elif rand.random() < delivered:
                deliver_ms = int(rand.lognormvariate(7.5, 1.0))  # median about 1.8 s
                add(subject, "delivered", provider, 0, "", "", no_cost, "", deliver_ms, sent_at + deliver_ms)
                if rand.random() < opened:
                    open_ms = deliver_ms + int(rand.lognormvariate(14.0, 1.5))  # median about 20 minutes
                    add(subject, "opened", "", 0, "", "", no_cost, "", open_ms, sent_at + open_ms)
                    if rand.random() < clicked / opened:
                        click_ms = open_ms + int(rand.expovariate(1 / 30_000))
                        add(subject, "clicked", "", 0, "", "", no_cost, "", click_ms, sent_at + click_ms)
        if len(columns["status"]) >= batch:
            yield HistoryBatch(columns)
            columns = {name: [] for name in columns}
    if columns["status"]:
        yield HistoryBatch(columns)


def load(store: ChdbStore, batches: Iterator[HistoryBatch]) -> tuple[int, float, list[float]]:
    """Insert each batch; returns events written, seconds spent inserting, and each batch's rate."""
    written, spent, rates = 0, 0.0, []
    for batch in batches:
        began = time.perf_counter()
        store.insert(batch)
        took = time.perf_counter() - began
        written, spent = written + len(batch), spent + took
        rates.append(len(batch) / took)
        if len(rates) % 20 == 0:
            print(f"  {written:,} rows, {written / spent:,.0f} rows/s so far", flush=True)
    return written, spent, rates


async def _campaign(engine: Any, campaign_id: str, created: datetime) -> None:
    """The campaign row the report reads (PostgreSQL), with one run."""
    async with engine.begin() as conn:
        segment_id = await conn.scalar(
            sa.insert(segments).values(name="bench", kind="filter", filter={}, created_by="bench")
            .returning(segments.c.id)
        )  # fmt: skip
        await conn.execute(
            sa.insert(campaigns).values(id=uuid.UUID(campaign_id), name="bench", category="marketing",
                                        template_key=TEMPLATES[0], template_version=1, segment_id=segment_id,
                                        channels=["email", "sms", "push"], schedule={}, status="completed",
                                        created_by="bench", created_at=created)
        )  # fmt: skip
        run = {"id": "run-bench", "campaign_id": uuid.UUID(campaign_id), "status": "completed", "targeted": 1,
               "started_at": created}  # fmt: skip
        await conn.execute(sa.insert(campaign_runs).values(run))


async def _timed(call: Callable[[], Awaitable[Any]], runs: int) -> tuple[float, float]:
    """p50 and max in ms over `runs` runs, after one warm-up."""
    await call()
    took = []
    for _ in range(runs):
        began = time.perf_counter()
        await call()
        took.append((time.perf_counter() - began) * 1000)
    return statistics.median(took), max(took)


async def queries(writer: HistoryWriter, engine: Any, now: datetime, runs: int) -> dict[str, tuple[float, float]]:
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    week, month = end - timedelta(days=7), end - timedelta(days=30)
    by_channel = ("channel",)
    cases: dict[str, Callable[[], Awaitable[Any]]] = {
        "counts, day x channel, 30 days": lambda: analytics.counts(
            writer, Query(start=month, end=end, granularity="day", by=by_channel)),
        "counts, hour x channel, 7 days": lambda: analytics.counts(
            writer, Query(start=week, end=end, granularity="hour", by=by_channel)),
        "counts, campaign x template x country, 30 days": lambda: analytics.counts(
            writer, Query(start=month, end=end, by=("campaign", "template", "country"))),
        "rates, channel x provider, 30 days": lambda: analytics.rates(
            writer, Query(start=month, end=end, by=("channel", "provider"))),
        "latency, channel, 30 days": lambda: analytics.latency(writer, Query(start=month, end=end, by=by_channel)),
        "latency, day x channel, 30 days": lambda: analytics.latency(
            writer, Query(start=month, end=end, granularity="day", by=by_channel)),
        "geography, country x time zone, 30 days": lambda: analytics.geography(
            writer, Query(start=month, end=end, by=("timezone",))),
        "spend, channel x provider x campaign, 30 days": lambda: analytics.spend(
            writer, Query(start=month, end=end, by=("channel", "provider", "campaign"))),
        "dashboard, 7 days": lambda: analytics.dashboard(writer, now, 7),
        "dashboard, 30 days": lambda: analytics.dashboard(writer, now, 30),
    }  # fmt: skip

    async def report() -> Any:
        async with engine.connect() as conn:
            return await analytics.campaign_report(conn, writer, uuid.UUID(CAMPAIGNS[0]))

    cases["campaign report (one of 40 campaigns)"] = report
    return {name: await _timed(call, runs) for name, call in cases.items()}


async def run(total: int, batch: int, days: int, runs: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="marquee-bench-analytics-"))
    database_url, embedded = await fresh_database(workdir)
    store = ChdbStore(workdir / "chdb")
    writer = HistoryWriter(store)
    engine = create_engine(database_url, 2)
    try:
        await upgrade_async(database_url)
        store.ensure_schema()
        now = datetime.now(UTC)
        start = now - timedelta(days=days)
        await _campaign(engine, CAMPAIGNS[0], start - timedelta(hours=1))
        print(f"loading about {total:,} rows over {days} days in batches of {batch:,}", flush=True)
        began = time.perf_counter()
        written, spent, rates = load(store, history(total, start, now, batch))
        wall = time.perf_counter() - began
        print(f"writer: {written:,} rows in {spent:.1f} s of inserts: {written / spent:,.0f} rows/s sustained "
              f"(batches p50 {statistics.median(rates):,.0f} rows/s, slowest {min(rates):,.0f}); "
              f"{wall:.1f} s with generating the rows")  # fmt: skip
        [stored] = store.query("SELECT count() AS n FROM notification_history")
        [stats] = store.query("SELECT count() AS n FROM notification_stats")
        print(f"stored: {int(stored['n']):,} history rows, {int(stats['n']):,} notification_stats rows")
        # Right after the load (parts still merging in the background), then fully merged.
        fresh = await queries(writer, engine, now, runs)
        store.query("OPTIMIZE TABLE notification_stats FINAL")
        [stats] = store.query("SELECT count() AS n FROM notification_stats")
        print(f"notification_stats merged: {int(stats['n']):,} rows")
        merged = await queries(writer, engine, now, runs)
        print(f"\n{'query (ms)':<50} {'p50':>7} {'max':>7} {'merged p50':>11} {'max':>7}")
        for name, (p50, worst) in fresh.items():
            print(f"{name:<50} {p50:>7.1f} {worst:>7.1f} {merged[name][0]:>11.1f} {merged[name][1]:>7.1f}")
    finally:
        await writer.close()
        await engine.dispose()
        await drop_database(database_url)
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=Settings.model_fields["history_flush_rows"].default,
                        help="rows per insert (HistoryWriter's flush_rows)")  # fmt: skip
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each query")
    args = parser.parse_args()
    asyncio.run(run(args.rows, args.batch, args.days, args.runs))


if __name__ == "__main__":
    main()
