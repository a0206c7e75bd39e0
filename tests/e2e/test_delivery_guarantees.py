"""Providers stored in PostgreSQL carry real sends: failover in priority order, circuit
breakers shared through PostgreSQL, throttling that slows down instead of failing,
per-provider rate limits held by the Temporal server, dead tokens and suppressions,
preferences and quiet hours. The gateways are the test's own HTTP servers."""

from __future__ import annotations

import asyncio
import json
import re
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
from core.queries import deliveries, recipients
from services import breaker
from services.preferences import suppressions
from services.providers import delete_provider, providers, save_provider
from tests.e2e.gateways import Gateway
from tests.e2e.test_campaigns import TEMPLATE, create_campaign, make_audience, tag_segment, wait_campaign
from tests.e2e.test_replay import assert_replays
from tests.stack import SmtpServer, token_for, wait_for_status
from worker import MarqueeWorker, WorkerServices, create_worker

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
async def manager(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token_for(settings, Role.campaign_manager, 'cm')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture
async def template_key(manager: httpx.AsyncClient) -> str:
    key = f"promo-{uuid.uuid4().hex[:8]}"
    assert (await manager.post("/v1/templates", json={"key": key, **TEMPLATE})).status_code == 201
    return key


def _sms_provider(name: str, gateway: Gateway, priority: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "channel": "sms",
        "kind": "sms-json",
        "priority": priority,
        "settings": {"base_url": gateway.url, "sender": "Marquee", "timeout": 2},
        "secrets": {"api_key": gateway.sms_api_key},
        **extra,
    }


def _sms(user: str, **extra: Any) -> dict[str, Any]:
    return {"user_id": user, "type": "premiere", "channels": ["sms"], "title": "T", "body": "Dune at 20:00", **extra}


async def _delivery(engine: AsyncEngine, notification_id: str) -> sa.Row[Any]:
    async with engine.connect() as conn:
        return (
            await conn.execute(sa.select(deliveries).where(deliveries.c.notification_id == uuid.UUID(notification_id)))
        ).one()


async def test_failover_opens_the_circuit_and_a_probe_closes_it(
    api: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, stored: Any, gateways: Any, settings: Settings
) -> None:
    primary, backup = gateways(), gateways()
    name_a, name_b = f"sms-a-{uuid.uuid4().hex[:6]}", f"sms-b-{uuid.uuid4().hex[:6]}"
    await stored(**_sms_provider(name_a, primary, 10))
    await stored(**_sms_provider(name_b, backup, 20))
    primary.fail_always(503)

    # First send: the primary fails `failover_after` times, then the backup takes it.
    first = (await api.post("/v1/notifications?wait=true", json=_sms(recipient["user_id"]))).json()
    assert first["status"] == "sent", first
    assert first["channels"][0]["provider"] == name_b
    assert len(primary.requests_to("sms")) == 3  # RetryOptions.failover_after
    assert [m["to"] for m in backup.sms_messages] == [recipient["phone"]]
    async with engine.connect() as conn:
        state = (await breaker.states(conn))[name_a]
    assert state.state == breaker.BreakerState.open  # threshold 3 in the test settings
    assert "503" in (state.last_error or "")

    # While open, the primary is skipped without a request.
    second = (await api.post("/v1/notifications?wait=true", json=_sms(recipient["user_id"]))).json()
    assert second["channels"][0]["provider"] == name_b
    assert len(primary.requests_to("sms")) == 3

    # It recovers; after the cool-down one send probes it and closes the circuit.
    primary.recover()
    await asyncio.sleep(settings.breaker_cooldown_seconds + 0.2)
    third = (await api.post("/v1/notifications?wait=true", json=_sms(recipient["user_id"]))).json()
    assert third["channels"][0]["provider"] == name_a
    async with engine.connect() as conn:
        assert (await breaker.states(conn))[name_a].state == breaker.BreakerState.closed
    assert len(backup.sms_messages) == 2


async def test_retry_after_is_honoured_without_spending_the_failure_budget(
    api: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, stored: Any, gateways: Any
) -> None:
    gateway = gateways()
    name = f"sms-{uuid.uuid4().hex[:6]}"
    await stored(**_sms_provider(name, gateway, 10))
    # More throttles than the failure budget (6 in the test settings): none of them fails it.
    gateway.fail_next(429, retry_after=0.3, times=7)
    gateway.fail_next(429, retry_after=2)

    body = (await api.post("/v1/notifications?wait=true", json=_sms(recipient["user_id"]))).json()
    assert body["status"] == "sent", body
    row = await _delivery(engine, body["id"])
    assert (row.attempts, row.failures) == (9, 0)
    calls = gateway.requests_to("sms")
    assert [call.status for call in calls] == [429] * 8 + [202]
    assert calls[-1].at - calls[-2].at >= 2.0  # waited as long as the provider asked
    async with engine.connect() as conn:
        assert name not in await breaker.states(conn)  # throttling is not a failure


async def another_worker(services: WorkerServices, settings: Settings, temporal_client: Client) -> MarqueeWorker:
    """A second worker as another process would run it: its own client (one client may not
    run two workers on the same task queue) and its own view of the providers."""
    directory = services.directory.another()
    client = await Client.connect(
        temporal_client.service_client.config.target_host,
        namespace=temporal_client.namespace,
        data_converter=temporal_client.data_converter,
    )
    return create_worker(client, settings, WorkerServices(services.engine, services.history, directory, settings))


async def test_rate_limit_holds_across_two_workers(
    api: httpx.AsyncClient,
    recipient: dict,
    stored: Any,
    gateways: Any,
    services: WorkerServices,
    settings: Settings,
    temporal_client: Client,
) -> None:
    """Two worker processes' worth of pollers on the provider's queue: the server's
    per-queue limit holds for both together."""
    second = await another_worker(services, settings, temporal_client)
    gateway = gateways()
    name = f"sms-slow-{uuid.uuid4().hex[:6]}"
    await stored(**_sms_provider(name, gateway, 10, rate_limit_per_second=2.0))
    async with second:
        await second.refresh_providers()
        sends = [
            api.post("/v1/notifications?wait=true", json=_sms(recipient["user_id"], idempotency_key=f"rate-{n}-{name}"))
            for n in range(8)
        ]
        results = [response.json() for response in await asyncio.gather(*sends)]
    assert {body["status"] for body in results} == {"sent"}
    times = sorted(call.at for call in gateway.requests_to("sms"))
    assert len(times) == 8
    # 8 sends at 2 a second: the last can start no sooner than about 3 s after the first.
    assert times[-1] - times[0] >= 2.5


async def test_an_unregistered_push_token_is_retired(
    api: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, stored: Any, gateways: Any
) -> None:
    gateway = gateways()
    name = f"fcm-{uuid.uuid4().hex[:6]}"
    await stored(name=name, channel="push", kind="fcm", priority=10,
                 settings={"project_id": gateway.fcm_project, "base_url": gateway.url, "timeout": 2},
                 secrets={"service_account": gateway.service_account()})  # fmt: skip
    [token] = recipient["push_tokens"]
    gateway.mark_unregistered(token)
    push = {"user_id": recipient["user_id"], "type": "premiere", "channels": ["push"], "title": "T", "body": "B"}

    body = (await api.post("/v1/notifications?wait=true", json=push)).json()
    assert body["status"] == "failed"
    assert "UNREGISTERED" in body["channels"][0]["error"]
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(recipients).where(recipients.c.user_id == recipient["user_id"]))).one()
    assert (row.push_tokens, row.dead_push_tokens) == ([], [token])

    again = await api.post("/v1/notifications?wait=true", json=push)
    assert again.status_code == 422  # refused up front: no live token left
    assert "no push_tokens" in again.json()["detail"]
    assert len(gateway.requests_to("fcm")) == 1  # the dead token was not tried again


