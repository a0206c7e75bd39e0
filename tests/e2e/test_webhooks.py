"""Provider delivery webhooks over HTTP: signatures, forward-only statuses, deduplication,
bounces and complaints, Twilio status callbacks, campaign sends."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from channels.smtp import message_id_for
from core.config import Settings
from services import delivery_events
from services.preferences import preferences, suppressions
from tests.e2e.gateways import Gateway
from tests.e2e.test_campaigns import create_campaign, make_audience, manager, tag_segment, template_key, wait_campaign  # noqa: F401
from tests.stack import wait_for_status
from worker import WorkerServices

deliveries = delivery_events.deliveries
campaign_deliveries = delivery_events.campaign_deliveries
webhook_events = delivery_events.webhook_events


# --- helpers ------------------------------------------------------------------------------


async def make_provider(
    stored: Callable[..., Awaitable[None]],
    *,
    kind: str,
    channel: str,
    secrets: dict[str, str],
    provider_settings: dict[str, Any] | None = None,
    enabled: bool = False,
    name: str | None = None,
) -> str:
    """A provider row with these secrets, disabled unless asked (so no send goes to it)."""
    name = name or f"hooks-{uuid.uuid4().hex[:10]}"
    values = {"name": name, "channel": channel, "kind": kind, "settings": provider_settings or {}}
    await stored(**values, secrets=secrets, enabled=enabled)
    return name


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={hmac.new(secret.encode(), f'{t}.'.encode() + body, hashlib.sha256).hexdigest()}"


def event(kind: str, message_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": kind,
        "message_id": message_id,
        "timestamp": datetime.now(UTC).isoformat(),
        **extra,
    }


async def post_events(
    client: httpx.AsyncClient, provider: str, secret: str, events: list[dict[str, Any]], **sign_args: Any
) -> httpx.Response:
    body = json.dumps({"events": events}).encode()
    headers = {"X-Marquee-Signature": sign(secret, body, **sign_args), "Content-Type": "application/json"}
    return await client.post(f"/v1/webhooks/{provider}", content=body, headers=headers)


async def send(api: httpx.AsyncClient, recipient: dict, channel: str, category: str = "new_episode") -> dict:
    """A real notification on one channel, once the provider took it: the channel's row."""
    response = await api.post(
        "/v1/notifications",
        json={"user_id": recipient["user_id"], "type": category, "channels": [channel], "title": "Hi", "body": "Hi"},
    )
    assert response.status_code == 202, response.text
    done = await wait_for_status(api, response.json()["id"], "sent")
    [row] = done["channels"]
    assert row["provider_message_id"]
    return {**row, "notification_id": done["id"]}


async def delivery(engine: AsyncEngine, notification_id: str, channel: str) -> Any:
    async with engine.connect() as conn:
        return (
            await conn.execute(
                sa.select(deliveries).where(
                    deliveries.c.notification_id == uuid.UUID(notification_id), deliveries.c.channel == channel
                )
            )
        ).one()


async def stored_events(engine: AsyncEngine, provider: str) -> list[Any]:
    async with engine.connect() as conn:
        query = sa.select(webhook_events).where(webhook_events.c.provider == provider).order_by(webhook_events.c.id)
        return list((await conn.execute(query)).all())


async def recipient_id(engine: AsyncEngine, user_id: str) -> int:
    async with engine.connect() as conn:
        found = await conn.scalar(sa.text("SELECT id FROM recipients WHERE user_id = :u"), {"u": user_id})
    assert found is not None
    return int(found)


