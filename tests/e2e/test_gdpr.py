"""GDPR export and erasure through the real stack (docs/gdpr.md): a person with a sent
notification (email and SMS), an event naming them, a suppressed address, history rows in
chDB, a Temporal run and a captured dev mail. The export holds each; the erasure leaves
none of them in PostgreSQL, ClickHouse, Temporal or the mail directory, only a record and
an audit row that name no one; a second export finds nothing."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from core.auth import Role
from core.config import Settings
from services.gdpr import subject_hash
from tests.stack import SmtpServer, token_for, wait_for_status
from worker import WorkerServices

# Every PostgreSQL table, as text per row, is searched for the person's strings afterwards.
TABLES = ("recipients", "recipient_preferences", "suppressions", "notifications", "deliveries", "dead_letters",
          "webhook_events", "history_outbox", "audit_log", "sandbox_messages", "segment_members",
          "campaign_deliveries", "events", "event_actions", "digest_items", "provider_breakers",
          "erasures")  # fmt: skip


@pytest.fixture
async def admin(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token_for(settings, Role.admin, 'gdpr-admin')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=60) as client:
        yield client


async def history_count(services: WorkerServices, user_id: str) -> int:
    [row] = await services.history.query(
        "SELECT count() AS n FROM notification_history WHERE user_id = {user:String}", {"user": user_id}
    )
    return int(row["n"])


async def until(check: object, seconds: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{check} did not hold within {seconds} s")
        await asyncio.sleep(0.2)


async def gone_from_temporal(temporal: Client, workflow_id: str) -> bool:
    try:
        await temporal.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return True
        raise
    return False


async def rows_naming(engine: AsyncEngine, secrets: list[str]) -> dict[str, list[str]]:
    """Every row of TABLES whose text holds one of `secrets`, by table."""
    found: dict[str, list[str]] = {}
    async with engine.connect() as conn:
        for table in TABLES:
            rows = (await conn.execute(sa.text(f"SELECT t::text FROM {table} t"))).scalars().all()
            hits = [row for row in rows if any(secret in row for secret in secrets)]
            if hits:
                found[table] = hits
    return found


async def test_export_holds_everything_and_erase_leaves_nothing_but_a_record(
    api: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    api_url: str,
    settings: Settings,
    engine: AsyncEngine,
    services: WorkerServices,
    temporal_client: Client,
    smtp_server: SmtpServer,
) -> None:
    user = f"gdpr-{uuid.uuid4().hex[:10]}"
    email, phone = f"{user}@example.com", f"+1555{uuid.uuid4().int % 10**7:07d}"
    name = f"Zebediah Quux {uuid.uuid4().hex[:6]}"
    person = {"user_id": user, "email": email, "phone": phone, "name": name, "locale": "en"}
    assert (await api.post("/v1/recipients", json=person)).status_code == 200
    prefs = {"preferences": [{"category": "marketing", "channel": "sms", "enabled": False}]}
    assert (await api.put(f"/v1/recipients/{user}/preferences", json=prefs)).status_code == 200
    assert (await api.put(f"/v1/recipients/{user}/follows", json={"follows": ["series:42"]})).status_code == 200
    title, body = f"Your tickets {uuid.uuid4().hex[:6]}", f"Row 7, seats 3-4 {uuid.uuid4().hex[:6]}"
    sent = await api.post("/v1/notifications", json={"user_id": user, "type": "booking", "channels": ["email", "sms"],
                                                     "title": title, "body": body})  # fmt: skip
    assert sent.status_code == 202, sent.text
    notification_id = sent.json()["id"]
    await wait_for_status(api, notification_id, "sent")
    assert smtp_server.handler.to(email)
    # An event naming them (a type of its own, no rule: the event's run just records it).
    event_type = f"gdpr.visited_{uuid.uuid4().hex[:8]}"
    schema = {"type": "object", "properties": {"user_id": {"type": "string"}}, "required": ["user_id"]}
    assert (await admin.put(f"/v1/event-types/{event_type}", json={"schema": schema})).status_code == 200
    event_id = f"ev-{uuid.uuid4().hex[:10]}"
    posted = await api.post("/v1/events", json={"id": event_id, "type": event_type, "payload": {"user_id": user},
                                                "occurred_at": datetime.now(UTC).isoformat()})  # fmt: skip
    assert posted.status_code == 202, posted.text
    # Their address suppressed by hand: the audit row's object is "email:<address>".
    suppressed = await admin.post("/v1/suppressions", json={"channel": "email", "address": email, "reason": "bounced"})
    assert suppressed.status_code in (200, 201), suppressed.text
    # The dev stack's capture directory: one message to them, one to someone else.
    mail = settings.mail_capture_dir
    mail.mkdir(parents=True, exist_ok=True)
    theirs, others = mail / f"{user}.eml", mail / f"other-{user}.eml"
    theirs.write_bytes(smtp_server.handler.delivered_to({email})[0][1])
    others.write_bytes(b"To: someone.else@example.com\r\nSubject: hi\r\n\r\nhello\r\n")
    await until(lambda: _at_least(history_count(services, user), 4))  # queued and sent, per channel

    analyst = {"Authorization": f"Bearer {token_for(settings, Role.analyst)}"}
    assert (await admin.get(f"/v1/recipients/{user}/export", headers=analyst)).status_code == 403
    exported = await admin.get(f"/v1/recipients/{user}/export")
    assert exported.status_code == 200, exported.text
    document = exported.json()
    assert document["recipient"]["email"] == email
    assert document["recipient"]["name"] == name
    preferences = [(p["category"], p["channel"], p["enabled"]) for p in document["preferences"]]
    assert preferences == [("marketing", "sms", False)]
    assert document["follows"] == ["series:42"]
    [notification] = document["notifications"]
    assert (notification["id"], notification["title"], notification["body"]) == (notification_id, title, body)
    assert {(d["channel"], d["address"]) for d in document["deliveries"]} == {("email", email), ("sms", phone)}
    assert [(s["channel"], s["address"]) for s in document["suppressions"]] == [("email", email)]
    assert [(e["id"], e["payload"]) for e in document["events"]] == [(event_id, {"user_id": user})]
    assert [m["address"] for m in document["sandbox_messages"]] == [phone]  # the SMS went to the sandbox
    history = document["history"]
    assert {row["notification_id"] for row in history} == {notification_id}
    assert {(row["channel"], row["status"]) for row in history} >= {("email", "sent"), ("sms", "sent")}

    refused = await admin.post(f"/v1/recipients/{user}/erase", json={})
    assert refused.status_code == 422, refused.text
    naming = await admin.post(f"/v1/recipients/{user}/erase", json={"reason": f"asked by {email}"})
    assert naming.status_code == 422, naming.text
    assert "reason" in naming.text
    assert (await admin.post(f"/v1/recipients/{user}/erase", json={"reason": "ticket 123"}, headers=analyst)
            ).status_code == 403  # fmt: skip
    assert theirs.exists()
    assert await history_count(services, user) > 0

    erased = await admin.post(f"/v1/recipients/{user}/erase", json={"reason": "GDPR request, ticket 123"})
    assert erased.status_code == 200, erased.text
    report = erased.json()
    hashed = subject_hash(settings, user)
    assert report["subject_hash"] == hashed
    counts = report["counts"]
    erased_rows = {key: counts["postgresql"][key] for key in ("recipients", "notifications", "deliveries",
                   "suppressions", "events_blanked", "sandbox_messages")}  # fmt: skip
    assert erased_rows == {"recipients": 1, "notifications": 1, "deliveries": 2, "suppressions": 1,
                           "events_blanked": 1, "sandbox_messages": 1}  # fmt: skip
    assert counts["clickhouse"]["notification_history"] >= 4
    assert set(counts["clickhouse"]) == {"notification_history"}  # the aggregates hold counts, no user_id
    assert counts["mail_capture"]["files"] == 1
    assert counts["temporal"]["workflow_ids"] >= 2  # the notification's and the event's

    # PostgreSQL: no row anywhere holds the user_id, an address, the name, the title or the body.
    assert await rows_naming(engine, [user, email, phone, name, title, body]) == {}
    async with engine.connect() as conn:
        event = (await conn.execute(sa.text("SELECT payload FROM events WHERE id = :id"), {"id": event_id})).one()
        assert event.payload == {}  # kept, blank: a redelivery stays a duplicate
        [record] = (await conn.execute(sa.text("SELECT * FROM erasures WHERE subject_hash = :h"), {"h": hashed})).all()
        assert record.actor == "gdpr-admin"
        assert record.counts == counts
        audit = (await conn.execute(sa.text("SELECT * FROM audit_log WHERE entity_id = :e ORDER BY id"),
                                    {"e": f"erased:{hashed}"})).all()  # fmt: skip
    by_action = {row.action: row for row in audit}
    # The export and the suppression were audited naming them; now redacted, kept.
    assert {"recipient.export", "suppression.add", "recipient.erase"} <= by_action.keys()
    erase_row = by_action["recipient.erase"]
    assert (erase_row.actor, erase_row.role, erase_row.reason) == ("gdpr-admin", "admin", "GDPR request, ticket 123")
    assert by_action["suppression.add"].details == {}
    assert by_action["suppression.add"].actor == "gdpr-admin"
    # ClickHouse and the mail directory.
    assert await history_count(services, user) == 0
    assert not theirs.exists()
    assert others.exists()
    others.unlink()

    assert (await admin.get(f"/v1/recipients/{user}/export")).status_code == 404
    assert (await admin.post(f"/v1/recipients/{user}/erase", json={"reason": "again"})).status_code == 404
    # The erasure record says nothing of whom: no user_id, address or name in it.
    assert not any(secret in json.dumps(report) for secret in (user, email, phone, name))
    # Temporal deletes closed executions asynchronously: ~30 s on the dev server.
    for workflow_id in (f"notification-{notification_id}", f"event-{event_id}"):
        await until(lambda workflow_id=workflow_id: gone_from_temporal(temporal_client, workflow_id), seconds=90)


async def _at_least(count: object, wanted: int) -> bool:
    return int(await count) >= wanted  # type: ignore[misc]
