"""CampaignWorkflow: a bulk send to a segment, in keyset batches with a bounded window.

The history holds one activity per batch (hundreds to thousands of recipients), never
one event per recipient, and the run continues as new well before Temporal's history
limits, carrying only its cursor. Pause and resume are signals; cancellation (API, admin
or `temporal workflow cancel`) stops new batches and cancels the ones in flight, which
record what they sent before they end.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutType
from temporalio.exceptions import TimeoutError as ActivityTimeout
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.campaigns import CampaignActivities
    from core.contracts import (
        CAMPAIGN_NOT_FOUND,
        CAMPAIGN_PAUSE,
        CAMPAIGN_PROGRESS,
        CAMPAIGN_RESUME,
        CAMPAIGN_WORKFLOW,
        BatchInput,
        BatchResult,
        CampaignInput,
        CampaignProgress,
        ChannelLane,
        FinishRunInput,
        RangeInput,
        RunPlan,
        StartRunInput,
        WindowInput,
        WindowState,
    )

BOOKKEEPING = timedelta(seconds=60)
BATCH_TIMEOUT = timedelta(minutes=30)
# Batches heartbeat every second while they run (the SDK forwards them to the server at
# most every 0.8 x this timeout), so a dead worker's batch moves to another worker after this long.
BATCH_HEARTBEAT = timedelta(seconds=10)
BATCH_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
    non_retryable_error_types=[CAMPAIGN_NOT_FOUND],
)
# A batch waits this long on a provider's bulk queue (its rate limit) before the main
# queue takes it instead.
BATCH_QUEUE_TIMEOUT = timedelta(minutes=10)
# Continue as new after this many batches even if the server has not suggested it yet.
BATCHES_PER_RUN = 500


@workflow.defn(name=CAMPAIGN_WORKFLOW)
class CampaignWorkflow:
    def __init__(self) -> None:
        self._state = "waiting"
        self._paused = False
        self._cursor = 0
        self._zone: str | None = None
        self._in_flight = 0
        self._batches_done = 0
        self._totals = BatchResult()
        self._window: WindowState | None = None
        self._deferred_until: datetime | None = None  # recipients in their quiet hours: when to go again

    @workflow.run
    async def run(self, request: CampaignInput) -> BatchResult:
        run_id = request.run_id or workflow.info().workflow_id
        self._paused = request.paused
        self._cursor = request.cursor
        self._deferred_until = request.deferred_until
        try:
            if request.not_before is not None and request.not_before > workflow.now():
                await workflow.sleep(request.not_before - workflow.now())
            plan = await workflow.execute_local_activity_method(
                CampaignActivities.start_run,
                StartRunInput(campaign_id=request.campaign_id, run_id=run_id, now=workflow.now()),
                start_to_close_timeout=BOOKKEEPING,
            )
            zones: list[str | None] = [zone.time_zone for zone in plan.zones] or [None]
            for index in range(request.zone_index, len(zones) if not request.deferred_pass else 0):
                self._zone = zones[index]
                if plan.zones and not (index == request.zone_index and request.zone_started):
                    await self._sleep_until(plan.zones[index].fire_at)
                finished = await self._send_zone(request, plan, run_id)
                if not finished:  # handed over to a continued run
                    workflow.continue_as_new(self._continued(request, run_id, zone_index=index, zone_started=True))
                self._cursor = 0
            resuming = request.deferred_pass
            while resuming or self._deferred_until is not None:
                if not resuming:
                    # Some recipients were in their quiet hours: once the first of them ends,
                    # go over the segment again; batches skip everyone already recorded.
                    until, self._deferred_until = self._deferred_until, None
                    assert until is not None
                    await self._sleep_until(until)
                    self._cursor = 0
                resuming = False
                self._zone = None
                if not await self._send_zone(request, plan, run_id, again=True):
                    workflow.continue_as_new(self._continued(request, run_id, deferred_pass=True))
            self._state = "finishing"
            await self._finish(request, run_id, "completed")
        except asyncio.CancelledError:
            # Cancelled from the API, the admin or `temporal workflow cancel`.
            self._state = "finishing"
            await self._finish(request, run_id, "cancelled")
            raise
        except (ActivityError, ApplicationError):
            # A batch failed for good (or the campaign vanished): say so, then fail the run.
            self._state = "finishing"
            await self._finish(request, run_id, "failed")
            raise
        return self._totals

    def _continued(self, request: CampaignInput, run_id: str, **position: object) -> CampaignInput:
        """The input of the run that continues this one as new, from where it stands."""
        carried = {"run_id": run_id, "cursor": self._cursor, "paused": self._paused, "not_before": None,
                   "deferred_until": self._deferred_until}  # fmt: skip
        return request.model_copy(update={**carried, **position})

    async def _send_zone(self, request: CampaignInput, plan: RunPlan, run_id: str, again: bool = False) -> bool:
        """Send every batch of the current zone; False when it is time to continue as new."""
        # The throttle is shared by the batches in flight; never fewer than one message a
        # second each, so a throttle below the window means fewer batches at once.
        lanes = plan.channel_lanes or [ChannelLane(queue=plan.batch_queue, provider_rate=plan.provider_rate)]
        window = min(request.window, plan.throttle_per_second) if plan.throttle_per_second else request.window
        window = max(window, len(lanes))  # a range starts one batch per lane
        rate = plan.throttle_per_second / window if plan.throttle_per_second else None
        pending: list[asyncio.Task[BatchResult]] = []  # a list: iteration order must be deterministic
        exhausted = False
        started_here = 0
        try:
            while True:
                self._state = "paused" if self._paused else "running"
                while not exhausted and not self._paused and len(pending) + len(lanes) <= window:
                    if started_here >= BATCHES_PER_RUN or workflow.info().is_continue_as_new_suggested():
                        break
                    if plan.has_window and not await self._window_open(request):
                        break
                    upto = await workflow.execute_local_activity_method(
                        CampaignActivities.next_range,
                        RangeInput(campaign_id=request.campaign_id, after_id=self._cursor, limit=request.batch_size,
                                   time_zone=self._zone),
                        start_to_close_timeout=BOOKKEEPING,
                    )  # fmt: skip
                    if upto is None:
                        exhausted = True
                        break
                    for lane in lanes:
                        lane_rate = rate
                        if lane.provider_rate is not None:
                            lane_rate = min(rate or lane.provider_rate, lane.provider_rate)
                        batch = BatchInput(campaign_id=request.campaign_id, run_id=run_id, after_id=self._cursor,
                                           upto_id=upto, time_zone=self._zone, rate_per_second=lane_rate,
                                           now=workflow.now(), count_duplicates=not again,
                                           channel=lane.channel)  # fmt: skip
                        pending.append(asyncio.ensure_future(self._send_batch(batch, lane.queue)))
                    self._cursor = upto
                    started_here += len(lanes)  # batches, which is what the history holds
                self._in_flight = len(pending)
                if not pending:
                    if exhausted:
                        return True
                    if started_here >= BATCHES_PER_RUN or workflow.info().is_continue_as_new_suggested():
                        return False
                    # Paused, or outside the send window: wait for a change.
                    await self._wait_for_work(plan)
                    continue
                done, pending = await workflow.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self._add(task.result())
        finally:
            for task in pending:
                task.cancel()
            if pending:
                # Let cancelled batches record what they sent before the run goes on.
                for result in await asyncio.gather(*pending, return_exceptions=True):
                    if isinstance(result, BatchResult):
                        self._add(result)
            self._in_flight = 0

    async def _send_batch(self, batch: BatchInput, queue: str | None = None) -> BatchResult:
        if queue is not None:
            try:
                return await self._batch_activity(batch, queue)
            except ActivityError as err:
                if not isinstance(err.cause, ActivityTimeout) or err.cause.type != TimeoutType.SCHEDULE_TO_START:
                    raise
                # No worker took it from the provider's queue (the provider was disabled):
                # send it from the main queue, through whichever provider is there.
        return await self._batch_activity(batch, None)

    async def _batch_activity(self, batch: BatchInput, queue: str | None) -> BatchResult:
        return await workflow.execute_activity_method(
            CampaignActivities.send_batch,
            batch,
            task_queue=queue,
            schedule_to_start_timeout=BATCH_QUEUE_TIMEOUT if queue is not None else None,
            start_to_close_timeout=BATCH_TIMEOUT,
            heartbeat_timeout=BATCH_HEARTBEAT,
            retry_policy=BATCH_RETRY,
            # On cancel, wait until the batch has recorded what it sent: counts stay exact.
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )

    def _add(self, result: BatchResult) -> None:
        self._batches_done += 1
        if result.deferred_until is not None:
            self._deferred_until = min(result.deferred_until, self._deferred_until or result.deferred_until)
        self._totals = BatchResult(
            sent=self._totals.sent + result.sent,
            failed=self._totals.failed + result.failed,
            suppressed=self._totals.suppressed + result.suppressed,
            unreachable=self._totals.unreachable + result.unreachable,
            skipped_duplicate=self._totals.skipped_duplicate + result.skipped_duplicate,
        )

    async def _window_open(self, request: CampaignInput) -> bool:
        if self._window is None or workflow.now() >= self._window.until:
            self._window = await workflow.execute_local_activity_method(
                CampaignActivities.send_window,
                WindowInput(campaign_id=request.campaign_id, now=workflow.now()),
                start_to_close_timeout=BOOKKEEPING,
            )
        return self._window.open

    async def _wait_for_work(self, plan: RunPlan) -> None:
        if self._paused:
            await workflow.wait_condition(lambda: not self._paused)
        elif plan.has_window and self._window is not None and not self._window.open:
            self._state = "waiting"
            await self._sleep_until(self._window.until)

    async def _sleep_until(self, moment: datetime) -> None:
        delay = moment - workflow.now()
        if delay > timedelta(0):
            self._state = "waiting"
            await workflow.sleep(delay)

    async def _finish(self, request: CampaignInput, run_id: str, status: str) -> None:
        await workflow.execute_local_activity_method(
            CampaignActivities.finish_run,
            FinishRunInput(campaign_id=request.campaign_id, run_id=run_id, status=status, recurring=request.recurring),
            start_to_close_timeout=BOOKKEEPING,
        )

    @workflow.signal(name=CAMPAIGN_PAUSE)
    def pause(self) -> None:
        self._paused = True

    @workflow.signal(name=CAMPAIGN_RESUME)
    def resume(self) -> None:
        self._paused = False

    @workflow.query(name=CAMPAIGN_PROGRESS)
    def progress(self) -> CampaignProgress:
        return CampaignProgress(
            run_id=workflow.info().workflow_id,
            state=self._state,
            cursor=self._cursor,
            zone=self._zone,
            batches_in_flight=self._in_flight,
            batches_done=self._batches_done,
            totals=self._totals,
        )
