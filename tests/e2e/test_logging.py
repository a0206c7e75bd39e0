"""Logs: a real send through `marquee api` and `marquee worker` with MARQUEE_LOG_FORMAT=json.
Every line on stdout is an ECS document (uvicorn's and the Temporal SDK's too), the lines
about the notification carry its id and workflow id, and none carries the recipient's
address, number or push token, or the message's title or body."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client

from core.auth import Role
from core.config import Settings
from tests.e2e.processes import marquee_env, marquee_processes
from tests.stack import SmtpServer, token_for, wait_for_status


async def test_a_send_logs_ecs_json_with_its_ids_and_no_personal_data(
    settings: Settings, temporal_client: Client, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    env = marquee_env(settings, temporal_client, tmp_path, MARQUEE_LOG_FORMAT="json")
    async with marquee_processes(env, tmp_path, "api", "worker") as (api, worker):
        await api.wait_for_api()
        await worker.wait_for("worker started")
        user = f"user-{uuid.uuid4().hex[:10]}"
        email, phone, token = f"{user}@example.com", f"+1555{uuid.uuid4().int % 10**7:07d}", f"push-{uuid.uuid4().hex}"
        person = {"user_id": user, "email": email, "phone": phone, "push_tokens": [token], "locale": "en"}
        content = {"title": f"Secret title {uuid.uuid4().hex[:8]}", "body": f"Private body {uuid.uuid4().hex[:8]}"}
        headers = {"Authorization": f"Bearer {token_for(settings, Role.service)}"}
        async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=30) as client:
            assert (await client.post("/v1/recipients", json=person)).status_code == 200
            request = {"user_id": user, "type": "news", "channels": ["email", "sms", "push"], **content}
            response = await client.post("/v1/notifications", json=request)
            assert response.status_code == 202, response.text
            notification_id = response.json()["id"]
            await wait_for_status(client, notification_id, "sent")
        assert smtp_server.handler.to(email)  # it did go out
    output = api.output() + worker.output()

    documents = []
    for line in output.splitlines():
        try:
            documents.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line on stdout: {line!r}")
    for document in documents:
        assert {"@timestamp", "log.level", "message", "log"} <= document.keys(), document
        assert document["log"]["logger"]
    loggers = {document["log"]["logger"] for document in documents}
    assert "uvicorn.error" in loggers, loggers  # uvicorn's own lines, same format

    mine = [document for document in documents if document.get("labels", {}).get("notification_id") == notification_id]
    messages = {document["message"] for document in mine}
    assert {"notification accepted", "notification prepared", "notification sent"} <= messages, messages
    sent = [document for document in mine if document["message"] == "notification sent"]
    assert {document["channel"] for document in sent} == {"email", "sms", "push"}
    for document in sent:  # bound in the activity: the workflow it runs for
        assert document["labels"]["workflow_id"] == f"notification-{notification_id}"

    for secret in (email, phone, token, content["title"], content["body"]):
        assert secret not in output, f"{secret!r} was logged"
    assert email not in api.stderr.read_text() + worker.stderr.read_text()
