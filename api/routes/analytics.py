"""Analytics (FR-007, NFR-010): counts, rates, latency, geography, spend and the campaign
report, answered from the ClickHouse history by services.analytics, as JSON or CSV.

Every period endpoint takes the same parameters (`Asked`): a period (default the last 7
days, up to MARQUEE_ANALYTICS_MAX_DAYS), a granularity, dimensions and filters. What the
period, dimensions and format may be is checked here and answered as a 422 naming the
parameter; the figures are the service's.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel

from api.deps import ConnectionDep, SettingsDep, permit
from core.errors import Invalid, Unavailable
from core.schemas import (
    AnalyticsGranularity,
    AnalyticsOut,
    AnalyticsRow,
    CampaignReportOut,
    CountsRow,
    DateTime,
    GeographyRow,
    LatencyRow,
    RatesRow,
    ReportCampaign,
    ReportCost,
    ReportFailure,
    ReportFunnel,
    ReportMinute,
    SpendRow,
)
from services import analytics
from services.analytics import AnalyticsReader

router = APIRouter(prefix="/v1/analytics", tags=["analytics"], dependencies=[Depends(permit("analytics.read"))])

DEFAULT_DAYS = 7
# The history holds nothing outside these years, and ClickHouse's DateTime64 and the
# period arithmetic overflow not far beyond them.
PERIOD_YEARS = (2000, 2100)
Format = Literal["json", "csv"]
CSV_MEDIA_TYPE = "text/csv; charset=utf-8"
# The OpenAPI description of the CSV form every endpoint offers.
CSV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/csv": {"schema": {"type": "string"}}}, "description": "JSON, or CSV with ?format=csv"}
}
FILTERS = ("channel", "provider", "campaign_id", "template", "category", "country")


async def get_reader(request: Request) -> AnalyticsReader:
    """The history store this process reads: the worker's (one process, dev and tests) or
    its own ClickHouse server connection; chDB cannot be shared between processes."""
    reader: AnalyticsReader | None = request.app.state.history
    if reader is None:
        raise Unavailable(
            "analytics in a separate API process needs a ClickHouse server (MARQUEE_CLICKHOUSE_URL); "
            "the embedded chDB store belongs to the worker process",
            title="Analytics unavailable",
        )
    return reader


ReaderDep = Annotated[AnalyticsReader, Depends(get_reader)]


def _next_hour(now: datetime) -> datetime:
    """The end of the current hour: stats are hourly, so a default period covers whole hours."""
    return now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)


def _utc(at: datetime | None) -> datetime | None:
    """A time without a zone is read as UTC."""
    if at is None:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


class Asked:
    """The parameters every period endpoint takes, with defaults filled in and checked."""

    def __init__(
        self,
        settings: SettingsDep,
        start: Annotated[
            DateTime | None,
            Query(description="ISO 8601, UTC unless it names a zone; years 2000-2100; default: `end` minus 7 days"),
        ] = None,
        end: Annotated[
            DateTime | None, Query(description="Exclusive; years 2000-2100; default: the end of the current hour")
        ] = None,
        granularity: Annotated[
            AnalyticsGranularity, Query(description="A row per hour or day, or one for the whole period (all)")
        ] = "day",
        by: Annotated[
            list[str] | None,
            Query(description=f"Group by these (repeat it, or separate by commas): {', '.join(analytics.DIMENSIONS)}"),
        ] = None,
        channel: str | None = None,
        provider: str | None = None,
        campaign_id: uuid.UUID | None = None,
        template: Annotated[str | None, Query(description="A template key")] = None,
        category: str | None = None,
        country: Annotated[str | None, Query(description="ISO 3166 alpha-2, as recipients carry it")] = None,
        format: Annotated[Format, Query(description="json, or csv for a spreadsheet")] = "json",
    ) -> None:
        for name, at in (("start", start), ("end", end)):
            if at is not None and not PERIOD_YEARS[0] <= at.year <= PERIOD_YEARS[1]:
                raise Invalid([(name, f"the year must be {PERIOD_YEARS[0]}-{PERIOD_YEARS[1]}")])
        end_at = _utc(end) or _next_hour(datetime.now(UTC))
        start_at = _utc(start) or end_at - timedelta(days=DEFAULT_DAYS)
        dimensions = tuple(name.strip() for value in by or () for name in value.split(",") if name.strip())
        filters = {"channel": channel, "provider": provider, "campaign_id": str(campaign_id) if campaign_id else None,
                   "template": template, "category": category, "country": country}  # fmt: skip
        self.query = analytics.Query(
            start=start_at,
            end=end_at,
            granularity=None if granularity == "all" else granularity,
            by=dimensions,
            **filters,
        )
        problems = analytics.problems(self.query, settings.analytics_max_days)
        if problems:
            raise Invalid(problems)
        self.granularity = granularity
        self.filters = {name: value for name, value in filters.items() if value is not None}
        self.format = format

    def page(self, row_model: type[AnalyticsRow], rows: list[dict[str, Any]]) -> AnalyticsOut[Any]:
        page = {"start": self.query.start, "end": self.query.end, "granularity": self.granularity,
                "by": list(self.query.by), "filters": self.filters, "rows": rows}  # fmt: skip
        return AnalyticsOut[row_model].model_validate(page)  # type: ignore[valid-type]


AskedDep = Annotated[Asked, Depends()]


def _columns(report: str, row_model: type[AnalyticsRow], asked: Asked) -> list[str]:
    """The keys of the report's JSON rows, in their order: the CSV header (also when no row came)."""
    present = {*analytics.row_dimensions(report, asked.query.by), *(("bucket",) if asked.query.granularity else ())}
    return [name for name in row_model.model_fields if name in present or name not in AnalyticsRow.model_fields]


