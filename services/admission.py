"""Admission control for intake: refuse new work while the workers are behind.

Above capacity, accepting more only makes every accepted notification later: the backlog
grows without bound and so does accept -> sent. The signal is the oldest task waiting on
the main task queue (Temporal's approximate backlog age, read with DescribeTaskQueue): it
grows as soon as the workers fall behind, however many of them there are, and whichever
API process asks. Intake (`POST /v1/notifications`, `POST /v1/events`) is refused with a
503 and Retry-After while it is above MARQUEE_ADMISSION_MAX_BACKLOG_SECONDS; the figure is
read at most every MARQUEE_ADMISSION_CHECK_SECONDS, in the background of the requests.
"""

from __future__ import annotations

import asyncio
import math
import time

import structlog
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError

from core.errors import Unavailable

logger = structlog.get_logger("marquee.admission")


class Overloaded(Unavailable):
    title = "Overloaded"


class Admission:
    """One per API process. `check()` costs nothing when the figure is fresh; otherwise it
    starts one read (never more than one at a time) and answers from the last figure."""

    def __init__(self, temporal: Client, task_queue: str, max_backlog_seconds: float, check_seconds: float) -> None:
        self._temporal = temporal
        self._task_queue = task_queue
        self._max_backlog = max_backlog_seconds
        self._check_seconds = check_seconds
        self._backlog_age = 0.0
        self._read_at = -math.inf
        self._reading: asyncio.Task[None] | None = None

    def check(self) -> None:
        """Raise Overloaded while the main queue's oldest task waits longer than the limit."""
        if self._max_backlog <= 0:
            return
        if time.monotonic() - self._read_at >= self._check_seconds and (self._reading is None or self._reading.done()):
            self._reading = asyncio.create_task(self.refresh())
        if self._backlog_age > self._max_backlog:
            raise Overloaded(
                f"the workers are {self._backlog_age:.1f} s behind (the limit is {self._max_backlog:g} s); "
                "retry after Retry-After seconds",
                retry_after=max(1, math.ceil(self._backlog_age - self._max_backlog)),
            )

    async def refresh(self) -> None:
        """Read the backlog age of the main task queue's workflow tasks (new notifications
        and events start there)."""
        self._read_at = time.monotonic()
        request = DescribeTaskQueueRequest(
            namespace=self._temporal.namespace,
            task_queue=TaskQueue(name=self._task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            report_stats=True,
        )
        try:
            described = await self._temporal.workflow_service.describe_task_queue(request, timeout=None)
        except RPCError as err:  # Temporal itself answers the starts: its errors say so there
            logger.warning("task queue backlog unreadable", error=err.message)
            return
        age = described.stats.approximate_backlog_age
        self._backlog_age = age.seconds + age.nanos / 1e9
