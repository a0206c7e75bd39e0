"""The analytics API end to end: notifications and a campaign sent through the real stack,
a provider webhook ("delivered") and the tracking pixel ("opened") posted, then every
figure read back through /v1/analytics matches what PostgreSQL says happened, as JSON and as
CSV; bad parameters are 422s naming them; only staff may look.

History reaches ClickHouse asynchronously (the worker's group commit, the API's outbox
shipped by the worker), so each check polls until the figure appears, with a deadline.
Each test counts only its own events: a fresh category or campaign, and its own provider.
"""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from api.app import create_app
from core import tracking
from core.auth import Role
from core.config import Settings
from core.tracking import CampaignSend, InstantDelivery
from services import analytics
from services.campaign_store import campaign_deliveries, campaign_runs
from services.delivery_events import deliveries
from tests.e2e.test_campaigns import create_campaign, make_audience, manager, tag_segment, template_key, wait_campaign  # noqa: F401
from tests.e2e.test_webhooks import event, post_events, recipient_id
from tests.stack import SmtpServer, token_for, wait_for_status

COST = Decimal("0.0125")
PERIOD_ENDPOINTS = ("counts", "rates", "latency", "geography", "spend")


# --- helpers ------------------------------------------------------------------------------


def client(api_url: str, settings: Settings, role: Role) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token_for(settings, role)}"}
    return httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30)


@pytest.fixture
async def analyst(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with client(api_url, settings, Role.analyst) as analyst:
        yield analyst


@pytest.fixture
async def public(api_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """Providers' webhooks and mail clients' pixels come without a token."""
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as public:
        yield public


@pytest.fixture
async def mail_provider(stored: Callable[..., Awaitable[None]], smtp_server: SmtpServer) -> tuple[str, str]:
    """An enabled SMTP provider of this test alone, at EUR 0.0125 a message: (name, webhook secret)."""
    name, secret = f"an-{uuid.uuid4().hex[:10]}", f"whsec_{uuid.uuid4().hex}"
    await stored(name=name, channel="email", kind="smtp", enabled=True, cost_per_message=float(COST), currency="EUR",
                 settings={"host": "127.0.0.1", "port": smtp_server.port, "sender": "Marquee <news@example.com>"},
                 secrets={"webhook_secret": secret})  # fmt: skip
    return name, secret


async def eventually(
    analyst: httpx.AsyncClient, path: str, params: Any, done: Callable[[Any], bool], seconds: float = 30
) -> Any:
    """GET path until `done(body)`; the last body, whatever it was, at the deadline."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        response = await analyst.get(path, params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        if done(body) or asyncio.get_running_loop().time() > deadline:
            return body
        await asyncio.sleep(0.2)


def cell(value: Any) -> str:
    """A JSON value as its CSV cell."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(value)
    return str(value)


def as_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[cell(value) for value in row.values()] for row in rows]


async def csv_of(analyst: httpx.AsyncClient, path: str, params: Any) -> list[list[str]]:
    response = await analyst.get(path, params=[*_pairs(params), ("format", "csv")])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="marquee-'), disposition
    assert disposition.endswith('.csv"'), disposition
    return list(csv.reader(io.StringIO(response.text)))


def _pairs(params: Any) -> list[tuple[str, Any]]:
    return list(params.items()) if isinstance(params, dict) else list(params)


def interpolated(samples: list[int], level: float) -> float:
    """ClickHouse's quantile: linear interpolation between the sorted samples."""
    ordered = sorted(samples)
    position = level * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def quantiles(prefix: str, samples: list[int]) -> dict[str, float]:
    return {f"{prefix}_p{level}_ms": round(interpolated(samples, level / 100), 3) for level in analytics.LEVELS}


def ms(later: datetime, earlier: datetime) -> int:
    return max(0, round((later - earlier).total_seconds() * 1000))


async def sleep_until(at: datetime) -> None:
    await asyncio.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()) + 0.05)


def counted(**figures: int) -> dict[str, int]:
    return {name: figures.get(name, 0) for name in analytics.COUNTED}


# --- figures ------------------------------------------------------------------------------


