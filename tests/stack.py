"""The real stack for e2e and browser tests: PostgreSQL, the Temporal dev server, chDB, aiosmtpd.

One of each per test session, started lazily by the first test that asks for it (unit and
workflow tests ask for none); tests isolate themselves by unique user ids and keys.
Registered as a plugin by tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from core.auth import Role, create_token
from core.config import Settings
from core.db import create_engine
from core.migrate import upgrade_async
from entrypoints.embedded import EmbeddedPostgres, MailCapture, free_port, venv_binary
from services.providers import delete_provider, save_provider
from worker import MarqueeWorker, WorkerServices, create_worker, worker_services


class ScriptedSmtp(MailCapture):
    """A capture SMTP server that can refuse recipients with a chosen reply."""

    def __init__(self) -> None:
        super().__init__(None)
        self.refuse: dict[str, str] = {}  # address -> SMTP reply, e.g. "550 5.1.1 No such user"
        self.hold: dict[str, threading.Event] = {}  # address -> RCPT waits until it is set

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.hold:  # (this runs on the SMTP server's own thread and loop)
            await asyncio.to_thread(self.hold[address].wait, 30)
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    def to(self, address: str) -> list:
        """Parsed messages whose envelope went to `address` (only those are parsed)."""
        return [message_from_bytes(raw, policy=default_policy) for _, raw in self.delivered_to({address})]

    def delivered_to(self, addresses: set[str]) -> list[tuple[str, bytes]]:
        """(recipient, raw message) for every message to one of `addresses`, unparsed (fast)."""
        return [
            (rcpt, content) for envelope, content in self.messages for rcpt in envelope.rcpt_tos if rcpt in addresses
        ]


class SmtpServer:
    """The test's SMTP server: can be stopped and started on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.handler = ScriptedSmtp()
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


async def _server_url() -> tuple[str, EmbeddedPostgres | None]:
    """The machine's PostgreSQL when it answers (or MARQUEE_TEST_DATABASE_URL), else embedded."""
    explicit = os.environ.get("MARQUEE_TEST_DATABASE_URL")
    if explicit:
        return explicit.rstrip("/"), None
    try:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres", timeout=2)
        await conn.close()
        return "postgresql://postgres@127.0.0.1:5432", None
    except (OSError, asyncpg.PostgresError):
        pgdata = Path(os.environ.get("TMPDIR", "/tmp")) / f"marquee-pg-{uuid.uuid4().hex[:8]}"
        embedded = EmbeddedPostgres(pgdata, free_port())
        return await asyncio.to_thread(embedded.start), embedded


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    server_url, embedded = await _server_url()
    name = f"marquee_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(f"{server_url}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{server_url}/{name}"
    await upgrade_async(url)
    yield url
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()
    if embedded is not None:
        await asyncio.to_thread(embedded.stop)


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory, database_url: str, smtp_server: SmtpServer) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=tmp_path_factory.mktemp("data"),
        database_url=database_url,
        temporal_task_queue=f"marquee-test-{uuid.uuid4().hex[:8]}",
        jwt_secret=secrets.token_urlsafe(32),
        smtp_host="127.0.0.1",
        smtp_port=smtp_server.port,
        smtp_timeout_seconds=2.0,
        send_retry_initial_seconds=0.2,
        send_retry_max_seconds=1.0,
        send_retry_max_attempts=6,
        send_timeout_seconds=5.0,
        history_flush_seconds=0.05,
        history_outbox_seconds=0.2,
        campaign_batch_size=100,
        campaign_window=4,
        campaign_send_concurrency=10,
        dev_tools=True,
        wait_timeout_seconds=20.0,
        # The worker writes tracking and unsubscribe links to the API the tests serve.
        api_port=(api_port := free_port()),
        public_url=f"http://127.0.0.1:{api_port}",
        # Provider edits reach the worker fast, and circuits open and recover within a test.
        provider_refresh_seconds=0.3,
        breaker_failure_threshold=3,
        breaker_cooldown_seconds=2.0,
        throttle_default_retry_seconds=0.3,
    )


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter, dev_server_existing_path=str(venv_binary("temporal"))
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def temporal_client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture(scope="session")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    assert settings.database_url
    engine = create_engine(settings.database_url)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