async def make_campaign_delivery(
    engine: AsyncEngine, recipient: int, *, category: str = "weekly_digest", message_id: str | None = None
) -> tuple[str, int]:
    """A sent campaign_deliveries row under a segment, campaign and run: (run id, row id)."""
    suffix = uuid.uuid4().hex[:10]
    campaign_id = uuid.uuid4()
    run_id = f"campaign-{campaign_id}-run-1"
    async with engine.begin() as conn:
        segment_id = await conn.scalar(
            sa.text("INSERT INTO segments (name, kind, created_by) VALUES (:n, 'static', 'test') RETURNING id"),
            {"n": f"segment-{suffix}"},
        )
        await conn.execute(
            sa.text(
                "INSERT INTO campaigns (id, name, category, template_key, template_version, segment_id, channels,"
                " schedule, status, created_by) VALUES (:id, :name, :category, 'digest', 1, :segment,"
                " ARRAY['email'], '{\"kind\": \"now\"}', 'completed', 'test')"
            ),
            {"id": campaign_id, "name": f"campaign-{suffix}", "category": category, "segment": segment_id},
        )
        await conn.execute(
            sa.text("INSERT INTO campaign_runs (id, campaign_id, status) VALUES (:id, :c, 'completed')"),
            {"id": run_id, "c": campaign_id},
        )
        row_id = await conn.scalar(
            sa.insert(campaign_deliveries)
            .values(
                run_id=run_id,
                recipient_id=recipient,
                channel="email",
                status="sent",
                provider_message_id=message_id or f"<campaign-{suffix}@marquee.localhost>",
            )
            .returning(campaign_deliveries.c.id)
        )
    return run_id, int(row_id)