async def test_a_refused_address_is_suppressed_for_later_sends(
    api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer, engine: AsyncEngine
) -> None:
    smtp_server.handler.refuse[recipient["email"]] = "550 5.1.1 No such user"
    email = {"user_id": recipient["user_id"], "type": "premiere", "channels": ["email"], "title": "T", "body": "B"}
    assert (await api.post("/v1/notifications?wait=true", json=email)).json()["status"] == "failed"
    async with engine.connect() as conn:
        reason = await conn.scalar(sa.select(suppressions.c.reason).where(suppressions.c.address == recipient["email"]))
    assert reason is not None
    assert "550" in reason

    del smtp_server.handler.refuse[recipient["email"]]
    later = (await api.post("/v1/notifications?wait=true", json=email)).json()
    assert later["channels"][0]["status"] == "suppressed"
    assert "suppressed" in later["channels"][0]["error"]
    assert smtp_server.handler.to(recipient["email"]) == []


async def test_preferences_by_category_and_channel(
    api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer
) -> None:
    user = recipient["user_id"]
    put = await api.put(
        f"/v1/recipients/{user}/preferences",
        json={"preferences": [
            {"category": "*", "channel": "email", "enabled": False},  # no marketing email at all...
            {"category": "new_episode", "channel": "*", "enabled": True},  # ...but new episodes, yes
            {"category": "password_reset", "channel": "sms", "enabled": False},
        ]},
    )  # fmt: skip
    assert put.status_code == 200, put.text
    assert len(put.json()) == 3

    def send(kind: str) -> dict[str, Any]:
        return {"user_id": user, "type": kind, "channels": ["email", "sms"], "title": "T", "body": kind}

    async def statuses(kind: str) -> dict[str, str]:
        body = (await api.post("/v1/notifications?wait=true", json=send(kind))).json()
        return {channel["channel"]: channel["status"] for channel in body["channels"]}

    assert await statuses("promo") == {"email": "suppressed", "sms": "sent"}
    assert await statuses("new_episode") == {"email": "sent", "sms": "sent"}
    # Transactional: marketing-wide opt-outs do not apply, its own opt-out does.
    assert await statuses("password_reset") == {"email": "sent", "sms": "suppressed"}
    subjects = [message["Subject"] for message in smtp_server.handler.to(recipient["email"])]
    assert sorted(subjects) == ["T", "T"]

    bad = await api.put(f"/v1/recipients/{user}/preferences",
                        json={"preferences": [{"category": "Promo!", "channel": "fax", "enabled": False}]})  # fmt: skip
    assert bad.status_code == 422
    fields = {error["field"] for error in bad.json()["errors"]}
    assert {"preferences.0.category", "preferences.0.channel"} <= fields
    gone = await api.delete(f"/v1/recipients/{user}/preferences/password_reset/sms")
    assert gone.status_code == 204
    assert len((await api.get(f"/v1/recipients/{user}/preferences")).json()) == 2


