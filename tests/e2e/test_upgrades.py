"""Rolling upgrades: a worker stops gracefully (no new tasks, running activities finish or are
handed back to another worker), and workflow changes are versioned with workflow.patched so
the recorded histories of runs in flight still replay while new runs take the new path.

The activities are the workflow tests' fakes under the real names, on the session's Temporal
dev server, each test on task queues of its own."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from core.config import Settings
from core.contracts import ChannelPlan, DeliveryPlan, NotificationInput
from tests.workflows.harness import eventually, workers
from tests.workflows.test_notification_workflow import FakeNotification, notification, start, statuses
from worker import MarqueeWorker, WorkerServices
from workflows.notification import NotificationWorkflow

HISTORIES = Path(__file__).parent / "histories"
PATCH = "pause-before-each-channel"


@workflow.defn(name="NotificationWorkflow")
class PatchedNotificationWorkflow(NotificationWorkflow):
    """What a versioned change looks like: each channel now waits a moment before sending,
    but only in runs started after the change (`patched` is False while replaying older ones).
    Run unsandboxed: the sandbox would re-import this test module and everything it imports."""

    @workflow.run
    async def run(self, request: NotificationInput) -> Any:
        return await super().run(request)

    async def _deliver(self, request: NotificationInput, plan: ChannelPlan) -> None:
        if workflow.patched(PATCH):
            await workflow.sleep(timedelta(milliseconds=10))
        await super()._deliver(request, plan)


def _email_plan() -> DeliveryPlan:
    return DeliveryPlan(locale="en", channels=[ChannelPlan(channel="email", address="a@example.com")])


@pytest.mark.parametrize("path", sorted(HISTORIES.glob("notification_*.json")), ids=lambda path: path.stem)
async def test_patched_workflow_replays_the_recorded_histories(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, await asyncio.to_thread(path.read_text))
    replayer = Replayer(
        workflows=[PatchedNotificationWorkflow],
        data_converter=pydantic_data_converter,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    assert (await replayer.replay_workflow(history)).replay_failure is None


async def test_a_new_run_takes_the_patched_path(temporal_client: Client) -> None:
    queue, fake = f"upgrade-{uuid.uuid4().hex[:8]}", FakeNotification(_email_plan())
    async with workers(temporal_client, queue, [PatchedNotificationWorkflow], fake.activities(), sandboxed=False):
        handle = await start(temporal_client, queue, notification())
        assert statuses(await handle.result()) == {"email": "sent"}
    events = [event async for event in handle.fetch_history_events()]
    patches = [json.loads(event.marker_recorded_event_attributes.details["patch-data"].payloads[0].data)["id"]
               for event in events if event.marker_recorded_event_attributes.marker_name == "core_patch"]  # fmt: skip
    assert patches.count(PATCH) == 1
    assert any(event.event_type == EventType.EVENT_TYPE_TIMER_STARTED for event in events)


class FakeServices:
    """What MarqueeWorker needs from WorkerServices, with the fake activities and no providers."""

    def __init__(self, fake: FakeNotification, services: WorkerServices) -> None:
        self._fake = fake
        self.engine, self.history = services.engine, services.history
        self.directory = self

    def activities(self) -> list[Any]:
        return self._fake.activities()

    async def refresh(self) -> tuple[list[Any], list[Any]]:
        return [], []


async def _sending_worker(
    temporal_client: Client, settings: Settings, services: WorkerServices, grace: float
) -> tuple[MarqueeWorker, FakeNotification, str]:
    queue = f"shutdown-{uuid.uuid4().hex[:8]}"
    fake = FakeNotification(_email_plan(), hold=asyncio.Event())
    ours = settings.model_copy(update={"temporal_task_queue": queue, "worker_shutdown_seconds": grace})
    return MarqueeWorker(temporal_client, ours, cast(WorkerServices, FakeServices(fake, services))), fake, queue


async def test_shutdown_stops_polling_and_lets_a_running_send_finish(
    temporal_client: Client, settings: Settings, services: WorkerServices
) -> None:
    worker, fake, queue = await _sending_worker(temporal_client, settings, services, grace=10)
    async with worker:
        first = await start(temporal_client, queue, notification())
        await eventually(lambda: fake.sends)
        stopping = asyncio.create_task(worker.shutdown())
        await asyncio.sleep(0.5)
        second = await start(temporal_client, queue, notification())  # arrives after polling stopped
        await asyncio.sleep(1)
        assert not stopping.done(), "shutdown waits for the running send"
        assert len(fake.prepared) == 1, "no new task was taken after shutdown began"
        assert fake.hold is not None
        fake.hold.set()
        await asyncio.wait_for(stopping, 5)
    # The send (a local activity, as the channel's default provider has no shared rate
    # limit) finished and its result was recorded, after prepare's, rather than cancelled.
    events = [event async for event in first.fetch_history_events()]
    local = [event for event in events if event.marker_recorded_event_attributes.marker_name == "core_local_activity"]
    assert len(local) == 2
    assert not any(event.marker_recorded_event_attributes.HasField("failure") for event in local)
    async with workers(temporal_client, queue, [NotificationWorkflow], fake.activities()):  # the next release
        assert statuses(await first.result()) == {"email": "sent"}
        assert statuses(await second.result()) == {"email": "sent"}
    assert len(fake.sends) == 2  # one each: nothing was sent twice


async def test_a_local_send_running_past_the_grace_period_finishes_before_the_worker_stops(
    temporal_client: Client, settings: Settings, services: WorkerServices
) -> None:
    """A send as a local activity is part of its workflow task: cancelling it at the grace
    period would hand back a task whose message may already be out. The worker waits for it
    (its start-to-close timeout bounds the wait), and nothing is sent twice."""
    worker, fake, queue = await _sending_worker(temporal_client, settings, services, grace=0.5)
    async with worker:
        handle = await start(temporal_client, queue, notification())
        await eventually(lambda: fake.sends)
        stopping = asyncio.create_task(worker.shutdown())
        await asyncio.sleep(1.5)
        assert not stopping.done(), "the running send outlives the grace period"
        assert fake.hold is not None
        fake.hold.set()
        await asyncio.wait_for(stopping, 5)
    async with workers(temporal_client, queue, [NotificationWorkflow], fake.activities()):
        assert statuses(await handle.result()) == {"email": "sent"}
    assert len(fake.sends) == 1
