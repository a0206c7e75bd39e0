"""A campaign survives its worker: kill -9 mid-send, another worker finishes the job.

The workers here are real `marquee worker` processes on a task queue of their own, so the
in-process test worker takes no part.
"""

from __future__ import annotations

import asyncio
import email
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from core.config import Settings
from services import campaigns as campaign_control
from services.campaign_batches import MAX_UNRECORDED
from services.campaign_store import campaign_runs
from tests.e2e.test_campaigns import create_campaign, make_audience, manager, tag_segment, template_key  # noqa: F401
from tests.stack import SmtpServer

MARQUEE = Path(sys.executable).parent / "marquee"


def start_worker(
    settings: Settings, temporal_client: Client, smtp_server: SmtpServer, queue: str, data_dir: Path
) -> Any:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MARQUEE_")},
        "MARQUEE_DATABASE_URL": settings.database_url or "",
        "MARQUEE_TEMPORAL_ADDRESS": temporal_client.service_client.config.target_host,
        "MARQUEE_TEMPORAL_TASK_QUEUE": queue,
        "MARQUEE_SMTP_HOST": "127.0.0.1",
        "MARQUEE_SMTP_PORT": str(smtp_server.port),
        "MARQUEE_DATA_DIR": str(data_dir),
        # Signs tracking and unsubscribe links (as the API that verifies them does).
        "MARQUEE_JWT_SECRET": settings.resolved_jwt_secret(),
        "MARQUEE_CAMPAIGN_SEND_CONCURRENCY": "10",
    }
    return subprocess.Popen([str(MARQUEE), "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def _sent(engine: AsyncEngine, run_id: str) -> tuple[int, str]:
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(campaign_runs).where(campaign_runs.c.id == run_id))).first()
    return (row.sent, row.status) if row else (0, "none")


async def test_killed_worker_is_replaced_and_every_recipient_is_served(
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,  # noqa: F811
    template_key: str,  # noqa: F811
    smtp_server: SmtpServer,
    settings: Settings,
    engine: AsyncEngine,
    temporal_client: Client,
    tmp_path: Path,
) -> None:
    audience = 3000
    tag, emails = await make_audience(api, audience)
    campaign = await create_campaign(manager, template_key, await tag_segment(manager, tag), throttle_per_second=600)
    queue = f"durability-{uuid.uuid4().hex[:8]}"
    own_queue = settings.model_copy(update={"temporal_task_queue": queue})
    async with engine.begin() as conn:
        await campaign_control.launch(conn, temporal_client, own_queue, uuid.UUID(campaign["id"]))
    run_id = f"campaign-{campaign['id']}"

    first = start_worker(settings, temporal_client, smtp_server, queue, tmp_path / "w1")
    second = None
    try:
        for _ in range(600):
            sent, _ = await _sent(engine, run_id)
            if sent >= audience // 4:
                break
            assert first.poll() is None, first.stderr.read().decode() if first.stderr else ""
            await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        at_kill = len(smtp_server.handler.delivered_to(set(emails)))
        assert at_kill < audience

        second = start_worker(settings, temporal_client, smtp_server, queue, tmp_path / "w2")
        for _ in range(1800):
            sent, status = await _sent(engine, run_id)
            if status == "completed":
                break
            await asyncio.sleep(0.1)
        assert status == "completed", (sent, status)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)

    assert sent == audience  # the run's counters: each recipient recorded exactly once
    delivered = smtp_server.handler.delivered_to(set(emails))
    assert {rcpt for rcpt, _ in delivered} == set(emails)  # nobody skipped
    ids = Counter(str(email.message_from_bytes(raw)["Message-ID"]) for _, raw in delivered)
    assert len(ids) == audience  # one Message-ID per recipient: a resend carries the same one
    duplicates = len(delivered) - audience
    # Only what was sent but not yet recorded when the worker died can go out twice: per batch
    # in flight, the buffer (at most MAX_UNRECORDED), a chunk being written, and the sends
    # under way.
    assert duplicates <= settings.campaign_window * (2 * MAX_UNRECORDED + settings.campaign_send_concurrency)
    print(f"\nkill -9 after {at_kill} messages: {duplicates} duplicate deliveries, all with the same Message-ID")
