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
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.campaigns import CampaignActivities
from activities.events import EventActivities
from activities.notifications import NotificationActivities
from channels.base import Provider
from channels.registry import ProviderConfigError, build_provider
from channels.sandbox import SandboxProvider
from core.config import Settings
from core.db import create_engine
from core.temporal import connect
from core.tracing import instrument_engine
from entrypoints.probes import serve_probes
from services import health
from services.campaign_batches import CampaignSender
from services.history import HistoryWriter, open_store, ship_outbox
from services.providers import bulk_queue_for, task_queue_for
from services.routing import ProviderDirectory
from services.sending import InstantSender
from services.templates import PinnedVersions
from workflows.campaign import CampaignWorkflow
from workflows.events import DigestWorkflow, EventWorkflow
from workflows.notification import NotificationWorkflow

WORKFLOWS = [NotificationWorkflow, CampaignWorkflow, EventWorkflow, DigestWorkflow]
# The sandbox still guards each run (no clock, randomness or I/O but Temporal's), but every
# module is imported once, outside it: by default it re-imports the workflow's module for
# every run, a cost per notification (docs/benchmarks.md). Our workflow modules hold no
# state of their own between runs, which is what passing them through requires.
WORKFLOW_RUNNER = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_all_modules())
logger = structlog.get_logger("marquee.worker")


def build_default_providers(settings: Settings, engine: AsyncEngine) -> dict[str, Provider]:
    """Each channel's provider when the admin has none stored for it: from environment."""
    smtp = {
        "host": settings.smtp_host,
        "port": settings.smtp_port,
        "username": settings.smtp_username,
        "use_tls": settings.smtp_use_tls,
        "start_tls": settings.smtp_start_tls,
        "timeout": settings.smtp_timeout_seconds,
        "pool_size": settings.smtp_pool_size,
        "sender": settings.mail_from,
        "message_id_domain": settings.message_id_domain,
        "throttle_seconds": settings.throttle_default_retry_seconds,
    }
    password = {"password": settings.smtp_password.get_secret_value()} if settings.smtp_password else {}
    try:
        email = build_provider(
            name="smtp", channel="email", kind="smtp", settings=smtp, secrets=password, engine=engine
        )
    except ProviderConfigError as err:  # checked like a stored provider: say which variable is wrong
        raise ValueError(f"MARQUEE_SMTP_* / MARQUEE_MAIL_FROM: {'; '.join(err.problems)}") from err
    providers: dict[str, Provider] = {"email": email}
    for channel, kind in (("push", settings.push_provider), ("sms", settings.sms_provider)):
        if kind != "sandbox":
            raise ValueError(
                f"MARQUEE_{channel.upper()}_PROVIDER={kind!r}: only 'sandbox' can be set by environment; "
                "add real providers in the admin or with PUT /v1/providers/{name}"
            )
        providers[channel] = SandboxProvider(engine, channel)
    return providers


@dataclass
class WorkerServices:
    engine: AsyncEngine
    history: HistoryWriter
    directory: ProviderDirectory
    settings: Settings
    templates: PinnedVersions = field(default_factory=PinnedVersions)

    def __post_init__(self) -> None:
        self.notifications = NotificationActivities(
            InstantSender(self.engine, self.directory, self.settings, self.templates)
        )
        self.campaigns = CampaignActivities(
            CampaignSender(
                self.engine,
                self.directory,
                self.history,
                self.settings,
                self.settings.campaign_send_concurrency,
                templates=self.templates,
            )
        )
        self.events = EventActivities(self.engine, self.settings)

    def activities(self) -> list[Callable[..., Any]]:
        notifications, campaigns, events = self.notifications, self.campaigns, self.events
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
            events.plan,
            events.dispatch,
            events.settle,
            events.send_digest,
        ]