async def campaign_row(engine: AsyncEngine, row_id: int) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(sa.select(campaign_deliveries).where(campaign_deliveries.c.id == row_id))).one()


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
async def public(api_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client without a bearer token, as providers and mail clients call."""
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as client:
        yield client


@pytest.fixture
async def hook(stored: Callable[..., Awaitable[None]]) -> tuple[str, str]:
    """An email provider with a webhook secret: (name, secret)."""
    secret = f"whsec_{uuid.uuid4().hex}"
    name = await make_provider(
        stored,
        kind="smtp",
        channel="email",
        secrets={"webhook_secret": secret},
        provider_settings={"host": "127.0.0.1", "port": 25, "sender": "Marquee <news@example.com>"},
    )
    return name, secret


# --- signed JSON webhooks -----------------------------------------------------------------


async def test_statuses_only_move_forward(
    api: httpx.AsyncClient, public: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, hook: tuple[str, str]
) -> None:
    name, secret = hook
    sent = await send(api, recipient, "email")
    message_id = sent["provider_message_id"]
    delivered_at = datetime.now(UTC) - timedelta(seconds=30)

    response = await post_events(
        public, name, secret, [event("delivered", message_id, timestamp=delivered_at.isoformat())]
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 1, "duplicates": 0, "unknown": 0}
    row = await delivery(engine, sent["notification_id"], "email")
    assert row.status == "delivered"
    assert row.delivered_at == delivered_at
    assert (await api.get(f"/v1/notifications/{sent['notification_id']}")).json()["status"] == "delivered"

    # Providers report Message-IDs without the angle brackets too.
    bare = message_id.strip("<>")
    assert (await post_events(public, name, secret, [event("opened", bare)])).json()["accepted"] == 1
    row = await delivery(engine, sent["notification_id"], "email")
    assert (row.status, row.opened_at is not None) == ("opened", True)
    assert (await api.get(f"/v1/notifications/{sent['notification_id']}")).json()["status"] == "opened"

    # A late "delivered" (another event id) is stored but does not move the status back.
    late = event("delivered", message_id)
    assert (await post_events(public, name, secret, [late])).json() == {"accepted": 1, "duplicates": 0, "unknown": 0}
    row = await delivery(engine, sent["notification_id"], "email")
    assert row.status == "opened"
    assert row.delivered_at == delivered_at  # already set: kept
    outcomes = {stored.event_id: stored.outcome for stored in await stored_events(engine, name)}
    assert outcomes[late["id"]] == "stale"
    assert sorted(outcomes.values()) == ["advanced", "advanced", "stale"]


async def test_stale_event_fills_its_own_empty_timestamp(
    api: httpx.AsyncClient, public: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, hook: tuple[str, str]
) -> None:
    name, secret = hook
    sent = await send(api, recipient, "email")
    await post_events(public, name, secret, [event("opened", sent["provider_message_id"])])
    await post_events(public, name, secret, [event("delivered", sent["provider_message_id"])])
    row = await delivery(engine, sent["notification_id"], "email")
    assert row.status == "opened"
    assert row.delivered_at is not None


async def test_duplicate_event_is_acknowledged_and_changes_nothing(
    api: httpx.AsyncClient, public: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, hook: tuple[str, str]
) -> None:
    name, secret = hook
    sent = await send(api, recipient, "email")
    first = event("delivered", sent["provider_message_id"])
    assert (await post_events(public, name, secret, [first])).json() == {"accepted": 1, "duplicates": 0, "unknown": 0}
    again = await post_events(public, name, secret, [first])
    assert again.status_code == 200
    assert again.json() == {"accepted": 0, "duplicates": 1, "unknown": 0}
    # The event id is the key: a retry carrying other content is still the same event.
    replay = {**first, "type": "clicked"}
    assert (await post_events(public, name, secret, [replay])).json()["duplicates"] == 1
    row = await delivery(engine, sent["notification_id"], "email")
    assert (row.status, row.clicked_at) == ("delivered", None)
    assert len(await stored_events(engine, name)) == 1


async def test_bad_signatures_are_refused_and_nothing_stored(
    api: httpx.AsyncClient, public: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, hook: tuple[str, str]
) -> None:
    name, secret = hook
    sent = await send(api, recipient, "email")
    body = json.dumps({"events": [event("delivered", sent["provider_message_id"])]}).encode()
    now = int(time.time())
    attempts = {
        "wrong secret": sign("not-the-secret", body),
        # Past the 300 s tolerance either way; the future one by a margin, since it comes
        # closer while the requests before it are served.
        "stale timestamp": sign(secret, body, timestamp=now - 301),
        "future timestamp": sign(secret, body, timestamp=now + 360),
        "no v1": f"t={now}",
        "garbage": "hello",
        "body changed": sign(secret, body.replace(b"delivered", b"clicked")),
    }
    for label, header in attempts.items():
        response = await public.post(f"/v1/webhooks/{name}", content=body, headers={"X-Marquee-Signature": header})
        assert response.status_code == 401, label
        assert response.headers["content-type"] == "application/problem+json", label
        assert response.json()["title"] == "Unauthorized"
    missing = await public.post(f"/v1/webhooks/{name}", content=body)
    assert missing.status_code == 401
    assert "X-Marquee-Signature" in missing.json()["detail"]

    assert await stored_events(engine, name) == []
    assert (await delivery(engine, sent["notification_id"], "email")).status == "sent"


async def test_several_signatures_allow_secret_rotation(
    api: httpx.AsyncClient, public: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, hook: tuple[str, str]
) -> None:
    name, secret = hook
    sent = await send(api, recipient, "email")
    body = json.dumps({"events": [event("delivered", sent["provider_message_id"])]}).encode()
    t = int(time.time())
    old = hmac.new(b"old-secret", f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    new = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    response = await public.post(
        f"/v1/webhooks/{name}", content=body, headers={"X-Marquee-Signature": f"t={t},v1={old},v1={new}"}
    )
    assert response.status_code == 200, response.text
    assert (await delivery(engine, sent["notification_id"], "email")).status == "delivered"


async def test_hard_bounce_suppresses_the_address_soft_bounce_does_not(
    api: httpx.AsyncClient,
    public: httpx.AsyncClient,
    recipient: dict,
    engine: AsyncEngine,
    hook: tuple[str, str],
    settings: Settings,
) -> None:
    name, secret = hook
    address = recipient["email"]
    soft = await send(api, recipient, "email")
    bounce = event("bounced", soft["provider_message_id"], bounce_type="soft", reason="mailbox full")
    assert (await post_events(public, name, secret, [bounce])).status_code == 200
    row = await delivery(engine, soft["notification_id"], "email")
    assert (row.status, row.bounced_at is not None) == ("bounced", True)
    assert (await api.get(f"/v1/notifications/{soft['notification_id']}")).json()["status"] == "bounced"
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).where(suppressions.c.address == address)) == 0

    hard = await send(api, recipient, "email")
    await post_events(public, name, secret, [event("bounced", hard["provider_message_id"], reason="550 no such user")])
    assert (await delivery(engine, hard["notification_id"], "email")).status == "bounced"
    async with engine.connect() as conn:
        [suppressed] = (await conn.execute(sa.select(suppressions).where(suppressions.c.address == address))).all()
    assert (suppressed.channel, suppressed.reason) == ("email", "bounce: 550 no such user")
    assert suppressed.source == f"webhook:{name}"


async def test_complaint_suppresses_and_opts_out_of_the_category(
    api: httpx.AsyncClient, public: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, hook: tuple[str, str]
) -> None:
    name, secret = hook
    sent = await send(api, recipient, "email", category="promo")
    await post_events(public, name, secret, [event("delivered", sent["provider_message_id"])])
    response = await post_events(public, name, secret, [event("complained", sent["provider_message_id"])])
    assert response.json() == {"accepted": 1, "duplicates": 0, "unknown": 0}

    # A complaint says nothing about delivery progress: the status stays.
    assert (await delivery(engine, sent["notification_id"], "email")).status == "delivered"
    rid = await recipient_id(engine, recipient["user_id"])
    async with engine.connect() as conn:
        reason = await conn.scalar(sa.select(suppressions.c.reason).where(suppressions.c.address == recipient["email"]))
        [preference] = (await conn.execute(sa.select(preferences).where(preferences.c.recipient_id == rid))).all()
    assert reason == "complaint"
    assert (preference.category, preference.channel, preference.enabled, preference.source) == (
        "promo",
        "email",
        False,
        "complaint",
    )
    assert [e.outcome for e in await stored_events(engine, name)] == ["advanced", "complaint"]


async def test_malformed_bodies_are_422_and_nothing_stored(
    public: httpx.AsyncClient, engine: AsyncEngine, hook: tuple[str, str]
) -> None:
    name, secret = hook
    bad_type = await post_events(public, name, secret, [event("exploded", "m-1")])
    assert bad_type.status_code == 422
    assert bad_type.headers["content-type"] == "application/problem+json"
    assert [error["field"] for error in bad_type.json()["errors"]] == ["events.0.type"]

    no_message = {key: value for key, value in event("delivered", "m-1").items() if key != "message_id"}
    missing = await post_events(public, name, secret, [event("delivered", "m-2"), no_message])
    assert missing.status_code == 422
    assert [error["field"] for error in missing.json()["errors"]] == ["events.1.message_id"]

    body = b"{not json"
    broken = await public.post(
        f"/v1/webhooks/{name}", content=body, headers={"X-Marquee-Signature": sign(secret, body)}
    )
    assert broken.status_code == 422
    assert await stored_events(engine, name) == []


async def test_unknown_provider_is_404(public: httpx.AsyncClient) -> None:
    response = await post_events(public, "no-such-provider", "x", [event("delivered", "m-1")])
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert "no-such-provider" in response.json()["detail"]


async def test_event_before_its_message_is_recorded_is_applied_later(
    public: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, hook: tuple[str, str]
) -> None:
    """A fast provider can report "delivered" before the send's transaction commits."""
    name, secret = hook
    message_id = f"<early-{uuid.uuid4().hex}@marquee.localhost>"
    early = event("delivered", message_id)
    assert (await post_events(public, name, secret, [early])).json() == {"accepted": 0, "duplicates": 0, "unknown": 1}
    [stored] = await stored_events(engine, name)
    assert stored.outcome == "unknown message"

    _, row_id = await make_campaign_delivery(
        engine, await recipient_id(engine, recipient["user_id"]), message_id=message_id
    )
    async with engine.begin() as conn:
        assert await delivery_events.apply_early_events(conn, message_id) == 1
    row = await campaign_row(engine, row_id)
    assert (row.status, row.delivered_at) == ("delivered", datetime.fromisoformat(early["timestamp"]))
    [stored] = await stored_events(engine, name)
    assert stored.outcome == "advanced"
    async with engine.begin() as conn:
        assert await delivery_events.apply_early_events(conn, message_id) == 0


async def test_campaign_delivery_moves_and_complaint_opts_out_of_the_campaign_category(
    public: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, hook: tuple[str, str]
) -> None:
    name, secret = hook
    rid = await recipient_id(engine, recipient["user_id"])
    message_id = f"<campaign-{uuid.uuid4().hex}@marquee.localhost>"
    _, row_id = await make_campaign_delivery(engine, rid, category="weekly_digest", message_id=message_id)

    response = await post_events(public, name, secret, [event("delivered", message_id), event("clicked", message_id)])
    assert response.json() == {"accepted": 2, "duplicates": 0, "unknown": 0}
    row = await campaign_row(engine, row_id)
    assert row.status == "clicked"
    assert None not in (row.delivered_at, row.clicked_at, row.opened_at)  # a click implies an open

    await post_events(public, name, secret, [event("complained", message_id)])
    async with engine.connect() as conn:
        category = await conn.scalar(
            sa.select(preferences.c.category).where(preferences.c.recipient_id == rid, preferences.c.enabled.is_(False))
        )
        reason = await conn.scalar(sa.select(suppressions.c.reason).where(suppressions.c.address == recipient["email"]))
    assert (category, reason) == ("weekly_digest", "complaint")


async def test_terminal_statuses_never_change(
    public: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, hook: tuple[str, str]
) -> None:
    name, secret = hook
    message_id = f"<failed-{uuid.uuid4().hex}@marquee.localhost>"
    _, row_id = await make_campaign_delivery(
        engine, await recipient_id(engine, recipient["user_id"]), message_id=message_id
    )
    async with engine.begin() as conn:
        await conn.execute(
            campaign_deliveries.update().where(campaign_deliveries.c.id == row_id).values(status="failed")
        )
    await post_events(public, name, secret, [event("delivered", message_id), event("clicked", message_id)])
    row = await campaign_row(engine, row_id)
    assert (row.status, row.delivered_at, row.clicked_at) == ("failed", None, None)
    assert [e.outcome for e in await stored_events(engine, name)] == ["stale", "stale"]


# --- Twilio status callbacks --------------------------------------------------------------


def twilio_signature(auth_token: str, url: str, form: dict[str, str]) -> str:
    data = url + "".join(key + form[key] for key in sorted(form))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()).decode()


