"""The trivial workflows the Temporal ceiling is measured with (bench/ceilings.py): one
activity that returns its input, as a regular or a local activity. A module of its own
because the workflow sandbox re-imports the module a workflow lives in."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn
async def echo(value: str) -> str:
    return value


@workflow.defn
class OneActivity:
    @workflow.run
    async def run(self, value: str) -> str:
        return await workflow.execute_activity(echo, value, start_to_close_timeout=timedelta(seconds=30))


@workflow.defn
class OneLocalActivity:
    @workflow.run
    async def run(self, value: str) -> str:
        return await workflow.execute_local_activity(echo, value, start_to_close_timeout=timedelta(seconds=30))
