"""NotificationWorkflow: one notification to one recipient over one or more channels."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.notifications import NotificationActivities
    from core.contracts import (
        CIRCUIT_OPEN,
        FAILURES_EXHAUSTED,
        NOTIFICATION_WORKFLOW,
        PERMANENT_ERROR,
        PROVIDER_UNAVAILABLE,
        CancelInput,
        ChannelOutcome,
        ChannelPlan,
        FailureInput,
        HistoryTags,
        NotificationInput,
        NotificationOutcome,
        ProviderRoute,
        SendInput,
        SendResult,
    )

BOOKKEEPING_TIMEOUT = timedelta(seconds=30)
# Throttled attempts (429, SMTP 421) do not spend the failure budget; this bounds them.
THROTTLED_ATTEMPTS = 50
NOT_RETRIED = [PERMANENT_ERROR, CIRCUIT_OPEN, PROVIDER_UNAVAILABLE, FAILURES_EXHAUSTED]
RETRY_ON_TIMER = timedelta(milliseconds=1)  # a zero threshold would mean the SDK's default (1 min)


@workflow.defn(name=NOTIFICATION_WORKFLOW)
class NotificationWorkflow:
    def __init__(self) -> None:
        self._outcomes: dict[str, ChannelOutcome] = {}
        self._tags = HistoryTags()

    @workflow.run
    async def run(self, request: NotificationInput) -> NotificationOutcome:
        try:
            plan = await workflow.execute_local_activity_method(
                NotificationActivities.prepare, request, start_to_close_timeout=BOOKKEEPING_TIMEOUT
            )
            self._tags = plan.tags
            for channel in plan.channels:
                self._outcomes[channel.channel] = ChannelOutcome(channel=channel.channel, status="pending")
            if plan.defer_until is not None and plan.defer_until > workflow.now():
                # The recipient's quiet hours: a durable timer, so a restart changes nothing.
                await workflow.sleep(plan.defer_until - workflow.now())
            await asyncio.gather(*(self._deliver(request, channel) for channel in plan.channels))
        except asyncio.CancelledError:
            # Cancelled from the API or `temporal workflow cancel`: record it, then stay cancelled.
            await workflow.execute_local_activity_method(
                NotificationActivities.record_cancelled,
                CancelInput(
                    notification_id=request.notification_id,
                    user_id=request.user_id,
                    category=request.category,
                    tags=self._tags,
                ),
                start_to_close_timeout=BOOKKEEPING_TIMEOUT,
            )
            raise
        return NotificationOutcome(notification_id=request.notification_id, channels=list(self._outcomes.values()))

    @workflow.query
    def progress(self) -> list[ChannelOutcome]:
        return list(self._outcomes.values())

    async def _deliver(self, request: NotificationInput, plan: ChannelPlan) -> None:
        if plan.suppress or plan.skip_reason == "opted_out":
            self._outcomes[plan.channel] = ChannelOutcome(channel=plan.channel, status="suppressed")
            return
        if plan.unreachable:  # recorded by prepare; runs planned before it existed fail below, as they did
            self._outcomes[plan.channel] = ChannelOutcome(channel=plan.channel, status="unreachable",
                                                          error=plan.skip_reason)  # fmt: skip
            return
        if plan.skip_reason is not None or plan.address is None:
            await self._fail(request, plan.channel, plan.skip_reason or "no address", "undeliverable")
            return
        # Providers in priority order; with none stored, the worker's default for the channel.
        routes: list[ProviderRoute | None] = [*plan.routes] or [None]
        for index, route in enumerate(routes):
            last = index == len(routes) - 1
            try:
                result = await self._send(request, plan, route, last)
            except FailureError as err:
                # A regular activity's failure is an ActivityError around its cause; a local
                # activity's arrives as the cause itself.
                if is_cancelled_exception(err):
                    raise asyncio.CancelledError from err  # the run was cancelled, not the channel
                cause = err.cause if isinstance(err, ActivityError) else err
                kind = cause.type if isinstance(cause, ApplicationError) else None
                if kind == PERMANENT_ERROR:
                    await self._fail(request, plan.channel, _message(err), "rejected by provider")
                    return
                if last:
                    reason = "provider unavailable" if kind == PROVIDER_UNAVAILABLE else "retries exhausted"
                    await self._fail(request, plan.channel, _message(err), reason)
                    return
                continue  # provider trouble: fail over to the next one
            self._outcomes[plan.channel] = ChannelOutcome(
                channel=plan.channel, status="sent", provider_message_id=result.provider_message_id
            )
            return

    async def _send(
        self, request: NotificationInput, plan: ChannelPlan, route: ProviderRoute | None, last: bool
    ) -> SendResult:
        retry = request.retry
        assert plan.address is not None
        send = SendInput(
            notification_id=request.notification_id,
            idempotency_key=request.idempotency_key,
            channel=plan.channel,
            address=plan.address,
            user_id=request.user_id,
            category=request.category,
            title=plan.title if plan.title is not None else request.title or "",
            body=plan.body if plan.body is not None else request.body or "",
            data=plan.data if plan.data is not None else request.data,
            provider=route.provider if route else None,
            max_failures=retry.max_attempts if last else retry.failover_after,
            may_skip=not last,
            tags=self._tags,
        )
        retry_policy = RetryPolicy(
            initial_interval=timedelta(seconds=retry.initial_seconds),
            backoff_coefficient=2.0,
            maximum_interval=timedelta(seconds=retry.max_seconds),
            # The activity counts real failures itself (against max_failures); this
            # also bounds throttled attempts and timeouts.
            maximum_attempts=retry.max_attempts + THROTTLED_ATTEMPTS,
            non_retryable_error_types=NOT_RETRIED,
        )
        timeout = timedelta(seconds=retry.timeout_seconds)
        if (route is None or route.local) and request.send_locally:
            # No rate limit shared across workers: the send runs here, inside the workflow
            # task, so a notification costs one task instead of three server round trips.
            # Each retry waits on a durable timer rather than inside the worker (the default for
            # backoffs under a minute): a stopping worker is not held by a retrying send, and a
            # restarted one carries on where the history says.
            return await workflow.execute_local_activity_method(
                NotificationActivities.send,
                send,
                start_to_close_timeout=timeout,
                retry_policy=retry_policy,
                local_retry_threshold=RETRY_ON_TIMER,
            )
        # A provider's rate limit holds across workers on its own task queue (the server paces it).
        return await workflow.execute_activity_method(
            NotificationActivities.send,
            send,
            task_queue=route.task_queue if route else None,
            schedule_to_start_timeout=timedelta(seconds=retry.queue_timeout_seconds) if route else None,
            start_to_close_timeout=timeout,
            retry_policy=retry_policy,
        )

    async def _fail(self, request: NotificationInput, channel: str, error: str, reason: str) -> None:
        await workflow.execute_local_activity_method(
            NotificationActivities.record_failure,
            FailureInput(
                notification_id=request.notification_id,
                channel=channel,
                reason=reason,
                error=error,
                request=request,
                tags=self._tags,
            ),
            start_to_close_timeout=BOOKKEEPING_TIMEOUT,
        )
        self._outcomes[channel] = ChannelOutcome(channel=channel, status="failed", error=error)


def _message(err: FailureError) -> str:
    cause = err.cause if isinstance(err, ActivityError) else err
    return str(cause.message if isinstance(cause, ApplicationError) else cause or err)