async def test_instant_notifications_figures_match_what_happened(
    api: httpx.AsyncClient, analyst: httpx.AsyncClient, public: httpx.AsyncClient, engine: AsyncEngine,
    settings: Settings, smtp_server: SmtpServer, mail_provider: tuple[str, str],
) -> None:  # fmt: skip
    provider, secret = mail_provider
    category = f"an-{uuid.uuid4().hex[:8]}"
    people = {"de1": ("DE", "Europe/Berlin"), "de2": ("DE", "Europe/Berlin"), "us": ("US", "America/New_York"),
              "fr": ("FR", "Europe/Paris")}  # fmt: skip
    ids: dict[str, str] = {}
    for who, (country, zone) in people.items():
        user_id = f"{category}-{who}"
        body = {"user_id": user_id, "email": f"{user_id}@example.com", "country": country, "timezone": zone}
        assert (await api.post("/v1/recipients", json=body)).status_code == 200
        if who == "fr":
            smtp_server.handler.refuse[body["email"]] = "550 5.1.1 No such user here"
        sent = await api.post(
            "/v1/notifications",
            json={"user_id": user_id, "type": category, "channels": ["email"], "title": "Hi", "body": "Hi"},
        )
        assert sent.status_code == 202, sent.text
        ids[who] = sent.json()["id"]
    for who, notification_id in ids.items():
        await wait_for_status(api, notification_id, "failed" if who == "fr" else "sent")

    async with engine.connect() as conn:
        found = await conn.execute(sa.select(deliveries).where(deliveries.c.notification_id.in_(
            [uuid.UUID(value) for value in ids.values()])))  # fmt: skip
        rows = {str(row.notification_id): row for row in found}
    row = {who: rows[notification_id] for who, notification_id in ids.items()}
    assert {row[who].provider for who in ("de1", "de2", "us")} == {provider}

    # Delivered 1.5 s and 2.5 s after the provider took them (the provider's own times).
    delivered_at = {"de1": row["de1"].sent_at + timedelta(milliseconds=1500),
                    "de2": row["de2"].sent_at + timedelta(milliseconds=2500)}  # fmt: skip
    await sleep_until(max(delivered_at.values()))
    events = [event("delivered", row[who].provider_message_id, timestamp=at.isoformat())
              for who, at in delivered_at.items()]  # fmt: skip
    assert (await post_events(public, provider, secret, events)).json()["accepted"] == 2
    pixel = tracking.delivery_token(tracking.tracking_key(settings), InstantDelivery(uuid.UUID(ids["de1"]), "email"))
    assert (await public.get(f"/t/o/{pixel}.gif")).status_code == 200
    async with engine.connect() as conn:
        opened_at = await conn.scalar(
            sa.select(deliveries.c.opened_at).where(deliveries.c.notification_id == uuid.UUID(ids["de1"]))
        )
    assert opened_at is not None

    whole = {"category": category, "granularity": "all"}
    expected = [
        {"country": "DE", **counted(sent=2, delivered=2, opened=1)},
        {"country": "FR", **counted(failed=1)},
        {"country": "US", **counted(sent=1)},
    ]
    counts = await eventually(analyst, "/v1/analytics/counts", [*whole.items(), ("by", "country")],
                              lambda body: body["rows"] == expected)  # fmt: skip
    assert (counts["granularity"], counts["by"]) == ("all", ["country"])
    assert counts["filters"] == {"category": category}
    assert counts["rows"] == expected

    # Per hour (the default granularity is per day): the same totals, each in its event's hour.
    hourly = (await analyst.get("/v1/analytics/counts", params={"category": category, "granularity": "hour"})).json()
    totals: Counter[str] = Counter()
    for bucket in hourly["rows"]:
        totals.update({name: bucket[name] for name in analytics.COUNTED})
    assert dict(totals) == counted(sent=3, delivered=2, opened=1, failed=1)
    hours = {at.replace(minute=0, second=0, microsecond=0)
             for at in [*(row[who].sent_at for who in ("de1", "de2", "us")), row["fr"].failed_at,
                        *delivered_at.values(), opened_at]}  # fmt: skip
    assert {datetime.fromisoformat(bucket["bucket"]) for bucket in hourly["rows"]} <= hours
    daily = (await analyst.get("/v1/analytics/counts", params={"category": category})).json()
    assert daily["granularity"] == "day"
    assert datetime.fromisoformat(daily["end"]) - datetime.fromisoformat(daily["start"]) == timedelta(days=7)
    assert sum(bucket["sent"] for bucket in daily["rows"]) == 3

    rates = (await analyst.get("/v1/analytics/rates", params=[*whole.items(), ("by", "channel,provider")])).json()
    assert rates["by"] == ["channel", "provider"]
    assert rates["rows"] == [
        # Accepted events come before any provider: a group of their own, where nothing was sent.
        {"channel": "email", "provider": "", "sent": 0, "delivered": 0, "opened": 0, "clicked": 0,
         "delivery_rate": None, "open_rate": None, "click_rate": None},
        {"channel": "email", "provider": provider, "sent": 3, "delivered": 2, "opened": 1, "clicked": 0,
         "delivery_rate": 2 / 3, "open_rate": 1 / 3, "click_rate": 0.0},
    ]  # fmt: skip

    latency = (await analyst.get("/v1/analytics/latency", params={**whole, "by": "channel"})).json()
    delivered_ms = [1500, 2500]
    open_ms = [ms(opened_at, row["de1"].sent_at)]
    assert latency["rows"] == [
        {"channel": "email", "delivered": 2, **quantiles("deliver", delivered_ms), "opened": 1,
         **quantiles("open", open_ms)},
    ]  # fmt: skip
    assert latency["rows"][0]["deliver_p50_ms"] == 2000.0

    geography = (await analyst.get("/v1/analytics/geography", params={**whole, "by": "timezone"})).json()
    assert geography["rows"] == [
        {"country": "DE", "timezone": "Europe/Berlin", "sent": 2, "delivered": 2, "opened": 1, "delivery_rate": 1.0,
         "open_rate": 0.5},
        {"country": "FR", "timezone": "Europe/Paris", "sent": 0, "delivered": 0, "opened": 0, "delivery_rate": None,
         "open_rate": None},
        {"country": "US", "timezone": "America/New_York", "sent": 1, "delivered": 0, "opened": 0,
         "delivery_rate": 0.0, "open_rate": 0.0},
    ]  # fmt: skip
    germany = (await analyst.get("/v1/analytics/geography", params={**whole, "country": "DE"})).json()
    assert [(row["country"], row["sent"]) for row in germany["rows"]] == [("DE", 2)]

    spend = (await analyst.get("/v1/analytics/spend", params={**whole, "by": ["channel", "provider"]})).json()
    [spent] = spend["rows"]
    assert {**spent, "cost": Decimal(spent["cost"])} == {
        "channel": "email", "provider": provider, "currency": "EUR", "sent": 3, "cost": 3 * COST,
    }  # fmt: skip

    # Every endpoint's CSV, read back, is its JSON rows under a header of their keys.
    exports: list[tuple[str, Any]] = [
        ("counts", [*whole.items(), ("by", "country")]), ("counts", {"category": category}),
        ("rates", {**whole, "by": "channel,provider"}), ("latency", {**whole, "by": "channel"}),
        ("geography", {**whole, "by": "timezone"}), ("spend", {**whole, "by": "provider"}),
    ]  # fmt: skip
    for name, params in exports:
        body = (await analyst.get(f"/v1/analytics/{name}", params=params)).json()
        table = await csv_of(analyst, f"/v1/analytics/{name}", params)
        assert table == [list(body["rows"][0]), *as_cells(body["rows"])], name
    # No rows: still the header.
    nothing = {"category": f"none-{uuid.uuid4().hex[:6]}", "by": "channel"}
    assert (await csv_of(analyst, "/v1/analytics/counts", nothing)) == [["bucket", "channel", *analytics.COUNTED]]
    assert (await analyst.get("/v1/analytics/counts", params=nothing)).json()["rows"] == []


