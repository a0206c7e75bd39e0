"""EventWorkflow and DigestWorkflow on the time-skipping server, with fake activities under the
real names: a delayed send fires at the recipient's local time, a cancelling event stops it,
and a digest sends once per window whatever joins while it sends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from core.contracts import (
    DIGEST_ADD,
    ActionEnd,
    ActionInput,
    ActionOutcome,
    CancelTarget,
    DigestBatch,
    DigestInput,
    DigestSent,
    EventInput,
    EventPlan,
    RuleAction,
    event_workflow_id,
)
from core.events import Delay, fire_at
from tests.workflows.harness import eventually, workers
from workflows.events import DigestWorkflow, EventWorkflow


@dataclass
class FakeEvents:
    plans: dict[str, EventPlan]
    dispatched: list[tuple[ActionInput, datetime]] = field(default_factory=list)
    settled: list[ActionEnd] = field(default_factory=list)
    batches: list[tuple[DigestBatch, datetime]] = field(default_factory=list)
    hold_send: asyncio.Event | None = None

    @activity.defn(name="plan_event")
    async def plan(self, request: EventInput) -> EventPlan:
        return self.plans[request.event_id]

    @activity.defn(name="dispatch_event_action")
    async def dispatch(self, request: ActionInput) -> ActionOutcome:
        self.dispatched.append((request, activity.info().scheduled_time))
        return ActionOutcome(status="sent")

    @activity.defn(name="settle_event_action")
    async def settle(self, end: ActionEnd) -> None:
        self.settled.append(end)

    @activity.defn(name="send_digest")
    async def send_digest(self, request: DigestBatch) -> DigestSent:
        self.batches.append((request, activity.info().scheduled_time))
        if self.hold_send is not None and len(self.batches) == 1:
            await self.hold_send.wait()
        return DigestSent(listed=1)

    def activities(self) -> list[Callable[..., Any]]:
        return [self.plan, self.dispatch, self.settle, self.send_digest]


async def test_a_delayed_send_fires_at_ten_in_the_recipients_time_zone(
    time_skipping: WorkflowEnvironment, client: Client, task_queue: str
) -> None:
    now = await time_skipping.get_current_time()
    # "3 days before expiry, at 10:00 local": expiry in 5 days, the recipient in Tokyo.
    expires = now + timedelta(days=5)
    due = fire_at(
        Delay(offset_seconds=-3 * 86400, from_field="expires_at", at_local_time="10:00"),
        now,
        {"expires_at": expires.isoformat()},
        "Asia/Tokyo",
    )
    assert due is not None
    assert due.astimezone(UTC).hour == 1
    assert due.minute == 0
    assert timedelta(days=2) <= due - now < timedelta(days=3)
    fake = FakeEvents({"e1": EventPlan(actions=[RuleAction(rule_id=7, fire_at=due)])})
    async with workers(client, task_queue, [EventWorkflow], fake.activities()):
        await client.execute_workflow(
            EventWorkflow.run, EventInput(event_id="e1"), id=event_workflow_id("e1"), task_queue=task_queue
        )
    [(action, at)] = fake.dispatched
    assert action == ActionInput(event_id="e1", rule_id=7)
    assert due <= at < due + timedelta(seconds=5)
    assert fake.settled == []


async def test_a_cancelling_event_stops_a_waiting_send(
    time_skipping: WorkflowEnvironment, client: Client, task_queue: str
) -> None:
    now = await time_skipping.get_current_time()
    fake = FakeEvents(
        {
            "failed": EventPlan(
                actions=[
                    RuleAction(rule_id=3, fire_at=now + timedelta(days=1)),
                    RuleAction(rule_id=4, fire_at=now + timedelta(hours=2)),
                ]
            ),
            "paid": EventPlan(cancels=[CancelTarget(event_id="failed", rule_id=3)]),
        }
    )
    async with workers(client, task_queue, [EventWorkflow], fake.activities()):
        waiting = await client.start_workflow(
            EventWorkflow.run, EventInput(event_id="failed"), id=event_workflow_id("failed"), task_queue=task_queue
        )
        await client.execute_workflow(
            EventWorkflow.run, EventInput(event_id="paid"), id=event_workflow_id("paid"), task_queue=task_queue
        )
        await waiting.result()
    assert fake.settled == [
        ActionEnd(event_id="failed", rule_id=3, status="cancelled", reason="cancelled by event 'paid'")
    ]
    # The other rule's send was not the cancelling rule's: it fired when due.
    assert [action.rule_id for action, _ in fake.dispatched] == [4]


async def test_a_cancel_for_a_closed_event_is_harmless(
    time_skipping: WorkflowEnvironment, client: Client, task_queue: str
) -> None:
    fake = FakeEvents(
        {
            "done": EventPlan(actions=[RuleAction(rule_id=1)]),
            "late": EventPlan(
                cancels=[CancelTarget(event_id="done", rule_id=1), CancelTarget(event_id="never-seen", rule_id=1)]
            ),
        }
    )
    async with workers(client, task_queue, [EventWorkflow], fake.activities()):
        for event_id in ("done", "late"):
            await client.execute_workflow(
                EventWorkflow.run, EventInput(event_id=event_id), id=event_workflow_id(event_id), task_queue=task_queue
            )
    assert [action.event_id for action, _ in fake.dispatched] == ["done"]


async def test_a_digest_sends_when_its_window_closes_and_again_for_what_joined_meanwhile(
    time_skipping: WorkflowEnvironment, client: Client, task_queue: str
) -> None:
    now = await time_skipping.get_current_time()
    fake = FakeEvents({}, hold_send=asyncio.Event())
    closes = now + timedelta(minutes=10)
    async with workers(client, task_queue, [DigestWorkflow], fake.activities()):
        handle = await client.start_workflow(
            DigestWorkflow.run,
            DigestInput(rule_id=5, user_id="u1", closes_at=closes),
            id="digest-5-u1",
            task_queue=task_queue,
            start_signal=DIGEST_ADD,
            start_signal_args=["e1"],
        )
        await handle.signal(DIGEST_ADD, "e2")
        result = asyncio.create_task(handle.result())  # time skips to the window's end
        await eventually(lambda: len(fake.batches) == 1)
        await handle.signal(DIGEST_ADD, "e3")  # joins while the first send runs
        fake.hold_send.set()  # type: ignore[union-attr]
        assert await result == 2
    first, second = fake.batches
    assert first[1] >= closes
    assert first[0].batch != second[0].batch
    assert first[0].batch.endswith(":0")
    assert second[0].batch.endswith(":1")