@asynccontextmanager
async def worker_services(settings: Settings, engine: AsyncEngine | None = None) -> AsyncIterator[WorkerServices]:
    """Database, history store and providers for a worker; closed on exit."""
    own_engine = engine is None
    engine = engine or create_engine(_database_url(settings), settings.database_pool_size)
    instrument_engine(engine)  # when tracing is on
    store = open_store(settings.clickhouse_url, settings.chdb_path, settings.history_retention_days)
    await asyncio.to_thread(store.ensure_schema)
    history = HistoryWriter(store, settings.history_flush_seconds, settings.history_flush_rows)
    directory = ProviderDirectory(
        engine,
        build_default_providers(settings, engine),
        fernet_key=settings.fernet_key(),
        base_queue=settings.temporal_task_queue,
        build=lambda record: build_provider(
            name=record.name,
            channel=record.channel,
            kind=record.kind,
            settings=record.settings,
            secrets=record.secrets,
            engine=engine,
        ),
        breaker_threshold=settings.breaker_failure_threshold,
        breaker_cooldown=settings.breaker_cooldown_seconds,
    )
    try:
        yield WorkerServices(engine=engine, history=history, directory=directory, settings=settings)
    finally:
        await directory.close()
        await history.close()
        if own_engine:
            await engine.dispose()