async def test_quiet_hours_hold_normal_sends_not_urgent_ones(
    api: httpx.AsyncClient, recipient: dict, temporal_client: Client
) -> None:
    user = recipient["user_id"]
    now = datetime.now(UTC)
    quiet = {"quiet_hours_start": (now - timedelta(hours=1)).strftime("%H:%M"),
             "quiet_hours_end": (now + timedelta(hours=2)).strftime("%H:%M"), "timezone": "UTC"}  # fmt: skip
    update = {k: v for k, v in recipient.items() if k not in ("user_id", "created_at", "updated_at")}
    assert (await api.put(f"/v1/recipients/{user}", json={**update, **quiet})).status_code == 200

    held = (await api.post("/v1/notifications", json=_sms(user))).json()
    urgent = (await api.post("/v1/notifications?wait=true", json=_sms(user, priority="urgent"))).json()
    assert urgent["status"] == "sent"
    reset = (await api.post("/v1/notifications?wait=true", json={**_sms(user), "type": "password_reset"})).json()
    assert reset["status"] == "sent"

    # The normal one waits on a durable timer until the quiet hours end.
    handle = temporal_client.get_workflow_handle(held["workflow_id"])
    for _ in range(100):
        timers = [e for e in (await handle.fetch_history()).events if e.HasField("timer_started_event_attributes")]
        if timers:
            break
        await asyncio.sleep(0.1)
    [timer] = timers
    wait = timer.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
    assert timedelta(hours=1, minutes=58) < wait <= timedelta(hours=2)
    assert (await api.get(f"/v1/notifications/{held['id']}")).json()["status"] == "pending"
    await handle.cancel()
    await wait_for_status(api, held["id"], "cancelled")


