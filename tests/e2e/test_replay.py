"""Workflow code must stay deterministic: recorded histories replay with the current code.

A change that would break runs already in flight (reordering activities, new timers, ...)
fails here. To re-record after a deliberate, versioned change:
    MARQUEE_RECORD_HISTORIES=1 .venv/bin/python -m pytest tests/e2e/test_replay.py
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from services.preferences import suppressions
from tests.stack import SmtpServer, wait_for_status
from worker import WORKFLOWS

HISTORIES = Path(__file__).parent / "histories"


def _replayer() -> Replayer:
    return Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter)


@pytest.mark.parametrize("path", sorted(HISTORIES.glob("*.json")), ids=lambda path: path.stem)
async def test_recorded_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, await asyncio.to_thread(path.read_text))
    result = await _replayer().replay_workflow(history)
    assert result.replay_failure is None


async def assert_replays(history: WorkflowHistory, name: str) -> None:
    """The history replays with the current code; MARQUEE_RECORD_HISTORIES=1 stores it as `name`."""
    if os.environ.get("MARQUEE_RECORD_HISTORIES") == "1":
        path = HISTORIES / f"{name}.json"
        await asyncio.to_thread(path.write_text, json.dumps(json.loads(history.to_json()), indent=1))
    assert (await _replayer().replay_workflow(history)).replay_failure is None


async def test_fresh_histories_replay(
    api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer, temporal_client: Client, engine: AsyncEngine
) -> None:
    user = recipient["user_id"]
    sent = await api.post(
        "/v1/notifications?wait=true",
        json={"user_id": user, "type": "premiere", "channels": ["email", "sms", "push"], "title": "T", "body": "B"},
    )
    assert sent.json()["status"] == "sent"

    smtp_server.handler.refuse[recipient["email"]] = "550 5.1.1 No such user"
    rejected = await api.post(
        "/v1/notifications?wait=true",
        json={"user_id": user, "type": "account", "channels": ["email"], "title": "T", "body": "B"},
    )
    assert rejected.json()["status"] == "failed"
    async with engine.begin() as conn:  # the 550 suppressed the address; this run needs it
        await conn.execute(sa.delete(suppressions).where(suppressions.c.address == recipient["email"]))

    smtp_server.handler.refuse[recipient["email"]] = "421 4.3.2 Busy"
    pending = await api.post(
        "/v1/notifications", json={"user_id": user, "type": "account", "channels": ["email"], "title": "C", "body": "B"}
    )
    await api.post(f"/v1/notifications/{pending.json()['id']}/cancel", json={"reason": "test over"})
    await wait_for_status(api, pending.json()["id"], "cancelled")

    runs = {"notification_sent": sent, "notification_rejected": rejected, "notification_cancelled": pending}
    for name, response in runs.items():
        history = await temporal_client.get_workflow_handle(response.json()["workflow_id"]).fetch_history()
        await assert_replays(history, name)
