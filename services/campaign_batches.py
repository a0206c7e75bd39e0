"""The worker's side of a campaign run: keyset pages of the segment, batch sends, run bookkeeping.

A batch is a keyset range of recipient ids. Its activity skips what this run already
recorded for the range, sends the rest concurrently over the pooled providers and records
results in small chunks right after the provider accepted them, with the run's counters
updated in the same transaction. A retried batch, a restarted worker or a resumed campaign
therefore sends only what was not recorded; what can be sent twice is at most the messages
in flight when a worker dies, and those carry the same Message-ID.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
import structlog
from aiolimiter import AsyncLimiter
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from channels.base import InvalidAddressError, OutboundMessage, PermanentSendError, TransientSendError
from core import tracing
from core.clock import next_local_time, window_state
from core.config import Settings
from core.contracts import (
    BatchInput,
    BatchResult,
    ChannelLane,
    FinishRunInput,
    RangeInput,
    RunPlan,
    StartRunInput,
    WindowInput,
    WindowState,
    ZoneStart,
)
from core.errors import NotFound
from core.queries import recipients, select_recipients_to_send
from core.templating import RenderError, TemplateContent, checked_variables, render_for_recipient
from core.tracking import CampaignSend
from services import campaign_store as store
from services import delivery, metrics
from services.delivery_events import apply_early_events_for
from services.history import HistoryBatch, HistorySubject, HistoryWriter, campaign_send_id
from services.providers import bulk_queue_for, message_cost
from services.routing import ChannelRouter, ProviderDirectory
from services.sending import retire_address
from services.templates import PinnedVersions

HEARTBEAT_SECONDS = 1.0  # liveness for Temporal, independent of how fast sends go
FLUSH_EVERY = 50  # write a chunk once this many outcomes wait
MAX_UNRECORDED = 200  # senders wait beyond this: bounds what a crash can leave unrecorded
RUN_COUNTERS = ("sent", "failed", "suppressed", "unreachable")  # the statuses a delivery row is recorded with
# What an outcome stores in campaign_deliveries (with the run's id); the rest is for its history row.
DELIVERY_COLUMNS = ("recipient_id", "channel", "status", "provider_message_id", "error")
# A chunk of outcomes: its delivery rows (each once: a rewritten chunk's rows are kept) and
# the run's counters raised by what was new, in one statement; the new rows by status, with
# this transaction's time.
RECORD_CHUNK = sa.text(f"""
WITH written AS (
    INSERT INTO campaign_deliveries (run_id, {", ".join(DELIVERY_COLUMNS)})
    SELECT CAST(:run_id AS text), * FROM unnest(CAST(:recipient_id AS bigint[]), CAST(:channel AS text[]),
        CAST(:status AS text[]), CAST(:provider_message_id AS text[]), CAST(:error AS text[]))
    ON CONFLICT ON CONSTRAINT uq_campaign_delivery DO NOTHING
    RETURNING status, created_at
), counted AS (
    UPDATE campaign_runs SET {", ".join(f"{name} = campaign_runs.{name} + added.{name}" for name in RUN_COUNTERS)}
    FROM (SELECT {", ".join(f"count(*) FILTER (WHERE status = '{name}') AS {name}" for name in RUN_COUNTERS)}
          FROM written) AS added
    WHERE id = CAST(:run_id AS text) AND EXISTS (SELECT FROM written)
)
SELECT status, count(*) AS rows, min(created_at) AS at FROM written GROUP BY status
""")
# Failure classes, named as the notification workflow names its reasons.
REJECTED = "rejected by provider"
RENDER_FAILED = "render failed"


logger = structlog.get_logger("marquee.campaigns")


class CampaignMissing(NotFound):
    """The run's campaign row is gone (deleted while it ran)."""


