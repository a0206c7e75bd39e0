"""Temporal holds no personal data in clear: a worker, API and client configured with codec
keys (through core.temporal.connect, as `marquee api`, `marquee worker` and `marquee dev`
are) against the session's Temporal dev server. The run's history, as Temporal stores and
serves it, holds neither the address nor the message; the keys open it, a rotated key list
still does (and replays the run), and the codec server decodes it for admins only."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
import sqlalchemy as sa
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.history.v1 import MarkerRecordedEventAttributes
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer

from api.app import create_app
from core.auth import Role
from core.codec import ENCODING, KEY_ID, CodecKeyError, EncryptionCodec, new_key, parse_keys
from core.config import Settings
from core.contracts import NotificationOutcome
from core.temporal import connect, data_converter
from entrypoints.codec_server import create_codec_app
from services.preferences import suppressions
from tests.stack import SmtpServer, token_for
from worker import WORKFLOWS, MarqueeWorker, WorkerServices, create_worker

OLD_KEY = new_key("2024-old")
NEW_KEY = new_key("2025-new")


@dataclass
class CodecStack:
    settings: Settings
    client: Client
    worker: MarqueeWorker
    api: httpx.AsyncClient


def _with_keys(settings: Settings, temporal_client: Client, keys: str) -> Settings:
    return settings.model_copy(
        update={
            "temporal_task_queue": f"codec-{uuid.uuid4().hex[:8]}",  # only this test's worker runs its runs
            "temporal_address": temporal_client.service_client.config.target_host,
            "temporal_namespace": temporal_client.namespace,
            "temporal_codec_keys": SecretStr(keys),
        }
    )


@pytest.fixture
async def codec_stack(
    settings: Settings, services: WorkerServices, temporal_client: Client
) -> AsyncIterator[CodecStack]:
    codec_settings = _with_keys(settings, temporal_client, OLD_KEY)
    client = await connect(codec_settings)
    directory = services.directory.another(codec_settings.temporal_task_queue)
    worker = create_worker(
        client, codec_settings, WorkerServices(services.engine, services.history, directory, codec_settings)
    )
    app = create_app(codec_settings, engine=services.engine, temporal=client)
    app.state.temporal = client  # the lifespan that would set it does not run under ASGITransport
    headers = {"Authorization": f"Bearer {token_for(codec_settings, Role.service, 'codec-test')}"}
    async with (
        worker,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://marquee", headers=headers, timeout=30
        ) as api,
    ):
        yield CodecStack(codec_settings, client, worker, api)


def _payloads(message: Message, skip: frozenset[str] = frozenset({"header", "search_attributes"})) -> Iterator[Payload]:
    """Every Payload in a history event, wherever it sits. Headers (trace context) and search
    attributes are left out: Temporal never passes them through the codec, and Marquee puts
    no personal data there."""
    if isinstance(message, MarkerRecordedEventAttributes):
        # A local activity's marker: its result is ours; the rest (sequence number, activity
        # type, times; a patch's id) is the SDK's bookkeeping, written in clear by design.
        if "result" in message.details:
            yield from message.details["result"].payloads
        return
    for field, value in message.ListFields():
        if field.name in skip or field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            values = list(value.values())
        elif isinstance(value, Message):
            values = [value]
        else:  # a repeated field
            values = list(value)
        for item in values:
            if isinstance(item, Payload):
                yield item
            elif isinstance(item, Message):
                yield from _payloads(item, skip)


def _stored(history: WorkflowHistory) -> bytes:
    """The history's events as the server stores and serves them (protobuf bytes)."""
    return b"".join(event.SerializeToString() for event in history.events)


