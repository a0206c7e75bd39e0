"""Above capacity the API sheds intake instead of letting every accepted notification wait
longer: while the oldest new task on the main queue waits longer than the limit (read from
the Temporal server itself), POST /v1/notifications and POST /v1/events answer 503 with
Retry-After and write nothing; once the workers catch up, intake is accepted again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from api.app import create_app
from core.auth import Role
from core.config import Settings
from core.queries import notifications
from tests.stack import SmtpServer, token_for, wait_for_status
from worker import WorkerServices, create_worker

LIMIT = 0.5


@pytest.fixture
async def stack(
    settings: Settings, services: WorkerServices, temporal_client: Client
) -> AsyncIterator[tuple[Settings, httpx.AsyncClient]]:
    ours = settings.model_copy(update={
        "temporal_task_queue": f"admission-{uuid.uuid4().hex[:8]}", "admission_max_backlog_seconds": LIMIT,
        "admission_check_seconds": 0.05,
    })  # fmt: skip
    app = create_app(ours, engine=services.engine, temporal=temporal_client)
    token = token_for(ours, Role.service, "admission-test")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://marquee",
                                 headers={"Authorization": f"Bearer {token}"}) as api:  # fmt: skip
        yield ours, api


def _email(user_id: str) -> dict[str, object]:
    return {"user_id": user_id, "type": "account", "channels": ["email"], "title": "T", "body": "B"}


async def _count(engine: AsyncEngine, user_id: str) -> int:
    async with engine.connect() as conn:
        found = await conn.scalar(sa.select(sa.func.count()).where(notifications.c.user_id == user_id))
    return int(found or 0)


async def test_intake_is_shed_while_the_workers_are_behind_and_accepted_once_they_catch_up(
    stack: tuple[Settings, httpx.AsyncClient], services: WorkerServices, temporal_client: Client,
    engine: AsyncEngine, recipient: dict, smtp_server: SmtpServer,
) -> None:  # fmt: skip
    settings, api = stack
    user = recipient["user_id"]
    # No worker polls the queue yet: what is accepted waits, and the wait grows.
    first = await api.post("/v1/notifications", json=_email(user))
    assert first.status_code == 202, first.text
    shed: httpx.Response | None = None
    for _ in range(100):
        await asyncio.sleep(0.1)
        answer = await api.post("/v1/notifications", json=_email(user))
        if answer.status_code == 503:
            shed = answer
            break
        assert answer.status_code == 202, answer.text
    assert shed is not None, "never shed although nothing was taking the work"
    assert shed.headers["content-type"] == "application/problem+json"
    assert shed.json()["title"] == "Overloaded"
    assert int(shed.headers["Retry-After"]) >= 1
    accepted_before = await _count(engine, user)
    event = await api.post("/v1/events", json={"type": "anything", "id": "e-1", "payload": {}})
    assert event.status_code == 503  # events are intake too, refused before they are read
    assert await _count(engine, user) == accepted_before  # the refused requests wrote nothing

    directory = services.directory.another(settings.temporal_task_queue)
    worker = create_worker(temporal_client, settings, WorkerServices(services.engine, services.history,
                                                                     directory, settings))  # fmt: skip
    async with worker:
        await wait_for_status(api, first.json()["id"], "sent", seconds=30)
        for _ in range(100):  # the next read of the backlog finds it drained
            again = await api.post("/v1/notifications", json=_email(user))
            if again.status_code == 202:
                break
            await asyncio.sleep(0.1)
        assert again.status_code == 202, again.text
        await wait_for_status(api, again.json()["id"], "sent", seconds=30)
    assert len(smtp_server.handler.to(recipient["email"])) == accepted_before + 1