async def test_twilio_status_callbacks(
    api: httpx.AsyncClient,
    public: httpx.AsyncClient,
    api_url: str,
    recipient: dict,
    engine: AsyncEngine,
    stored: Callable[..., Awaitable[None]],
    gateways: Callable[[], Gateway],
) -> None:
    """A send through a Twilio provider (the test's own Twilio), then its status callbacks."""
    twilio = gateways()
    token = twilio.twilio_auth_token
    name = f"hooks-{uuid.uuid4().hex[:10]}"
    url = f"{api_url}/v1/webhooks/{name}"  # the app's public_url: what Twilio calls
    await make_provider(
        stored,
        name=name,
        kind="twilio",
        channel="sms",
        secrets={"auth_token": token},
        provider_settings={
            "account_sid": twilio.twilio_account_sid,
            "sender": "+15550000000",
            "base_url": twilio.url,
            "status_callback_url": url,
        },
        enabled=True,
    )
    sent = await send(api, recipient, "sms")
    assert sent["provider"] == name
    [message] = twilio.twilio_messages
    sid = sent["provider_message_id"]
    assert (message["sid"], message["status_callback"]) == (sid, url)

    async def callback(form: dict[str, str], signature: str | None = None) -> httpx.Response:
        headers = {"X-Twilio-Signature": signature or twilio_signature(token, url, form)}
        return await public.post(
            f"/v1/webhooks/{name}",
            content=urlencode(form),
            headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
        )

    base = {
        "MessageSid": sid,
        "AccountSid": twilio.twilio_account_sid,
        "To": recipient["phone"],
        "From": "+15550000000",
    }
    queued = await callback({**base, "MessageStatus": "sent"})
    assert queued.json() == {"accepted": 1, "duplicates": 0, "unknown": 0}
    assert (await delivery(engine, sent["notification_id"], "sms")).status == "sent"

    forged = await callback({**base, "MessageStatus": "delivered"}, signature=twilio_signature("wrong", url, base))
    assert forged.status_code == 401
    assert (await delivery(engine, sent["notification_id"], "sms")).status == "sent"

    delivered = await callback({**base, "MessageStatus": "delivered"})
    assert delivered.status_code == 200, delivered.text
    assert (await delivery(engine, sent["notification_id"], "sms")).status == "delivered"
    assert (await callback({**base, "MessageStatus": "delivered"})).json()["duplicates"] == 1

    await callback({**base, "MessageStatus": "undelivered", "ErrorCode": "30005"})
    assert (await delivery(engine, sent["notification_id"], "sms")).status == "bounced"
    async with engine.connect() as conn:
        reason = await conn.scalar(
            sa.select(suppressions.c.reason).where(
                suppressions.c.channel == "sms", suppressions.c.address == recipient["phone"]
            )
        )
    assert reason == "bounce: twilio undelivered (error 30005)"
    ids = [(e.event_id, e.type, e.outcome) for e in await stored_events(engine, name)]
    assert ids == [
        (f"{sid}:sent", "ignored", "ignored"),
        (f"{sid}:delivered", "delivered", "advanced"),
        (f"{sid}:undelivered", "bounced", "advanced"),
    ]