class BatchInterrupted(Exception):
    """A provider or channel is in trouble: what was sent is recorded, the rest waits for
    the batch's retry."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_delay = timedelta(seconds=retry_after) if retry_after else None


@dataclass(frozen=True)
class CampaignSpec:
    """What every batch of a campaign needs; campaigns are immutable once launched."""

    campaign_id: uuid.UUID
    category: str
    channels: list[str]
    variables: dict[str, Any]
    content: TemplateContent
    template_key: str
    template_version: int
    segment: sa.Row[Any]
    schedule: dict[str, Any]


class _Recorder:
    """Records send outcomes in small chunks without holding the senders up.

    Senders only append; a chunk is written to PostgreSQL (rows and run counters in one
    transaction) as soon as FLUSH_EVERY outcomes wait, one chunk at a time, and senders
    pause only if MAX_UNRECORDED outcomes are waiting. ClickHouse history follows each
    chunk through the group-commit writer; `close()` waits for all of it.
    """

    def __init__(self, engine: AsyncEngine, history: HistoryWriter, directory: ProviderDirectory, spec: CampaignSpec,
                 run_id: str) -> None:  # fmt: skip
        self._engine = engine
        self._history = history
        self._directory = directory
        self._spec = spec
        self._run_id = run_id
        self._rows: list[dict[str, Any]] = []
        self._lock = asyncio.Lock()
        self._flushing: asyncio.Task[None] | None = None
        self._history_writes: list[asyncio.Task[None]] = []
        self.totals: Counter[str] = Counter()
        # What the batch's history rows share; each row adds its recipient's fields.
        self._subject = HistorySubject(
            "", "", spec.category, str(spec.campaign_id), run_id=run_id, template_key=spec.template_key,
            template_version=spec.template_version,
        )  # fmt: skip

    async def add(self, recipient: sa.Row[Any], channel: str, status: str, *, message_id: str | None = None,
                  error: str | None = None, error_class: str = "", provider: str = "") -> None:  # fmt: skip
        if status == "sent":
            metrics.SENT.labels(channel, provider, "campaign").inc()
        elif status == "failed":
            metrics.FAILED.labels(channel, provider, "campaign").inc()
        self._rows.append(
            {
                "recipient_id": recipient.id,
                "user_id": recipient.user_id,
                "country": recipient.country or "",
                "timezone": recipient.timezone or "",
                "channel": channel,
                "status": status,
                "provider_message_id": message_id,
                "error": error,
                "error_class": error_class,
                "provider": provider,
            }
        )
        if len(self._rows) >= FLUSH_EVERY and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.create_task(self._write_chunk())
        if len(self._rows) >= MAX_UNRECORDED:
            await self.flush()

    async def flush(self) -> None:
        # Shielded: a cancelled sender or activity must not abandon a chunk it took from
        # the buffer half-written; the write finishes and close() waits for it.
        await asyncio.shield(self._write_chunk())

    async def _write_chunk(self) -> None:
        async with self._lock:
            rows, self._rows = self._rows, []
            if not rows:
                return
            try:
                counts, at = await self._insert(rows)
            except BaseException:
                # Not recorded: back to the buffer, so the next write (or close()) retries them
                # and a failure that persists fails the batch instead of losing its records.
                self._rows[:0] = rows
                raise
            self.totals.update(counts)
            self._history_writes.append(asyncio.create_task(self._history.record(self._history_batch(rows, at))))

    async def _insert(self, rows: list[dict[str, Any]]) -> tuple[Counter[str], datetime]:
        """Delivery rows and the run's counters, in one transaction; the rows' recorded time."""
        async with self._engine.begin() as conn:
            # One statement a chunk, its rows bound as one array a column (an executemany
            # bound and sent each row, then the counters took a statement of their own).
            written = await conn.execute(
                RECORD_CHUNK,
                {"run_id": self._run_id, **{column: [row[column] for row in rows] for column in DELIVERY_COLUMNS}},
            )
            stored = written.all()
            counts = Counter({row.status: row.rows for row in stored})
            # now() of this transaction, the same for every row: a rewritten chunk keeps its time.
            at = stored[0].at if stored else datetime.now(UTC)
            # A fast provider may have reported on some of these before this commit.
            await apply_early_events_for(
                conn, [row["provider_message_id"] for row in rows if row["provider_message_id"]]
            )
        return counts, at

    def _history_batch(self, rows: list[dict[str, Any]], at: datetime) -> HistoryBatch:
        """The chunk's history events as columns, a list per field rather than a row object
        per event (what the writer converts fastest); a sent event carries its provider's cost
        and currency."""
        campaign_id, run_id = self._spec.campaign_id, self._run_id
        costs: dict[str, dict[str, Any]] = {}  # a sent event's cost and currency, by provider
        for row in rows:
            if row["status"] == "sent" and row["provider"] not in costs:
                costs[row["provider"]] = self._cost(row["provider"])
        priced = [costs[row["provider"]] if row["status"] == "sent" else {} for row in rows]
        columns: dict[str, list[Any]] = {
            name: [row[name] for row in rows]
            for name in ("user_id", "country", "timezone", "channel", "status", "error", "provider", "error_class")
        }
        columns["notification_id"] = [campaign_send_id(campaign_id, run_id, row["recipient_id"], row["channel"])
                                      for row in rows]  # fmt: skip
        columns["cost"] = [cost.get("cost", Decimal(0)) for cost in priced]
        columns["currency"] = [cost.get("currency", "") for cost in priced]
        return self._subject.batch_of(columns, event_time=at)

    def _cost(self, provider: str) -> dict[str, Any]:
        loaded = self._directory.loaded.get(provider)
        return message_cost(loaded.record if loaded else None)

    async def close(self) -> None:
        """Record everything still buffered, and wait until its history is stored too."""
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self.flush()
        await asyncio.gather(*self._history_writes)


class CampaignSender:
    """Built once per worker with its clients; a campaign's spec is read once per worker."""

    def __init__(
        self,
        engine: AsyncEngine,
        directory: ProviderDirectory,
        history: HistoryWriter,
        settings: Settings,
        send_concurrency: int = 20,
        templates: PinnedVersions | None = None,
    ) -> None:
        self._engine = engine
        self._directory = directory
        self._router = ChannelRouter(directory)
        self._settings = settings
        self._history = history
        self._send_concurrency = send_concurrency
        self._templates = templates or PinnedVersions()
        self._specs: dict[uuid.UUID, CampaignSpec] = {}

    async def _spec(self, campaign_id: uuid.UUID) -> CampaignSpec:
        if campaign_id in self._specs:
            return self._specs[campaign_id]
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(store.campaigns).where(store.campaigns.c.id == campaign_id))).first()
            if row is None:
                raise CampaignMissing(f"no campaign {campaign_id}")
            segment = await store.load_segment(conn, row.segment_id)
            content = await self._templates.get(conn, row.template_key, row.template_version)
        spec = CampaignSpec(
            campaign_id=campaign_id,
            category=row.category,
            channels=list(row.channels),
            variables=dict(row.variables),
            content=content,
            template_key=row.template_key,
            template_version=row.template_version,
            segment=segment,
            schedule=dict(row.schedule),
        )
        self._specs[campaign_id] = spec
        return spec

    async def start_run(self, request: StartRunInput) -> RunPlan:
        """Open the run (once), count its audience and say how it is paced."""
        spec = await self._spec(request.campaign_id)
        async with self._engine.begin() as conn:
            created = await conn.scalar(
                insert(store.campaign_runs)
                .values(id=request.run_id, campaign_id=request.campaign_id, status="running")
                .on_conflict_do_nothing()
                .returning(store.campaign_runs.c.id)
            )
            if created is not None:
                counted = await store.count_segment(conn, spec.segment, spec.channels)
                await conn.execute(
                    store.campaign_runs.update()
                    .where(store.campaign_runs.c.id == request.run_id)
                    .values(targeted=counted["matches"])
                )
            if not spec.schedule.get("cron"):
                # Only a scheduled campaign becomes running: one paused while it waited for
                # its time stays paused (its workflow is paused too) until it is resumed.
                await conn.execute(
                    store.campaigns.update()
                    .where(store.campaigns.c.id == request.campaign_id, store.campaigns.c.status == "scheduled")
                    .values(status="running", updated_at=sa.func.now())
                )
            zones: list[ZoneStart] = []
            local_time = spec.schedule.get("local_time")
            if local_time:
                for zone in await store.segment_time_zones(conn, spec.segment):
                    zones.append(ZoneStart(time_zone=zone, fire_at=next_local_time(request.now, zone, local_time)))
                zones.sort(key=lambda zone: (zone.fire_at, zone.time_zone))
            throttle = await conn.scalar(
                sa.select(store.campaigns.c.throttle_per_second).where(store.campaigns.c.id == request.campaign_id)
            )
        logger.info("campaign run started" if created is not None else "campaign run resumed")
        plan = RunPlan(throttle_per_second=throttle, zones=zones, has_window=bool(spec.schedule.get("window")))
        lanes = [self._lane(channel) for channel in spec.channels]
        if len(lanes) == 1:
            plan.batch_queue, plan.provider_rate = lanes[0].queue, lanes[0].provider_rate
        elif any(lane.queue for lane in lanes):
            plan.channel_lanes = lanes
        return plan

    def _lane(self, channel: str) -> ChannelLane:
        """Where a channel's campaign batches run. If its first stored provider has a rate
        limit: that provider's bulk queue, paced by the Temporal server for all workers."""
        routes = self._directory.routes(channel)
        loaded = self._directory.loaded.get(routes[0].provider) if routes else None
        if loaded is None or not loaded.record.rate_limit_per_second:
            return ChannelLane(channel=channel)
        return ChannelLane(channel=channel, queue=bulk_queue_for(routes[0].task_queue),
                           provider_rate=loaded.record.rate_limit_per_second)  # fmt: skip

    async def next_range(self, request: RangeInput) -> int | None:
        spec = await self._spec(request.campaign_id)
        async with self._engine.connect() as conn:
            return await store.next_range_end(conn, spec.segment, request.after_id, request.limit, request.time_zone)

    async def send_window(self, request: WindowInput) -> WindowState:
        spec = await self._spec(request.campaign_id)
        window = spec.schedule["window"]
        return window_state(request.now, window["start"], window["end"], window.get("timezone", "UTC"))

    async def send_batch(self, batch: BatchInput, heartbeat: Callable[[dict[str, int]], None]) -> BatchResult:
        """Send a keyset range; `heartbeat` is called every second with the totals so far.
        One span (core.tracing) per batch, the parent of its provider calls."""
        spec = await self._spec(batch.campaign_id)
        channels = [batch.channel] if batch.channel else spec.channels
        providers = [self._directory.first_in_line(channel, self._directory.routes(channel)) for channel in channels]
        # The queue start_run chose for these batches (a one-channel lane: its provider's bulk queue).
        lane = (self._lane(channels[0]).queue if len(channels) == 1 else None) or self._settings.temporal_task_queue
        with tracing.campaign_batch(str(batch.campaign_id), batch.run_id, channels, providers, lane) as span:
            result = await self._send_range(spec, channels, batch, heartbeat, span)
            counts = result.model_dump(exclude={"deferred_until"})
            span.set_attributes({f"marquee.batch.{name}": count for name, count in counts.items()})
            return result

    async def _send_range(
        self,
        spec: CampaignSpec,
        channels: list[str],
        batch: BatchInput,
        heartbeat: Callable[[dict[str, int]], None],
        span: tracing.Span,
    ) -> BatchResult:
        async with self._engine.connect() as conn:
            query = select_recipients_to_send().where(
                store.segment_condition(spec.segment),
                recipients.c.id > batch.after_id,
                recipients.c.id <= batch.upto_id,
            )
            if batch.time_zone is not None:
                query = query.where(recipients.c.timezone == batch.time_zone)
            audience = (await conn.execute(query.order_by(recipients.c.id))).all()
            done = {
                (row.recipient_id, row.channel)
                for row in await conn.execute(
                    sa.select(store.campaign_deliveries.c.recipient_id, store.campaign_deliveries.c.channel).where(
                        store.campaign_deliveries.c.run_id == batch.run_id,
                        store.campaign_deliveries.c.recipient_id > batch.after_id,
                        store.campaign_deliveries.c.recipient_id <= batch.upto_id,
                    )
                )
            }
            choices = await delivery.load_choices(conn, audience, channels)
        span.set_attribute(tracing.BATCH_SIZE, len(audience))
        now = batch.now or datetime.now(UTC)
        deferred = 0
        deferred_until: datetime | None = None
        waiting: str | None = None  # why a channel waits for a provider
        recorder = _Recorder(self._engine, self._history, self._directory, spec, batch.run_id)
        jobs: list[tuple[sa.Row[Any], str, OutboundMessage]] = []
        skipped = 0
        ticker = asyncio.create_task(_heartbeat_every(HEARTBEAT_SECONDS, recorder, heartbeat))
        try:
            variables: dict[str, Any] | RenderError
            try:
                variables = checked_variables(spec.content, spec.variables)
            except RenderError as err:
                variables = err
            for person in audience:
                unsent = [channel for channel in channels if (person.id, channel) not in done]
                decisions = {
                    channel: delivery.decide(person, channel, category=spec.category, choices=choices,
                                             directory=self._directory, settings=self._settings, now=now)
                    for channel in unsent
                }  # fmt: skip
                quiet = [decision.until for decision in decisions.values() if decision.until is not None]
                if quiet:
                    # Not recorded: the workflow's next pass over the segment, once their quiet
                    # hours are over, sends them (and skips everyone recorded by then).
                    deferred += len(quiet)
                    deferred_until = min(quiet) if deferred_until is None else min(*quiet, deferred_until)
                else:
                    skipped += (len(channels) - len(unsent)) * batch.count_duplicates
                for channel, decision in decisions.items():
                    if decision.final:
                        await recorder.add(person, channel, decision.status, error=decision.reason)
                    elif decision.outcome is delivery.Outcome.no_provider:
                        waiting = decision.reason
                    elif decision.outcome is delivery.Outcome.send:
                        first = self._directory.first_in_line(channel, decision.routes)
                        metrics.ACCEPTED.labels(channel, first, "campaign").inc()
                        job = await self._message(spec, batch.run_id, person, channel, decision, variables, recorder)
                        if job is not None:
                            jobs.append((person, channel, job))
            span.set_attribute(tracing.BATCH_MESSAGES, len(jobs))
            transient = await self._send_all(jobs, recorder, batch.rate_per_second)
        finally:
            ticker.cancel()
            # Cancelled or not, what was sent is recorded before the activity ends
            # (the cancellation was delivered once; this await runs to completion).
            await recorder.close()
        if skipped:
            async with self._engine.begin() as conn:
                run = store.campaign_runs
                await conn.execute(
                    run.update()
                    .where(run.c.id == batch.run_id)
                    .values(skipped_duplicate=run.c.skipped_duplicate + skipped)
                )
        totals = recorder.totals
        outcomes = {name: totals[name] for name in RUN_COUNTERS}
        if transient is not None:
            # The sent part is recorded; the retry of this batch sends only the rest. (The
            # provider's error text is the activity's failure, not logged: it may quote an address.)
            logger.warning("campaign batch interrupted", size=len(audience), **outcomes)
            raise BatchInterrupted(f"batch interrupted: {transient}", transient.retry_after)
        if waiting is not None:
            logger.info("campaign batch waits for a provider", size=len(audience), **outcomes)
            raise BatchInterrupted(f"batch waits: {waiting}", None)
        logger.info("campaign batch done", size=len(audience), skipped_duplicate=skipped, deferred=deferred, **outcomes)
        return BatchResult(sent=totals["sent"], failed=totals["failed"], suppressed=totals["suppressed"],
                           unreachable=totals["unreachable"], skipped_duplicate=skipped, deferred=deferred,
                           deferred_until=deferred_until)  # fmt: skip

    async def _message(
        self,
        spec: CampaignSpec,
        run_id: str,
        person: sa.Row[Any],
        channel: str,
        decision: delivery.ChannelDecision,
        variables: dict[str, Any] | RenderError,
        recorder: _Recorder,
    ) -> OutboundMessage | None:
        """The finished message for one recipient and channel; a render failure is recorded."""
        assert decision.address is not None
        try:
            if isinstance(variables, RenderError):
                raise variables
            rendered = render_for_recipient(spec.content, dict(person._mapping), variables, [channel])
            content = delivery.rendered_content(rendered, channel)
        except (RenderError, ValueError) as err:
            await recorder.add(person, channel, "failed", error=f"render failed: {err}", error_class=RENDER_FAILED)
            return None
        tracked = CampaignSend(run_id, person.id, channel)
        finished = delivery.compose(self._settings, content, channel=channel, user_id=person.user_id,
                                    category=spec.category, delivery=tracked)  # fmt: skip
        key = f"campaign:{run_id}:{person.id}:{channel}"
        return OutboundMessage(channel, decision.address, finished.title, finished.body, key, finished.data)

    async def _send_all(
        self, jobs: list[tuple[sa.Row[Any], str, OutboundMessage]], recorder: _Recorder, rate: float | None
    ) -> TransientSendError | None:
        """Send with bounded concurrency (and rate); stop taking new jobs on a transient error."""
        # One message per 1/rate seconds also covers rates below one a second.
        limiter = AsyncLimiter(1, 1 / rate) if rate else None
        queue = list(reversed(jobs))
        interrupted: list[TransientSendError] = []

        async def sender() -> None:
            while queue and not interrupted:
                person, channel, message = queue.pop()
                if limiter is not None:
                    await limiter.acquire()
                try:
                    receipt = await self._router.send(message)
                except InvalidAddressError as err:
                    await recorder.add(person, channel, "failed", error=str(err), error_class=REJECTED)
                    await retire_address(
                        self._engine, channel, person.user_id, err.address or message.address, str(err)
                    )
                    continue
                except PermanentSendError as err:
                    await recorder.add(person, channel, "failed", error=str(err), error_class=REJECTED)
                    continue
                except TransientSendError as err:
                    interrupted.append(err)
                    return
                await recorder.add(person, channel, "sent", message_id=receipt.message_id, provider=receipt.provider)

        await asyncio.gather(*(sender() for _ in range(min(self._send_concurrency, len(jobs)) or 1)))
        return interrupted[0] if interrupted else None

    async def finish_run(self, request: FinishRunInput) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                store.campaign_runs.update()
                .where(store.campaign_runs.c.id == request.run_id)
                .values(status=request.status, finished_at=sa.func.now())
            )
            if not request.recurring:
                await store.set_campaign_status(conn, request.campaign_id, request.status)
        self._specs.pop(request.campaign_id, None)
        logger.info("campaign run finished", status=request.status)


async def _heartbeat_every(seconds: float, recorder: _Recorder, heartbeat: Callable[[dict[str, int]], None]) -> None:
    """Heartbeat (Temporal's liveness check and a cancellation point) and record stragglers."""
    while True:
        heartbeat(dict(recorder.totals))
        await asyncio.sleep(seconds)
        await recorder.flush()