async def test_provider_rows_are_validated_and_secrets_sealed(engine: AsyncEngine, settings: Settings) -> None:
    from services.providers import ProviderInvalid

    async with engine.begin() as conn:
        with pytest.raises(ProviderInvalid) as problem:
            await save_provider(conn, settings.fernet_key(), {"name": "Bad Name", "channel": "fax", "kind": "smtp"})
    assert any(p.startswith("name:") for p in problem.value.problems)
    assert any(p.startswith("channel:") for p in problem.value.problems)

    name = f"sms-sealed-{uuid.uuid4().hex[:6]}"
    async with engine.begin() as conn:
        await save_provider(conn, settings.fernet_key(), _sms_provider(name, Gateway(), 10) | {"enabled": False})
        stored_secret = await conn.scalar(sa.select(providers.c.secrets).where(providers.c.name == name))
        await delete_provider(conn, name)
    assert stored_secret
    assert "sms-" not in stored_secret


async def test_a_campaign_fails_over_inside_its_batches(
    api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, stored: Any, gateways: Any,
    engine: AsyncEngine,
) -> None:  # fmt: skip
    primary, backup = gateways(), gateways()
    name_a, name_b = f"sms-ca-{uuid.uuid4().hex[:6]}", f"sms-cb-{uuid.uuid4().hex[:6]}"
    await stored(**_sms_provider(name_a, primary, 10))
    await stored(**_sms_provider(name_b, backup, 20))
    primary.fail_always(500)
    tag = f"t{uuid.uuid4().hex[:10]}"
    people: list[dict[str, Any]] = [
        {"user_id": f"{tag}-{n}", "phone": f"+1555{uuid.uuid4().int % 10**7:07d}", "tags": [tag]} for n in range(30)
    ]
    assert (await api.post("/v1/recipients/batch", json={"recipients": people})).status_code == 200
    segment_id = await tag_segment(manager, tag)
    campaign = await create_campaign(manager, template_key, segment_id, channels=["sms"])
    assert (await manager.post(f"/v1/campaigns/{campaign['id']}/launch")).status_code == 200
    done = await wait_campaign(manager, campaign["id"], "completed", "failed")

    [run] = done["runs"]
    assert (run["sent"], run["failed"]) == (30, 0)
    assert sorted(m["to"] for m in backup.sms_messages) == sorted(str(p["phone"]) for p in people)
    # The primary failed until its circuit opened; after that batches skipped it.
    assert len(primary.requests_to("sms")) < 30
    async with engine.connect() as conn:
        assert (await breaker.states(conn))[name_a].state == breaker.BreakerState.open