async def test_status_changes_reach_the_clickhouse_history(
    api: httpx.AsyncClient, public: httpx.AsyncClient, recipient: dict, hook: tuple[str, str],
    services: WorkerServices, engine: AsyncEngine,
) -> None:  # fmt: skip
    """The API queues each change in PostgreSQL; the worker ships it to ClickHouse."""
    name, secret = hook
    sent = await send(api, recipient, "email")
    delivered_at = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    events = [event("delivered", sent["provider_message_id"], timestamp=delivered_at.isoformat()),
              event("opened", sent["provider_message_id"])]  # fmt: skip
    assert (await post_events(public, name, secret, events)).json()["accepted"] == 2
    query = (
        "SELECT status, toUnixTimestamp(event_time) AS at, provider FROM notification_history "
        f"WHERE notification_id = '{sent['notification_id']}' ORDER BY event_time, status"
    )
    for _ in range(100):
        rows = await services.history.query(query)
        if len(rows) >= 4:
            break
        await asyncio.sleep(0.1)
    by_status = {row["status"]: row for row in rows}
    assert sorted(by_status) == ["delivered", "opened", "pending", "sent"]
    assert len(rows) == 4
    assert by_status["delivered"]["at"] == int(delivered_at.timestamp())  # the provider's time, not ours
    assert by_status["delivered"]["provider"] == sent["provider"]
    # The shipper deletes its rows in the transaction that waited for their insert, so the
    # delete commits just after ClickHouse has them; other tests' rows may still be queued.
    queued = sa.text("SELECT count(*) FROM history_outbox WHERE row->>'notification_id' = :id")
    for _ in range(50):
        async with engine.connect() as conn:
            left = await conn.scalar(queued, {"id": sent["notification_id"]})
        if left == 0:
            break
        await asyncio.sleep(0.1)
    assert left == 0


