"""The NATS JetStream intake against the machine's NATS server (127.0.0.1:4222, JetStream on)
and the real stack: an event published to NATS mails its user once; what can never be
accepted is dead-lettered with its reason; a transient failure is redelivered, then
dead-lettered; a consumer killed between accepting and acking loses nothing and, restarted,
sends nothing twice. Each test has streams of its own (a prefix unique to it), deleted after."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import sqlalchemy as sa
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerInfo
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from core.config import Settings
from core.db import create_engine
from entrypoints.embedded import venv_binary
from entrypoints.event_consumer import EventConsumer, Names, NatsUnavailable, connect_nats
from tests.e2e import test_events
from tests.e2e.processes import marquee_env
from tests.e2e.test_events import event, mail_to, wait_event
from tests.e2e.test_health import sample
from tests.e2e.test_metrics import scrape
from tests.stack import SmtpServer
from worker import MarqueeWorker

NATS_URL = "nats://127.0.0.1:4222"
SESSION = uuid.uuid4().hex[:8]

# The events tests' fixtures: a campaign manager's client, and a type whose rule mails a link.
manager = test_events.manager
password_reset = test_events.password_reset

# The consumer killed after accepting, before acking: its ack never comes (the crash lands there).
HOLD_THE_ACK = """
import asyncio
from nats.aio.msg import Msg

async def never(self):
    print("accepted, holding the ack", flush=True)
    await asyncio.sleep(3600)

Msg.ack = never
from entrypoints.cli import main
main(["events", "consume"])
"""


@pytest.fixture
async def nc() -> AsyncIterator[NATS]:
    try:
        client = await connect_nats(NATS_URL, 3.0)
    except NatsUnavailable as err:
        pytest.fail(f"these tests need NATS with JetStream at {NATS_URL} (.ci/run starts one): {err}")
    yield client
    await client.close()


@pytest.fixture
async def intake_settings(settings: Settings, nc: NATS) -> AsyncIterator[Callable[..., Settings]]:
    """Settings with subjects and streams of this test's own; the streams are deleted after."""
    made: list[Names] = []

    def make(**overrides: Any) -> Settings:
        names = Names(f"mqtest{SESSION}{uuid.uuid4().hex[:6]}")
        made.append(names)
        intake = {"nats_url": NATS_URL, "nats_prefix": names.prefix, "events_ack_wait_seconds": 5.0,
                  "events_max_deliver": 3}  # fmt: skip
        return settings.model_copy(update={**intake, **overrides})

    yield make
    js = nc.jetstream()
    for names in made:
        for stream in (names.stream, names.dead_stream):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)


@contextlib.asynccontextmanager
async def running(nc: NATS, engine: AsyncEngine, temporal: Client, settings: Settings) -> AsyncIterator[Names]:
    """The consumer in this process (its counters are the API's /metrics), until the block ends."""
    consumer = EventConsumer(nc, engine, temporal, settings)
    await consumer.prepare()
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield consumer.names
    finally:
        stop.set()
        await task


async def publish(nc: NATS, names: Names, body: dict[str, Any] | bytes, event_type: str = "any") -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await nc.jetstream().publish(names.subject(event_type), data, stream=names.stream)


async def dead_letters(nc: NATS, names: Names, count: int, seconds: float = 20) -> list[Any]:
    """The dead-letter stream's messages, once it holds `count`."""
    js = nc.jetstream()
    deadline = asyncio.get_running_loop().time() + seconds
    while (held := (await js.stream_info(names.dead_stream)).state.messages) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{held} dead letters, wanted {count}"
        await asyncio.sleep(0.1)
    last = (await js.stream_info(names.dead_stream)).state.last_seq
    return [await js.get_msg(names.dead_stream, seq) for seq in range(1, last + 1)]


async def settled(nc: NATS, names: Names, handled: int, seconds: float = 20) -> ConsumerInfo:
    """The consumer's state once `handled` messages are acked or terminated and none is pending."""
    js = nc.jetstream()
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        info = await js.consumer_info(names.stream, names.durable)
        assert info.ack_floor is not None
        if info.ack_floor.stream_seq >= handled and info.num_ack_pending == 0 and info.num_pending == 0:
            return info
        assert asyncio.get_running_loop().time() < deadline, f"consumer not settled: {info}"
        await asyncio.sleep(0.1)


async def arrived(api: httpx.AsyncClient, event_id: str, *statuses: str) -> dict[str, Any]:
    """wait_event, once the consumer stored the event (until then GET answers 404)."""
    deadline = asyncio.get_running_loop().time() + 20
    while (await api.get(f"/v1/events/{event_id}")).status_code == 404:
        assert asyncio.get_running_loop().time() < deadline, f"event {event_id} never stored"
        await asyncio.sleep(0.1)
    return await wait_event(api, event_id, *statuses)