async def test_history_holds_ciphertext_that_rotated_keys_and_the_codec_server_open(
    codec_stack: CodecStack,
    recipient: dict,
    smtp_server: SmtpServer,
    settings: Settings,
    temporal_client: Client,
    engine: AsyncEngine,
) -> None:
    address, phone = recipient["email"], recipient["phone"]
    title, body = f"Seat {uuid.uuid4().hex[:8]} is yours", f"Your code is {uuid.uuid4().int % 10**9:09d}"
    sent = await codec_stack.api.post(
        "/v1/notifications?wait=true",
        json={"user_id": recipient["user_id"], "type": "account", "channels": ["email"], "title": title, "body": body},
    )
    assert sent.status_code == 200, sent.text
    assert sent.json()["status"] == "sent", sent.json()
    [message] = smtp_server.handler.to(address)  # delivered: the worker read its encrypted input
    assert message["Subject"] == title

    workflow_id = sent.json()["workflow_id"]
    history = await codec_stack.client.get_workflow_handle(workflow_id).fetch_history()
    stored = _stored(history)
    for personal in (address, phone, title, body, recipient["user_id"] + "@"):
        assert personal.encode() not in stored, personal
    payloads = [payload for event in history.events for payload in _payloads(event)]
    assert len(payloads) >= 4  # input, activity arguments and results, the result
    assert {payload.metadata["encoding"] for payload in payloads} == {ENCODING}
    assert {payload.metadata[KEY_ID] for payload in payloads} == {b"2024-old"}
    # The same payloads opened with the key: the address and the message were in there.
    opened = b"".join(
        payload.SerializeToString() for payload in await EncryptionCodec(parse_keys(OLD_KEY)).decode(payloads)
    )
    assert address.encode() in opened
    assert body.encode() in opened

    # Rotation: a new key first, the old one kept. The old run's result still reads and its
    # history replays with the current code; without the old key it does not open.
    rotated = _with_keys(settings, temporal_client, f"{NEW_KEY},{OLD_KEY}")
    rotated_client = await connect(rotated)
    result = await rotated_client.get_workflow_handle(workflow_id, result_type=NotificationOutcome).result()
    assert [(channel.channel, channel.status) for channel in result.channels] == [("email", "sent")]
    replayer = Replayer(workflows=WORKFLOWS, data_converter=data_converter(rotated))
    assert (await replayer.replay_workflow(history)).replay_failure is None
    new_only = await connect(_with_keys(settings, temporal_client, NEW_KEY))
    with pytest.raises(CodecKeyError, match="2024-old"):
        await new_only.get_workflow_handle(workflow_id).result()

    # A refusal whose SMTP reply quotes the address: the failure message is sealed too.
    smtp_server.handler.refuse[address] = f"550 5.1.1 <{address}>: Recipient address rejected"
    try:
        rejected = await codec_stack.api.post(
            "/v1/notifications?wait=true",
            json={"user_id": recipient["user_id"], "type": "account", "channels": ["email"], "title": "T", "body": "B"},
        )
    finally:
        del smtp_server.handler.refuse[address]
        async with engine.begin() as conn:  # the 550 suppressed the address
            await conn.execute(sa.delete(suppressions).where(suppressions.c.address == address))
    assert rejected.json()["status"] == "failed", rejected.json()
    failed_history = await codec_stack.client.get_workflow_handle(rejected.json()["workflow_id"]).fetch_history()
    assert b"Recipient address rejected" in b"".join(  # the reply reached the history: sealed
        payload.SerializeToString()
        for payload in await EncryptionCodec(parse_keys(OLD_KEY)).decode(
            [payload for event in failed_history.events for payload in _payloads(event)]
        )
    )
    assert address.encode() not in _stored(failed_history)
    assert b"Recipient address rejected" not in _stored(failed_history)

    # The codec server, as the Web UI calls it: admins get the payloads in clear.
    codec_app = create_codec_app(rotated)
    request = json_format.MessageToJson(Payloads(payloads=payloads))
    ui = "http://127.0.0.1:8233"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=codec_app), base_url="http://codec") as codec:
        decoded = await codec.post(
            "/decode",
            content=request,
            headers={"Authorization": f"Bearer {token_for(settings, Role.admin)}", "X-Namespace": "default"},
        )
        assert decoded.status_code == 200, decoded.text
        clear = json_format.Parse(decoded.text, Payloads())
        assert len(clear.payloads) == len(payloads)
        assert {payload.metadata["encoding"] for payload in clear.payloads} == {b"json/plain"}
        assert any(address.encode() in payload.data for payload in clear.payloads)

        encoded = await codec.post(
            "/encode", content=decoded.text, headers={"Authorization": f"Bearer {token_for(settings, Role.admin)}"}
        )
        assert encoded.status_code == 200, encoded.text
        sealed = json_format.Parse(encoded.text, Payloads())
        assert {payload.metadata[KEY_ID] for payload in sealed.payloads} == {b"2025-new"}  # the first key seals
        assert address.encode() not in sealed.SerializeToString()

        for role in (Role.service, Role.campaign_manager, Role.analyst):
            refused = await codec.post(
                "/decode", content=request, headers={"Authorization": f"Bearer {token_for(settings, role)}"}
            )
            assert refused.status_code == 403, (role, refused.text)
            assert address not in refused.text
        for headers in ({}, {"Authorization": "Bearer not-a-jwt"}, {"Authorization": "Basic YWRtaW46YWRtaW4="}):
            refused = await codec.post("/decode", content=request, headers=headers)
            assert refused.status_code == 401, (headers, refused.text)
            assert refused.headers["WWW-Authenticate"] == "Bearer"
            assert address not in refused.text

        # The browser's preflight from the Web UI's origin, and another origin's.
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,x-namespace",
        }
        allowed = await codec.options("/decode", headers={"Origin": ui, **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["Access-Control-Allow-Origin"] == ui
        assert "authorization" in allowed.headers["Access-Control-Allow-Headers"].lower()
        other = await codec.options("/decode", headers={"Origin": "https://evil.example", **preflight})
        assert "Access-Control-Allow-Origin" not in other.headers
