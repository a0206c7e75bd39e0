"""At least once, end to end: a notification the API accepted is delivered even when the
Temporal server is killed and restarted, with the worker and the API process replaced."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from api.app import create_app
from core.auth import Role
from core.config import Settings
from core.queries import deliveries
from entrypoints.embedded import TemporalDevServer, free_port
from tests.stack import SmtpServer, token_for, wait_for_status
from worker import MarqueeWorker, WorkerServices, create_worker


class Stack:
    """A Temporal dev server on a SQLite file, and a worker and API process against it."""

    def __init__(self, tmp_path: Path, settings: Settings, services: WorkerServices) -> None:
        self.server = TemporalDevServer(tmp_path / "temporal.db", free_port(), free_port(), tmp_path / "temporal.log")
        self.settings = settings.model_copy(update={"temporal_task_queue": f"restart-{uuid.uuid4().hex[:8]}"})
        self.services = services

    async def up(self) -> tuple[MarqueeWorker, httpx.AsyncClient]:
        address = await asyncio.to_thread(self.server.start)
        client = await Client.connect(address, data_converter=pydantic_data_converter)
        directory = self.services.directory.another(self.settings.temporal_task_queue)
        services = WorkerServices(self.services.engine, self.services.history, directory, self.settings)
        worker = create_worker(client, self.settings, services)
        app = create_app(self.settings, engine=self.services.engine, temporal=client)
        app.state.temporal = client  # the lifespan that would set it does not run under ASGITransport
        token = token_for(self.settings, Role.service, "restart-test")
        api = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://marquee",
                                headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        return worker, api


async def test_an_accepted_notification_survives_a_temporal_server_crash(
    tmp_path: Path, settings: Settings, services: WorkerServices, engine: AsyncEngine, smtp_server: SmtpServer,
    recipient: dict,
) -> None:  # fmt: skip
    stack = Stack(tmp_path, settings, services)
    address = recipient["email"]
    smtp_server.handler.refuse[address] = "450 4.2.1 Mailbox busy"  # keeps the send retrying
    worker, api = await stack.up()
    async with worker:
        accepted = await api.post(
            "/v1/notifications",
            json={"user_id": recipient["user_id"], "type": "account", "channels": ["email"], "title": "T",
                  "body": "Your code is 123456"},
        )  # fmt: skip
        assert accepted.status_code == 202, accepted.text
        notification_id = uuid.UUID(accepted.json()["id"])
        for _ in range(200):  # until the first attempt has failed at the SMTP server
            async with engine.connect() as conn:
                attempts = await conn.scalar(
                    sa.select(deliveries.c.attempts).where(deliveries.c.notification_id == notification_id)
                )
            if attempts:
                break
            await asyncio.sleep(0.05)
        assert attempts
    await api.aclose()

    # The server dies hard (SIGKILL) with the send still owed; worker and API are gone too.
    assert stack.server._process is not None
    stack.server._process.kill()
    stack.server._process.wait()
    del smtp_server.handler.refuse[address]

    worker, api = await stack.up()
    try:
        async with worker:
            done = await wait_for_status(api, str(notification_id), "sent", seconds=60)
    finally:
        await api.aclose()
        await asyncio.to_thread(stack.server.stop)
    assert done["channels"][0]["status"] == "sent"
    [message] = smtp_server.handler.to(address)
    assert message["Message-ID"] == done["channels"][0]["provider_message_id"]
