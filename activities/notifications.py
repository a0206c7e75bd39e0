"""Activities of NotificationWorkflow: thin calls into services.sending."""

from __future__ import annotations

from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.contracts import CancelInput, DeliveryPlan, FailureInput, NotificationInput, SendInput, SendResult
from services.sending import InstantSender, SendFailure


class NotificationActivities:
    """Built once per worker with its clients; Temporal calls the decorated methods."""

    def __init__(self, sender: InstantSender) -> None:
        self._sender = sender

    @activity.defn(name="prepare_notification")
    async def prepare(self, request: NotificationInput) -> DeliveryPlan:
        return await self._sender.prepare(request, activity.info().workflow_run_id or "")

    @activity.defn(name="send_notification")
    async def send(self, request: SendInput) -> SendResult:
        """Runs on the provider's own task queue (its rate limit) or, for the channel's
        default provider, on the main one."""
        try:
            return await self._sender.send(request, activity.info().attempt)
        except SendFailure as err:
            raise ApplicationError(str(err), type=err.kind, non_retryable=err.final,
                                   next_retry_delay=err.retry_delay) from err  # fmt: skip

    @activity.defn(name="record_notification_failure")
    async def record_failure(self, failure: FailureInput) -> None:
        await self._sender.record_failure(failure)

    @activity.defn(name="record_notification_cancelled")
    async def record_cancelled(self, cancel: CancelInput) -> None:
        await self._sender.record_cancelled(cancel)