async def stored(engine: AsyncEngine, *event_ids: str) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(sa.text("SELECT count(*) FROM events WHERE id = ANY(:ids)"),
                                     {"ids": list(event_ids)}) or 0)  # fmt: skip


async def test_an_event_published_to_nats_mails_the_user_once_with_the_payload_value(
    nc: NATS, intake_settings: Callable[..., Settings], engine: AsyncEngine, temporal_client: Client,
    worker: MarqueeWorker, api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer,
    password_reset: tuple[str, dict[str, Any]],
) -> None:  # fmt: skip
    name, rule = password_reset
    link = f"https://cinema.example/reset/{uuid.uuid4().hex}"
    body = event(name, {"user_id": recipient["user_id"], "link": link})
    async with running(nc, engine, temporal_client, intake_settings()) as names:
        await publish(nc, names, body, name)
        await publish(nc, names, body, name)  # a publisher's retry: the same event
        done = await arrived(api, body["id"], "sent")
        await settled(nc, names, 2)
    assert done["source"] == "nats"
    assert [action["rule_id"] for action in done["actions"]] == [rule["id"]]
    [message] = await mail_to(smtp_server, recipient["email"])
    assert link in message.get_body(("html",)).get_content()
    await asyncio.sleep(1)  # a duplicate would have arrived by now
    assert len(smtp_server.handler.to(recipient["email"])) == 1


async def test_what_can_never_be_accepted_is_dead_lettered_with_its_reason_and_counted(
    nc: NATS, intake_settings: Callable[..., Settings], engine: AsyncEngine, temporal_client: Client,
    worker: MarqueeWorker, api: httpx.AsyncClient, api_url: str, password_reset: tuple[str, dict[str, Any]],
) -> None:  # fmt: skip
    name, _ = password_reset
    good = event(name, {"user_id": "nobody", "link": "https://cinema.example/r/1"})
    bad_payload = event(name, {"link": 7})
    unknown = event("no.such_type", {})
    naive = event(name, {"user_id": "u", "link": "l"}, occurred_at="2026-12-06T10:00:00")
    reused = {**good, "payload": {**good["payload"], "link": "https://other.example"}}
    before = await scrape(api_url)
    async with running(nc, engine, temporal_client, intake_settings()) as names:
        await publish(nc, names, good, name)
        await settled(nc, names, 1)  # first: the id reused below is then a conflict, whatever the order
        await publish(nc, names, b'{"id": "not json', name)
        for body in (naive, bad_payload, unknown, reused):
            await publish(nc, names, body, name)
        letters = await dead_letters(nc, names, 5)
        info = await settled(nc, names, 6)
    assert (info.delivered.stream_seq if info.delivered else 0) == 6
    assert info.num_redelivered == 0  # terminated at once, not retried
    found = {(letter.headers or {})["Marquee-Stream-Sequence"]: letter for letter in letters}
    assert sorted(found) == ["2", "3", "4", "5", "6"]
    reasons = {seq: (letter.headers or {})["Marquee-Reason"] for seq, letter in found.items()}
    assert reasons == {"2": "malformed", "3": "malformed", "4": "invalid_payload", "5": "unknown_type",
                       "6": "conflict"}  # fmt: skip
    fields = {seq: (letter.headers or {}).get("Marquee-Field") for seq, letter in found.items()}
    assert fields["3"] == "occurred_at"
    assert sorted((fields["4"] or "").split(",")) == ["payload", "payload.link"]
    assert (fields["5"], fields["6"]) == ("type", "id")
    assert "different content" in (found["6"].headers or {})["Marquee-Detail"]
    # The original body, as published.
    assert found["2"].data == b'{"id": "not json'
    assert json.loads(found["4"].data) == bad_payload
    assert all((letter.headers or {})["Marquee-Subject"] == names.subject(name) for letter in letters)
    assert await stored(engine, bad_payload["id"], unknown["id"], naive["id"]) == 0
    async with engine.connect() as conn:
        kept = await conn.scalar(sa.text("SELECT payload->>'link' FROM events WHERE id = :id"), {"id": good["id"]})
    assert kept == good["payload"]["link"]
    after = await scrape(api_url)
    counted = {reason: sample(after, "marquee_events_rejected_total", source="nats", reason=reason)
               - sample(before, "marquee_events_rejected_total", source="nats", reason=reason)
               for reason in ("malformed", "invalid_payload", "unknown_type", "conflict")}  # fmt: skip
    assert counted == {"malformed": 2, "invalid_payload": 1, "unknown_type": 1, "conflict": 1}


