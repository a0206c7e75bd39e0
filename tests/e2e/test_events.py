"""Events end to end: types, rules, intake over HTTP, deduplication, delays and cancellation,
digests and fan-out, against PostgreSQL, the Temporal dev server, the worker and the SMTP server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from core.auth import Role
from core.config import Settings
from core.errors import Unavailable
from core.schemas import EventIn
from services import events
from tests.e2e.test_replay import assert_replays
from tests.stack import SmtpServer, token_for

PASSWORD_SCHEMA = {
    "type": "object",
    "required": ["user_id", "link"],
    "properties": {"user_id": {"type": "string"}, "link": {"type": "string"}},
}
RESET_TEMPLATE = {
    "category": "security",
    "content": {
        "variables": [{"name": "link", "type": "url", "example": "https://cinema.example/r"}],
        "locales": {"en": {"email": {"subject": "Reset your password", "html": "<p>Open {{ link }}</p>"}}},
    },
}


@pytest.fixture
async def manager(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token_for(settings, Role.campaign_manager, 'cm-events')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=60) as client:
        yield client


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def put_type(manager: httpx.AsyncClient, name: str, schema: dict[str, Any]) -> None:
    response = await manager.put(f"/v1/event-types/{name}", json={"schema": schema, "description": name})
    assert response.status_code == 200, response.text


async def put_template(manager: httpx.AsyncClient, body: dict[str, Any]) -> str:
    key = unique("tpl-")
    response = await manager.post("/v1/templates", json={"key": key, **body})
    assert response.status_code == 201, response.text
    return key


async def put_rule(manager: httpx.AsyncClient, event_type: str, template: str, **extra: Any) -> dict[str, Any]:
    body = {
        "name": unique("rule-"),
        "event_type": event_type,
        "template": template,
        "channels": ["email"],
        "category": "security",
        **extra,
    }
    response = await manager.post("/v1/trigger-rules", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def event(event_type: str, payload: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": unique("ev-"),
        "type": event_type,
        "occurred_at": datetime.now(UTC).isoformat(),
        "payload": payload,
        **extra,
    }


async def wait_event(api: httpx.AsyncClient, event_id: str, *statuses: str, seconds: float = 30) -> dict[str, Any]:
    """Poll until every action of the event is in one of `statuses`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        body = (await api.get(f"/v1/events/{event_id}")).json()
        if body["actions"] and all(action["status"] in statuses for action in body["actions"]):
            return dict(body)
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"event actions stayed {body['actions']}, wanted {statuses}")
        await asyncio.sleep(0.1)


async def mail_to(smtp_server: SmtpServer, address: str, count: int = 1, seconds: float = 30) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + seconds
    while len(smtp_server.handler.to(address)) < count:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{len(smtp_server.handler.to(address))} messages to {address}, wanted {count}")
        await asyncio.sleep(0.1)
    return smtp_server.handler.to(address)


@pytest.fixture
async def password_reset(manager: httpx.AsyncClient) -> tuple[str, dict[str, Any]]:
    """A fresh password.reset_requested-like type with a rule mailing the link."""
    name = unique("password.reset_requested_")
    await put_type(manager, name, PASSWORD_SCHEMA)
    rule = await put_rule(manager, name, await put_template(manager, RESET_TEMPLATE))
    return name, rule


