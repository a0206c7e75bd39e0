"""Activities of CampaignWorkflow: thin calls into services.campaign_batches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.contracts import (
    CAMPAIGN_NOT_FOUND,
    TRANSIENT_ERROR,
    BatchInput,
    BatchResult,
    FinishRunInput,
    RangeInput,
    RunPlan,
    StartRunInput,
    WindowInput,
    WindowState,
)
from core.log_fields import bound_activity_ids
from services.campaign_batches import BatchInterrupted, CampaignMissing, CampaignSender


@contextmanager
def _domain_errors(request: object) -> Iterator[None]:
    """The services' errors as the ApplicationError types the workflow's retry policy knows
    (and the request's ids on what the activity logs)."""
    try:
        with bound_activity_ids(request):
            yield
    except CampaignMissing as err:
        raise ApplicationError(str(err), type=CAMPAIGN_NOT_FOUND, non_retryable=True) from err
    except BatchInterrupted as err:
        raise ApplicationError(str(err), type=TRANSIENT_ERROR, next_retry_delay=err.retry_delay) from err


class CampaignActivities:
    def __init__(self, sender: CampaignSender) -> None:
        self._sender = sender

    @activity.defn(name="start_campaign_run")
    async def start_run(self, request: StartRunInput) -> RunPlan:
        """Open the run (once), count its audience and say how it is paced."""
        with _domain_errors(request):
            return await self._sender.start_run(request)

    @activity.defn(name="next_campaign_range")
    async def next_range(self, request: RangeInput) -> int | None:
        with _domain_errors(request):
            return await self._sender.next_range(request)

    @activity.defn(name="campaign_send_window")
    async def send_window(self, request: WindowInput) -> WindowState:
        with _domain_errors(request):
            return await self._sender.send_window(request)

    @activity.defn(name="send_campaign_batch")
    async def send_batch(self, batch: BatchInput) -> BatchResult:
        with _domain_errors(batch):
            return await self._sender.send_batch(batch, activity.heartbeat)

    @activity.defn(name="finish_campaign_run")
    async def finish_run(self, request: FinishRunInput) -> None:
        with bound_activity_ids(request):
            await self._sender.finish_run(request)
