"""The analytics questions, answered from ClickHouse (schema and writing: services.history).

Every period query reads hourly aggregates, never the raw history: `notification_stats`,
or a rollup of it (by channel and provider, by campaign) when the query groups and
filters by nothing else;
the campaign report's timeline and failure reasons read `notification_campaign_minutes`.
A period covers the hours whose start lies in [start, end):
stats have an hour's resolution, so callers pass whole hours (a start at 10:30 begins with
the 11:00 hour).

SQL is built from fixed fragments only: dimension and filter names map to column names
through the tables below, and every value (period, filters, campaign id) is bound as a
`{name:Type}` query parameter, never spliced into the text.

Rates are x / sent (None when nothing was sent) and come with their denominator. Latency
quantiles interpolate linearly between samples and are exact while a group (hour x
dimensions) has at most 8,192 samples, a uniform reservoir sample beyond.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from services import campaign_store as store
from services import campaigns

Granularity = Literal["hour", "day"]
DIMENSIONS = ("channel", "provider", "campaign", "template", "category", "country", "timezone")
# Dimension -> column of notification_stats.
COLUMNS = {"channel": "channel", "provider": "provider", "campaign": "campaign_id", "template": "template_key",
           "category": "category", "country": "country", "timezone": "timezone"}  # fmt: skip
# Query field -> the column it filters.
KEYS = {**COLUMNS, "currency": "currency"}  # what rows may be grouped by
FILTERS = {"channel": "channel", "provider": "provider", "campaign_id": "campaign_id", "template": "template_key",
           "category": "category", "country": "country"}  # fmt: skip
COUNTED = ("sent", "delivered", "failed", "opened", "clicked", "bounced", "complained", "unreachable", "suppressed")
SPEND_DIMENSIONS = ("channel", "provider", "campaign")
LEVELS = (50, 90, 99)  # the quantiles notification_stats keeps: 0.5, 0.9, 0.99
# Smaller aggregates of notification_stats: (table, the dimensions and filters it keeps,
# whether it has the latency states). A query that groups and filters by nothing else reads
# the first that fits (thousands of rows instead of millions).
ROLLUPS = (
    ("notification_stats_channel", {"channel", "provider", "currency"}, True),
    ("notification_campaign_stats", {"campaign", "campaign_id", "currency"}, False),
)


@dataclass(frozen=True)
class Query:
    """A period (UTC, end exclusive), an optional time bucket, dimensions and filters;
    validated by the caller (`problems` says what is wrong)."""

    start: datetime
    end: datetime
    granularity: Granularity | None = None  # None: one row per group for the whole period
    by: tuple[str, ...] = ()  # a subset of DIMENSIONS
    channel: str | None = None
    provider: str | None = None
    campaign_id: str | None = None
    template: str | None = None
    category: str | None = None
    country: str | None = None


class AnalyticsReader(Protocol):
    """HistoryWriter satisfies it (its .query runs on the store's thread)."""

    async def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]: ...


def problems(q: Query, max_days: int) -> list[tuple[str, str]]:
    """What is wrong with a query, as (parameter, message): for the caller's 422."""
    found: list[tuple[str, str]] = []
    if q.start.tzinfo is None or q.end.tzinfo is None:
        found.append(("start" if q.start.tzinfo is None else "end", "must carry a time zone (UTC)"))
    elif q.end <= q.start:
        found.append(("end", "must be after start"))
    elif q.end - q.start > timedelta(days=max_days):
        found.append(("end", f"the period may cover at most {max_days} days"))
    if q.granularity not in (None, "hour", "day"):
        found.append(("granularity", "must be hour or day"))
    found += [("by", f"unknown dimension {name!r}; use {', '.join(DIMENSIONS)}") for name in q.by
              if name not in DIMENSIONS]  # fmt: skip
    return found


def _utc(at: datetime) -> datetime:
    return at.astimezone(UTC) if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _where(q: Query, params: dict[str, Any], *, table_time: str = "hour") -> list[str]:
    params.update(start=_utc(q.start), end=_utc(q.end))
    where = [f"{table_time} >= {{start:DateTime64(3, 'UTC')}}", f"{table_time} < {{end:DateTime64(3, 'UTC')}}"]
    for field, column in FILTERS.items():
        value = getattr(q, field)
        if value is not None:
            params[field] = str(value)
            where.append(f"{column} = {{{field}:String}}")
    return where


