"""One idempotency key is one notification and one message, however often it is sent."""

from __future__ import annotations

import asyncio
import uuid

import httpx

from core.auth import Role
from tests.stack import SmtpServer, token_for, wait_for_status


def _request(user_id: str, **extra: object) -> dict[str, object]:
    return {"user_id": user_id, "type": "password_reset", "channels": ["email"], "title": "Reset", "body": "Code 1234"}


async def test_ten_concurrent_requests_with_one_key_send_one_email(
    api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer
) -> None:
    key = f"reset-{uuid.uuid4()}"
    body = _request(recipient["user_id"])
    responses = await asyncio.gather(
        *(api.post("/v1/notifications", json=body, headers={"Idempotency-Key": key}) for _ in range(10))
    )
    assert {response.status_code for response in responses} == {202}
    ids = {response.json()["id"] for response in responses}
    assert len(ids) == 1
    replays = [response for response in responses if response.headers.get("Idempotent-Replayed") == "true"]
    assert len(replays) == 9

    await wait_for_status(api, ids.pop(), "sent")
    await asyncio.sleep(0.5)  # give a (wrong) second workflow time to deliver
    assert len(smtp_server.handler.to(recipient["email"])) == 1


async def test_key_after_completion_returns_the_same_notification(
    api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer
) -> None:
    body = {**_request(recipient["user_id"]), "idempotency_key": f"k-{uuid.uuid4()}"}
    first = await api.post("/v1/notifications?wait=true", json=body)
    assert first.json()["status"] == "sent"
    again = await api.post("/v1/notifications?wait=true", json=body)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(smtp_server.handler.to(recipient["email"])) == 1


async def test_same_key_with_a_different_request_is_a_conflict(api: httpx.AsyncClient, recipient: dict) -> None:
    key = f"k-{uuid.uuid4()}"
    body = _request(recipient["user_id"])
    assert (await api.post("/v1/notifications", json=body, headers={"Idempotency-Key": key})).status_code == 202
    changed = {**body, "body": "Code 9999"}
    response = await api.post("/v1/notifications", json=changed, headers={"Idempotency-Key": key})
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Idempotency key reused"


async def test_keys_are_scoped_to_the_caller(
    api: httpx.AsyncClient, api_url: str, settings: object, recipient: dict
) -> None:
    key = f"k-{uuid.uuid4()}"
    body = _request(recipient["user_id"])
    mine = await api.post("/v1/notifications", json=body, headers={"Idempotency-Key": key})
    other_token = token_for(settings, Role.service, subject="billing-service")  # type: ignore[arg-type]
    async with httpx.AsyncClient(base_url=api_url, headers={"Authorization": f"Bearer {other_token}"}) as other:
        theirs = await other.post("/v1/notifications", json=body, headers={"Idempotency-Key": key})
    assert theirs.status_code == 202
    assert theirs.json()["id"] != mine.json()["id"]


async def test_a_replay_is_answered_even_after_the_recipient_is_gone(api: httpx.AsyncClient, recipient: dict) -> None:
    body = {**_request(recipient["user_id"]), "idempotency_key": f"k-{uuid.uuid4()}"}
    first = await api.post("/v1/notifications?wait=true", json=body)
    assert (
        await api.delete(f"/v1/recipients/{recipient['user_id']}", params={"reason": "account closed"})
    ).status_code == 204
    again = await api.post("/v1/notifications", json=body)
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    fresh = await api.post("/v1/notifications", json={**body, "idempotency_key": f"k-{uuid.uuid4()}"})
    assert fresh.status_code == 422  # a new notification is still checked