async def test_campaign_report_matches_the_campaign(
    api: httpx.AsyncClient, analyst: httpx.AsyncClient, manager: httpx.AsyncClient,  # noqa: F811
    public: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, smtp_server: SmtpServer,
    mail_provider: tuple[str, str], template_key: str,  # noqa: F811
) -> None:  # fmt: skip
    provider, secret = mail_provider
    tag, emails = await make_audience(api, 3, country="DE", timezone="Europe/Berlin")
    smtp_server.handler.refuse[emails[2]] = "550 5.1.1 No such user here"
    campaign = await create_campaign(manager, template_key, await tag_segment(manager, tag))
    assert (await manager.post(f"/v1/campaigns/{campaign['id']}/launch")).status_code == 200
    done = await wait_campaign(manager, campaign["id"], "completed")
    [run] = done["runs"]
    assert (run["targeted"], run["sent"], run["failed"]) == (3, 2, 1)

    async with engine.connect() as conn:
        sends = {row.recipient_id: row for row in await conn.execute(
            sa.select(campaign_deliveries).where(campaign_deliveries.c.run_id == run["id"]))}  # fmt: skip
        started_at, finished_at = (
            await conn.execute(
                sa.select(campaign_runs.c.started_at, campaign_runs.c.finished_at).where(
                    campaign_runs.c.id == run["id"]
                )
            )
        ).one()
    first, second = [await recipient_id(engine, f"{tag}-{n}") for n in range(2)]
    delivered_at = sends[first].created_at + timedelta(milliseconds=1200)
    await sleep_until(delivered_at)
    delivered = event("delivered", sends[first].provider_message_id, timestamp=delivered_at.isoformat())
    assert (await post_events(public, provider, secret, [delivered])).json()["accepted"] == 1
    pixel = tracking.delivery_token(tracking.tracking_key(settings), CampaignSend(run["id"], second, "email"))
    assert (await public.get(f"/t/o/{pixel}.gif")).status_code == 200

    path = f"/v1/analytics/campaigns/{campaign['id']}"
    report = await eventually(analyst, path, {}, lambda body: body["funnel"]["opened"] == 1
                              and body["funnel"]["delivered"] == 1)  # fmt: skip
    minutes: dict[datetime, Counter[str]] = {}
    for send in sends.values():
        minutes.setdefault(send.created_at.replace(second=0, microsecond=0), Counter())[send.status] += 1
    assert report == {
        "campaign": {
            "id": campaign["id"], "name": campaign["name"], "status": "completed", "category": campaign["category"],
            "channels": ["email"], "template_key": template_key, "template_version": campaign["template_version"],
            "created_at": report["campaign"]["created_at"],
            "first_run_at": report["campaign"]["first_run_at"], "finished_at": report["campaign"]["finished_at"],
        },
        "funnel": {"targeted": 3, "sent": 2, "delivered": 1, "opened": 1, "clicked": 0},
        "failures": [{"reason": "rejected by provider", "count": 1}],
        "timeline": [{"minute": report["timeline"][n]["minute"], "sent": counts["sent"], "failed": counts["failed"]}
                     for n, (_, counts) in enumerate(sorted(minutes.items()))],
        "cost": [{"currency": "EUR", "cost": report["cost"][0]["cost"]}],
    }  # fmt: skip
    assert [datetime.fromisoformat(item["minute"]) for item in report["timeline"]] == sorted(minutes)
    assert Decimal(report["cost"][0]["cost"]) == 2 * COST
    assert datetime.fromisoformat(report["campaign"]["created_at"]) == datetime.fromisoformat(campaign["created_at"])
    assert datetime.fromisoformat(report["campaign"]["first_run_at"]) == started_at
    assert datetime.fromisoformat(report["campaign"]["finished_at"]) == finished_at

    # The same campaign through the period endpoints, filtered to it.
    mine = {"campaign_id": campaign["id"], "granularity": "all"}
    latency = (await analyst.get("/v1/analytics/latency", params=mine)).json()
    assert latency["rows"][0]["delivered"] == 1
    assert latency["rows"][0]["deliver_p50_ms"] == 1200.0
    spend = (await analyst.get("/v1/analytics/spend", params={**mine, "by": "campaign"})).json()
    assert [(row["campaign"], row["currency"], row["sent"], Decimal(row["cost"])) for row in spend["rows"]] == [
        (campaign["id"], "EUR", 2, 2 * COST)
    ]

    # CSV: the report's sections in order, each a title, a header and its rows.
    table = await csv_of(analyst, path, {})
    sections: list[list[list[str]]] = [[]]
    for line in table:
        if line:
            sections[-1].append(line)
        else:
            sections.append([])
    assert [section[0] for section in sections] == [[name] for name in report]
    for (name, value), section in zip(report.items(), sections, strict=True):
        rows = value if isinstance(value, list) else [value]
        header = list(rows[0]) if rows else section[1]
        assert section[1:] == [header, *as_cells(rows)], name