async def test_campaign_email_is_tracked_and_unsubscribe_is_honoured(
    api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, smtp_server: SmtpServer,
    api_url: str, engine: AsyncEngine,
) -> None:  # fmt: skip
    tag, emails = await make_audience(api, 2)
    segment_id = await tag_segment(manager, tag)
    campaign = await create_campaign(manager, template_key, segment_id)
    assert (await manager.post(f"/v1/campaigns/{campaign['id']}/launch")).status_code == 200
    await wait_campaign(manager, campaign["id"], "completed")

    [message] = smtp_server.handler.to(emails[0])
    html = message.get_body(("html",)).get_content()
    pixel = re.search(r'<img src="([^"]+/t/o/[^"]+\.gif)"', html)
    assert pixel is not None
    async with httpx.AsyncClient() as browser:
        assert (await browser.get(pixel.group(1))).headers["content-type"] == "image/gif"
        # One click on the mail client's unsubscribe button (RFC 8058).
        one_click = message["List-Unsubscribe"].strip("<>")
        assert one_click.startswith(f"{api_url}/u/")
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        response = await browser.post(one_click, data={"List-Unsubscribe": "One-Click"})
        assert response.status_code == 200
    async with engine.connect() as conn:
        opened = await conn.scalar(
            sa.text("SELECT d.opened_at FROM campaign_deliveries d JOIN campaign_runs r ON r.id = d.run_id "
                    "JOIN recipients p ON p.id = d.recipient_id WHERE r.campaign_id = :c AND p.email = :e"),
            {"c": uuid.UUID(campaign["id"]), "e": emails[0]},
        )  # fmt: skip
    assert opened is not None

    # The next campaign of that category skips the one who unsubscribed.
    again = await create_campaign(manager, template_key, segment_id)
    assert (await manager.post(f"/v1/campaigns/{again['id']}/launch")).status_code == 200
    [run] = (await wait_campaign(manager, again["id"], "completed"))["runs"]
    assert (run["sent"], run["suppressed"]) == (1, 1)
    assert len(smtp_server.handler.to(emails[0])) == 1
    assert len(smtp_server.handler.to(emails[1])) == 2


async def test_a_channel_whose_providers_are_all_disabled_does_not_fall_back_to_the_sandbox(
    api: httpx.AsyncClient, recipient: dict, stored: Any, gateways: Any, engine: AsyncEngine, settings: Settings
) -> None:
    """The send waits for a provider, as a campaign batch does: retried within its budget,
    then dead-lettered for a replay once one is enabled."""
    gateway = gateways()
    await stored(**_sms_provider(f"sms-off-{uuid.uuid4().hex[:6]}", gateway, 10, enabled=False))
    body = (await api.post("/v1/notifications?wait=true", json=_sms(recipient["user_id"]))).json()
    assert body["status"] == "failed"
    assert body["channels"][0]["error"] == "no enabled sms provider (all are disabled)"
    outbox = (await api.get("/dev/outbox")).json()
    assert recipient["phone"] not in {row["address"] for row in outbox}  # not "sent" to the sandbox
    assert gateway.requests == []
    async with engine.connect() as conn:  # a dead letter to replay once a provider is enabled
        letters = await conn.scalar(
            sa.text("SELECT count(*) FROM dead_letters WHERE notification_id = :id"), {"id": uuid.UUID(body["id"])}
        )
    assert letters == 1
    row = await _delivery(engine, body["id"])
    assert row.attempts == settings.send_retry_max_attempts


async def test_a_send_no_worker_picks_up_moves_to_the_next_provider(
    recipient: dict, stored: Any, gateways: Any, worker: MarqueeWorker, settings: Settings,
    temporal_client: Client, engine: AsyncEngine,
) -> None:  # fmt: skip
    """A provider disabled while sends wait on its queue: they time out there and fail over.
    (A rate-limited provider: only those send on their own queue; others send locally.)"""
    from core.contracts import NotificationInput, RetryOptions, workflow_id_for
    from workflows.notification import NotificationWorkflow

    stuck, backup = gateways(), gateways()
    name_a, name_b = f"sms-gone-{uuid.uuid4().hex[:6]}", f"sms-next-{uuid.uuid4().hex[:6]}"
    await stored(**_sms_provider(name_a, stuck, 10, rate_limit_per_second=100.0))
    await stored(**_sms_provider(name_b, backup, 20))
    await worker._stop_provider(name_a)  # as if another process had just disabled it: nobody polls its queue

    notification_id = uuid.uuid4()
    request = NotificationInput(
        notification_id=notification_id, idempotency_key=f"queue-timeout-{notification_id}", request_hash="-",
        requested_by="test", user_id=recipient["user_id"], category="premiere", channels=["sms"], title="T",
        body="Dune at 20:00", retry=RetryOptions(initial_seconds=0.2, max_seconds=1, queue_timeout_seconds=1.5),
    )  # fmt: skip
    outcome = await temporal_client.execute_workflow(
        NotificationWorkflow.run, request, id=workflow_id_for(notification_id), task_queue=settings.temporal_task_queue
    )
    assert [(c.channel, c.status) for c in outcome.channels] == [("sms", "sent")]
    assert stuck.requests == []
    assert [m["to"] for m in backup.sms_messages] == [recipient["phone"]]
    row = await _delivery(engine, str(notification_id))
    assert row.provider == name_b


