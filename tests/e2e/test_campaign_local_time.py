"""Local-time delivery through the real workflow, on Temporal's time-skipping test server:
each time zone's recipients are sent at 10:00 of their own clock, DST-correct."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from core.clock import next_local_time
from core.config import Settings
from entrypoints.embedded import venv_binary
from services import campaigns as campaign_control
from tests.e2e.test_campaigns import create_campaign, manager, tag_segment, template_key  # noqa: F401
from tests.stack import SmtpServer
from worker import WorkerServices, create_worker


@pytest.fixture
async def skipping() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=str(venv_binary("temporal-test-server"))
    )
    yield env
    await env.shutdown()


async def test_each_zone_gets_its_send_at_ten_local(
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,  # noqa: F811
    template_key: str,  # noqa: F811
    smtp_server: SmtpServer,
    settings: Settings,
    services: WorkerServices,
    engine: Any,
    skipping: WorkflowEnvironment,
) -> None:
    tag = f"tz{uuid.uuid4().hex[:8]}"
    zones = {"Asia/Tokyo": 3, "America/New_York": 2, "Europe/Moscow": 4}
    people = [
        {"user_id": f"{tag}-{zone}-{n}", "name": f"V{n}",
         "email": f"{tag}-{zone.replace('/', '_').lower()}-{n}@example.com",
         "timezone": zone, "tags": [tag]}
        for zone, count in zones.items() for n in range(count)
    ]  # fmt: skip
    assert (await api.post("/v1/recipients/batch", json={"recipients": people})).status_code == 200
    campaign = await create_campaign(
        manager, template_key, await tag_segment(manager, tag), schedule={"kind": "now", "local_time": "10:00"}
    )
    queue = f"skipping-{uuid.uuid4().hex[:8]}"
    own = settings.model_copy(update={"temporal_task_queue": queue})
    async with create_worker(skipping.client, own, services):
        started = datetime.now(UTC)
        async with engine.begin() as conn:
            await campaign_control.launch(conn, skipping.client, own, uuid.UUID(campaign["id"]))
        handle = skipping.client.get_workflow_handle(f"campaign-{campaign['id']}")
        for _ in range(60):  # up to 60 hours of the test server's clock, in 1-hour skips
            if (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED:
                break
            await skipping.sleep(timedelta(hours=1))
            await asyncio.sleep(0.2)  # real time for the batches that became due
        assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
        history = await handle.fetch_history()

    zone_of = {str(person["email"]): str(person["timezone"]) for person in people}
    delivered = smtp_server.handler.delivered_to(set(zone_of))
    assert len(delivered) == sum(zones.values())

    # One timer per zone, in the order the zones reach 10:00, each ending at that zone's 10:00.
    timers = [
        event.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED
    ]
    expected = sorted((next_local_time(started, zone, "10:00"), zone) for zone in zones)
    assert len(timers) == len(zones)
    elapsed = timedelta(0)
    for timer, (fire_at, zone) in zip(timers, expected, strict=True):
        elapsed += timer
        # Each sleep ends at the zone's 10:00 (within the seconds the test itself takes).
        assert abs((started + elapsed) - fire_at) < timedelta(seconds=30), zone
    # And the mail went out zone by zone, in that order.
    order = list(dict.fromkeys(zone_of[rcpt] for rcpt, _ in delivered))
    assert order == [zone for _, zone in expected]


async def test_recipients_in_quiet_hours_get_the_campaign_when_they_end(
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,  # noqa: F811
    template_key: str,  # noqa: F811
    smtp_server: SmtpServer,
    settings: Settings,
    services: WorkerServices,
    engine: Any,
    skipping: WorkflowEnvironment,
) -> None:
    tag = f"qh{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    quiet = {"quiet_hours_start": (now - timedelta(hours=1)).strftime("%H:%M"),
             "quiet_hours_end": (now + timedelta(hours=3)).strftime("%H:%M")}  # fmt: skip
    awake: list[dict[str, Any]] = [
        {"user_id": f"{tag}-a{n}", "email": f"{tag}-a{n}@example.com", "tags": [tag]} for n in range(2)
    ]
    asleep: list[dict[str, Any]] = [
        {"user_id": f"{tag}-q{n}", "email": f"{tag}-q{n}@example.com", "tags": [tag], **quiet} for n in range(3)
    ]
    assert (await api.post("/v1/recipients/batch", json={"recipients": awake + asleep})).status_code == 200
    campaign = await create_campaign(manager, template_key, await tag_segment(manager, tag))
    own = settings.model_copy(update={"temporal_task_queue": f"skipping-{uuid.uuid4().hex[:8]}"})
    async with create_worker(skipping.client, own, services):
        async with engine.begin() as conn:
            await campaign_control.launch(conn, skipping.client, own, uuid.UUID(campaign["id"]))
        handle = skipping.client.get_workflow_handle(f"campaign-{campaign['id']}")
        # The first pass sends to those awake, then waits (the test server skips the wait).
        for _ in range(100):
            if len(smtp_server.handler.delivered_to({p["email"] for p in awake})) == 2:
                break
            await asyncio.sleep(0.1)
        assert smtp_server.handler.delivered_to({p["email"] for p in asleep}) == []
        for _ in range(10):
            if (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED:
                break
            await skipping.sleep(timedelta(hours=1))
            await asyncio.sleep(0.2)
        assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
        history = await handle.fetch_history()

    assert {rcpt for rcpt, _ in smtp_server.handler.delivered_to({p["email"] for p in awake + asleep})} == {
        p["email"] for p in awake + asleep
    }
    [timer] = [e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta() for e in history.events
               if e.event_type == EventType.EVENT_TYPE_TIMER_STARTED]  # fmt: skip
    assert timedelta(hours=2, minutes=58) < timer <= timedelta(hours=3)  # until their quiet hours end
    run = (await manager.get(f"/v1/campaigns/{campaign['id']}")).json()["runs"][0]
    assert (run["targeted"], run["sent"], run["skipped_duplicate"]) == (5, 5, 0)
