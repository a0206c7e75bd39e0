"""Bad input and auth failures: a problem+json naming the fault, and nothing written."""

from __future__ import annotations

import uuid

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from core.auth import Role, create_token
from core.config import Settings
from core.queries import notifications, recipients
from tests.stack import token_for

PROBLEM = "application/problem+json"


async def _count(engine: AsyncEngine, table: sa.Table) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


def _problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    assert body["title"]
    return body


def _fields(body: dict) -> list[str]:
    return [error["field"] for error in body["errors"]]


@pytest.mark.parametrize(
    ("change", "field", "message_part"),
    [
        ({"channels": ["fax"]}, "channels.0", "'email', 'push' or 'sms'"),
        ({"channels": []}, "channels", "at least 1"),
        ({"channels": ["sms", "sms"]}, "channels", "each channel may appear once"),
        ({"type": "Not A Category!"}, "type", "pattern"),
        ({"title": ""}, "title", "at least 1"),
        ({"unknown": 1}, "unknown", "Extra inputs"),
        ({"user_id": None}, "user_id", "valid string"),
    ],
)
async def test_invalid_notification_names_the_field(
    api: httpx.AsyncClient, engine: AsyncEngine, recipient: dict, change: dict, field: str, message_part: str
) -> None:
    before = await _count(engine, notifications)
    body = {"user_id": recipient["user_id"], "type": "promo", "channels": ["sms"], "title": "T", "body": "B", **change}
    problem = _problem(await api.post("/v1/notifications", json=body), 422)
    assert field in _fields(problem)
    assert message_part in problem["detail"]
    assert await _count(engine, notifications) == before


async def test_unknown_recipient_and_missing_contact_are_refused(
    api: httpx.AsyncClient, engine: AsyncEngine, user_id: str
) -> None:
    before = await _count(engine, notifications)
    body = {"user_id": user_id, "type": "promo", "channels": ["email"], "title": "T", "body": "B"}
    problem = _problem(await api.post("/v1/notifications", json=body), 422)
    assert _fields(problem) == ["user_id"]

    assert (await api.post("/v1/recipients", json={"user_id": user_id, "email": "a@example.com"})).status_code == 200
    problem = _problem(await api.post("/v1/notifications", json={**body, "channels": ["email", "sms"]}), 422)
    assert _fields(problem) == ["channels.1"]
    assert "no phone" in problem["detail"]
    assert await _count(engine, notifications) == before


async def test_header_and_body_keys_must_agree(api: httpx.AsyncClient, recipient: dict) -> None:
    body = {"user_id": recipient["user_id"], "type": "promo", "channels": ["sms"], "title": "T", "body": "B"}
    response = await api.post(
        "/v1/notifications", json={**body, "idempotency_key": "a"}, headers={"Idempotency-Key": "b"}
    )
    assert _fields(_problem(response, 422)) == ["idempotency_key"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"email": "not-an-email"}, "email"),
        ({"phone": "12345"}, "phone"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"locale": "english"}, "locale"),
        ({"country": "Russia"}, "country"),
        ({"opted_out_channels": ["pigeon"]}, "opted_out_channels.0"),
    ],
)
async def test_invalid_recipient_names_the_field(
    api: httpx.AsyncClient, engine: AsyncEngine, user_id: str, change: dict, field: str
) -> None:
    before = await _count(engine, recipients)
    problem = _problem(await api.post("/v1/recipients", json={"user_id": user_id, **change}), 422)
    assert _fields(problem) == [field]
    assert await _count(engine, recipients) == before