async def test_a_campaign_send_picks_up_an_event_that_came_before_it_was_recorded(
    api: httpx.AsyncClient, public: httpx.AsyncClient, engine: AsyncEngine, hook: tuple[str, str],
    settings: Settings, manager: httpx.AsyncClient, template_key: str,  # noqa: F811
) -> None:  # fmt: skip
    name, secret = hook
    tag, [address] = await make_audience(api, 1)
    campaign = await create_campaign(manager, template_key, await tag_segment(manager, tag))
    rid = await recipient_id(engine, f"{tag}-0")
    # The Message-ID this send will carry is derived from (run, recipient, channel).
    message_id = message_id_for(f"campaign:campaign-{campaign['id']}:{rid}:email", settings.message_id_domain)
    early = event("delivered", message_id)
    assert (await post_events(public, name, secret, [early])).json()["unknown"] == 1

    assert (await manager.post(f"/v1/campaigns/{campaign['id']}/launch")).status_code == 200
    await wait_campaign(manager, campaign["id"], "completed")
    async with engine.connect() as conn:
        status = await conn.scalar(
            sa.text("SELECT status FROM campaign_deliveries WHERE recipient_id = :r AND provider_message_id = :m"),
            {"r": rid, "m": message_id},
        )
    assert status == "delivered"
    assert [stored.outcome for stored in await stored_events(engine, name)] == ["advanced"]
    assert address.startswith(tag)