async def test_an_event_over_http_mails_the_user_once_with_the_payload_values(
    api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer, password_reset: tuple[str, dict[str, Any]]
) -> None:
    name, rule = password_reset
    link = f"https://cinema.example/reset/{uuid.uuid4().hex}"
    body = event(name, {"user_id": recipient["user_id"], "link": link})
    response = await api.post("/v1/events", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["Location"].endswith(f"/v1/events/{body['id']}")
    done = await wait_event(api, body["id"], "sent")
    [action] = done["actions"]
    assert (action["rule_id"], action["rule"]) == (rule["id"], rule["name"])
    [message] = await mail_to(smtp_server, recipient["email"])
    assert link in message.get_body(("html",)).get_content()
    notification = (await api.get(f"/v1/notifications/{action['notification_id']}")).json()
    assert notification["user_id"] == recipient["user_id"]


async def test_the_same_event_posted_ten_times_at_once_makes_one_notification(
    api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer, password_reset: tuple[str, dict[str, Any]]
) -> None:
    name, _ = password_reset
    body = event(name, {"user_id": recipient["user_id"], "link": "https://cinema.example/r/1"})
    responses = await asyncio.gather(*(api.post("/v1/events", json=body) for _ in range(10)))
    assert [response.status_code for response in responses] == [202] * 10
    assert sum(response.headers.get("Idempotent-Replayed") == "true" for response in responses) == 9
    await wait_event(api, body["id"], "sent")
    await mail_to(smtp_server, recipient["email"])
    await asyncio.sleep(1)  # a duplicate would have arrived by now
    assert len(smtp_server.handler.to(recipient["email"])) == 1
    reused = await api.post("/v1/events", json={**body, "payload": {**body["payload"], "link": "https://x.example"}})
    assert reused.status_code == 409
    assert "different content" in reused.json()["detail"]


async def test_bad_events_are_refused_naming_the_field_and_nothing_is_stored(
    api: httpx.AsyncClient, engine: AsyncEngine, password_reset: tuple[str, dict[str, Any]]
) -> None:
    name, _ = password_reset
    unknown = await api.post("/v1/events", json=event("no.such_type", {}))
    assert unknown.status_code == 422
    assert [error["field"] for error in unknown.json()["errors"]] == ["type"]
    missing = await api.post("/v1/events", json=event(name, {"link": 7}))
    assert missing.status_code == 422
    fields = sorted(error["field"] for error in missing.json()["errors"])
    assert fields == ["payload", "payload.link"]
    naive = await api.post("/v1/events", json=event(name, {}, occurred_at="2026-12-06T10:00:00"))
    assert naive.status_code == 422
    async with engine.connect() as conn:
        stored = await conn.scalar(
            sa.text("SELECT count(*) FROM events WHERE type IN ('no.such_type', :t) AND payload->>'link' = '7'"),
            {"t": name},
        )
    assert stored == 0
    metrics = (await api.get("/metrics")).text
    for reason in ("unknown_type", "invalid_payload"):
        assert f'marquee_events_rejected_total{{reason="{reason}",source="http"}}' in metrics


async def test_a_rule_is_checked_whole_against_the_schema_and_template(manager: httpx.AsyncClient) -> None:
    name = unique("subscription.expiring_")
    await put_type(
        manager,
        name,
        {
            "type": "object",
            "required": ["user_id"],
            "properties": {"user_id": {"type": "string"}, "days_left": {"type": "string"}},
        },
    )
    template = await put_template(
        manager,
        {
            "category": "billing",
            "content": {
                "variables": [
                    {"name": "days_left", "type": "integer", "example": 3},
                    {"name": "plan", "example": "family"},
                ],
                "locales": {"en": {"email": {"subject": "{{ days_left }} days", "html": "<p>{{ plan }}</p>"}}},
            },
        },
    )
    response = await manager.post(
        "/v1/trigger-rules",
        json={
            "name": unique("rule-"),
            "event_type": name,
            "template": template,
            "channels": ["email", "sms"],
            "category": "billing",
            "condition": [{"field": "days", "op": "lte", "value": 3}],
            "delay": {"from_field": "expires_at"},
            "cancel_on": ["no.such_event"],
        },
    )
    assert response.status_code == 422, response.text
    fields = sorted(error["field"] for error in response.json()["errors"])
    assert fields == sorted(
        [
            "channels.1",
            "variables.days_left",
            "variables.days_left",
            "variables.plan",
            "condition.0.field",
            "delay.from_field",
            "cancel_on.0",
        ]
    )


async def test_a_delayed_send_is_cancelled_by_its_cancelling_event(
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,
    recipient: dict,
    smtp_server: SmtpServer,
    temporal_client: Client,
) -> None:
    failed, succeeded = unique("payment.failed_"), unique("payment.succeeded_")
    schema = {
        "type": "object",
        "required": ["user_id", "amount"],
        "properties": {"user_id": {"type": "string"}, "amount": {"type": "number"}},
    }
    await put_type(manager, failed, schema)
    await put_type(manager, succeeded, schema)
    template = await put_template(
        manager,
        {
            "category": "billing",
            "content": {
                "variables": [{"name": "amount", "type": "number", "example": 5}],
                "locales": {"en": {"email": {"subject": "Payment of {{ amount }} failed", "html": "<p>Retry</p>"}}},
            },
        },
    )
    await put_rule(manager, failed, template, category="billing", delay={"offset_seconds": 3600}, cancel_on=[succeeded])
    reminder = event(failed, {"user_id": recipient["user_id"], "amount": 9.99})
    assert (await api.post("/v1/events", json=reminder)).status_code == 202
    waiting = await wait_event(api, reminder["id"], "waiting")
    fire_at = datetime.fromisoformat(waiting["actions"][0]["fire_at"])
    assert timedelta(minutes=59) < fire_at - datetime.now(UTC) <= timedelta(hours=1)
    paid = event(succeeded, {"user_id": recipient["user_id"], "amount": 9.99})
    assert (await api.post("/v1/events", json=paid)).status_code == 202
    cancelled = await wait_event(api, reminder["id"], "cancelled")
    assert paid["id"] in cancelled["actions"][0]["reason"]
    assert smtp_server.handler.to(recipient["email"]) == []
    for name, body in (("event_cancelled", reminder), ("event_cancelling", paid)):
        handle = temporal_client.get_workflow_handle(f"event-{body['id']}")
        await handle.result()
        await assert_replays(await handle.fetch_history(), name)


async def test_a_hundred_events_within_a_second_make_one_digest_listing_all(
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,
    recipient: dict,
    smtp_server: SmtpServer,
    temporal_client: Client,
) -> None:
    name = unique("episode.watched_")
    await put_type(
        manager,
        name,
        {
            "type": "object",
            "required": ["user_id", "title"],
            "properties": {"user_id": {"type": "string"}, "title": {"type": "string"}},
        },
    )
    single = await put_template(
        manager,
        {
            "category": "news",
            "content": {
                "variables": [{"name": "title", "example": "E1"}],
                "locales": {"en": {"email": {"subject": "{{ title }}", "html": "<p>x</p>"}}},
            },
        },
    )
    digest = await put_template(
        manager,
        {
            "category": "news",
            "content": {
                "variables": [
                    {"name": "events", "type": "list", "example": [{"title": "E1"}]},
                    {"name": "count", "type": "integer", "example": 1},
                ],
                "locales": {
                    "en": {
                        "email": {
                            "subject": "{{ count }} new episodes",
                            "html": "<ul>{% for e in events %}<li>{{ e.title }}</li>{% endfor %}</ul>",
                        }
                    }
                },
            },
        },
    )
    rule = await put_rule(
        manager,
        name,
        single,
        category="news",
        # The window opens at the first event: wide enough that all hundred, posted at once, arrive
        # in it on a slow 2-core machine under coverage (they took over 3 s once).
        digest={"window_seconds": 8, "template": digest, "single_as_message": True},
    )
    bodies = [event(name, {"user_id": recipient["user_id"], "title": f"Episode {n}"}) for n in range(100)]
    responses = await asyncio.gather(*(api.post("/v1/events", json=body) for body in bodies))
    assert {response.status_code for response in responses} == {202}
    # Redelivered: counted once.
    assert (await api.post("/v1/events", json=bodies[0])).headers["Idempotent-Replayed"] == "true"
    [message] = await mail_to(smtp_server, recipient["email"], seconds=60)
    assert message["Subject"] == "100 new episodes"
    html = message.get_body(("html",)).get_content()
    assert sorted(html.count(f"<li>Episode {n}</li>") for n in range(100)) == [1] * 100
    await asyncio.sleep(2)
    assert len(smtp_server.handler.to(recipient["email"])) == 1
    digest_run = temporal_client.get_workflow_handle(f"digest-{rule['id']}-{recipient['user_id']}")
    assert await digest_run.result() == 100
    await assert_replays(await digest_run.fetch_history(), "digest_sent")

    # Alone in its window, with single_as_message: the rule's own template, as one message.
    alone = event(name, {"user_id": recipient["user_id"], "title": "Episode 101"})
    assert (await api.post("/v1/events", json=alone)).status_code == 202
    second = (await mail_to(smtp_server, recipient["email"], count=2, seconds=60))[1]
    assert second["Subject"] == "Episode 101"


async def test_an_episode_to_its_followers_runs_as_one_batched_campaign_run(
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,
    engine: AsyncEngine,
    temporal_client: Client,
    smtp_server: SmtpServer,
) -> None:
    name = unique("episode.released_")
    await put_type(
        manager,
        name,
        {
            "type": "object",
            "required": ["series_id", "title"],
            "properties": {
                "series_id": {"type": "integer"},
                "title": {"type": "string"},
                "content_id": {"type": "string"},
            },
        },
    )
    template = await put_template(
        manager,
        {
            "category": "news",
            "content": {
                "variables": [{"name": "title", "example": "E1"}],
                "locales": {"en": {"email": {"subject": "New: {{ title }}", "html": "<p>{{ title }} is out</p>"}}},
            },
        },
    )
    rule = await put_rule(
        manager,
        name,
        template,
        category="news",
        audience={"kind": "segment", "filter": {"field": "follows", "op": "contains", "value": "series:${series_id}"}},
    )
    series = int(uuid.uuid4().int % 10**9)
    tag = unique("fan")
    followers = 20_000
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO recipients (user_id, email, follows, locale, timezone) "
                "SELECT :tag || '-' || n, :tag || '-' || n || '@example.com', "
                "ARRAY['series:' || :series] || CASE WHEN n % 2 = 0 THEN ARRAY['series:0'] ELSE '{}' END, 'en', 'UTC' "
                "FROM generate_series(1, :count) n"
            ),
            {"tag": tag, "series": str(series), "count": followers},
        )
        # Someone following another series hears nothing.
        await conn.execute(
            sa.text(
                "INSERT INTO recipients (user_id, email, follows, locale, timezone) VALUES "
                "(:u, :u || '@example.com', ARRAY['series:1'], 'en', 'UTC')"
            ),
            {"u": f"{tag}-other"},
        )
    started = datetime.now(UTC)
    body = event(name, {"series_id": series, "title": "Episode 5"})
    assert (await api.post("/v1/events", json=body)).status_code == 202
    sent = await wait_event(api, body["id"], "sent")
    campaign_id = sent["actions"][0]["campaign_id"]
    assert sent["actions"][0]["rule_id"] == rule["id"]
    # The run goes on in batches; once the first thousands are mailed, count what Temporal runs.
    deadline = asyncio.get_running_loop().time() + 120
    while True:
        mailed = sum(
            1
            for envelope, _ in smtp_server.handler.messages
            for rcpt in envelope.rcpt_tos
            if rcpt.startswith(f"{tag}-")
        )
        if mailed >= 2000:
            break
        assert asyncio.get_running_loop().time() < deadline, f"only {mailed} mailed"
        await asyncio.sleep(0.5)
    query = f'StartTime >= "{started.isoformat()}"'
    workflows = [item.id async for item in temporal_client.list_workflows(query)]
    assert sorted(workflows) == sorted([f"event-{body['id']}", f"campaign-{campaign_id}"])
    campaign = (await manager.get(f"/v1/campaigns/{campaign_id}")).json()
    counted = (await manager.get(f"/v1/segments/{campaign['segment_id']}/count", params={"channels": "email"})).json()
    assert counted["matches"] == followers  # the payload's series, not series:0 or series:1
    cancel = await manager.post(f"/v1/campaigns/{campaign_id}/cancel", json={"reason": "test is done"})
    assert cancel.status_code in (200, 202, 409), cancel.text
    assert not any(
        rcpt == f"{tag}-other@example.com" for envelope, _ in smtp_server.handler.messages for rcpt in envelope.rcpt_tos
    )


async def test_an_event_whose_workflow_cannot_start_leaves_no_row_and_a_retry_succeeds(
    engine: AsyncEngine, temporal_client: Client, settings: Settings, password_reset: tuple[str, dict[str, Any]]
) -> None:
    name, _ = password_reset
    # A namespace the server does not have: every start is refused, as when Temporal is down.
    refusing = await Client.connect(
        temporal_client.service_client.config.target_host,
        namespace="no-such-namespace",
        data_converter=temporal_client.data_converter,
    )
    body = EventIn.model_validate(event(name, {"user_id": "nobody", "link": "https://cinema.example/r/2"}))
    async with engine.connect() as conn:
        with pytest.raises(Unavailable, match="could not start"):
            await events.accept(conn, refusing, settings, "test", body, "http")
        assert await conn.scalar(sa.text("SELECT count(*) FROM events WHERE id = :id"), {"id": body.id}) == 0
        accepted = await events.accept(conn, temporal_client, settings, "test", body, "http")
    assert not accepted.replayed
    await temporal_client.get_workflow_handle(f"event-{body.id}").result()