async def services(settings: Settings, engine: AsyncEngine) -> AsyncIterator[WorkerServices]:
    async with worker_services(settings, engine) as services:
        yield services


@pytest.fixture(scope="session")
async def worker(temporal_client: Client, settings: Settings, services: WorkerServices) -> AsyncIterator[MarqueeWorker]:
    global _session_worker
    worker = create_worker(temporal_client, settings, services)
    async with worker:
        _session_worker = worker
        yield worker
        _session_worker = None


_session_worker: MarqueeWorker | None = None


async def settle_providers() -> None:
    """Once a test stored, edited or deleted providers (through the API, the admin or
    `stored`), the session worker sees the result before the next test sends: otherwise a
    send could race the periodic refresh and meet a provider that is no longer there."""
    if _session_worker is not None:
        await _session_worker.refresh_providers()


@pytest.fixture
async def stored(engine: AsyncEngine, settings: Settings, worker: MarqueeWorker) -> AsyncIterator[Callable[..., Any]]:
    """Store providers for one test; the session worker sees them at once, and they are gone
    after (a channel with stored providers, even disabled ones, no longer uses the sandbox;
    `_providers_settled` refreshes the worker once they are)."""
    names: list[str] = []

    async def store(**values: Any) -> None:
        async with engine.begin() as conn:
            await save_provider(conn, settings.fernet_key(), values)
        names.append(values["name"])
        await worker.refresh_providers()

    yield store
    async with engine.begin() as conn:
        for name in names:
            await delete_provider(conn, name)


@pytest.fixture(scope="session")
async def api_url(
    settings: Settings, engine: AsyncEngine, temporal_client: Client, worker: MarqueeWorker, services: WorkerServices
) -> AsyncIterator[str]:
    """The API served by uvicorn on a real port, as clients reach it (analytics reads the
    worker's history store: one process, as in `marquee dev`)."""
    port = settings.api_port
    app = create_app(settings, engine=engine, temporal=temporal_client, history=services.history)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn only offers a flag
        await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


@pytest.fixture(scope="session")
def app_settings(api_url: str, settings: Settings) -> Settings:
    return settings


def token_for(settings: Settings, role: Role, subject: str | None = None) -> str:
    assert settings.jwt_secret is not None
    return create_token(settings.jwt_secret.get_secret_value(), subject or f"test-{role.value}", role, 3600)


@pytest.fixture
async def api(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client authenticated as a service."""
    headers = {"Authorization": f"Bearer {token_for(settings, Role.service)}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30) as client:
        yield client


@pytest.fixture
def user_id() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def recipient(api: httpx.AsyncClient, user_id: str) -> dict:
    response = await api.post(
        "/v1/recipients",
        json={
            "user_id": user_id,
            "email": f"{user_id}@example.com",
            "phone": f"+1555{int(uuid.uuid4()) % 10**7:07d}",  # unique: tests find their own SMS by it
            "push_tokens": [f"token-{user_id}"],
            "locale": "en",
            "timezone": "Europe/Moscow",
            "country": "RU",
        },
    )
    assert response.status_code == 200, response.text
    return response.json()


async def wait_for_status(api: httpx.AsyncClient, notification_id: str, *statuses: str, seconds: float = 20) -> dict:
    """Poll the API until the notification reaches one of `statuses`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        body = (await api.get(f"/v1/notifications/{notification_id}")).json()
        if body["status"] in statuses:
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"status stayed {body['status']!r}, wanted {statuses}: {body}")
        await asyncio.sleep(0.1)