def _grouped(
    q: Query, dims: tuple[str, ...], measures: list[str], *, only: str | None = None, latency: bool = False
) -> tuple[str, dict[str, Any]]:
    """SELECT [bucket,] dims, measures FROM notification_stats for the query's period and
    filters (and `only`: one status), grouped and ordered by bucket and dims."""
    unknown = [name for name in dims if name not in KEYS]
    if unknown:  # the caller validates; never let a name reach the SQL unchecked
        raise ValueError(f"unknown dimensions {unknown}")
    params: dict[str, Any] = {}
    keys = [f"{KEYS[name]} AS {name}" for name in dims]
    names = list(dims)
    if q.granularity is not None:
        bucket = "toStartOfDay(hour)" if q.granularity == "day" else "hour"
        keys.insert(0, f"toUnixTimestamp({bucket}) AS bucket")
        names.insert(0, "bucket")
    where = _where(q, params)
    filtered = {name for name in FILTERS if getattr(q, name) is not None}
    fitting = (name for name, keeps, quantiles in ROLLUPS if {*dims, *filtered} <= keeps and quantiles >= latency)
    table = next(fitting, "notification_stats")
    if only is not None:
        params["only"] = only
        where.append("status = {only:String}")
    # HAVING: an ungrouped query over no rows answers no row, not one row of zeros.
    grouping = f"GROUP BY {', '.join(names)} ORDER BY {', '.join(names)}" if names else "HAVING count() > 0"
    sql = f"SELECT {', '.join(keys + measures)} FROM {table} WHERE {' AND '.join(where)} {grouping}"
    return sql, params


def _counted(*statuses: str) -> list[str]:
    return [f"toUInt64(sumIf(events, status = '{status}')) AS {status}" for status in statuses]


def _shaped(row: dict[str, Any], dims: tuple[str, ...], measures: tuple[str, ...]) -> dict[str, Any]:
    """A result row with Python types: bucket a UTC datetime, dims strings, counts ints."""
    shaped: dict[str, Any] = {}
    if "bucket" in row:
        shaped["bucket"] = datetime.fromtimestamp(int(row["bucket"]), UTC)
    shaped.update({name: str(row[name]) for name in dims})
    shaped.update({name: int(row[name]) for name in measures})
    return shaped


def rate(part: int, whole: int) -> float | None:
    """part / whole, None when there is no denominator (the API and the admin alike)."""
    return part / whole if whole else None


async def counts(reader: AnalyticsReader, q: Query) -> list[dict[str, Any]]:
    """bucket?, dims..., sent, delivered, failed, opened, clicked, bounced, complained,
    unreachable, suppressed."""
    sql, params = _grouped(q, q.by, _counted(*COUNTED))
    return [_shaped(row, q.by, COUNTED) for row in await reader.query(sql, params)]


async def rates(reader: AnalyticsReader, q: Query) -> list[dict[str, Any]]:
    """bucket?, dims..., sent, delivered, opened, clicked, delivery_rate, open_rate,
    click_rate: each rate is x / sent, None when sent is 0."""
    return [with_rates(row) for row in await _funnel(reader, q, q.by)]


async def _funnel(reader: AnalyticsReader, q: Query, dims: tuple[str, ...]) -> list[dict[str, Any]]:
    measures = ("sent", "delivered", "opened", "clicked")
    sql, params = _grouped(q, dims, _counted(*measures))
    return [_shaped(row, dims, measures) for row in await reader.query(sql, params)]


def with_rates(row: dict[str, Any]) -> dict[str, Any]:
    """A funnel row (sent, delivered, opened, clicked) with its delivery, open and click rates."""
    sent = row["sent"]
    return {**row, "delivery_rate": rate(row["delivered"], sent), "open_rate": rate(row["opened"], sent),
            "click_rate": rate(row["clicked"], sent)}  # fmt: skip


def _quantiles(values: Any) -> list[float | None]:
    """[p50, p90, p99] in ms; None where a group had no sample (NaN or null)."""
    out: list[float | None] = []
    for value in values or [None] * len(LEVELS):
        number = None if value is None else float(value)
        out.append(None if number is None or math.isnan(number) else round(number, 3))
    return out


async def latency(reader: AnalyticsReader, q: Query) -> list[dict[str, Any]]:
    """bucket?, dims..., delivered, deliver_p50_ms, deliver_p90_ms, deliver_p99_ms, opened,
    open_p50_ms, open_p90_ms, open_p99_ms: ms from the provider's acceptance."""
    levels = ", ".join(str(level / 100) for level in LEVELS)
    measures = [*_counted("delivered", "opened"),
                f"quantilesMergeIf({levels})(latency, status = 'delivered') AS deliver_q",
                f"quantilesMergeIf({levels})(latency, status = 'opened') AS open_q"]  # fmt: skip
    sql, params = _grouped(q, q.by, measures, latency=True)
    result = []
    for row in await reader.query(sql, params):
        shaped = _shaped(row, q.by, ("delivered",))
        shaped.update(zip((f"deliver_p{level}_ms" for level in LEVELS), _quantiles(row["deliver_q"]), strict=True))
        shaped["opened"] = int(row["opened"])
        shaped.update(zip((f"open_p{level}_ms" for level in LEVELS), _quantiles(row["open_q"]), strict=True))
        result.append(shaped)
    return result


def row_dimensions(report: str, by: tuple[str, ...]) -> tuple[str, ...]:
    """The dimensions a report's rows carry for `by`: geography always groups by country (and
    time zone when asked), spend only by its own dimensions, the others by `by` itself."""
    if report == "geography":
        return ("country", "timezone") if "timezone" in by else ("country",)
    if report == "spend":
        return tuple(name for name in by if name in SPEND_DIMENSIONS)
    return by


