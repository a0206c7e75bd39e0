"""EventWorkflow: what the trigger rules make of one event. DigestWorkflow: one recipient's
digest for one rule, one run per window.

An event's workflow plans once (which rules, when; which waiting sends it cancels), then
each rule's send waits on a durable timer if it is delayed, ending early as cancelled when
a cancelling event signals it, and is dispatched once due. The send's own check at
dispatch time decides a cancellation too, so a signal that raced the plan changes nothing.

A digest's run sleeps until its window closes, then sends what its rows hold; signals are
only counted, so an event that arrives while the send runs makes the run send once more,
and one that arrives after the run closed starts the next run (signal-with-start).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.events import EventActivities
    from core.contracts import (
        DIGEST_ADD,
        DIGEST_WORKFLOW,
        EVENT_CANCEL_ACTION,
        EVENT_WORKFLOW,
        ActionEnd,
        ActionInput,
        DigestBatch,
        DigestInput,
        EventInput,
        RuleAction,
        event_workflow_id,
    )

BOOKKEEPING = timedelta(seconds=30)
DISPATCH_TIMEOUT = timedelta(seconds=60)
DISPATCH_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1),
                             non_retryable_error_types=["EventNotFound"])  # fmt: skip


@workflow.defn(name=EVENT_WORKFLOW)
class EventWorkflow:
    def __init__(self) -> None:
        self._cancelled: dict[int, str] = {}

    @workflow.run
    async def run(self, request: EventInput) -> None:
        plan = await workflow.execute_local_activity_method(
            EventActivities.plan, request, start_to_close_timeout=BOOKKEEPING, retry_policy=DISPATCH_RETRY
        )
        for target in plan.cancels:
            handle = workflow.get_external_workflow_handle(event_workflow_id(target.event_id))
            try:
                await handle.signal(EVENT_CANCEL_ACTION, args=[target.rule_id, request.event_id])
            except Exception:
                workflow.logger.info("cancel target already closed", extra={"event_id": target.event_id})
        await asyncio.gather(*(self._act(request.event_id, action) for action in plan.actions))

    @workflow.signal(name=EVENT_CANCEL_ACTION)
    def cancel_action(self, rule_id: int, by_event: str) -> None:
        self._cancelled.setdefault(rule_id, by_event)

    async def _act(self, event_id: str, action: RuleAction) -> None:
        if action.fire_at is not None and action.fire_at > workflow.now():
            try:
                await workflow.wait_condition(
                    lambda: action.rule_id in self._cancelled, timeout=action.fire_at - workflow.now()
                )
            except TimeoutError:
                pass  # due
            else:
                reason = f"cancelled by event {self._cancelled[action.rule_id]!r}"
                await workflow.execute_activity_method(
                    EventActivities.settle,
                    ActionEnd(event_id=event_id, rule_id=action.rule_id, status="cancelled", reason=reason),
                    start_to_close_timeout=BOOKKEEPING,
                )
                return
        await workflow.execute_activity_method(
            EventActivities.dispatch,
            ActionInput(event_id=event_id, rule_id=action.rule_id),
            start_to_close_timeout=DISPATCH_TIMEOUT,
            retry_policy=DISPATCH_RETRY,
        )


@workflow.defn(name=DIGEST_WORKFLOW)
class DigestWorkflow:
    def __init__(self) -> None:
        self._signals = 0

    @workflow.run
    async def run(self, request: DigestInput) -> int:
        if request.closes_at > workflow.now():
            await workflow.sleep(request.closes_at - workflow.now())
        listed, sends = 0, 0
        while True:
            seen = self._signals
            sent = await workflow.execute_activity_method(
                EventActivities.send_digest,
                DigestBatch(
                    rule_id=request.rule_id, user_id=request.user_id, batch=f"{workflow.info().run_id}:{sends}"
                ),
                start_to_close_timeout=DISPATCH_TIMEOUT,
                retry_policy=DISPATCH_RETRY,
            )
            listed, sends = listed + sent.listed, sends + 1
            if self._signals == seen:  # nothing joined while it sent
                return listed

    @workflow.signal(name=DIGEST_ADD)
    def add(self, event_id: str) -> None:
        self._signals += 1
