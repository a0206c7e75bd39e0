"""NotificationWorkflow against fake activities registered under the real activity names:
quiet hours, failover between a channel's providers, failures that stay, cancellation."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import WorkflowEnvironment

from core.contracts import (
    CIRCUIT_OPEN,
    FAILURES_EXHAUSTED,
    PERMANENT_ERROR,
    PROVIDER_UNAVAILABLE,
    CancelInput,
    ChannelOutcome,
    ChannelPlan,
    DeliveryPlan,
    FailureInput,
    NotificationInput,
    NotificationOutcome,
    ProviderRoute,
    SendInput,
    SendResult,
)
from tests.workflows.harness import eventually, workers
from workflows.notification import NotificationWorkflow


@dataclass
class Sent:
    """A send the fake was asked for: its input and task queue."""

    input: SendInput
    queue: str


@dataclass
class FakeNotification:
    """The notification activities: `prepare` answers `plan`; a send through a provider named
    in `refuse` fails with that error type, any other is accepted."""

    plan: DeliveryPlan
    refuse: dict[str | None, str] = field(default_factory=dict)
    hold: asyncio.Event | None = None  # set: sends wait for it
    prepared: list[NotificationInput] = field(default_factory=list)
    sends: list[Sent] = field(default_factory=list)
    failures: list[FailureInput] = field(default_factory=list)
    cancels: list[CancelInput] = field(default_factory=list)

    @activity.defn(name="prepare_notification")
    async def prepare(self, request: NotificationInput) -> DeliveryPlan:
        self.prepared.append(request)
        return self.plan

    @activity.defn(name="send_notification")
    async def send(self, request: SendInput) -> SendResult:
        self.sends.append(Sent(request, activity.info().task_queue))
        if self.hold is not None:  # no heartbeat, as the real send
            await self.hold.wait()
        if request.provider in self.refuse:
            raise ApplicationError(f"{request.provider} says no", type=self.refuse[request.provider])
        return SendResult(
            provider=request.provider or "sandbox", provider_message_id=f"{request.provider}-{request.channel}"
        )

    @activity.defn(name="record_notification_failure")
    async def record_failure(self, failure: FailureInput) -> None:
        self.failures.append(failure)

    @activity.defn(name="record_notification_cancelled")
    async def record_cancelled(self, cancel: CancelInput) -> None:
        self.cancels.append(cancel)

    def activities(self) -> list[Any]:
        return [self.prepare, self.send, self.record_failure, self.record_cancelled]

    def route_queues(self) -> dict[str, list[Any]]:
        """A worker per provider queue, as the real worker polls each provider's queue."""
        return {route.task_queue: [self.send] for channel in self.plan.channels for route in channel.routes}


def notification(**values: Any) -> NotificationInput:
    return NotificationInput.model_validate({
        "notification_id": uuid.uuid4(), "idempotency_key": f"key-{uuid.uuid4().hex}", "request_hash": "hash",
        "requested_by": "test", "user_id": "user-1", "category": "alerts", "channels": ["email"],
        "title": "Hello", "body": "Body", "send_locally": True, **values,
    })  # fmt: skip


def routes(task_queue: str, *providers: str) -> list[ProviderRoute]:
    return [ProviderRoute(provider=name, task_queue=f"{task_queue}-{name}") for name in providers]


async def start(
    client: Client, task_queue: str, request: NotificationInput
) -> WorkflowHandle[NotificationWorkflow, NotificationOutcome]:
    return await client.start_workflow(
        NotificationWorkflow.run, request, id=f"notification-{request.notification_id}", task_queue=task_queue
    )


async def deliver(
    client: Client, task_queue: str, fake: FakeNotification, request: NotificationInput
) -> NotificationOutcome:
    async with workers(client, task_queue, [NotificationWorkflow], fake.activities(), lanes=fake.route_queues()):
        return await (await start(client, task_queue, request)).result()


def statuses(outcome: NotificationOutcome) -> dict[str, str]:
    return {channel.channel: channel.status for channel in outcome.channels}


