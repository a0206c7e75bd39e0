"""PII never reaches the logs: notifications by email and SMS through the real stack (API,
worker, SMTP, the SMS sandbox), one delivered and one refused by the mail server with a
reply quoting the address, while every logger writes JSON lines (MARQUEE_LOG_FORMAT=json,
at DEBUG, so more than production shows) into a buffer. No line holds an address, a phone
number, the person's name, or a title or body. (tests/e2e/test_logging.py does the same
across real processes at INFO; this one adds names, a failure's path and DEBUG lines.)"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import httpx
import structlog
from temporalio.runtime import Runtime

from core import logging as marquee_logging
from core.config import Settings
from tests.stack import SmtpServer, wait_for_status


@contextmanager
def json_logs(settings: Settings) -> Iterator[io.StringIO]:
    """This process's logging as `marquee` configures it for JSON, written to a buffer;
    the session's logging is put back after."""
    root = logging.getLogger()
    saved_handlers, saved_level, saved_structlog = root.handlers[:], root.level, structlog.get_config()
    buffer = io.StringIO()
    # The session's Temporal runtime stays (configure_logging would install a new default).
    with mock.patch.object(Runtime, "set_default"):
        marquee_logging.configure_logging(
            settings.model_copy(update={"log_format": "json", "log_level": "DEBUG", "sentry_dsn": None})
        )
    [handler] = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    try:
        yield buffer
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        structlog.configure(**saved_structlog)


async def test_sends_and_failures_log_no_address_name_or_content(
    api: httpx.AsyncClient, settings: Settings, smtp_server: SmtpServer
) -> None:
    def person() -> dict[str, Any]:
        tag = uuid.uuid4().hex[:8]
        phone = f"+1555{uuid.uuid4().int % 10**7:07d}"
        return {"user_id": f"pii-{uuid.uuid4().hex[:10]}", "email": f"ada.{tag}@example.com", "phone": phone,
                "name": f"Ada Lovelace-{tag}", "locale": "en"}  # fmt: skip

    delivered, refused = person(), person()
    smtp_server.handler.refuse[refused["email"]] = f"550 5.1.1 <{refused['email']}>: Recipient address rejected"
    secrets: list[str] = []
    with json_logs(settings) as buffer:
        for someone, outcome in ((delivered, "sent"), (refused, "failed")):
            assert (await api.post("/v1/recipients", json=someone)).status_code == 200
            title = f"Tickets for {someone['name']}"
            body = f"Dear {someone['name']}, row 7 seat {uuid.uuid4().hex[:6]} is yours"
            request = {"user_id": someone["user_id"], "type": "booking", "channels": ["email", "sms"],
                       "title": title, "body": body}  # fmt: skip
            response = await api.post("/v1/notifications", json=request)
            assert response.status_code == 202, response.text
            # The refused email fails for good; its SMS still goes, so the summary is "sent".
            await wait_for_status(api, response.json()["id"], "sent", "failed")
            if outcome == "failed":
                channels = (await api.get(f"/v1/notifications/{response.json()['id']}")).json()["channels"]
                assert {c["channel"]: c["status"] for c in channels}["email"] == "failed", channels
            secrets += [someone["email"], someone["phone"], someone["name"], title, body]
    smtp_server.handler.refuse.pop(refused["email"])
    assert smtp_server.handler.to(delivered["email"])  # it did go out

    output = buffer.getvalue()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    messages = {line["message"] for line in lines}
    assert {"notification accepted", "notification sent"} <= messages, messages  # the sends were logged
    leaks = [(secret, line) for secret in secrets for line in output.splitlines() if secret in line]
    assert leaks == [], leaks
    # Nor their parts: the local part of an address, the phone without its "+".
    for email, phone in ((delivered["email"], delivered["phone"]), (refused["email"], refused["phone"])):
        assert email.split("@")[0] not in output
        assert phone[1:] not in output