async def test_recipient_batch_is_all_or_nothing(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    ids = [f"batch-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    before = await _count(engine, recipients)
    bad = [{"user_id": ids[0], "email": "ok@example.com"}, {"user_id": ids[1], "email": "broken"}]
    problem = _problem(await api.post("/v1/recipients/batch", json={"recipients": bad}), 422)
    assert _fields(problem) == ["recipients.1.email"]
    duplicated = [{"user_id": ids[0]}, {"user_id": ids[0]}]
    problem = _problem(await api.post("/v1/recipients/batch", json={"recipients": duplicated}), 422)
    assert "more than once" in problem["detail"]
    assert await _count(engine, recipients) == before

    good = [{"user_id": user, "email": f"{user}@example.com", "locale": "ru"} for user in ids]
    response = await api.post("/v1/recipients/batch", json={"recipients": good})
    assert response.json() == {"upserted": 3}
    assert (await api.get(f"/v1/recipients/{ids[2]}")).json()["locale"] == "ru"


async def test_recipient_read_update_delete(api: httpx.AsyncClient, user_id: str) -> None:
    created = await api.put(f"/v1/recipients/{user_id}", json={"email": "Mixed@Example.com", "push_tokens": ["t1"]})
    assert created.json()["email"] == "mixed@example.com"
    assert (await api.get(f"/v1/recipients/{user_id}")).json()["push_tokens"] == ["t1"]
    assert (await api.delete(f"/v1/recipients/{user_id}", params={"reason": "account closed"})).status_code == 204
    _problem(await api.get(f"/v1/recipients/{user_id}"), 404)
    _problem(await api.delete(f"/v1/recipients/{user_id}", params={"reason": "account closed"}), 404)


async def test_authentication_and_roles(api_url: str, settings: Settings, recipient: dict) -> None:
    body = {"user_id": recipient["user_id"], "type": "promo", "channels": ["sms"], "title": "T", "body": "B"}
    async with httpx.AsyncClient(base_url=api_url) as anonymous:
        missing = _problem(await anonymous.post("/v1/notifications", json=body), 401)
        assert "missing bearer token" in missing["detail"]
        forged = create_token("another-secret-that-is-long-enough-for-hs256", "mallory", Role.admin, 60)
        bad = await anonymous.get("/v1/notifications", headers={"Authorization": f"Bearer {forged}"})
        assert "Signature verification failed" in _problem(bad, 401)["detail"]
        assert settings.jwt_secret is not None
        expired = create_token(settings.jwt_secret.get_secret_value(), "svc", Role.service, -10)
        response = await anonymous.get("/v1/notifications", headers={"Authorization": f"Bearer {expired}"})
        assert "expired" in _problem(response, 401)["detail"]

        analyst = {"Authorization": f"Bearer {token_for(settings, Role.analyst)}"}
        forbidden = _problem(await anonymous.post("/v1/notifications", json=body, headers=analyst), 403)
        assert "analyst" in forbidden["detail"]
        assert (await anonymous.get("/v1/notifications", headers=analyst)).status_code == 200


async def test_not_found_and_bad_cursor(api: httpx.AsyncClient) -> None:
    _problem(await api.get(f"/v1/notifications/{uuid.uuid4()}"), 404)
    _problem(await api.post(f"/v1/notifications/{uuid.uuid4()}/cancel", json={"reason": "not wanted"}), 404)
    assert _fields(_problem(await api.get("/v1/notifications/not-a-uuid"), 422)) == ["notification_id"]
    assert _fields(_problem(await api.get("/v1/notifications", params={"cursor": "garbage"}), 422)) == ["cursor"]
    assert _fields(_problem(await api.get("/v1/notifications", params={"limit": 0}), 422)) == ["limit"]


async def test_health_endpoints(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).json()["status"] == "ready"  # each dependency: tests/e2e/test_health.py


async def test_oversized_payload_is_refused_before_temporal(api: httpx.AsyncClient, recipient: dict) -> None:
    body = {"user_id": recipient["user_id"], "type": "promo", "channels": ["sms"], "title": "T", "body": "B",
            "data": {"blob": "x" * 70_000}}  # fmt: skip
    problem = _problem(await api.post("/v1/notifications", json=body), 422)
    assert _fields(problem) == ["data"]
    assert "at most 65,536" in problem["detail"]


async def test_unknown_status_filter_is_refused(api: httpx.AsyncClient) -> None:
    problem = _problem(await api.get("/v1/notifications", params={"status": "delivred"}), 422)
    assert _fields(problem) == ["status"]
    assert "'pending'" in problem["detail"]