class MarqueeWorker:
    """The worker of the main task queue, plus one worker per stored provider on that
    provider's task queue, with the provider's rate limit (enforced by the Temporal server
    across every worker) and concurrency. Provider edits are picked up every
    `provider_refresh_seconds`: changed providers get a new worker, removed ones lose theirs."""

    def __init__(self, client: Client, settings: Settings, services: WorkerServices) -> None:
        self._client = client
        self._settings = settings
        self._services = services
        self._main = Worker(
            client,
            task_queue=settings.temporal_task_queue,
            workflows=WORKFLOWS,
            activities=services.activities(),
            max_concurrent_activities=settings.worker_max_concurrent_activities,
            max_concurrent_workflow_tasks=settings.worker_max_concurrent_workflow_tasks,
            graceful_shutdown_timeout=timedelta(seconds=settings.worker_shutdown_seconds),
            # Eager activities would all run on the worker that runs the workflow, leaving the
            # other workers idle during a campaign (measured: docs/benchmarks.md).
            disable_eager_activity_execution=True,
            workflow_runner=WORKFLOW_RUNNER,
        )
        self._providers: dict[str, list[tuple[Worker, asyncio.Task[None]]]] = {}
        self._task: asyncio.Task[None] | None = None
        # The refresh loop and callers (tests, a provider edit) must not start one provider twice.
        self._refreshing = asyncio.Lock()
        self._stopping = False

    @property
    def is_running(self) -> bool:
        return self._main.is_running

    async def refresh_providers(self) -> None:
        async with self._refreshing:
            if not self._stopping:
                await self._refresh_providers()

    async def _refresh_providers(self) -> None:
        started, retired = await self._services.directory.refresh()
        for loaded in retired:
            await self._stop_provider(loaded.record.name)
            await loaded.provider.close()
        for loaded in started:
            record = loaded.record
            queue = task_queue_for(self._settings.temporal_task_queue, record.name)
            shutdown = timedelta(seconds=self._settings.worker_shutdown_seconds)
            workers = [
                Worker(
                    self._client,
                    task_queue=queue,
                    activities=[self._services.notifications.send],
                    max_concurrent_activities=record.max_concurrency,
                    max_task_queue_activities_per_second=record.rate_limit_per_second,
                    graceful_shutdown_timeout=shutdown,
                )
            ]
            if record.rate_limit_per_second:
                # Campaign batches of a one-channel campaign through this provider: started at
                # rate / batch size a second, each sending at the rate, so on average the
                # provider sees its rate however many workers and campaigns there are.
                workers.append(
                    Worker(
                        self._client,
                        task_queue=bulk_queue_for(queue),
                        activities=[self._services.campaigns.send_batch],
                        max_concurrent_activities=self._settings.campaign_window,
                        max_task_queue_activities_per_second=record.rate_limit_per_second
                        / self._settings.campaign_batch_size,
                        graceful_shutdown_timeout=shutdown,
                    )
                )
            self._providers[record.name] = [
                (worker, asyncio.create_task(worker.run(), name=f"provider-{record.name}")) for worker in workers
            ]
            logger.info("provider workers started", provider=record.name, rate=record.rate_limit_per_second)

    async def _stop_provider(self, name: str) -> None:
        for worker, task in self._providers.pop(name, []):
            await worker.shutdown()
            await asyncio.gather(task, return_exceptions=True)
            logger.info("provider worker stopped", provider=name, task_queue=worker.task_queue)

    async def _keep_providers_fresh(self) -> None:
        while True:
            await asyncio.sleep(self._settings.provider_refresh_seconds)
            try:
                await self.refresh_providers()
            except Exception:  # a database hiccup must not stop the worker; try again next round
                logger.exception("refreshing providers failed")

    async def _ship_history(self) -> None:
        """Status changes the API recorded (webhooks, opens, clicks) go on to ClickHouse."""
        while True:
            try:
                while await ship_outbox(self._services.engine, self._services.history) > 0:
                    pass
            except Exception:  # the rows stay queued; try again next round
                logger.exception("shipping history rows failed")
            await asyncio.sleep(self._settings.history_outbox_seconds)

    async def run(self) -> None:
        await self.refresh_providers()
        background = [
            asyncio.create_task(self._keep_providers_fresh(), name="provider-refresh"),
            asyncio.create_task(self._ship_history(), name="history-outbox"),
        ]
        try:
            await self._main.run()
        finally:
            for task in background:
                task.cancel()
            for name in list(self._providers):
                await self._stop_provider(name)

    async def readiness(self) -> health.Readiness:
        """What the health port's /readyz answers: the dependencies, and whether this worker polls."""
        settings = self._settings
        found = await health.readiness(
            self._services.engine,
            self._client,
            clickhouse_url=settings.clickhouse_url,
            history=self._services.history,
            within=settings.readiness_timeout_seconds,
        )
        polling = health.Check(health.UP if self.is_running else health.DOWN, "" if self.is_running else "not polling")
        return health.Readiness({**found.checks, "worker": polling})

    async def shutdown(self) -> None:
        """Every task queue stops polling at once (no provider worker is started after), then
        running activities share one grace period, MARQUEE_WORKER_SHUTDOWN_SECONDS; those still
        running then are cancelled, and Temporal retries them on another worker. A local send
        runs to its end (its own timeout): it is part of a workflow task, not handed back."""
        async with self._refreshing:
            self._stopping = True
        providers = [worker for pairs in self._providers.values() for worker, _ in pairs]
        await asyncio.gather(*(worker.shutdown() for worker in [self._main, *providers] if worker.is_running))

    async def __aenter__(self) -> MarqueeWorker:
        self._task = asyncio.create_task(self.run(), name="marquee-worker")
        while not self._main.is_running and not self._task.done():  # noqa: ASYNC110 - the SDK offers a flag only
            await asyncio.sleep(0.01)
        if self._task.done():
            await self._task  # raises what stopped it
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()
        if self._task is not None:
            await self._task


def create_worker(client: Client, settings: Settings, services: WorkerServices) -> MarqueeWorker:
    return MarqueeWorker(client, settings, services)


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
        probes = None
        if settings.worker_health_port is not None:
            # Up before the worker polls: orchestrators see it alive and, until it polls, not ready.
            probes = await serve_probes(settings.api_host, settings.worker_health_port, worker.readiness)
            logger.info("health port listening", host=settings.api_host,
                        port=probes.sockets[0].getsockname()[1])  # fmt: skip
        await asyncio.wait([running, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not running.done():
            logger.info("worker stopping")
            await worker.shutdown()
        try:
            await running
        finally:
            if probes is not None:
                probes.close()