async def test_a_transient_failure_is_redelivered_then_dead_lettered_when_deliveries_run_out(
    nc: NATS, intake_settings: Callable[..., Settings], settings: Settings, temporal_client: Client,
    password_reset: tuple[str, dict[str, Any]],
) -> None:  # fmt: skip
    name, _ = password_reset
    assert settings.database_url is not None
    # PostgreSQL "down": a database that does not exist refuses every connection.
    gone = create_engine(settings.database_url.rsplit("/", 1)[0] + f"/marquee_gone_{SESSION}", pool_size=1)
    body = event(name, {"user_id": "u", "link": "https://cinema.example/r/2"})
    try:
        async with running(nc, gone, temporal_client, intake_settings(events_max_deliver=2)) as names:
            await publish(nc, names, body, name)
            [letter] = await dead_letters(nc, names, 1)
            info = await settled(nc, names, 1)
    finally:
        await gone.dispose()
    headers = letter.headers or {}
    assert headers["Marquee-Reason"] == "redelivery_exhausted"
    assert headers["Marquee-Deliveries"] == "2"
    assert "marquee_gone_" in headers["Marquee-Detail"]
    assert json.loads(letter.data) == body
    assert deliveries(info) == 2  # delivered, redelivered, dead-lettered


async def test_a_consumer_killed_between_accepting_and_acking_loses_nothing_and_sends_once(
    tmp_path: Path, nc: NATS, intake_settings: Callable[..., Settings], settings: Settings, engine: AsyncEngine,
    temporal_client: Client, worker: MarqueeWorker, api: httpx.AsyncClient, recipient: dict,
    smtp_server: SmtpServer, password_reset: tuple[str, dict[str, Any]],
) -> None:  # fmt: skip
    name, _ = password_reset
    intake = intake_settings()
    names = Names(intake.nats_prefix)
    env = marquee_env(settings, temporal_client, tmp_path, MARQUEE_NATS_URL=NATS_URL,
                      MARQUEE_NATS_PREFIX=intake.nats_prefix, MARQUEE_EVENTS_ACK_WAIT_SECONDS="5",
                      MARQUEE_EVENTS_MAX_DELIVER="3",
                      # The session worker runs the workflows these processes start.
                      MARQUEE_TEMPORAL_TASK_QUEUE=settings.temporal_task_queue)  # fmt: skip
    link = f"https://cinema.example/reset/{uuid.uuid4().hex}"
    body = event(name, {"user_id": recipient["user_id"], "link": link})

    out, err = tmp_path / "first.out", tmp_path / "first.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        first = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLD_THE_ACK, env=env, stdout=stdout,
                                                     stderr=stderr)  # fmt: skip
        try:
            await _until(lambda: b"event consumer started" in err.read_bytes(), first, "the first consumer to start")
            await publish(nc, names, body, name)
            await _until(lambda: b"holding the ack" in out.read_bytes(), first, "the event to be accepted")
            assert await stored(engine, body["id"]) == 1
            info = await nc.jetstream().consumer_info(names.stream, names.durable)
            assert (info.num_ack_pending, info.ack_floor and info.ack_floor.stream_seq) == (1, 0)  # not acked
        finally:
            first.send_signal(signal.SIGKILL)
            await first.wait()

    err = tmp_path / "second.err"
    with err.open("wb") as stderr:
        second = await asyncio.create_subprocess_exec(venv_binary("marquee"), "events", "consume", env=env,
                                                      stdout=asyncio.subprocess.DEVNULL, stderr=stderr)  # fmt: skip
        try:
            info = await settled(nc, names, 1, seconds=30)  # redelivered once the ack wait ran out, then acked
            assert deliveries(info) == 2
            await _until(lambda: b"event redelivered, accepted before" in err.read_bytes(), second, "the replay")
            await arrived(api, body["id"], "sent")
            [message] = await mail_to(smtp_server, recipient["email"])
            assert link in message.get_body(("html",)).get_content()
        finally:
            second.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(second.wait(), 20)
        assert code == 0, err.read_bytes().decode(errors="replace")[-3000:]
        assert b"event consumer stopped" in err.read_bytes()
    await asyncio.sleep(1)  # a duplicate would have arrived by now
    assert len(smtp_server.handler.to(recipient["email"])) == 1
    async with engine.connect() as conn:
        notifications = await conn.scalar(sa.text("SELECT count(*) FROM notifications WHERE user_id = :u"),
                                          {"u": recipient["user_id"]})  # fmt: skip
    assert (await stored(engine, body["id"]), notifications) == (1, 1)


def deliveries(info: ConsumerInfo) -> int:
    """How many times the consumer delivered (the stream's messages, and their redeliveries)."""
    return info.delivered.consumer_seq if info.delivered else 0


async def _until(
    check: Callable[[], bool], process: asyncio.subprocess.Process, what: str, seconds: float = 30
) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert process.returncode is None, f"the consumer exited ({process.returncode}) before {what}"
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