async def test_a_rate_limited_provider_paces_campaign_batches_across_workers(
    api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, stored: Any, gateways: Any,
    services: WorkerServices, settings: Settings, temporal_client: Client,
) -> None:  # fmt: skip
    gateway = gateways()
    name = f"sms-bulk-{uuid.uuid4().hex[:6]}"
    rate = 50.0  # messages a second; batches of 100 (test settings) start at 0.5 a second
    await stored(**_sms_provider(name, gateway, 10, rate_limit_per_second=rate))
    tag = f"t{uuid.uuid4().hex[:10]}"
    people: list[dict[str, Any]] = [
        {"user_id": f"{tag}-{n}", "phone": f"+1555{uuid.uuid4().int % 10**7:07d}", "tags": [tag]} for n in range(300)
    ]
    assert (await api.post("/v1/recipients/batch", json={"recipients": people})).status_code == 200
    campaign = await create_campaign(manager, template_key, await tag_segment(manager, tag), channels=["sms"])
    second = await another_worker(services, settings, temporal_client)
    async with second:
        await second.refresh_providers()
        assert (await manager.post(f"/v1/campaigns/{campaign['id']}/launch")).status_code == 200
        done = await wait_campaign(manager, campaign["id"], "completed", "failed")
    assert done["runs"][0]["sent"] == 300

    history = await temporal_client.get_workflow_handle(f"campaign-{campaign['id']}").fetch_history()
    scheduled = [event.activity_task_scheduled_event_attributes for event in history.events
                 if event.HasField("activity_task_scheduled_event_attributes")]  # fmt: skip
    queues = {item.task_queue.name for item in scheduled if item.activity_type.name == "send_campaign_batch"}
    assert queues == {f"{settings.temporal_task_queue}.provider.{name}.bulk"}
    times = sorted(call.at for call in gateway.requests_to("sms"))
    assert len(times) == 300
    # Two workers, each limiting itself to 50 a second, would finish in about 3 s; the
    # server starts the three batches about 2 s apart, so the last one ends at least 5 s in.
    assert times[-1] - times[0] >= 4.5


