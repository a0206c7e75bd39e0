"""Transient failures are retried until they pass; permanent ones fail once, with a dead letter."""

from __future__ import annotations

import asyncio
import subprocess
import threading

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from core.config import Settings
from core.queries import dead_letters
from entrypoints.embedded import venv_binary
from tests.stack import SmtpServer, wait_for_status


def _email(user_id: str, title: str = "Hello") -> dict[str, object]:
    return {"user_id": user_id, "type": "account", "channels": ["email"], "title": title, "body": "Body"}


async def _dead_letters(engine: AsyncEngine, notification_id: str) -> list[sa.Row]:
    async with engine.connect() as conn:
        query = sa.select(dead_letters).where(dead_letters.c.notification_id == notification_id)
        return list((await conn.execute(query)).all())


async def test_smtp_down_then_back_is_retried_and_sent_once(
    api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer
) -> None:
    smtp_server.stop()
    try:
        accepted = (await api.post("/v1/notifications", json=_email(recipient["user_id"]))).json()
        # Wait until at least one attempt failed against the closed port.
        for _ in range(100):
            channel = (await api.get(f"/v1/notifications/{accepted['id']}")).json()["channels"]
            if channel and channel[0]["error"]:
                break
            await asyncio.sleep(0.05)
        assert "SMTP connection failed" in channel[0]["error"]
        assert channel[0]["status"] == "pending"
    finally:
        smtp_server.start()

    done = await wait_for_status(api, accepted["id"], "sent")
    assert done["channels"][0]["attempts"] >= 2
    assert done["channels"][0]["error"] is None
    assert len(smtp_server.handler.to(recipient["email"])) == 1


async def test_permanent_rejection_fails_at_once_with_a_dead_letter(
    api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer, engine: AsyncEngine
) -> None:
    smtp_server.handler.refuse[recipient["email"]] = "550 5.1.1 No such user here"
    response = await api.post("/v1/notifications?wait=true", json=_email(recipient["user_id"]))
    body = response.json()
    assert body["status"] == "failed"
    [channel] = body["channels"]
    assert channel["attempts"] == 1  # no retry storm on a 5xx
    assert "550" in channel["error"]
    assert channel["failed_at"] is not None

    [letter] = await _dead_letters(engine, body["id"])
    assert letter.reason == "rejected by provider"
    assert "No such user" in letter.last_error
    assert letter.attempts == 1
    assert letter.request["title"] == "Hello"
    assert smtp_server.handler.to(recipient["email"]) == []


async def test_transient_errors_until_attempts_run_out_end_failed(
    api: httpx.AsyncClient, api_url: str, recipient: dict, smtp_server: SmtpServer, engine: AsyncEngine
) -> None:
    smtp_server.handler.refuse[recipient["email"]] = "450 4.2.1 Mailbox busy"
    response = await api.post("/v1/notifications?wait=true", json=_email(recipient["user_id"]))
    body = response.json()
    assert body["status"] == "failed"
    [channel] = body["channels"]
    assert channel["attempts"] == 6  # settings.send_retry_max_attempts in conftest
    assert "450" in channel["error"]
    [letter] = await _dead_letters(engine, body["id"])
    assert letter.reason == "retries exhausted"


async def test_cancel_through_the_api_leaves_the_channel_cancelled(
    api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer
) -> None:
    smtp_server.handler.refuse[recipient["email"]] = "421 4.3.2 Service shutting down"
    accepted = (await api.post("/v1/notifications", json=_email(recipient["user_id"]))).json()
    response = await api.post(f"/v1/notifications/{accepted['id']}/cancel", json={"reason": "sent by mistake"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "cancelled"
    assert body["channels"][0]["status"] == "cancelled"

    again = await api.post(f"/v1/notifications/{accepted['id']}/cancel", json={"reason": "sent by mistake"})
    assert again.status_code == 409
    assert again.json()["detail"] == "notification is already cancelled"


async def test_cancel_with_the_temporal_cli(
    api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer, temporal_client: object, settings: Settings
) -> None:
    smtp_server.handler.refuse[recipient["email"]] = "421 4.3.2 Service shutting down"
    accepted = (await api.post("/v1/notifications", json=_email(recipient["user_id"]))).json()
    address = temporal_client.service_client.config.target_host  # type: ignore[attr-defined]
    result = await asyncio.to_thread(
        subprocess.run,
        [str(venv_binary("temporal")), "workflow", "cancel", "--workflow-id", accepted["workflow_id"],
         "--address", address],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = await wait_for_status(api, accepted["id"], "cancelled")
    assert body["channels"][0]["status"] == "cancelled"


async def test_a_cancel_does_not_cut_off_an_attempt_under_way_and_what_went_out_is_recorded_sent(
    api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer
) -> None:
    address = recipient["email"]
    smtp_server.handler.hold[address] = released = threading.Event()
    try:
        accepted = (await api.post("/v1/notifications", json=_email(recipient["user_id"]))).json()
        for _ in range(200):  # until the attempt is talking to the SMTP server
            [channel] = (await api.get(f"/v1/notifications/{accepted['id']}")).json()["channels"] or [{}]
            if channel.get("attempts"):
                break
            await asyncio.sleep(0.05)
        cancelling = asyncio.create_task(
            api.post(f"/v1/notifications/{accepted['id']}/cancel", json={"reason": "test"})
        )
        await asyncio.sleep(0.5)
        assert not cancelling.done(), "the cancel waits for the attempt under way"
    finally:
        released.set()
    cancelled = await cancelling
    assert cancelled.status_code == 200, cancelled.text
    del smtp_server.handler.hold[address]
    done = await wait_for_status(api, accepted["id"], "sent")  # the message did go out, and says so
    assert done["channels"][0]["provider_message_id"]
    assert len(smtp_server.handler.to(address)) == 1
