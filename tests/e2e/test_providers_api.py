"""Providers through the API: write-only secrets, validation, test sends, breakers, metrics.

Against the real app (uvicorn), PostgreSQL and the test SMTP server. Every provider made
here is disabled (so no send of another test is routed through it) and deleted after.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from core.auth import Role
from core.config import Settings
from core.models import AuditEntry, DeadLetter, Delivery, Notification
from core.secretbox import unseal
from entrypoints.embedded import free_port
from services import breaker
from services.providers import providers
from tests.stack import SmtpServer, token_for

audit_log = AuditEntry.__table__  # type: ignore[attr-defined]
notifications = Notification.__table__  # type: ignore[attr-defined]
deliveries = Delivery.__table__  # type: ignore[attr-defined]
dead_letters = DeadLetter.__table__  # type: ignore[attr-defined]

MakeProvider = Callable[..., Awaitable[tuple[str, dict[str, Any]]]]
# Provider changes need a reason (the audit log keeps it).
REASON = {"reason": "provider tests"}


async def client_for(api_url: str, settings: Settings, role: Role) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token_for(settings, role, f'{role.value}@providers-tests')}"}
    return httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30)


@pytest.fixture
async def admin(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with await client_for(api_url, settings, Role.admin) as client:
        yield client


@pytest.fixture
async def analyst(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with await client_for(api_url, settings, Role.analyst) as client:
        yield client


def smtp_body(port: int, password: str | None = None, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "channel": "email",
        "kind": "smtp",
        "priority": 50,
        "settings": {"host": "127.0.0.1", "port": port, "sender": "Marquee Tests <tests@example.com>", "timeout": 2},
        "rate_limit_per_second": 20,
        "max_concurrency": 4,
        "cost_per_message": 0.0001,
        "enabled": False,
    }
    if password is not None:
        body["secrets"] = {"password": password, "webhook_secret": f"whsec-{uuid.uuid4().hex}"}
    return {**body, **changes}


@pytest.fixture
async def make_provider(admin: httpx.AsyncClient, smtp_server: SmtpServer) -> AsyncIterator[MakeProvider]:
    """PUT a disabled smtp provider at the test SMTP server; every one is deleted afterwards."""
    names: list[str] = []

    async def make(port: int | None = None, **changes: Any) -> tuple[str, dict[str, Any]]:
        name = f"smtp-{uuid.uuid4().hex[:8]}"
        names.append(name)
        password = f"pw-{uuid.uuid4().hex}"
        body = smtp_body(port or smtp_server.port, password, **changes)
        response = await admin.put(f"/v1/providers/{name}", params=REASON, json=body)
        assert response.status_code == 201, response.text
        return name, {"password": password, "response": response.json()}

    yield make
    for name in names:
        await admin.delete(f"/v1/providers/{name}", params=REASON)


async def audit_rows(engine: AsyncEngine, name: str) -> list[Any]:
    async with engine.connect() as conn:
        query = sa.select(audit_log).where(audit_log.c.entity == "provider", audit_log.c.entity_id == name)
        return list((await conn.execute(query.order_by(audit_log.c.id))).all())


async def stored_secrets(engine: AsyncEngine, name: str) -> str | None:
    async with engine.connect() as conn:
        return await conn.scalar(sa.select(providers.c.secrets).where(providers.c.name == name))


async def test_secrets_are_write_only_and_encrypted_at_rest(
    make_provider: MakeProvider,
    admin: httpx.AsyncClient,
    analyst: httpx.AsyncClient,
    api_url: str,
    settings: Settings,
    engine: AsyncEngine,
) -> None:
    name, made = await make_provider()
    password = made["password"]
    created = made["response"]
    assert created["secrets_set"] == ["password", "webhook_secret"]
    assert created["settings"]["port"] > 0
    assert created["breaker"] == {"state": "closed", "consecutive_failures": 0, "last_error": None,
                                  "opened_at": None}  # fmt: skip
    assert created["task_queue"] == f"{settings.temporal_task_queue}.provider.{name}"
    assert password not in json.dumps(created)

    listed = await admin.get("/v1/providers")
    assert listed.status_code == 200, listed.text
    assert password not in listed.text
    mine = next(item for item in listed.json() if item["name"] == name)
    assert (mine["channel"], mine["kind"], mine["priority"], mine["enabled"]) == ("email", "smtp", 50, False)
    assert (mine["rate_limit_per_second"], mine["max_concurrency"]) == (20, 4)
    one = await admin.get(f"/v1/providers/{name}")
    assert one.status_code == 200
    assert password not in one.text

    # Other roles see the list without settings or secret names; a service sees nothing.
    for role in (Role.analyst, Role.campaign_manager):
        async with await client_for(api_url, settings, role) as client:
            response = await client.get("/v1/providers")
            assert response.status_code == 200, response.text
            theirs = next(item for item in response.json() if item["name"] == name)
            assert theirs["settings"] is None
            assert theirs["secrets_set"] is None
            assert theirs["breaker"]["state"] == "closed"
    assert (await analyst.get(f"/v1/providers/{name}")).status_code == 403
    async with await client_for(api_url, settings, Role.service) as service:
        assert (await service.get("/v1/providers")).status_code == 403

    # At rest: a Fernet token, not the password; the configured key opens it.
    sealed = await stored_secrets(engine, name)
    assert sealed is not None
    assert password not in sealed
    assert unseal(settings.fernet_key(), sealed)["password"] == password


async def test_update_keeps_secrets_left_out_and_removes_emptied_ones(
    make_provider: MakeProvider, admin: httpx.AsyncClient, smtp_server: SmtpServer, settings: Settings,
    engine: AsyncEngine,
) -> None:  # fmt: skip
    name, made = await make_provider()
    password = made["password"]

    response = await admin.put(f"/v1/providers/{name}", params=REASON, json=smtp_body(smtp_server.port, priority=7))
    assert response.status_code == 200, response.text
    assert response.json()["priority"] == 7
    assert response.json()["secrets_set"] == ["password", "webhook_secret"]
    assert unseal(settings.fernet_key(), await stored_secrets(engine, name))["password"] == password

    response = await admin.put(f"/v1/providers/{name}", params=REASON, json=smtp_body(smtp_server.port, priority=7,
                                                                      secrets={"webhook_secret": ""}))  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["secrets_set"] == ["password"]

    rows = await audit_rows(engine, name)
    assert [row.action for row in rows] == ["provider.create", "provider.update", "provider.update"]
    assert {row.actor for row in rows} == {"admin@providers-tests"}
    assert {row.role for row in rows} == {"admin"}
    assert "secrets.password" in rows[0].details["changed"]
    assert rows[1].details["changed"] == ["priority"]
    assert rows[2].details["changed"] == ["secrets.webhook_secret"]
    assert password not in json.dumps([row.details for row in rows])


async def test_changing_kind_drops_the_secrets_the_new_kind_has_not(admin: httpx.AsyncClient) -> None:
    name = f"sms-{uuid.uuid4().hex[:8]}"
    gateway = {"channel": "sms", "kind": "sms-json", "enabled": False, "secrets": {"api_key": "key-1"},
               "settings": {"base_url": "http://127.0.0.1:9/send", "sender": "+15550001111"}}  # fmt: skip
    try:
        response = await admin.put(f"/v1/providers/{name}", params=REASON, json=gateway)
        assert response.status_code == 201, response.text
        assert response.json()["secrets_set"] == ["api_key"]
        twilio = {"channel": "sms", "kind": "twilio", "enabled": False, "secrets": {"auth_token": "token-1"},
                  "settings": {"account_sid": "AC" + "1" * 32, "sender": "+15550001111"}}  # fmt: skip
        response = await admin.put(f"/v1/providers/{name}", params=REASON, json=twilio)
        assert response.status_code == 200, response.text
        assert response.json()["secrets_set"] == ["auth_token"]
    finally:
        await admin.delete(f"/v1/providers/{name}", params=REASON)


@pytest.mark.parametrize(
    ("name", "changes", "fields"),
    [
        ("bad-port", {"settings": {"host": "127.0.0.1", "port": 70000, "sender": "a@example.com"}}, {"settings.port"}),
        ("unknown-kind", {"kind": "pigeon"}, {"kind"}),
        ("wrong-channel", {"channel": "sms"}, {"kind"}),
        ("Bad_Name!", {}, {"name"}),
        # The kind's own checks are listed together with the basic ones.
        ("Bad_Name", {"settings": {"host": "", "port": 0, "sender": "nobody"}, "max_concurrency": 0},
         {"name", "max_concurrency", "settings.host", "settings.port", "settings.sender"}),
        ("no-sender", {"settings": {"host": "127.0.0.1", "port": 25, "prot": 1}}, {"settings.sender", "settings.prot"}),
    ],
)  # fmt: skip
async def test_invalid_definitions_are_refused_with_every_field_and_nothing_saved(
    name: str, changes: dict[str, Any], fields: set[str], admin: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    name = f"{name}-{uuid.uuid4().hex[:6]}"
    secret = f"pw-{uuid.uuid4().hex}"
    response = await admin.put(f"/v1/providers/{name}", params=REASON, json=smtp_body(25, secret, **changes))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["title"] == "Provider is invalid"
    assert {error["field"] for error in problem["errors"]} == fields, problem
    assert secret not in response.text
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).where(providers.c.name == name)) == 0
    assert await audit_rows(engine, name) == []


async def test_unknown_body_fields_and_missing_providers(admin: httpx.AsyncClient) -> None:
    response = await admin.put("/v1/providers/x-extra", params=REASON, json={**smtp_body(25), "colour": "red"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "colour"
    for method, path in (("GET", ""), ("POST", "/enable"), ("POST", "/disable"), ("DELETE", ""),
                         ("POST", "/breaker/reset")):  # fmt: skip
        response = await admin.request(method, f"/v1/providers/no-such-provider{path}", params=REASON)
        assert response.status_code == 404, (method, path, response.text)
    response = await admin.post("/v1/providers/no-such-provider/test", json={"to": "a@example.com"})
    assert response.status_code == 404


async def test_test_message_arrives_at_the_smtp_server(
    make_provider: MakeProvider, admin: httpx.AsyncClient, smtp_server: SmtpServer, engine: AsyncEngine
) -> None:
    name, _ = await make_provider()
    address = f"probe-{uuid.uuid4().hex[:8]}@example.com"
    probe = {"to": address, "title": "Provider check", "body": "Hello from the test"}
    response = await admin.post(f"/v1/providers/{name}/test", json=probe)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["ok"] is True
    assert result["provider"] == name
    [message] = smtp_server.handler.to(address)
    assert message["Subject"] == "Provider check"
    assert message["From"] == "Marquee Tests <tests@example.com>"
    assert message["Message-ID"] == result["provider_message_id"]
    assert "Hello from the test" in message.get_body(("plain",)).get_content()

    [row] = [row for row in await audit_rows(engine, name) if row.action == "provider.test"]
    assert row.details == {"to": address, "ok": True, "provider_message_id": result["provider_message_id"]}


async def test_a_failing_provider_answers_502_naming_its_error(
    make_provider: MakeProvider, admin: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    name, _ = await make_provider(port=free_port())  # nothing listens there
    response = await admin.post(f"/v1/providers/{name}/test", json={"to": "someone@example.com"})
    assert response.status_code == 502, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["title"] == "Provider error"
    assert name in problem["detail"]
    assert "Error" in problem["errors"][0]["message"]  # the SendError's class, e.g. TransientSendError
    [row] = [row for row in await audit_rows(engine, name) if row.action == "provider.test"]
    assert row.details["ok"] is False
    assert row.details["error"]


async def test_analysts_and_managers_may_not_change_providers(
    make_provider: MakeProvider, api_url: str, settings: Settings, smtp_server: SmtpServer
) -> None:
    name, _ = await make_provider()
    for role in (Role.analyst, Role.campaign_manager, Role.service):
        async with await client_for(api_url, settings, role) as client:
            calls = [
                client.put(f"/v1/providers/{name}", json=smtp_body(smtp_server.port)),
                client.put(f"/v1/providers/new-{uuid.uuid4().hex[:6]}", json=smtp_body(smtp_server.port)),
                client.post(f"/v1/providers/{name}/enable"),
                client.post(f"/v1/providers/{name}/disable"),
                client.post(f"/v1/providers/{name}/breaker/reset"),
                client.post(f"/v1/providers/{name}/test", json={"to": "a@example.com"}),
                client.delete(f"/v1/providers/{name}"),
            ]
            for call in calls:
                response = await call
                assert response.status_code == 403, (role, response.request.url, response.text)
                assert response.json()["title"] == "Forbidden"


async def test_enable_disable_and_delete_are_audited(
    make_provider: MakeProvider, admin: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    name, _ = await make_provider()
    before = (await admin.get(f"/v1/providers/{name}")).json()["updated_at"]
    enabled = await admin.post(f"/v1/providers/{name}/enable", params=REASON)
    assert enabled.status_code == 200
    assert enabled.json()["enabled"] is True
    assert enabled.json()["updated_at"] > before  # what tells workers to rebuild it
    disabled = await admin.post(f"/v1/providers/{name}/disable", params=REASON)
    assert disabled.status_code == 200
    assert disabled.json()["enabled"] is False

    assert (await admin.delete(f"/v1/providers/{name}", params=REASON)).status_code == 204
    assert (await admin.get(f"/v1/providers/{name}")).status_code == 404
    assert (await admin.delete(f"/v1/providers/{name}", params=REASON)).status_code == 404
    actions = [row.action for row in await audit_rows(engine, name)]
    assert actions == ["provider.create", "provider.enable", "provider.disable", "provider.delete"]


async def test_an_open_breaker_shows_in_the_list_and_metrics_until_reset(
    make_provider: MakeProvider, admin: httpx.AsyncClient, api_url: str, engine: AsyncEngine
) -> None:
    name, _ = await make_provider()
    state = await breaker.record_failure(engine, name, "SMTP 451 on DATA: try later", threshold=1)
    assert state == breaker.BreakerState.open

    mine = next(item for item in (await admin.get("/v1/providers")).json() if item["name"] == name)
    assert mine["breaker"]["state"] == "open"
    assert mine["breaker"]["consecutive_failures"] == 1
    assert mine["breaker"]["last_error"] == "SMTP 451 on DATA: try later"
    assert mine["breaker"]["opened_at"] is not None

    async with httpx.AsyncClient(base_url=api_url, timeout=30) as anonymous:  # /metrics needs no token
        scraped = await anonymous.get("/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain")
        text = scraped.text
        assert f'marquee_provider_breaker_state{{channel="email",provider="{name}"}} 2.0' in text
        assert f'marquee_provider_consecutive_failures{{provider="{name}"}} 1.0' in text
        assert f'marquee_provider_enabled{{channel="email",provider="{name}"}} 0.0' in text
        assert "# TYPE marquee_dead_letters_open gauge" in text
        assert "\nmarquee_dead_letters_open " in text
        assert "# TYPE marquee_deliveries gauge" in text

        reset = await admin.post(f"/v1/providers/{name}/breaker/reset", params=REASON)
        assert reset.status_code == 200, reset.text
        assert reset.json() == {"state": "closed", "consecutive_failures": 0,
                                "last_error": "SMTP 451 on DATA: try later", "opened_at": None}  # fmt: skip
        text = (await anonymous.get("/metrics")).text
        assert f'marquee_provider_breaker_state{{channel="email",provider="{name}"}} 0.0' in text

    [row] = [row for row in await audit_rows(engine, name) if row.action == "provider.breaker_reset"]
    assert row.details == {"previous_state": "open", "consecutive_failures": 1}


def sample(text: str, line: str) -> float:
    """The value of the sample `line` (name and labels) in a scrape; 0 when absent."""
    for row in text.splitlines():
        if row.startswith(f"{line} "):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_deliveries_by_status_and_open_dead_letters(api_url: str, engine: AsyncEngine) -> None:
    notification_id = uuid.uuid4()
    delivered = 'marquee_deliveries{channel="sms",status="delivered"}'
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as anonymous:
        before = (await anonymous.get("/metrics")).text
        async with engine.begin() as conn:
            await conn.execute(notifications.insert().values(
                id=notification_id, idempotency_key=f"metrics-{notification_id}", request_hash="x",
                user_id="metrics-test", category="transactional", channels=["sms"], requested_by="tests",
                workflow_id=f"notification-{notification_id}"))  # fmt: skip
            await conn.execute(deliveries.insert().values(notification_id=notification_id, channel="sms",
                                                          status="delivered"))  # fmt: skip
            await conn.execute(dead_letters.insert().values(notification_id=notification_id, channel="sms",
                                                            reason="test", last_error="test", attempts=1,
                                                            request={}))  # fmt: skip
        try:
            after = (await anonymous.get("/metrics")).text
        finally:
            async with engine.begin() as conn:
                await conn.execute(notifications.delete().where(notifications.c.id == notification_id))
    assert sample(after, delivered) == sample(before, delivered) + 1
    assert sample(after, "marquee_dead_letters_open") == sample(before, "marquee_dead_letters_open") + 1
