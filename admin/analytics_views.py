"""Analytics in the admin (issue #10): a dashboard over today or the last 7 or 30 days, and
one campaign's report. Read-only pages for everyone the permission table's analytics.read
allows.

The figures are services.analytics' (ClickHouse), read through the history reader the API
app keeps on app.state.history; running campaigns come from PostgreSQL (services.campaigns).
Each chart (Chart.js, vendored under admin/static/vendor/chartjs and served by the admin
itself) has a table beside it with the exact figures, which screen readers read instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqladmin import expose
from starlette.requests import Request
from starlette.responses import Response

from admin.pages import AdminPage, FormErrors, not_found
from core.models import Channel
from services import analytics
from services import campaigns as control
from services.analytics import AnalyticsReader, Query

# Permission identity of both pages: RolePermissions maps it to analytics.read.
ANALYTICS = "analytics"

NO_HISTORY = "Analytics needs ClickHouse (MARQUEE_CLICKHOUSE_URL) in a separate API process"


@dataclass(frozen=True)
class Period:
    key: str
    label: str
    days: int


PERIODS = {period.key: period for period in (Period("today", "Today", 1), Period("7d", "Last 7 days", 7),
                                             Period("30d", "Last 30 days", 30))}  # fmt: skip
DEFAULT_PERIOD = "7d"
RUNNING_SHOWN = 20
# A campaign's timeline gets its quiet minutes filled in with zeros up to this span (a day);
# a longer one (a recurring campaign's runs days apart) lists only the minutes that sent.
TIMELINE_FILL_MINUTES = 24 * 60
FUNNEL = ("targeted", "sent", "delivered", "opened", "clicked")
COUNTS = ("sent", "delivered", "opened", "clicked", "failed")  # per channel on the dashboard


def percent(rate: float | None) -> str:
    """A rate as the pages show it; a dash when there was no denominator."""
    return "—" if rate is None else f"{rate * 100:.1f} %"


def steps(start: datetime, end: datetime, step: timedelta) -> list[datetime]:
    """Every bucket start from `start` up to `end` (exclusive)."""
    out = []
    at = start
    while at < end:
        out.append(at)
        at += step
    return out


def chart(kind: str, labels: Sequence[str], series: dict[str, list[Any]], **options: Any) -> dict[str, Any]:
    """What a canvas hands Chart.js (see analytics/_charts.html): kind, labels, one dataset per series."""
    datasets = [{"label": name, "data": values} for name, values in series.items()]
    return {"type": kind, "labels": list(labels), "datasets": datasets, **options}


def channels_of(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Every channel the service knows, then any other one the history names."""
    known = [channel.value for channel in Channel]
    return known + sorted({str(row["channel"]) for row in rows} - set(known))


def per_channel_totals(
    period_rates: list[dict[str, Any]], daily: list[dict[str, Any]], channels: list[str]
) -> list[dict[str, Any]]:
    """One row per channel and a last one for all: sends, failures and the rates with their
    denominators (failures from the per-day counts, which cover the same period)."""
    counts = {channel: dict.fromkeys(COUNTS, 0) for channel in channels}
    for row in period_rates:
        counts[row["channel"]].update({key: int(row[key]) for key in ("sent", "delivered", "opened", "clicked")})
    for row in daily:
        counts[row["channel"]]["failed"] += int(row["failed"])
    total = {key: sum(figures[key] for figures in counts.values()) for key in COUNTS}
    rows = [analytics.with_rates({"channel": channel, **figures}) for channel, figures in counts.items()]
    return [*rows, analytics.with_rates({"channel": "all channels", **total})]


