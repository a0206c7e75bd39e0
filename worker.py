"""The Temporal worker process: `marquee worker`. Scale out by running more of them."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.worker import Worker

from activities.campaigns import CampaignActivities
from activities.notifications import NotificationActivities
from channels.base import Provider
from channels.sandbox import SandboxProvider
from channels.smtp import SmtpProvider
from core.config import Settings
from core.db import create_engine
from core.history import HistoryWriter, open_store
from core.template_store import PinnedVersions
from core.temporal import connect
from workflows.campaign import CampaignWorkflow
from workflows.notification import NotificationWorkflow

WORKFLOWS = [NotificationWorkflow, CampaignWorkflow]
logger = structlog.get_logger("marquee.worker")


def build_providers(settings: Settings, engine: AsyncEngine) -> dict[str, Provider]:
    """One provider per channel from settings (provider records in the admin come later)."""
    providers: dict[str, Provider] = {
        "email": SmtpProvider(
            host=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            use_tls=settings.smtp_use_tls,
            start_tls=settings.smtp_start_tls,
            timeout=settings.smtp_timeout_seconds,
            pool_size=settings.smtp_pool_size,
            sender=settings.mail_from,
            message_id_domain=settings.message_id_domain,
        )
    }
    for channel, kind in (("push", settings.push_provider), ("sms", settings.sms_provider)):
        if kind != "sandbox":
            raise ValueError(f"MARQUEE_{channel.upper()}_PROVIDER={kind!r}: only 'sandbox' is available yet")
        providers[channel] = SandboxProvider(engine, channel)
    return providers


@dataclass
class WorkerServices:
    engine: AsyncEngine
    history: HistoryWriter
    providers: dict[str, Provider]

    send_concurrency: int = 10
    templates: PinnedVersions = field(default_factory=PinnedVersions)

    def activities(self) -> list[Callable[..., Any]]:
        notifications = NotificationActivities(self.engine, self.providers, self.history, self.templates)
        campaigns = CampaignActivities(
            self.engine, self.providers, self.history, self.send_concurrency, templates=self.templates
        )
        return [
            notifications.prepare,
            notifications.send,
            notifications.record_failure,
            notifications.record_cancelled,
            campaigns.start_run,
            campaigns.next_range,
            campaigns.send_window,
            campaigns.send_batch,
            campaigns.finish_run,
        ]


@asynccontextmanager
async def worker_services(settings: Settings, engine: AsyncEngine | None = None) -> AsyncIterator[WorkerServices]:
    """Database, history store and providers for a worker; closed on exit."""
    own_engine = engine is None
    engine = engine or create_engine(_database_url(settings), settings.database_pool_size)
    store = open_store(settings.clickhouse_url, settings.chdb_path)
    await asyncio.to_thread(store.ensure_schema)
    history = HistoryWriter(store, settings.history_flush_seconds, settings.history_flush_rows)
    providers = build_providers(settings, engine)
    try:
        yield WorkerServices(
            engine=engine, history=history, providers=providers, send_concurrency=settings.campaign_send_concurrency
        )
    finally:
        for provider in providers.values():
            await provider.close()
        await history.close()
        if own_engine:
            await engine.dispose()


def create_worker(client: Client, settings: Settings, services: WorkerServices) -> Worker:
    return Worker(
        client,
        task_queue=settings.temporal_task_queue,
        workflows=WORKFLOWS,
        activities=services.activities(),
        max_concurrent_activities=settings.worker_max_concurrent_activities,
        graceful_shutdown_timeout=timedelta(seconds=settings.worker_shutdown_seconds),
        # Eager activities would all run on the worker that runs the workflow, leaving the
        # other workers idle during a campaign (measured: docs/benchmarks.md).
        disable_eager_activity_execution=True,
    )


def _database_url(settings: Settings) -> str:
    if not settings.database_url:
        raise RuntimeError("MARQUEE_DATABASE_URL is not set (the dev stack sets it for you: `marquee dev`)")
    return settings.database_url


async def run_worker(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM, then stop polling and let running activities finish
    (up to the graceful timeout) before closing connections."""
    client = await connect(settings)
    async with worker_services(settings) as services:
        worker = create_worker(client, settings, services)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        running = asyncio.create_task(worker.run())
        logger.info("worker started", task_queue=settings.temporal_task_queue)
        await asyncio.wait([running, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not running.done():
            logger.info("worker stopping")
            await worker.shutdown()
        await running
