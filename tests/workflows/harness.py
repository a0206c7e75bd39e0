"""Workers for fake activities, and waiting on what a workflow has done so far."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

# Fake batches heartbeat often; the worker forwards each at once, so a cancellation reaches
# them in milliseconds rather than after 0.8 x the heartbeat timeout.
HEARTBEAT_THROTTLE = timedelta(milliseconds=50)


@asynccontextmanager
async def workers(
    client: Client,
    task_queue: str,
    workflows: Sequence[type],
    activities: Sequence[Callable[..., Any]],
    lanes: Mapping[str, Sequence[Callable[..., Any]]] | None = None,
    sandboxed: bool = True,
) -> AsyncIterator[None]:
    """The main worker (workflows and activities) on `task_queue`, and one worker per lane
    queue running only that lane's activities, as the real worker runs providers' queues."""
    runner: WorkflowRunner = SandboxedWorkflowRunner() if sandboxed else UnsandboxedWorkflowRunner()
    queues = {task_queue: activities, **(lanes or {})}
    async with AsyncExitStack() as stack:
        for queue, queue_activities in queues.items():
            worker = Worker(
                client,
                task_queue=queue,
                workflows=workflows if queue == task_queue else [],
                activities=queue_activities,
                workflow_runner=runner,
                max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
                default_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
            )
            await stack.enter_async_context(worker)
        yield


async def eventually(check: Callable[[], Any], seconds: float = 10) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; time does not skip meanwhile."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still {value!r} after {seconds}s")
        await asyncio.sleep(0.02)