def sends_over_time(
    rows: list[dict[str, Any]], channels: list[str], buckets: list[datetime], label_format: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sends per bucket and channel, quiet buckets as zeros: the table's rows and the chart."""
    sent = {(row["bucket"], row["channel"]): row["sent"] for row in rows}
    labels = [f"{bucket:{label_format}}" for bucket in buckets]
    series = {channel: [sent.get((bucket, channel), 0) for bucket in buckets] for channel in channels}
    table = [{"label": label, "counts": [series[channel][index] for channel in channels]}
             for index, label in enumerate(labels)]  # fmt: skip
    return table, chart("bar", labels, series, stacked=True)


def spend_totals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spend per currency (never converted), largest first."""
    totals: dict[str, Decimal] = {}
    sent: dict[str, int] = {}
    for row in rows:
        totals[row["currency"]] = totals.get(row["currency"], Decimal(0)) + row["cost"]
        sent[row["currency"]] = sent.get(row["currency"], 0) + row["sent"]
    return [{"currency": currency, "cost": cost, "sent": sent[currency]}
            for currency, cost in sorted(totals.items(), key=lambda item: (-item[1], item[0]))]  # fmt: skip


def funnel_steps(funnel: dict[str, int]) -> list[dict[str, Any]]:
    """Each step with its share of the targeted recipients and of the step before."""
    out = []
    previous = None
    for name in FUNNEL:
        count = int(funnel.get(name, 0))
        out.append({"step": name, "count": count, "of_targeted": analytics.rate(count, funnel.get("targeted", 0)),
                    "of_previous": None if previous is None else analytics.rate(count, previous)})  # fmt: skip
        previous = count
    return out


def timeline_minutes(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sends and failures per minute, the quiet minutes in between as zeros (within a day's span)."""
    if not timeline:
        return []
    found = {row["minute"]: row for row in timeline}
    first, last = timeline[0]["minute"], timeline[-1]["minute"]
    minutes = sorted(found)
    if last - first <= timedelta(minutes=TIMELINE_FILL_MINUTES):
        minutes = steps(first, last + timedelta(minutes=1), timedelta(minutes=1))
    label = "%H:%M" if first.date() == last.date() else "%Y-%m-%d %H:%M"
    return [{"minute": minute, "label": f"{minute:{label}}", "sent": found.get(minute, {}).get("sent", 0),
             "failed": found.get(minute, {}).get("failed", 0)} for minute in minutes]  # fmt: skip


class AnalyticsPages(AdminPage):
    name = "Analytics"
    icon = "fa-solid fa-chart-line"
    permission = ANALYTICS

    def history(self) -> AnalyticsReader | None:
        """The API's history reader; None in a separate API process without a ClickHouse server."""
        reader: AnalyticsReader | None = getattr(self._app_state(), "history", None)
        return reader

    # The first exposed route is the one the menu links to.
    @expose("/analytics", identity="analytics")
    async def dashboard_page(self, request: Request) -> Response:
        errors = FormErrors()
        key = request.query_params.get("period") or DEFAULT_PERIOD
        if key not in PERIODS:
            errors.add("period", f"choose one of {', '.join(PERIODS)}")
            key = DEFAULT_PERIOD
        period = PERIODS[key]
        context: dict[str, Any] = {"title": "Analytics", "period": period, "periods": PERIODS.values(),
                                   "errors": errors, "percent": percent, "unavailable": None}  # fmt: skip
        reader = self.history()
        if reader is None:
            context["unavailable"] = NO_HISTORY
            return await self.render(request, "marquee/analytics/dashboard.html", context, 503)
        now = datetime.now(UTC)
        figures = await analytics.dashboard(reader, now, period.days)
        start, end = figures["start"], figures["end"]
        if period.days == 1:  # today by the hour; a longer period by the day
            over_time = await analytics.counts(reader, Query(start=start, end=end, granularity="hour", by=("channel",)))
            buckets, label_format = steps(start, end, timedelta(hours=1)), "%H:00"
        else:
            over_time = figures["daily"]
            buckets, label_format = steps(start, end, timedelta(days=1)), "%Y-%m-%d"
        channels = channels_of([*figures["channels"], *figures["daily"]])
        totals = per_channel_totals(figures["channels"], figures["daily"], channels)
        sends_table, sends_chart = sends_over_time(over_time, channels, buckets, label_format)
        by_channel = totals[:-1]
        rates_chart = chart("bar", channels, {
            "delivery rate": [row["delivery_rate"] for row in by_channel],
            "open rate": [row["open_rate"] for row in by_channel],
            "click rate": [row["click_rate"] for row in by_channel],
        }, percent=True)  # fmt: skip
        async with self.connect() as conn:
            running = await control.list_campaigns(conn, self.temporal(), self.settings(), "running", RUNNING_SHOWN)
        context.update(
            start=start, end=end, channels=channels, totals=totals, all_channels=totals[-1],
            bucket_name="Hour (UTC)" if period.days == 1 else "Day (UTC)",
            sends_table=sends_table, sends_chart=sends_chart, rates_chart=rates_chart,
            latency=figures["latency"], spend=figures["spend"], spend_totals=spend_totals(figures["spend"]),
            running=running,
        )  # fmt: skip
        return await self.render(request, "marquee/analytics/dashboard.html", context, 400 if errors else 200)

    @expose("/analytics/campaigns/{campaign_id:uuid}", identity="analytics-campaign")
    async def campaign_page(self, request: Request) -> Response:
        campaign_id: uuid.UUID = request.path_params["campaign_id"]
        context: dict[str, Any] = {"title": "Campaign report", "campaign_id": campaign_id, "percent": percent,
                                   "unavailable": None}  # fmt: skip
        reader = self.history()
        if reader is None:
            context["unavailable"] = NO_HISTORY
            return await self.render(request, "marquee/analytics/campaign.html", context, 503)
        async with self.connect() as conn:
            try:
                report = await analytics.campaign_report(conn, reader, campaign_id)
            except control.CampaignNotFound as err:
                raise not_found(f"campaign {campaign_id}") from err
        funnel = funnel_steps(report["funnel"])
        timeline = timeline_minutes(report["timeline"])
        funnel_chart = chart("bar", FUNNEL, {"recipients": [step["count"] for step in funnel]}, horizontal=True)
        timeline_series = {key: [row[key] for row in timeline] for key in ("sent", "failed")}
        context.update(
            title=report["campaign"]["name"],
            campaign=report["campaign"],
            funnel=funnel,
            funnel_chart=funnel_chart,
            failures=report["failures"],
            failed=sum(item["count"] for item in report["failures"]),
            timeline=timeline,
            timeline_chart=chart("bar", [row["label"] for row in timeline], timeline_series, stacked=True),
            cost=report["cost"],
        )
        return await self.render(request, "marquee/analytics/campaign.html", context)
