"""Activities of CampaignWorkflow: keyset pages of the segment, batch sends, run bookkeeping.

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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from aiolimiter import AsyncLimiter
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.notifications import contact_for, retire_address
from channels.base import InvalidAddressError, OutboundMessage, PermanentSendError, TransientSendError
from core.clock import next_local_time, window_state
from core.config import Settings
from core.contracts import (
    CAMPAIGN_NOT_FOUND,
    TRANSIENT_ERROR,
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
from core.queries import recipients
from core.templating import RenderError, TemplateContent, coerce_variables, recipient_context, render
from core.tracking import CampaignSend
from services import campaign_store as store
from services import preferences as prefs
from services.delivery_events import apply_early_events_for
from services.history import HistoryRow, HistoryWriter
from services.outbound import finish_email
from services.providers import bulk_queue_for
from services.routing import ChannelRouter, ProviderDirectory
from services.templates import PinnedVersions

HEARTBEAT_SECONDS = 1.0  # liveness for Temporal, independent of how fast sends go
FLUSH_EVERY = 50  # write a chunk once this many outcomes wait
MAX_UNRECORDED = 200  # senders wait beyond this: bounds what a crash can leave unrecorded


@dataclass(frozen=True)
class _Choices:
    """A batch's recipients' preferences and suppressed addresses, loaded in two queries."""

    preferences: dict[int, list[prefs.Preference]]
    suppressed: dict[tuple[str, str], str]
    transactional: bool


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

    def __init__(self, engine: AsyncEngine, history: HistoryWriter, spec: CampaignSpec, run_id: str) -> None:
        self._engine = engine
        self._history = history
        self._spec = spec
        self._run_id = run_id
        self._rows: list[dict[str, Any]] = []
        self._lock = asyncio.Lock()
        self._flushing: asyncio.Task[None] | None = None
        self._history_writes: list[asyncio.Task[None]] = []
        self.totals: Counter[str] = Counter()

    async def add(self, recipient: sa.Row[Any], channel: str, status: str, *, message_id: str | None = None,
                  error: str | None = None) -> None:  # fmt: skip
        self._rows.append(
            {
                "run_id": self._run_id,
                "recipient_id": recipient.id,
                "user_id": recipient.user_id,
                "channel": channel,
                "status": status,
                "provider_message_id": message_id,
                "error": error,
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
                counts = await self._insert(rows)
            except BaseException:
                # Not recorded: back to the buffer, so the next write (or close()) retries them
                # and a failure that persists fails the batch instead of losing its records.
                self._rows[:0] = rows
                raise
            self.totals.update(counts)
            self._history_writes.append(asyncio.create_task(self._history.record(self._history_rows(rows))))

    async def _insert(self, rows: list[dict[str, Any]]) -> Counter[str]:
        """Delivery rows and the run's counters, in one transaction."""
        table = store.campaign_deliveries
        async with self._engine.begin() as conn:
            # executemany of one cached statement: no per-chunk SQL compilation.
            inserted = await conn.execute(
                insert(table).on_conflict_do_nothing(constraint="uq_campaign_delivery").returning(table.c.status),
                [{key: value for key, value in row.items() if key != "user_id"} for row in rows],
            )
            counts = Counter(row.status for row in inserted)
            if counts:
                run = store.campaign_runs
                await conn.execute(
                    run.update()
                    .where(run.c.id == self._run_id)
                    .values({name: run.c[name] + counts[name] for name in ("sent", "failed", "suppressed")})
                )
            # A fast provider may have reported on some of these before this commit.
            await apply_early_events_for(
                conn, [row["provider_message_id"] for row in rows if row["provider_message_id"]]
            )
        return counts

    def _history_rows(self, rows: list[dict[str, Any]]) -> list[HistoryRow]:
        return [
            HistoryRow(
                notification_id=str(uuid.uuid5(self._spec.campaign_id, _delivery_key(row))),
                channel=row["channel"],
                status=row["status"],
                user_id=row["user_id"],
                category=self._spec.category,
                error=(row["error"] or "")[:1000],
                campaign_id=str(self._spec.campaign_id),
            )
            for row in rows
        ]

    async def close(self) -> None:
        """Record everything still buffered, and wait until its history is stored too."""
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self.flush()
        await asyncio.gather(*self._history_writes)


