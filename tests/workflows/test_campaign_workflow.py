"""CampaignWorkflow against fake activities registered under the real activity names:
what it asks for, in which order, on which task queue, and when (on skipped time)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import WorkflowEnvironment

from core.contracts import (
    CAMPAIGN_NOT_FOUND,
    CAMPAIGN_PAUSE,
    CAMPAIGN_PROGRESS,
    CAMPAIGN_RESUME,
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
    ZoneStart,
)
from tests.workflows.harness import eventually, workers
from workflows import campaign as campaign_module
from workflows.campaign import CampaignWorkflow


@dataclass
class Batch:
    """A batch the fake was given, and the task queue it ran on."""

    input: BatchInput
    queue: str


@dataclass
class FakeCampaign:
    """The campaign activities over a pretend segment: `bounds[zone]` are the keyset range
    ends `next_campaign_range` hands out, `limit` ids at a time (ids are 1, 2, 3, ...)."""

    plan: RunPlan
    bounds: dict[str | None, int] = field(default_factory=lambda: {None: 6})
    result: Callable[[BatchInput], BatchResult] = lambda batch: BatchResult(sent=batch.upto_id - batch.after_id)
    starts: list[StartRunInput] = field(default_factory=list)
    ranges: list[RangeInput] = field(default_factory=list)
    ranges_by_run: list[tuple[str, RangeInput]] = field(default_factory=list)  # (Temporal run id, range)
    batches: list[Batch] = field(default_factory=list)
    finished: list[FinishRunInput] = field(default_factory=list)
    # Set: every batch waits on it (heartbeating) before it answers.
    gate: asyncio.Event | None = None
    cancelled_batches: list[BatchInput] = field(default_factory=list)

    @activity.defn(name="start_campaign_run")
    async def start_run(self, request: StartRunInput) -> RunPlan:
        self.starts.append(request)
        return self.plan

    @activity.defn(name="next_campaign_range")
    async def next_range(self, request: RangeInput) -> int | None:
        self.ranges.append(request)
        self.ranges_by_run.append((activity.info().workflow_run_id or "", request))
        last = self.bounds.get(request.time_zone, 0)
        return None if request.after_id >= last else min(request.after_id + request.limit, last)

    @activity.defn(name="campaign_send_window")
    async def send_window(self, request: WindowInput) -> WindowState:
        return WindowState(open=True, until=request.now + timedelta(days=1))

    @activity.defn(name="send_campaign_batch")
    async def send_batch(self, batch: BatchInput) -> BatchResult:
        self.batches.append(Batch(batch, activity.info().task_queue))
        try:
            while self.gate is not None and not self.gate.is_set():
                activity.heartbeat()
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            self.cancelled_batches.append(batch)
            raise
        return self.result(batch)

    @activity.defn(name="finish_campaign_run")
    async def finish_run(self, request: FinishRunInput) -> None:
        self.finished.append(request)

    def activities(self) -> list[Callable[..., object]]:
        return [self.start_run, self.next_range, self.send_window, self.send_batch, self.finish_run]

    def spans(self) -> list[tuple[int, int]]:
        return [(batch.input.after_id, batch.input.upto_id) for batch in self.batches]


def campaign(**values: object) -> CampaignInput:
    return CampaignInput.model_validate({"campaign_id": uuid.uuid4(), "batch_size": 2, "window": 1, **values})


async def run(client: Client, task_queue: str, fake: FakeCampaign, request: CampaignInput) -> BatchResult:
    async with workers(client, task_queue, [CampaignWorkflow], fake.activities()):
        return await client.execute_workflow(
            CampaignWorkflow.run, request, id=f"campaign-{request.campaign_id}", task_queue=task_queue
        )


async def test_a_plain_run_sends_the_segment_range_by_range_and_records_completion(
    client: Client, task_queue: str
) -> None:
    fake = FakeCampaign(RunPlan(throttle_per_second=None))
    request = campaign()
    totals = await run(client, task_queue, fake, request)

    assert totals == BatchResult(sent=6)
    assert [r.after_id for r in fake.ranges] == [0, 2, 4, 6]
    assert fake.spans() == [(0, 2), (2, 4), (4, 6)]
    assert {b.queue for b in fake.batches} == {task_queue}
    assert all(b.input.count_duplicates and b.input.channel is None for b in fake.batches)
    run_id = f"campaign-{request.campaign_id}"
    assert [s.run_id for s in fake.starts] == [run_id]
    assert fake.finished == [FinishRunInput(campaign_id=request.campaign_id, run_id=run_id, status="completed")]


async def test_local_time_zones_start_one_after_another_at_their_own_time(
    client: Client, task_queue: str, time_skipping: WorkflowEnvironment
) -> None:
    now = await time_skipping.get_current_time()
    tokyo, berlin = now + timedelta(hours=1), now + timedelta(hours=8)
    plan = RunPlan(throttle_per_second=None, zones=[ZoneStart(time_zone="Asia/Tokyo", fire_at=tokyo),
                                                    ZoneStart(time_zone="Europe/Berlin", fire_at=berlin)])  # fmt: skip
    fake = FakeCampaign(plan, bounds={"Asia/Tokyo": 4, "Europe/Berlin": 2})
    totals = await run(client, task_queue, fake, campaign())

    assert totals.sent == 6
    # Each zone walks its own keyset from the start, at or after its local send time.
    assert [(r.time_zone, r.after_id) for r in fake.ranges] == [
        ("Asia/Tokyo", 0), ("Asia/Tokyo", 2), ("Asia/Tokyo", 4), ("Europe/Berlin", 0), ("Europe/Berlin", 2),
    ]  # fmt: skip
    by_zone = [(b.input.time_zone, b.input.after_id, b.input.upto_id) for b in fake.batches]
    assert by_zone == [("Asia/Tokyo", 0, 2), ("Asia/Tokyo", 2, 4), ("Europe/Berlin", 0, 2)]
    sent_at = {b.input.time_zone: _now(b.input) for b in fake.batches}
    assert tokyo <= sent_at["Asia/Tokyo"] < berlin <= sent_at["Europe/Berlin"]


async def test_deferred_recipients_get_another_pass_once_their_quiet_hours_end(
    client: Client, task_queue: str, time_skipping: WorkflowEnvironment
) -> None:
    later = await time_skipping.get_current_time() + timedelta(hours=5)
    passes: list[bool] = []

    def result(batch: BatchInput) -> BatchResult:
        passes.append(batch.count_duplicates)
        if batch.count_duplicates and batch.after_id == 2:  # the first pass defers one recipient
            return BatchResult(sent=1, deferred=1, deferred_until=later)
        return BatchResult(sent=2 if batch.count_duplicates else 1)

    fake = FakeCampaign(RunPlan(throttle_per_second=None), bounds={None: 4}, result=result)
    totals = await run(client, task_queue, fake, campaign())

    assert fake.spans() == [(0, 2), (2, 4), (0, 2), (2, 4)]
    assert passes == [True, True, False, False]  # the second pass does not count the others as duplicates
    first, second = fake.batches[:2], fake.batches[2:]
    assert all(_now(b.input) < later for b in first)
    assert all(_now(b.input) >= later and b.input.time_zone is None for b in second)
    assert totals.sent == 2 + 1 + 1 + 1
    assert [f.status for f in fake.finished] == ["completed"]


async def test_channel_lanes_send_each_range_once_per_channel_on_its_lane_queue(
    client: Client, task_queue: str
) -> None:
    email_queue, sms_queue = f"{task_queue}-email-bulk", f"{task_queue}-sms-bulk"
    plan = RunPlan(throttle_per_second=None, channel_lanes=[
        ChannelLane(channel="email", queue=email_queue, provider_rate=50),
        ChannelLane(channel="sms", queue=sms_queue, provider_rate=5),
        ChannelLane(channel="push"),
    ])  # fmt: skip
    fake = FakeCampaign(plan, bounds={None: 4})
    request = campaign(window=3)
    lanes = {email_queue: [fake.send_batch], sms_queue: [fake.send_batch]}
    async with workers(client, task_queue, [CampaignWorkflow], fake.activities(), lanes=lanes):
        await client.execute_workflow(CampaignWorkflow.run, request, id=f"lanes-{uuid.uuid4()}", task_queue=task_queue)

    seen = sorted((b.input.after_id, b.input.channel, b.queue, b.input.rate_per_second) for b in fake.batches)
    assert seen == [
        (0, "email", email_queue, 50), (0, "push", task_queue, None), (0, "sms", sms_queue, 5),
        (2, "email", email_queue, 50), (2, "push", task_queue, None), (2, "sms", sms_queue, 5),
    ]  # fmt: skip
    assert [r.after_id for r in fake.ranges] == [0, 2, 4]  # one range serves every lane


async def test_a_single_channel_batch_queue_carries_every_batch_at_the_provider_rate(
    client: Client, task_queue: str
) -> None:
    bulk = f"{task_queue}-bulk"
    fake = FakeCampaign(RunPlan(throttle_per_second=10, batch_queue=bulk, provider_rate=3), bounds={None: 4})
    request = campaign(window=2)
    async with workers(client, task_queue, [CampaignWorkflow], fake.activities(), lanes={bulk: [fake.send_batch]}):
        await client.execute_workflow(CampaignWorkflow.run, request, id=f"bulk-{uuid.uuid4()}", task_queue=task_queue)

    # The throttle (10/s over a window of 2) is above the provider's rate: the provider's wins.
    assert [(b.queue, b.input.rate_per_second, b.input.channel) for b in fake.batches] == [(bulk, 3, None)] * 2


async def test_pause_holds_new_batches_until_resume_and_progress_tells(client: Client, task_queue: str) -> None:
    fake = FakeCampaign(RunPlan(throttle_per_second=None), gate=asyncio.Event())
    request = campaign()
    async with workers(client, task_queue, [CampaignWorkflow], fake.activities()):
        handle = await client.start_workflow(
            CampaignWorkflow.run, request, id=f"pause-{uuid.uuid4()}", task_queue=task_queue
        )

        await eventually(lambda: fake.batches)
        await handle.signal(CAMPAIGN_PAUSE)
        assert fake.gate is not None
        fake.gate.set()  # the batch in flight finishes; no new one starts while paused
        paused = await progress_until(handle, lambda p: p.state == "paused" and p.batches_done == 1)
        assert (paused.cursor, paused.zone, paused.batches_in_flight, paused.totals.sent) == (2, None, 0, 2)
        await asyncio.sleep(0.3)
        assert fake.spans() == [(0, 2)]

        await handle.signal(CAMPAIGN_RESUME)
        totals = await handle.result()
        done = await handle.query(CAMPAIGN_PROGRESS, result_type=CampaignProgress)

    assert totals.sent == 6
    assert fake.spans() == [(0, 2), (2, 4), (4, 6)]
    assert (done.state, done.batches_done, done.totals.sent) == ("finishing", 3, 6)
    assert [f.status for f in fake.finished] == ["completed"]


async def test_a_run_started_paused_sends_nothing_until_resumed(client: Client, task_queue: str) -> None:
    fake = FakeCampaign(RunPlan(throttle_per_second=None))
    async with workers(client, task_queue, [CampaignWorkflow], fake.activities()):
        handle = await client.start_workflow(
            CampaignWorkflow.run, campaign(paused=True), id=f"paused-{uuid.uuid4()}", task_queue=task_queue
        )
        await progress_until(handle, lambda p: p.state == "paused")
        assert fake.batches == []
        assert fake.ranges == []
        await handle.signal(CAMPAIGN_RESUME)
        assert (await handle.result()).sent == 6


async def test_cancel_reaches_the_batches_in_flight_and_records_cancelled(client: Client, task_queue: str) -> None:
    fake = FakeCampaign(RunPlan(throttle_per_second=None), gate=asyncio.Event())
    request = campaign(window=2)
    async with workers(client, task_queue, [CampaignWorkflow], fake.activities()):
        handle = await client.start_workflow(
            CampaignWorkflow.run, request, id=f"cancel-{uuid.uuid4()}", task_queue=task_queue
        )
        await eventually(lambda: len(fake.batches) == 2)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()

    assert isinstance(failure.value.cause, CancelledError)
    assert sorted(b.after_id for b in fake.cancelled_batches) == [0, 2]
    assert sorted(fake.spans()) == [(0, 2), (2, 4)]  # nothing new started after the cancel
    assert [(f.run_id, f.status) for f in fake.finished] == [(handle.id, "cancelled")]


async def test_a_batch_failing_for_good_fails_the_run_and_records_it(client: Client, task_queue: str) -> None:
    def vanished(batch: BatchInput) -> BatchResult:
        raise ApplicationError("campaign is gone", type=CAMPAIGN_NOT_FOUND)

    fake = FakeCampaign(RunPlan(throttle_per_second=None), result=vanished)
    with pytest.raises(WorkflowFailureError):
        await run(client, task_queue, fake, campaign())

    assert len(fake.batches) == 1  # CampaignNotFound is not retried
    assert [f.status for f in fake.finished] == ["failed"]


async def test_continue_as_new_carries_the_cursor_and_the_run_id(
    client: Client, task_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unsandboxed, the workflow reads this module's constant: a new run every 2 batches.
    monkeypatch.setattr(campaign_module, "BATCHES_PER_RUN", 2)
    fake = FakeCampaign(RunPlan(throttle_per_second=None), bounds={None: 10})
    request = campaign()
    async with workers(client, task_queue, [CampaignWorkflow], fake.activities(), sandboxed=False):
        handle = await client.start_workflow(
            CampaignWorkflow.run, request, id=f"can-{uuid.uuid4()}", task_queue=task_queue
        )
        await handle.result()

    # Three runs, each opening with the same run id and going on from the cursor it was handed.
    assert [s.run_id for s in fake.starts] == [handle.id] * 3
    runs: dict[str, list[int]] = {}
    for execution, asked in fake.ranges_by_run:
        runs.setdefault(execution, []).append(asked.after_id)
    assert list(runs.values()) == [[0, 2], [4, 6], [8, 10]]
    assert fake.spans() == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]  # every range exactly once
    assert {b.input.run_id for b in fake.batches} == {handle.id}
    assert [f.status for f in fake.finished] == ["completed"]


async def progress_until(handle: WorkflowHandle, condition: Callable[[CampaignProgress], bool]) -> CampaignProgress:
    async def check() -> CampaignProgress | None:
        progress = await handle.query(CAMPAIGN_PROGRESS, result_type=CampaignProgress)
        return progress if condition(progress) else None

    return await eventually(check)


def _now(batch: BatchInput) -> datetime:
    assert batch.now is not None
    return batch.now
