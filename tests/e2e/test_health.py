"""Health and readiness, as an orchestrator sees them: `marquee worker --health-port` and a
standalone `marquee api`, each a process of its own on a Temporal dev server of this test's
own, which the test stops to see readiness fail. The API's ClickHouse is a closed port: it
starts anyway, reports ClickHouse down and answers analytics with 503. The worker's health
port also serves its own /metrics (its sends), and MARQUEE_TEMPORAL_METRICS_ADDRESS the
Temporal SDK's, whose names the docs/ops files use."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from temporalio.testing import WorkflowEnvironment

from core.auth import Role
from core.config import Settings
from entrypoints.embedded import free_port, venv_binary
from tests.stack import SmtpServer, token_for
from tests.unit.test_ops_docs import exported, names_used

MARQUEE = Path(sys.executable).parent / "marquee"


def sample(exposition: str, name: str, **labels: str) -> float:
    """The value of one series in a scrape (0 when absent)."""
    for family in text_string_to_metric_families(exposition):
        for found in family.samples:
            if found.name == name and all(found.labels.get(key) == value for key, value in labels.items()):
                return float(found.value)
    return 0.0


async def until(client: httpx.AsyncClient, url: str, status: int, seconds: float = 40) -> httpx.Response:
    """GET `url` until it answers `status` (connection refused while the process starts)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            response = await client.get(url)
            if response.status_code == status:
                return response
        except httpx.TransportError:
            response = None
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{url} never answered {status}: {response and response.text}")
        await asyncio.sleep(0.2)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.terminate()
    for process in started:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class OwnTemporal:
    """A Temporal dev server for one test, which the test may stop."""

    def __init__(self, env: WorkflowEnvironment) -> None:
        self.env = env
        self.address = env.client.service_client.config.target_host
        self.running = True

    async def stop(self) -> None:
        if self.running:
            self.running = False
            await self.env.shutdown()


@pytest.fixture
async def own_temporal() -> AsyncIterator[OwnTemporal]:
    server = OwnTemporal(await WorkflowEnvironment.start_local(dev_server_existing_path=str(venv_binary("temporal"))))
    yield server
    await server.stop()


async def test_readiness_follows_the_dependencies(
    settings: Settings,
    smtp_server: SmtpServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    own_temporal: OwnTemporal,
) -> None:
    health_port, sdk_port, api_port, closed_port = free_port(), free_port(), free_port(), free_port()
    assert settings.database_url
    assert settings.jwt_secret
    common = {key: value for key, value in os.environ.items() if not key.startswith("MARQUEE_")} | {
        "MARQUEE_DATABASE_URL": settings.database_url,
        "MARQUEE_TEMPORAL_ADDRESS": own_temporal.address,
        "MARQUEE_TEMPORAL_TASK_QUEUE": f"health-{uuid.uuid4().hex[:8]}",
        "MARQUEE_JWT_SECRET": settings.jwt_secret.get_secret_value(),
        "MARQUEE_SMTP_HOST": "127.0.0.1",
        "MARQUEE_SMTP_PORT": str(smtp_server.port),
        "MARQUEE_READINESS_TIMEOUT_SECONDS": "1",
    }
    roles = {
        "worker": ["worker", "--health-port", str(health_port)],
        "api": ["api", "--port", str(api_port)],
    }
    extra = {
        "worker": {"MARQUEE_TEMPORAL_METRICS_ADDRESS": f"127.0.0.1:{sdk_port}"},
        "api": {"MARQUEE_CLICKHOUSE_URL": f"http://default:secret@127.0.0.1:{closed_port}/marquee"},
    }
    for role, args in roles.items():
        data_dir = tmp_path / role
        data_dir.mkdir()
        env = common | extra[role] | {"MARQUEE_DATA_DIR": str(data_dir)}
        log = (tmp_path / f"{role}.log").open("wb")
        # From its own directory: Settings also reads ./.env.
        processes.append(subprocess.Popen([str(MARQUEE), *args], env=env, cwd=data_dir, stdout=log, stderr=log))  # noqa: ASYNC220 - started once, not awaited

    worker_url, api_url = f"http://127.0.0.1:{health_port}", f"http://127.0.0.1:{api_port}"
    headers = {"Authorization": f"Bearer {token_for(settings, Role.admin)}"}
    async with httpx.AsyncClient(timeout=10, headers=headers, trust_env=False) as http:
        try:
            ready = (await until(http, f"{worker_url}/readyz", 200)).json()
            await until(http, f"{api_url}/healthz", 200)
        except AssertionError:
            for role in roles:
                print(role, (tmp_path / f"{role}.log").read_text()[-3000:])
            raise
        assert ready["status"] == "ready"
        assert {name: check["status"] for name, check in ready["checks"].items()} == {
            "postgresql": "up", "temporal": "up", "clickhouse": "up", "worker": "up",
        }  # fmt: skip
        assert (await http.get(f"{worker_url}/healthz")).json() == {"status": "ok"}

        # The API started although its ClickHouse does not answer: not ready, saying why.
        api_ready = await http.get(f"{api_url}/readyz")
        assert api_ready.status_code == 503
        checks = api_ready.json()["checks"]
        assert (checks["postgresql"]["status"], checks["temporal"]["status"]) == ("up", "up")
        assert checks["clickhouse"]["status"] == "down"
        assert "secret" not in api_ready.text
        analytics = await http.get(f"{api_url}/v1/analytics/counts")
        assert analytics.status_code == 503, analytics.text
        assert "secret" not in analytics.text

        # A send through the API process, made by the worker process: counted on its port.
        user = f"health-{uuid.uuid4().hex[:8]}"
        created = await http.post(f"{api_url}/v1/recipients", json={"user_id": user, "email": f"{user}@example.com"})
        assert created.status_code == 200, created.text
        body = {"user_id": user, "channels": ["email"], "title": "Ready", "body": "Checked.", "type": "health"}
        accepted = await http.post(f"{api_url}/v1/notifications", json=body)
        assert accepted.status_code == 202, accepted.text
        deadline = asyncio.get_running_loop().time() + 30
        while (await http.get(f"{api_url}/v1/notifications/{accepted.json()['id']}")).json()["status"] != "sent":
            assert asyncio.get_running_loop().time() < deadline, "the worker process did not send"
            await asyncio.sleep(0.2)
        scraped = (await http.get(f"{worker_url}/metrics")).text
        assert sample(scraped, "marquee_notifications_sent_total", channel="email", provider="smtp", kind="instant")
        assert sample(scraped, "marquee_provider_send_seconds_count", provider="smtp", outcome="ok")

        # The Temporal SDK's own metrics, with every temporal_* name the dashboard uses.
        sdk = (await http.get(f"http://127.0.0.1:{sdk_port}/metrics")).text
        used = {name for name in names_used() if name.startswith("temporal_")}
        assert used
        assert used - exported(sdk) == set()

        # Temporal goes away: neither process is ready, each saying Temporal is down, in time.
        await own_temporal.stop()
        for url in (worker_url, api_url):
            started = asyncio.get_running_loop().time()
            response = await until(http, f"{url}/readyz", 503, seconds=20)
            assert asyncio.get_running_loop().time() - started < 20
            assert response.json()["checks"]["temporal"]["status"] == "down", response.text
            assert response.json()["checks"]["postgresql"]["status"] == "up"
        assert (await http.get(f"{worker_url}/healthz")).status_code == 200  # alive, only not ready