async def geography(reader: AnalyticsReader, q: Query) -> list[dict[str, Any]]:
    """bucket?, country (and timezone when q.by names it), sent, delivered, opened,
    delivery_rate, open_rate."""
    dims = row_dimensions("geography", q.by)
    return [
        {key: value for key, value in with_rates(row).items() if key not in ("clicked", "click_rate")}
        for row in await _funnel(reader, q, dims)
    ]


async def spend(reader: AnalyticsReader, q: Query) -> list[dict[str, Any]]:
    """bucket?, dims... (those of q.by among channel, provider, campaign), currency, sent,
    cost (a Decimal, summed per currency, never converted)."""
    dims = (*row_dimensions("spend", q.by), "currency")
    sql, params = _grouped(q, dims, ["toUInt64(sum(events)) AS sent", "toString(sum(cost)) AS spent"], only="sent")
    rows = []
    for row in await reader.query(sql, params):
        shaped = _shaped(row, dims, ("sent",))
        shaped["cost"] = Decimal(str(row["spent"]))
        rows.append(shaped)
    return rows


async def campaign_report(conn: AsyncConnection, reader: AnalyticsReader, campaign_id: uuid.UUID) -> dict[str, Any]:
    """{"campaign": {...}, "funnel": {targeted, sent, delivered, opened, clicked},
    "failures": [{reason, count}], "timeline": [{minute, sent, failed}], "cost": [{currency, cost}]}.
    Raises services.campaigns.CampaignNotFound."""
    row = await campaigns.load(conn, campaign_id)
    runs = store.campaign_runs
    found = (
        await conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(runs.c.targeted), 0), sa.func.min(runs.c.started_at),
                      sa.func.max(runs.c.finished_at)).where(runs.c.campaign_id == campaign_id)
        )
    ).one()  # fmt: skip
    targeted, first_run, last_finish = found
    # The whole life of a campaign's events: from its creation to now (stats are hourly).
    whole = Query(start=_utc(row.created_at).replace(minute=0, second=0, microsecond=0),
                  end=datetime.now(UTC) + timedelta(hours=1), campaign_id=str(campaign_id))  # fmt: skip
    params = {"campaign": str(campaign_id)}
    funnel, cost, failures, timeline = await asyncio.gather(
        _funnel(reader, whole, ()),
        spend(reader, whole),
        reader.query(
            "SELECT if(error_class = '', 'unknown', error_class) AS reason, toUInt64(sum(events)) AS n "
            "FROM notification_campaign_minutes WHERE campaign_id = {campaign:String} AND status = 'failed' "
            "GROUP BY reason ORDER BY n DESC, reason",
            params,
        ),
        # One row of three arrays, not a row per minute: a month-long campaign has ~43,000
        # minutes, and parsing each as its own JSON row cost more than the query.
        reader.query(
            "SELECT groupArray(at) AS at, groupArray(sent) AS sent, groupArray(failed) AS failed FROM ("
            "SELECT toUnixTimestamp(minute) AS at, toUInt64(sumIf(events, status = 'sent')) AS sent, "
            "toUInt64(sumIf(events, status = 'failed')) AS failed FROM notification_campaign_minutes "
            "WHERE campaign_id = {campaign:String} GROUP BY at ORDER BY at)",
            params,
        ),
    )
    totals = funnel[0] if funnel else {"sent": 0, "delivered": 0, "opened": 0, "clicked": 0}
    return {
        "campaign": {
            "id": str(row.id),
            "name": row.name,
            "status": row.status,
            "category": row.category,
            "channels": list(row.channels),
            "template_key": row.template_key,
            "template_version": row.template_version,
            "created_at": row.created_at,
            "first_run_at": first_run,
            "finished_at": last_finish,
        },
        "funnel": {
            "targeted": int(targeted),
            **{key: totals[key] for key in ("sent", "delivered", "opened", "clicked")},
        },
        "failures": [{"reason": str(item["reason"]), "count": int(item["n"])} for item in failures],
        "timeline": [
            {"minute": datetime.fromtimestamp(int(at), UTC), "sent": int(sent), "failed": int(failed)}
            for item in timeline
            for at, sent, failed in zip(item["at"], item["sent"], item["failed"], strict=True)
        ],
        "cost": [{"currency": item["currency"], "cost": item["cost"]} for item in cost],
    }


async def dashboard(reader: AnalyticsReader, now: datetime, days: int) -> dict[str, Any]:
    """What the admin dashboard shows for the last `days` days (today included) and today:
    {"start", "end", "today": counts by channel, "channels": rates by channel,
     "daily": counts per day and channel, "latency": by channel, "spend": by channel and currency}.
    Running campaigns come from PostgreSQL (services.campaigns), not from here."""
    now = _utc(now)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    start = midnight - timedelta(days=days - 1)
    period = Query(start=start, end=end, by=("channel",))
    today, channels, daily, delays, spent = await asyncio.gather(
        counts(reader, Query(start=midnight, end=end, by=("channel",))),
        rates(reader, period),
        counts(reader, Query(start=start, end=end, granularity="day", by=("channel",))),
        latency(reader, period),
        spend(reader, period),
    )
    return {"start": start, "end": end, "today": today, "channels": channels, "daily": daily, "latency": delays,
            "spend": spent}  # fmt: skip
