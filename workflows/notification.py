"""NotificationWorkflow: one notification to one recipient over one or more channels."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.notifications import PERMANENT_ERROR, NotificationActivities
    from workflows.contracts import (
        CancelInput,
        ChannelOutcome,
        ChannelPlan,
        FailureInput,
        NotificationInput,
        NotificationOutcome,
        SendInput,
    )

BOOKKEEPING_TIMEOUT = timedelta(seconds=30)


@workflow.defn
class NotificationWorkflow:
    def __init__(self) -> None:
        self._outcomes: dict[str, ChannelOutcome] = {}

    @workflow.run
    async def run(self, request: NotificationInput) -> NotificationOutcome:
        try:
            plan = await workflow.execute_local_activity_method(
                NotificationActivities.prepare, request, start_to_close_timeout=BOOKKEEPING_TIMEOUT
            )
            for channel in plan.channels:
                self._outcomes[channel.channel] = ChannelOutcome(channel=channel.channel, status="pending")
            await asyncio.gather(*(self._deliver(request, channel) for channel in plan.channels))
        except asyncio.CancelledError:
            # Cancelled from the API or `temporal workflow cancel`: record it, then stay cancelled.
            await workflow.execute_local_activity_method(
                NotificationActivities.record_cancelled,
                CancelInput(
                    notification_id=request.notification_id, user_id=request.user_id, category=request.category
                ),
                start_to_close_timeout=BOOKKEEPING_TIMEOUT,
            )
            raise
        return NotificationOutcome(notification_id=request.notification_id, channels=list(self._outcomes.values()))

    @workflow.query
    def progress(self) -> list[ChannelOutcome]:
        return list(self._outcomes.values())

    async def _deliver(self, request: NotificationInput, plan: ChannelPlan) -> None:
        if plan.skip_reason == "opted_out":
            self._outcomes[plan.channel] = ChannelOutcome(channel=plan.channel, status="suppressed")
            return
        if plan.skip_reason is not None or plan.address is None:
            await self._fail(request, plan.channel, plan.skip_reason or "no address", "undeliverable")
            return
        retry = request.retry
        try:
            result = await workflow.execute_activity_method(
                NotificationActivities.send,
                SendInput(
                    notification_id=request.notification_id,
                    idempotency_key=request.idempotency_key,
                    channel=plan.channel,
                    address=plan.address,
                    user_id=request.user_id,
                    category=request.category,
                    title=plan.title if plan.title is not None else request.title or "",
                    body=plan.body if plan.body is not None else request.body or "",
                    data=plan.data if plan.data is not None else request.data,
                ),
                start_to_close_timeout=timedelta(seconds=retry.timeout_seconds),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=retry.initial_seconds),
                    backoff_coefficient=2.0,
                    maximum_interval=timedelta(seconds=retry.max_seconds),
                    maximum_attempts=retry.max_attempts,
                    non_retryable_error_types=[PERMANENT_ERROR],
                ),
            )
        except ActivityError as err:
            if is_cancelled_exception(err):
                raise asyncio.CancelledError from err  # the run was cancelled, not the channel
            cause = err.cause
            message = str(cause.message if isinstance(cause, ApplicationError) else cause or err)
            permanent = isinstance(cause, ApplicationError) and cause.type == PERMANENT_ERROR
            reason = "rejected by provider" if permanent else "retries exhausted"
            await self._fail(request, plan.channel, message, reason)
            return
        self._outcomes[plan.channel] = ChannelOutcome(
            channel=plan.channel, status="sent", provider_message_id=result.provider_message_id
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
            ),
            start_to_close_timeout=BOOKKEEPING_TIMEOUT,
        )
        self._outcomes[channel] = ChannelOutcome(channel=channel, status="failed", error=error)