# --- parameters, roles, no store ------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"start": "yesterday"}, "start"),
        ({"end": "2024-13-01T00:00:00Z"}, "end"),
        ({"start": "2024-03-02T00:00:00Z", "end": "2024-03-01T00:00:00Z"}, "end"),
        ({"start": "2024-03-01T00:00:00Z", "end": "2024-03-01T00:00:00Z"}, "end"),
        ({"start": "2020-01-01T00:00:00Z", "end": "2024-01-01T00:00:00Z"}, "end"),  # over 400 days
        ({"by": "channel,planet"}, "by"),
        ({"by": "campaign_id"}, "by"),  # the filter's name, not the dimension's
        ({"granularity": "week"}, "granularity"),
        ({"format": "xml"}, "format"),
        ({"campaign_id": "not-a-uuid"}, "campaign_id"),
    ],
)
async def test_bad_parameters_are_422_naming_the_parameter(
    analyst: httpx.AsyncClient, params: dict[str, str], field: str
) -> None:
    for name in PERIOD_ENDPOINTS:
        response = await analyst.get(f"/v1/analytics/{name}", params=params)
        assert response.status_code == 422, (name, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert [error["field"] for error in response.json()["errors"]] == [field], (name, response.text)


async def test_the_longest_period_is_allowed_and_the_report_checks_its_own_parameters(
    analyst: httpx.AsyncClient, settings: Settings
) -> None:
    end = datetime(2024, 6, 1, tzinfo=UTC)
    start = end - timedelta(days=settings.analytics_max_days)
    response = await analyst.get("/v1/analytics/counts", params={"start": start.isoformat(), "end": end.isoformat()})
    assert response.status_code == 200, response.text
    assert (response.json()["start"], response.json()["rows"]) == ("2023-04-28T00:00:00Z", [])
    unknown = await analyst.get(f"/v1/analytics/campaigns/{uuid.uuid4()}")
    assert unknown.status_code == 404
    bad = await analyst.get(f"/v1/analytics/campaigns/{uuid.uuid4()}", params={"format": "pdf"})
    assert [error["field"] for error in bad.json()["errors"]] == ["format"]
    assert [error["field"] for error in (await analyst.get("/v1/analytics/campaigns/x")).json()["errors"]] == [
        "campaign_id"
    ]


async def test_staff_may_look_and_services_may_not(api_url: str, settings: Settings) -> None:
    paths = [*(f"/v1/analytics/{name}" for name in PERIOD_ENDPOINTS), f"/v1/analytics/campaigns/{uuid.uuid4()}"]
    for role in Role:
        async with client(api_url, settings, role) as someone:
            for path in paths:
                response = await someone.get(path)
                if role is Role.service:
                    assert response.status_code == 403, path
                    assert "allowed: admin, analyst, campaign_manager" in response.json()["detail"]
                else:
                    assert response.status_code == (404 if "/campaigns/" in path else 200), (role, path)
    async with httpx.AsyncClient(base_url=api_url) as nobody:
        assert (await nobody.get("/v1/analytics/counts")).status_code == 401


async def test_an_api_process_without_a_history_store_says_what_it_needs(
    settings: Settings, engine: AsyncEngine
) -> None:
    """`marquee api` on its own: chDB belongs to the worker, so analytics needs a server."""
    assert settings.clickhouse_url is None
    app = create_app(settings, engine=engine)  # not started: no lifespan, no store of its own
    headers = {"Authorization": f"Bearer {token_for(settings, Role.analyst)}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api", headers=headers) as someone:
        response = await someone.get("/v1/analytics/counts")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert "MARQUEE_CLICKHOUSE_URL" in response.json()["detail"]