async def test_quiet_hours_hold_every_channel_until_defer_until(
    client: Client, task_queue: str, time_skipping: WorkflowEnvironment
) -> None:
    until = await time_skipping.get_current_time() + timedelta(hours=7)
    plan = DeliveryPlan(locale="en", defer_until=until, channels=[
        ChannelPlan(channel="email", address="a@example.com", title="Rendered", body="Rendered body"),
        ChannelPlan(channel="sms", address="+15550001"),
    ])  # fmt: skip
    fake = FakeNotification(plan)
    request = notification(channels=["email", "sms"])
    async with workers(client, task_queue, [NotificationWorkflow], fake.activities()):
        handle = await start(client, task_queue, request)
        pending = await eventually(lambda: _progress_if(handle, "pending"))
        assert {c.channel for c in pending} == {"email", "sms"}
        assert fake.sends == []
        outcome = await handle.result()

    assert fake.prepared == [request]
    assert statuses(outcome) == {"email": "sent", "sms": "sent"}
    # Both sends ran as local activities of the run's own worker, after the timer fired
    # (a local activity's times are the worker's clock, not the skipped server's: the
    # history's order is what proves it).
    assert all(sent.queue == task_queue for sent in fake.sends)
    events = [event async for event in handle.fetch_history_events()]
    fired = [event.event_type for event in events].index(EventType.EVENT_TYPE_TIMER_FIRED)
    local_after = [event for event in events[fired:]
                   if event.marker_recorded_event_attributes.marker_name == "core_local_activity"]  # fmt: skip
    assert len(local_after) == 2
    by_channel = {sent.input.channel: sent.input for sent in fake.sends}
    assert (by_channel["email"].title, by_channel["email"].body) == ("Rendered", "Rendered body")
    assert (by_channel["sms"].title, by_channel["sms"].body, by_channel["sms"].address) == (
        "Hello",
        "Body",
        "+15550001",
    )
    # No stored providers: the worker's default, with the whole failure budget.
    assert {(s.input.provider, s.input.max_failures, s.input.may_skip) for s in fake.sends} == {(None, 8, False)}
    assert fake.failures == []


async def test_provider_trouble_fails_over_to_the_next_route_in_order(client: Client, task_queue: str) -> None:
    plan = DeliveryPlan(locale="en", channels=[ChannelPlan(channel="email", address="a@example.com",
                        routes=routes(task_queue, "open", "unavailable", "exhausted", "good"))])  # fmt: skip
    refuse: dict[str | None, str] = {
        "open": CIRCUIT_OPEN,
        "unavailable": PROVIDER_UNAVAILABLE,
        "exhausted": FAILURES_EXHAUSTED,
    }
    fake = FakeNotification(plan, refuse=refuse)
    outcome = await deliver(client, task_queue, fake, notification())

    assert outcome.channels == [ChannelOutcome(channel="email", status="sent", provider_message_id="good-email")]
    # Each route once (these errors are not retried), on its own queue; only the last has the whole budget.
    assert [(s.input.provider, s.queue, s.input.max_failures, s.input.may_skip) for s in fake.sends] == [
        ("open", f"{task_queue}-open", 3, True),
        ("unavailable", f"{task_queue}-unavailable", 3, True),
        ("exhausted", f"{task_queue}-exhausted", 3, True),
        ("good", f"{task_queue}-good", 8, False),
    ]
    assert fake.failures == []


@pytest.mark.parametrize(
    ("last_error", "reason"),
    [(PROVIDER_UNAVAILABLE, "provider unavailable"), (FAILURES_EXHAUSTED, "retries exhausted"),
     (CIRCUIT_OPEN, "retries exhausted")],
)  # fmt: skip
async def test_when_the_last_route_fails_too_the_channel_fails_for_good(
    client: Client, task_queue: str, last_error: str, reason: str
) -> None:
    plan = DeliveryPlan(locale="en", channels=[ChannelPlan(channel="sms", address="+15550002",
                                                           routes=routes(task_queue, "first", "last"))])  # fmt: skip
    fake = FakeNotification(plan, refuse={"first": CIRCUIT_OPEN, "last": last_error})
    request = notification(channels=["sms"])
    outcome = await deliver(client, task_queue, fake, request)

    assert outcome.channels == [ChannelOutcome(channel="sms", status="failed", error="last says no")]
    assert [s.input.provider for s in fake.sends] == ["first", "last"]
    assert [(f.channel, f.reason, f.error, f.request) for f in fake.failures] == [
        ("sms", reason, "last says no", request)
    ]


