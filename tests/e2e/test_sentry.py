"""Sentry: `marquee worker` and `marquee api` with MARQUEE_SENTRY_DSN pointing at an ingest
endpoint of the test's own. Each runs in its own process, so Sentry's global client never
touches this test session. A send the SMTP server refuses for good arrives as an event
tagged with the notification id, the workflow id and the trace id, and
an API exception as one too; neither carries the recipient's address, title, body or token."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import httpx
from temporalio.client import Client

from core.auth import Role
from core.config import Settings
from tests.e2e.processes import SentryReceiver, marquee_env, marquee_processes
from tests.stack import SmtpServer, token_for, wait_for_status


async def test_a_failed_send_is_reported_with_its_ids_and_without_the_address(
    settings: Settings, temporal_client: Client, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    with SentryReceiver() as sentry:
        port = sentry.dsn.rsplit(":", 1)[1].split("/")[0]
        env = marquee_env(settings, temporal_client, tmp_path, MARQUEE_SENTRY_DSN=sentry.dsn,
                          OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}")  # fmt: skip
        user = f"user-{uuid.uuid4().hex[:10]}"
        email = f"{user}@example.com"
        # The refusal quotes the address, as real servers do: the event must not.
        smtp_server.handler.refuse[email] = f"550 5.1.1 <{email}>: Recipient address rejected"
        title, body = f"Secret title {uuid.uuid4().hex[:8]}", f"Private body {uuid.uuid4().hex[:8]}"
        async with marquee_processes(env, tmp_path, "api", "worker") as (api, worker):
            await api.wait_for_api()
            await worker.wait_for("worker started")
            headers = {"Authorization": f"Bearer {token_for(settings, Role.service)}"}
            async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=30) as client:
                assert (await client.post("/v1/recipients", json={"user_id": user, "email": email})).status_code == 200
                request = {"user_id": user, "type": "news", "channels": ["email"], "title": title, "body": body}
                response = await client.post("/v1/notifications", json=request)
                assert response.status_code == 202, response.text
                notification_id = response.json()["id"]
                await wait_for_status(client, notification_id, "failed")
            event = await sentry.wait_for_event(notification_id=notification_id)

    tags = dict(event["tags"])
    assert tags["workflow_id"] == f"notification-{notification_id}"
    assert tags["temporal.activity"] == "send_notification"
    assert re.fullmatch(r"[0-9a-f]{32}", tags["trace_id"])  # the process traces: an OTLP endpoint is set
    [exception] = [value for value in event["exception"]["values"] if value["type"] == "ApplicationError"]
    assert "550" in exception["value"]
    received = b"".join(sentry.raw).decode(errors="replace")
    for secret in (email, title, body, settings.jwt_secret.get_secret_value() if settings.jwt_secret else ""):
        assert secret not in received, f"{secret!r} was sent to Sentry"
    smtp_server.handler.refuse.pop(email)


async def test_an_api_exception_is_reported_without_the_request_body(
    settings: Settings, temporal_client: Client, tmp_path: Path
) -> None:
    assert settings.database_url is not None
    missing = settings.database_url.rsplit("/", 1)[0] + f"/marquee_missing_{uuid.uuid4().hex[:8]}"
    with SentryReceiver() as sentry:
        # No such database: every query raises, which nothing in the API turns into a reply.
        env = marquee_env(settings, temporal_client, tmp_path, MARQUEE_SENTRY_DSN=sentry.dsn,
                          MARQUEE_DATABASE_URL=missing)  # fmt: skip
        email = f"api-{uuid.uuid4().hex[:8]}@example.com"
        token = token_for(settings, Role.service)
        async with marquee_processes(env, tmp_path, "api") as (api,):
            await api.wait_for_api()
            async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {token}"}) as client:
                response = await client.post("/v1/recipients", json={"user_id": "someone", "email": email})
            assert response.status_code == 500
            event = await sentry.wait_for_event()

    assert event["exception"]["values"], event
    assert event["request"]["url"].endswith("/v1/recipients")
    received = b"".join(sentry.raw).decode(errors="replace")
    assert email not in received
    assert token not in received
