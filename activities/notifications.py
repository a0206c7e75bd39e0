"""Activities of NotificationWorkflow: thin calls into services.sending."""

from __future__ import annotations

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.contracts import CancelInput, DeliveryPlan, FailureInput, NotificationInput, SendInput, SendResult
from core.log_fields import bound_activity_ids
from services.sending import InstantSender, SendFailure

logger = structlog.get_logger("marquee.notifications")


class NotificationActivities:
    """Built once per worker with its clients; Temporal calls the decorated methods."""

    def __init__(self, sender: InstantSender) -> None:
        self._sender = sender

    @activity.defn(name="prepare_notification")
    async def prepare(self, request: NotificationInput) -> DeliveryPlan:
        with bound_activity_ids(request):
            return await self._sender.prepare(request, activity.info().workflow_run_id or "")

    @activity.defn(name="send_notification")
    async def send(self, request: SendInput) -> SendResult:
        """Runs on the provider's own task queue (its rate limit) or, for the channel's
        default provider, on the main one."""
        with bound_activity_ids(request):
            try:
                return await self._sender.send(request, activity.info().attempt)
            except SendFailure as err:
                # The kind, not the text: a provider's error may quote the address.
                logger.warning("send failed", channel=request.channel, provider=request.provider, kind=err.kind,
                               final=err.final, attempt=activity.info().attempt)  # fmt: skip
                raise ApplicationError(str(err), type=err.kind, non_retryable=err.final,
                                       next_retry_delay=err.retry_delay) from err  # fmt: skip

    @activity.defn(name="record_notification_failure")
    async def record_failure(self, failure: FailureInput) -> None:
        with bound_activity_ids(failure):
            await self._sender.record_failure(failure)

    @activity.defn(name="record_notification_cancelled")
    async def record_cancelled(self, cancel: CancelInput) -> None:
        with bound_activity_ids(cancel):
            await self._sender.record_cancelled(cancel)
