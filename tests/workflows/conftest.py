"""Workflow logic on Temporal's time-skipping test server, with fake activities.

One test server per session; each test gets its own task queues, so their workers and
workflows never meet. Timers skip ahead whenever a test waits on a workflow's result.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

TEST_SERVER = Path(sys.executable).parent / "temporal-test-server"


@pytest.fixture(scope="session")
async def time_skipping() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=str(TEST_SERVER)
    )
    yield env
    await env.shutdown()


@pytest.fixture
def client(time_skipping: WorkflowEnvironment) -> Client:
    return time_skipping.client


@pytest.fixture
def task_queue() -> str:
    return f"workflow-test-{uuid.uuid4().hex[:10]}"