async def test_a_permanent_error_records_the_failure_without_failover(client: Client, task_queue: str) -> None:
    plan = DeliveryPlan(locale="en", channels=[ChannelPlan(channel="email", address="gone@example.com",
                                                           routes=routes(task_queue, "strict", "spare"))])  # fmt: skip
    fake = FakeNotification(plan, refuse={"strict": PERMANENT_ERROR})
    request = notification()
    outcome = await deliver(client, task_queue, fake, request)

    assert statuses(outcome) == {"email": "failed"}
    assert [s.input.provider for s in fake.sends] == ["strict"]  # the spare is never tried
    assert [(f.notification_id, f.reason, f.error) for f in fake.failures] == [
        (request.notification_id, "rejected by provider", "strict says no")
    ]


async def test_suppressed_and_opted_out_channels_are_not_sent_nor_failed(client: Client, task_queue: str) -> None:
    plan = DeliveryPlan(locale="en", channels=[
        ChannelPlan(channel="email", address="quiet@example.com", suppress=True),
        ChannelPlan(channel="sms", address="+15550003", skip_reason="opted_out"),
        ChannelPlan(channel="push", address=None, skip_reason="no push token"),
    ])  # fmt: skip
    fake = FakeNotification(plan)
    outcome = await deliver(client, task_queue, fake, notification(channels=["email", "sms", "push"]))

    assert statuses(outcome) == {"email": "suppressed", "sms": "suppressed", "push": "failed"}
    assert fake.sends == []
    assert [(f.channel, f.reason, f.error) for f in fake.failures] == [("push", "undeliverable", "no push token")]


async def test_cancelling_during_quiet_hours_records_cancelled_and_sends_nothing(
    client: Client, task_queue: str, time_skipping: WorkflowEnvironment
) -> None:
    until = await time_skipping.get_current_time() + timedelta(days=1)
    plan = DeliveryPlan(
        locale="en", defer_until=until, channels=[ChannelPlan(channel="email", address="a@example.com")]
    )
    fake = FakeNotification(plan)
    request = notification()
    async with workers(client, task_queue, [NotificationWorkflow], fake.activities()):
        handle = await start(client, task_queue, request)
        await eventually(lambda: _progress_if(handle, "pending"))
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()

    assert isinstance(failure.value.cause, CancelledError)
    assert fake.cancels == [CancelInput(notification_id=request.notification_id, user_id="user-1", category="alerts")]
    assert fake.sends == []
    assert fake.failures == []


@pytest.mark.parametrize("local", [False, True], ids=["provider queue", "local activity"])
async def test_cancelling_during_a_send_records_cancelled_not_a_failure(
    client: Client, task_queue: str, local: bool
) -> None:
    chain = [route.model_copy(update={"local": local}) for route in routes(task_queue, "slow", "spare")]
    plan = DeliveryPlan(locale="en", channels=[ChannelPlan(channel="email", address="a@example.com", routes=chain)])
    fake = FakeNotification(plan, hold=asyncio.Event())
    request = notification()
    async with workers(client, task_queue, [NotificationWorkflow], fake.activities(), lanes=fake.route_queues()):
        handle = await start(client, task_queue, request)
        await eventually(lambda: fake.sends)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        assert fake.hold is not None
        fake.hold.set()

    assert isinstance(failure.value.cause, CancelledError)
    assert [s.input.provider for s in fake.sends] == ["slow"]  # a cancel is not provider trouble: no failover
    assert [c.notification_id for c in fake.cancels] == [request.notification_id]
    assert fake.failures == []


async def _progress_if(handle: WorkflowHandle[Any, Any], status: str) -> list[ChannelOutcome] | None:
    """The channels' progress once every one of them has `status` (and there is one)."""
    progress = await handle.query(NotificationWorkflow.progress)
    return progress if progress and all(channel.status == status for channel in progress) else None


async def test_a_run_submitted_before_local_sends_sends_through_a_regular_activity(
    client: Client, task_queue: str
) -> None:
    """Its input (as recorded in its history) has no send_locally: it replays, and runs, as it
    was started, a regular activity on the main queue."""
    plan = DeliveryPlan(locale="en", channels=[ChannelPlan(channel="email", address="a@example.com")])
    fake = FakeNotification(plan)
    async with workers(client, task_queue, [NotificationWorkflow], fake.activities()):
        handle = await start(client, task_queue, notification(send_locally=False))
        assert statuses(await handle.result()) == {"email": "sent"}
    scheduled = [event.activity_task_scheduled_event_attributes async for event in handle.fetch_history_events()
                 if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED]  # fmt: skip
    assert [(event.activity_type.name, event.task_queue.name) for event in scheduled] == [
        ("send_notification", task_queue)
    ]