class CampaignActivities:
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
                raise ApplicationError(f"no campaign {campaign_id}", type=CAMPAIGN_NOT_FOUND, non_retryable=True)
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

    @activity.defn(name="start_campaign_run")
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

    @activity.defn(name="next_campaign_range")
    async def next_range(self, request: RangeInput) -> int | None:
        spec = await self._spec(request.campaign_id)
        async with self._engine.connect() as conn:
            return await store.next_range_end(conn, spec.segment, request.after_id, request.limit, request.time_zone)

    @activity.defn(name="campaign_send_window")
    async def send_window(self, request: WindowInput) -> WindowState:
        spec = await self._spec(request.campaign_id)
        window = spec.schedule["window"]
        return window_state(request.now, window["start"], window["end"], window.get("timezone", "UTC"))

    @activity.defn(name="send_campaign_batch")
    async def send_batch(self, batch: BatchInput) -> BatchResult:
        spec = await self._spec(batch.campaign_id)
        channels = [batch.channel] if batch.channel else spec.channels
        async with self._engine.connect() as conn:
            query = sa.select(recipients).where(
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
            wanted = await prefs.load(conn, [person.id for person in audience])
            blocked = await prefs.suppressed(
                conn,
                [
                    (channel, address)
                    for person in audience
                    for channel in channels
                    if (address := contact_for(channel, person.email, person.phone, person.push_tokens))
                ],
            )
        choices = _Choices(wanted, blocked, spec.category in self._settings.transactional_categories)
        now = batch.now or datetime.now(UTC)
        deferred = 0
        deferred_until: datetime | None = None
        recorder = _Recorder(self._engine, self._history, spec, batch.run_id)
        variables, _ = coerce_variables(spec.content.variables, spec.variables)
        jobs: list[tuple[sa.Row[Any], str, OutboundMessage]] = []
        skipped = 0
        ticker = asyncio.create_task(_heartbeat_every(HEARTBEAT_SECONDS, recorder))
        try:
            for person in audience:
                quiet = (
                    None
                    if choices.transactional
                    else prefs.quiet_until(now, person.timezone, person.quiet_hours_start, person.quiet_hours_end)
                )
                if quiet is not None:
                    # Not recorded: the workflow's next pass over the segment, once their quiet
                    # hours are over, sends them (and skips everyone recorded by then).
                    waiting = sum((person.id, channel) not in done for channel in channels)
                    if waiting:
                        deferred += waiting
                        deferred_until = min(quiet, deferred_until or quiet)
                    continue
                for channel in channels:
                    if (person.id, channel) in done:
                        skipped += batch.count_duplicates
                        continue
                    job = await self._prepare(spec, batch.run_id, person, channel, variables, recorder, choices)
                    if job is not None:
                        jobs.append((person, channel, job))
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
        if transient is not None:
            # The sent part is recorded; the retry of this batch sends only the rest.
            raise ApplicationError(
                f"batch interrupted: {transient}", type=TRANSIENT_ERROR, next_retry_delay=_delay(transient)
            )
        totals = recorder.totals
        return BatchResult(sent=totals["sent"], failed=totals["failed"], suppressed=totals["suppressed"],
                           skipped_duplicate=skipped, deferred=deferred, deferred_until=deferred_until)  # fmt: skip

    async def _prepare(
        self,
        spec: CampaignSpec,
        run_id: str,
        person: sa.Row[Any],
        channel: str,
        variables: dict[str, Any],
        recorder: _Recorder,
        choices: _Choices,
    ) -> OutboundMessage | None:
        wants = prefs.wants(
            choices.preferences.get(person.id, []),
            category=spec.category,
            channel=channel,
            transactional=choices.transactional,
            opted_out_channels=person.opted_out_channels,
        )
        if not wants:
            await recorder.add(person, channel, "suppressed", error="opted out")
            return None
        address = contact_for(channel, person.email, person.phone, person.push_tokens)
        if address is None:
            await recorder.add(person, channel, "suppressed", error=f"no {channel} contact")
            return None
        if (channel, address) in choices.suppressed:
            await recorder.add(
                person, channel, "suppressed", error=f"address suppressed: {choices.suppressed[channel, address]}"
            )
            return None
        try:
            rendered = render(spec.content, locale_wanted=person.locale, variables=variables,
                              recipient=recipient_context(dict(person._mapping)), channels=[channel])  # fmt: skip
        except RenderError as err:
            await recorder.add(person, channel, "failed", error=f"render failed: {err}")
            return None
        key = f"campaign:{run_id}:{person.id}:{channel}"
        if channel == "email" and rendered.email:
            email = finish_email(
                self._settings,
                text=rendered.email.text,
                html=rendered.email.html,
                user_id=person.user_id,
                category=spec.category,
                delivery=CampaignSend(run_id, person.id, channel),
            )
            data = {"html": email.html, "headers": email.headers}
            return OutboundMessage(channel, address, rendered.email.subject, email.text, key, data)
        if channel == "push" and rendered.push:
            return OutboundMessage(channel, address, rendered.push.title, rendered.push.body, key, rendered.push.data)
        assert rendered.sms is not None
        return OutboundMessage(channel, address, "", rendered.sms.text, key, {})

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
                    await recorder.add(person, channel, "failed", error=str(err))
                    await retire_address(
                        self._engine, channel, person.user_id, err.address or message.address, str(err)
                    )
                    continue
                except PermanentSendError as err:
                    await recorder.add(person, channel, "failed", error=str(err))
                    continue
                except TransientSendError as err:
                    interrupted.append(err)
                    return
                await recorder.add(person, channel, "sent", message_id=receipt.message_id)

        await asyncio.gather(*(sender() for _ in range(min(self._send_concurrency, len(jobs)) or 1)))
        return interrupted[0] if interrupted else None

    @activity.defn(name="finish_campaign_run")
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


async def _heartbeat_every(seconds: float, recorder: _Recorder) -> None:
    """Heartbeat (Temporal's liveness check and a cancellation point) and record stragglers."""
    while True:
        activity.heartbeat(dict(recorder.totals))
        await asyncio.sleep(seconds)
        await recorder.flush()


def _delivery_key(row: dict[str, Any]) -> str:
    return f"{row['run_id']}:{row['recipient_id']}:{row['channel']}"


def _delay(error: TransientSendError) -> timedelta | None:
    return timedelta(seconds=error.retry_after) if error.retry_after else None