def _cell(value: Any) -> Any:
    """A JSON value as a CSV cell: null is empty, a list its items separated by spaces."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return value


def _csv(filename: str, sections: Iterable[tuple[str | None, Sequence[str], Iterable[dict[str, Any]]]]) -> Response:
    """CSV of (title, header, rows) sections, a blank line between them; an untitled section
    is written without its title row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    for number, (title, header, rows) in enumerate(sections):
        if number:
            writer.writerow([])
        if title is not None:
            writer.writerow([title])
        writer.writerow(header)
        writer.writerows([_cell(row[name]) for name in header] for row in rows)
    return Response(
        out.getvalue(),
        media_type=CSV_MEDIA_TYPE,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _stamp(at: datetime) -> str:
    return at.strftime("%Y%m%dT%H%MZ")


async def _answer(
    report: str,
    reading: Callable[[AnalyticsReader, analytics.Query], Awaitable[list[dict[str, Any]]]],
    row_model: type[AnalyticsRow],
    asked: Asked,
    reader: AnalyticsReader,
) -> Any:
    page = asked.page(row_model, await reading(reader, asked.query))
    if asked.format == "json":
        return page
    rows = [row.model_dump(mode="json", exclude_unset=True) for row in page.rows]
    filename = f"marquee-{report}-{_stamp(asked.query.start)}-{_stamp(asked.query.end)}.csv"
    return _csv(filename, [(None, _columns(report, row_model, asked), rows)])


def _period_route(path: str, row_model: type[AnalyticsRow], summary: str) -> Callable[..., Any]:
    return router.get(
        path,
        response_model=AnalyticsOut[row_model],  # type: ignore[valid-type]
        response_model_exclude_unset=True,  # a row carries only the dimensions asked for
        responses=CSV_RESPONSE,
        summary=summary,
    )


@_period_route("/counts", CountsRow, "Events per status")
async def counts(asked: AskedDep, reader: ReaderDep) -> Any:
    """Sent, delivered, failed, opened, clicked, bounced, complained, unreachable and
    suppressed, per bucket and the dimensions asked for."""
    return await _answer("counts", analytics.counts, CountsRow, asked, reader)


@_period_route("/rates", RatesRow, "Delivery, open and click rates")
async def rates(asked: AskedDep, reader: ReaderDep) -> Any:
    """Each rate is x / sent, with `sent` beside it (null when nothing was sent)."""
    return await _answer("rates", analytics.rates, RatesRow, asked, reader)


@_period_route("/latency", LatencyRow, "Time to deliver and to open")
async def latency(asked: AskedDep, reader: ReaderDep) -> Any:
    """Median, p90 and p99 in milliseconds from the provider's acceptance, with the number
    of samples (null quantiles when there was none)."""
    return await _answer("latency", analytics.latency, LatencyRow, asked, reader)


@_period_route("/geography", GeographyRow, "Counts and rates by country")
async def geography(asked: AskedDep, reader: ReaderDep) -> Any:
    """By the recipient's country; `by=timezone` adds the time zone (for send-time planning);
    other dimensions are filters here, not groups."""
    return await _answer("geography", analytics.geography, GeographyRow, asked, reader)


@_period_route("/spend", SpendRow, "Cost of the messages sent")
async def spend(asked: AskedDep, reader: ReaderDep) -> Any:
    """Provider cost of the sent messages per currency; `by` may name channel, provider and
    campaign (the other dimensions are not grouped here)."""
    return await _answer("spend", analytics.spend, SpendRow, asked, reader)


# The report's sections in order, each with its row model (the CSV header).
REPORT_SECTIONS: dict[str, type[BaseModel]] = {"campaign": ReportCampaign, "funnel": ReportFunnel,
                                               "failures": ReportFailure, "timeline": ReportMinute,
                                               "cost": ReportCost}  # fmt: skip


@router.get(
    "/campaigns/{campaign_id}", response_model=CampaignReportOut, responses=CSV_RESPONSE, summary="Campaign report"
)
async def campaign_report(
    campaign_id: uuid.UUID,
    conn: ConnectionDep,
    reader: ReaderDep,
    format: Annotated[Format, Query(description="json, or csv: one titled block per section")] = "json",
) -> Any:
    """Funnel (targeted, sent, delivered, opened, clicked), failures by reason, sends and
    failures per minute, and cost per currency, over the campaign's whole life."""
    report = CampaignReportOut.model_validate(await analytics.campaign_report(conn, reader, campaign_id))
    if format == "json":
        return report
    body = report.model_dump(mode="json")
    sections = [
        (name, list(model.model_fields), body[name] if isinstance(body[name], list) else [body[name]])
        for name, model in REPORT_SECTIONS.items()
    ]
    return _csv(f"marquee-campaign-{campaign_id}.csv", sections)
