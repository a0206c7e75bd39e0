"""Exact aggregates from a synthetic history whose answers are worked out by hand, and the
same aggregates after the whole history is written again (at-least-once writes)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from services import analytics
from services.analytics import Query
from services.campaign_store import campaign_runs, campaigns, segments
from services.history import HistoryRow, HistorySubject, HistoryWriter

# Two days ago, 10:00 UTC: inside any retention, clear of other tests' "now".
HOUR = datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0) - timedelta(days=2)
DELIVER_MS = [100, 200, 300, 400, 500, 600, 700, 800]
OPEN_MS = [1000, 2000, 3000, 4000]


def synthetic(category: str, campaign_id: str) -> list[HistoryRow]:
    """Email (RU, USD 0.001 a message): 10 sent at HOUR, 8 delivered, 4 opened, 2 clicked,
    2 failed, 1 unreachable (FR), 1 suppressed. SMS (DE, EUR 0.05): 5 sent an hour later,
    4 delivered after 5 s, 1 bounced."""
    rows: list[HistoryRow] = []

    def person(n: int, country: str, zone: str) -> HistorySubject:
        return HistorySubject(str(uuid.uuid4()), f"u{n}", category, campaign_id, run_id="run-1",
                              template_key="promo", template_version=2, country=country, timezone=zone)  # fmt: skip

    for n in range(10):
        who = person(n, "RU", "Europe/Moscow")
        sent = HOUR + timedelta(seconds=n)
        rows += [who.event("email", "pending", event_time=HOUR),
                 who.event("email", "sent", provider="p-mail", event_time=sent, cost=Decimal("0.001"),
                           currency="USD")]  # fmt: skip
        if n < 8:
            rows.append(who.event("email", "delivered", provider="p-mail", latency_ms=DELIVER_MS[n],
                                  event_time=sent + timedelta(milliseconds=DELIVER_MS[n])))  # fmt: skip
        if n < 4:
            rows.append(who.event("email", "opened", latency_ms=OPEN_MS[n], event_time=sent + timedelta(seconds=n + 1)))
        if n < 2:
            rows.append(who.event("email", "clicked", latency_ms=9000, event_time=sent + timedelta(seconds=9)))
    for n in range(2):
        who = person(20 + n, "RU", "Europe/Moscow")
        rows.append(who.event("email", "failed", provider="p-mail", error="550 no such user",
                              error_class="rejected by provider", event_time=HOUR + timedelta(seconds=30)))  # fmt: skip
    rows.append(person(30, "FR", "Europe/Paris").event("email", "unreachable", event_time=HOUR))
    rows.append(person(31, "RU", "Europe/Moscow").event("email", "suppressed", event_time=HOUR))
    for n in range(5):
        who = person(40 + n, "DE", "Europe/Berlin")
        sent = HOUR + timedelta(hours=1, seconds=n)
        rows.append(who.event("sms", "sent", provider="p-sms", event_time=sent, cost=Decimal("0.05"), currency="EUR"))
        if n < 4:
            rows.append(who.event("sms", "delivered", provider="p-sms", latency_ms=5000,
                                  event_time=sent + timedelta(seconds=5)))  # fmt: skip
        else:
            rows.append(who.event("sms", "bounced", provider="p-sms", event_time=sent + timedelta(seconds=5)))
    return rows


ZERO = dict.fromkeys(analytics.COUNTED, 0)
EMAIL = {**ZERO, "sent": 10, "delivered": 8, "failed": 2, "opened": 4, "clicked": 2, "unreachable": 1, "suppressed": 1}
SMS = {**ZERO, "sent": 5, "delivered": 4, "bounced": 1}


@pytest.fixture
async def campaign(engine: AsyncEngine) -> dict[str, Any]:
    """A campaign row (created three days ago, 17 recipients targeted) for the report."""
    name = f"analytics-{uuid.uuid4().hex[:10]}"
    created = HOUR - timedelta(days=1)
    async with engine.begin() as conn:
        segment_id = await conn.scalar(
            sa.insert(segments)
            .values(name=name, kind="filter", filter={"field": "country", "op": "exists"}, created_by="test")
            .returning(segments.c.id)
        )
        campaign_id = await conn.scalar(
            sa.insert(campaigns)
            .values(id=uuid.uuid4(), name=name, category=name, template_key="promo", template_version=2,
                    segment_id=segment_id, channels=["email", "sms"], schedule={}, status="completed",
                    created_by="test", created_at=created)
            .returning(campaigns.c.id)
        )  # fmt: skip
        run = {"id": f"run-{name}", "campaign_id": campaign_id, "status": "completed", "targeted": 17,
               "started_at": created}  # fmt: skip
        await conn.execute(sa.insert(campaign_runs).values(run))
    return {"id": campaign_id, "category": name}


@pytest.fixture
async def recorded(history: HistoryWriter, campaign: dict[str, Any]) -> tuple[str, str, list[HistoryRow]]:
    rows = synthetic(campaign["category"], str(campaign["id"]))
    await history.record(rows)
    return campaign["category"], str(campaign["id"]), rows


def period(category: str, **fields: Any) -> Query:
    return Query(start=HOUR - timedelta(hours=1), end=HOUR + timedelta(hours=3), category=category, **fields)


async def everything(history: HistoryWriter, engine: AsyncEngine, category: str, campaign_id: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        report = await analytics.campaign_report(conn, history, uuid.UUID(campaign_id))
    return {
        "counts": await analytics.counts(history, period(category, by=("channel",))),
        "hourly": await analytics.counts(history, period(category, granularity="hour", by=("channel", "country"))),
        "rates": await analytics.rates(history, period(category, by=("channel", "provider"))),
        "latency": await analytics.latency(history, period(category, by=("channel",))),
        "geography": await analytics.geography(history, period(category, by=("timezone",))),
        "spend": await analytics.spend(history, period(category, by=("channel", "campaign"))),
        "report": report,
    }


async def test_counts_by_channel_and_per_hour(history: HistoryWriter, recorded: tuple) -> None:
    category, _, _ = recorded
    assert await analytics.counts(history, period(category, by=("channel",))) == [
        {"channel": "email", **EMAIL}, {"channel": "sms", **SMS}]  # fmt: skip
    hourly = await analytics.counts(history, period(category, granularity="hour", by=("channel",)))
    assert [(row["bucket"], row["channel"], row["sent"]) for row in hourly] == [
        (HOUR, "email", 10), (HOUR + timedelta(hours=1), "sms", 5)]  # fmt: skip
    daily = await analytics.counts(history, period(category, granularity="day"))
    assert daily == [{"bucket": HOUR.replace(hour=0), **{key: EMAIL[key] + SMS[key] for key in ZERO}}]
    # Filters narrow; a period that misses the events finds none.
    assert [row["sent"] for row in await analytics.counts(history, period(category, channel="sms"))] == [5]
    assert [row["sent"] for row in await analytics.counts(history, period(category, country="DE"))] == [5]
    assert [row["sent"] for row in await analytics.counts(history, period(category, template="promo"))] == [15]
    late = Query(start=HOUR + timedelta(hours=2), end=HOUR + timedelta(hours=3), category=category)
    assert await analytics.counts(history, late) == []


async def test_rates_carry_their_denominator(history: HistoryWriter, recorded: tuple) -> None:
    category, _, _ = recorded
    assert await analytics.rates(history, period(category, by=("channel", "provider"))) == [
        {"channel": "email", "provider": "", "sent": 0, "delivered": 0, "opened": 4, "clicked": 2,
         "delivery_rate": None, "open_rate": None, "click_rate": None},
        {"channel": "email", "provider": "p-mail", "sent": 10, "delivered": 8, "opened": 0, "clicked": 0,
         "delivery_rate": 0.8, "open_rate": 0.0, "click_rate": 0.0},
        {"channel": "sms", "provider": "p-sms", "sent": 5, "delivered": 4, "opened": 0, "clicked": 0,
         "delivery_rate": 0.8, "open_rate": 0.0, "click_rate": 0.0},
    ]  # fmt: skip
    # By channel only (tracking events have no provider): open and click rates of all sends.
    [email, sms] = await analytics.rates(history, period(category, by=("channel",)))
    assert (email["sent"], email["delivery_rate"], email["open_rate"], email["click_rate"]) == (10, 0.8, 0.4, 0.2)
    assert (sms["sent"], sms["delivery_rate"], sms["open_rate"]) == (5, 0.8, 0.0)


async def test_latency_quantiles_are_exact(history: HistoryWriter, recorded: tuple) -> None:
    category, _, _ = recorded
    # Linear interpolation between the sorted samples: p = x[k] + f * (x[k+1] - x[k]), k + f = q * (n - 1).
    assert await analytics.latency(history, period(category, by=("channel",))) == [
        {"channel": "email", "delivered": 8, "deliver_p50_ms": 450.0, "deliver_p90_ms": 730.0,
         "deliver_p99_ms": 793.0, "opened": 4, "open_p50_ms": 2500.0, "open_p90_ms": 3700.0,
         "open_p99_ms": 3970.0},
        {"channel": "sms", "delivered": 4, "deliver_p50_ms": 5000.0, "deliver_p90_ms": 5000.0,
         "deliver_p99_ms": 5000.0, "opened": 0, "open_p50_ms": None, "open_p90_ms": None, "open_p99_ms": None},
    ]  # fmt: skip


async def test_geography_by_country_and_time_zone(history: HistoryWriter, recorded: tuple) -> None:
    category, _, _ = recorded
    assert await analytics.geography(history, period(category)) == [
        {"country": "DE", "sent": 5, "delivered": 4, "opened": 0, "delivery_rate": 0.8, "open_rate": 0.0},
        {"country": "FR", "sent": 0, "delivered": 0, "opened": 0, "delivery_rate": None, "open_rate": None},
        {"country": "RU", "sent": 10, "delivered": 8, "opened": 4, "delivery_rate": 0.8, "open_rate": 0.4},
    ]  # fmt: skip
    zones = await analytics.geography(history, period(category, by=("timezone",)))
    assert [(row["country"], row["timezone"], row["sent"]) for row in zones] == [
        ("DE", "Europe/Berlin", 5), ("FR", "Europe/Paris", 0), ("RU", "Europe/Moscow", 10)]  # fmt: skip


async def test_spend_per_channel_provider_and_campaign(history: HistoryWriter, recorded: tuple) -> None:
    category, campaign_id, _ = recorded
    assert await analytics.spend(history, period(category, by=("channel", "provider"))) == [
        {"channel": "email", "provider": "p-mail", "currency": "USD", "sent": 10, "cost": Decimal("0.01")},
        {"channel": "sms", "provider": "p-sms", "currency": "EUR", "sent": 5, "cost": Decimal("0.25")},
    ]  # fmt: skip
    assert await analytics.spend(history, period(category, by=("campaign",))) == [
        {"campaign": campaign_id, "currency": "EUR", "sent": 5, "cost": Decimal("0.25")},
        {"campaign": campaign_id, "currency": "USD", "sent": 10, "cost": Decimal("0.01")},
    ]  # fmt: skip


async def test_campaign_report(history: HistoryWriter, recorded: tuple, engine: AsyncEngine) -> None:
    _, campaign_id, _ = recorded
    async with engine.connect() as conn:
        report = await analytics.campaign_report(conn, history, uuid.UUID(campaign_id))
    assert report["campaign"]["id"] == campaign_id
    assert report["funnel"] == {"targeted": 17, "sent": 15, "delivered": 12, "opened": 4, "clicked": 2}
    assert report["failures"] == [{"reason": "rejected by provider", "count": 2}]
    assert report["timeline"] == [{"minute": HOUR, "sent": 10, "failed": 2},
                                  {"minute": HOUR + timedelta(hours=1), "sent": 5, "failed": 0}]  # fmt: skip
    assert report["cost"] == [
        {"currency": "EUR", "cost": Decimal("0.25")},
        {"currency": "USD", "cost": Decimal("0.01")},
    ]


async def test_dashboard_sums_the_period(history: HistoryWriter, recorded: tuple) -> None:
    # The dashboard is not filtered by category: only check that its parts are there and
    # that the synthetic day's sends are inside its 7-day totals.
    board = await analytics.dashboard(history, HOUR + timedelta(hours=5), 7)
    assert set(board) == {"start", "end", "today", "channels", "daily", "latency", "spend"}
    email = next(row for row in board["channels"] if row["channel"] == "email")
    assert email["sent"] >= 10


async def test_resending_the_history_changes_no_aggregate(
    history: HistoryWriter, recorded: tuple, engine: AsyncEngine
) -> None:
    category, campaign_id, rows = recorded
    before = await everything(history, engine, category, campaign_id)
    # At least once: the same events again, in one batch (each twice) and in separate ones.
    await history.record([*rows, *rows])
    for chunk in range(0, len(rows), 7):
        await history.record(rows[chunk : chunk + 7])
    assert await everything(history, engine, category, campaign_id) == before
    listed = ", ".join(f"'{row.event_id}'" for row in rows)
    [stored] = await history.query(f"SELECT count() AS n FROM notification_history WHERE event_id IN ({listed})")
    assert int(stored["n"]) == len(rows)


def test_unknown_dimensions_never_reach_the_sql() -> None:
    q = Query(start=HOUR, end=HOUR + timedelta(days=500), by=("channel", "1; DROP TABLE x"))
    assert analytics.problems(q, 400) == [("end", "the period may cover at most 400 days"),
                                          ("by", "unknown dimension '1; DROP TABLE x'; use " +
                                           ", ".join(analytics.DIMENSIONS))]  # fmt: skip
    with pytest.raises(ValueError, match="unknown dimensions"):
        analytics._grouped(q, q.by, [])


async def test_the_rollups_answer_as_the_full_stats(
    history: HistoryWriter, recorded: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    # By channel, by campaign: the rollups. The same queries with them turned off read notification_stats.
    _, campaign_id, _ = recorded
    around = Query(start=HOUR - timedelta(hours=1), end=HOUR + timedelta(hours=3), granularity="hour", by=("channel",))
    one = Query(start=HOUR - timedelta(hours=1), end=HOUR + timedelta(hours=3), campaign_id=campaign_id)
    by_campaign = Query(start=HOUR - timedelta(hours=1), end=HOUR + timedelta(hours=3), by=("campaign",))
    calls = [(call, query) for call in (analytics.counts, analytics.rates, analytics.latency, analytics.spend)
             for query in (around, one, by_campaign)]  # fmt: skip
    rolled = [await call(history, query) for call, query in calls]
    assert any(row["sent"] >= 10 for row in rolled[0])
    assert [row["sent"] for row in rolled[1]] == [15]
    monkeypatch.setattr(analytics, "ROLLUPS", ())
    assert [await call(history, query) for call, query in calls] == rolled