async def test_a_multi_channel_campaign_paces_each_channel_on_its_own_lane(
    api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, stored: Any, gateways: Any,
    smtp_server: SmtpServer, settings: Settings, temporal_client: Client,
) -> None:  # fmt: skip
    """Email and SMS to the same people: each range of recipients becomes an SMS batch on the
    rate-limited provider's bulk queue and an email batch on the main queue, so the SMS rate
    holds across workers while email goes at its own pace."""
    gateway = gateways()
    name = f"sms-lane-{uuid.uuid4().hex[:6]}"
    await stored(**_sms_provider(name, gateway, 10, rate_limit_per_second=50.0))
    tag = f"t{uuid.uuid4().hex[:10]}"
    people: list[dict[str, Any]] = [
        {"user_id": f"{tag}-{n}", "email": f"{tag}-{n}@example.com", "phone": f"+1555{uuid.uuid4().int % 10**7:07d}",
         "tags": [tag]}
        for n in range(200)
    ]  # fmt: skip
    assert (await api.post("/v1/recipients/batch", json={"recipients": people})).status_code == 200
    segment = await tag_segment(manager, tag)
    campaign = await create_campaign(manager, template_key, segment, channels=["email", "sms"])
    assert (await manager.post(f"/v1/campaigns/{campaign['id']}/launch")).status_code == 200
    done = await wait_campaign(manager, campaign["id"], "completed", "failed")
    assert (done["status"], done["runs"][0]["sent"]) == ("completed", 400)

    assert sorted(m["to"] for m in gateway.sms_messages) == sorted(p["phone"] for p in people)
    emailed = {rcpt for rcpt, _ in smtp_server.handler.delivered_to({p["email"] for p in people})}
    assert emailed == {p["email"] for p in people}
    history = await temporal_client.get_workflow_handle(f"campaign-{campaign['id']}").fetch_history()
    batches = [
        (item.task_queue.name, item.input.payloads[0].data)
        for event in history.events
        if event.HasField("activity_task_scheduled_event_attributes")
        and (item := event.activity_task_scheduled_event_attributes).activity_type.name == "send_campaign_batch"
    ]
    sms_queue = f"{settings.temporal_task_queue}.provider.{name}.bulk"
    by_channel = {json.loads(data)["channel"]: queue for queue, data in batches}
    assert by_channel == {"sms": sms_queue, "email": settings.temporal_task_queue}
    assert len(batches) == 4  # two ranges of 100 (test settings), a batch per channel each
    times = sorted(call.at for call in gateway.requests_to("sms"))
    # Each SMS batch sends its 100 at 50 a second (2 s), and the server starts the second one
    # about 2 s after the first: about 4 s in all, where two unpaced batches would take 2 s.
    assert times[-1] - times[0] >= 3.0
    await assert_replays(history, "campaign_channel_lanes")


async def test_a_recipient_without_the_channels_contact_is_unreachable_not_failed(
    api: httpx.AsyncClient, settings: Settings, temporal_client: Client, engine: AsyncEngine, smtp_server: SmtpServer
) -> None:
    """The API refuses such a request up front; a run that meets it anyway (the phone removed
    since) records the channel unreachable, as a campaign does: no failure, no dead letter."""
    from core.contracts import NotificationInput, workflow_id_for
    from services.notifications import retry_options
    from workflows.notification import NotificationWorkflow

    user_id = f"no-phone-{uuid.uuid4().hex[:8]}"
    email = f"{user_id}@example.com"
    assert (await api.post("/v1/recipients", json={"user_id": user_id, "email": email})).status_code in (200, 201)
    notification_id = uuid.uuid4()
    request = NotificationInput(
        notification_id=notification_id, idempotency_key=f"unreachable-{notification_id}", request_hash="-",
        requested_by="test", user_id=user_id, category="premiere", channels=["email", "sms"], title="Dune",
        body="Dune at 20:00", retry=retry_options(settings),
    )  # fmt: skip
    outcome = await temporal_client.execute_workflow(
        NotificationWorkflow.run, request, id=workflow_id_for(notification_id), task_queue=settings.temporal_task_queue
    )
    assert {(c.channel, c.status) for c in outcome.channels} == {("email", "sent"), ("sms", "unreachable")}
    body = (await api.get(f"/v1/notifications/{notification_id}")).json()
    assert body["status"] == "sent"
    sms = next(channel for channel in body["channels"] if channel["channel"] == "sms")
    assert (sms["status"], sms["error"]) == ("unreachable", "recipient has no phone for sms")
    assert len(smtp_server.handler.to(email)) == 1
    async with engine.connect() as conn:
        letters = await conn.scalar(
            sa.text("SELECT count(*) FROM dead_letters WHERE notification_id = :id"), {"id": notification_id}
        )
    assert letters == 0
