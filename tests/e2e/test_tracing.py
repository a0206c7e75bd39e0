"""Tracing end to end: `marquee api` and `marquee worker` as real processes, each exporting
with the real OTLP/HTTP exporter to a receiver of the test's own, which decodes the protobuf.

One notification (email through a stored SMTP provider, SMS through a stored HTTP gateway)
must make ONE connected trace from the HTTP request to the provider calls, and one campaign
run one trace with a span per batch; no span carries the recipient's address or the text.
The processes (not this one) hold the tracer providers, so the session's other tests run
untraced, and the processes use a task queue of their own.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from core.auth import Role
from core.config import Settings
from core.tracing import BATCH_LANE, BATCH_SIZE, CHANNEL, OUTCOME, PROVIDER, PROVIDER_KIND, RUN_ID
from services.providers import bulk_queue_for, providers, save_provider, task_queue_for
from tests.e2e.gateways import Gateway
from tests.e2e.processes import marquee_env, marquee_processes
from tests.stack import SmtpServer, token_for

SMTP_RATE = 50.0  # a rate limit puts campaign batches on the SMTP provider's bulk queue
TITLE, BODY = "Episode 5 is out", "Watch episode 5 of The Long Night tonight."


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    attributes: dict[str, Any]
    texts: list[str] = field(default_factory=list)  # every string value: attributes, events, resource


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


def _flat(attributes: Any) -> dict[str, Any]:
    return {attribute.key: _value(attribute.value) for attribute in attributes}


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1 that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.add(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = _flat(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = _flat(span.attributes)
                    values: list[KeyValue] = [*span.attributes, *resource_spans.resource.attributes]
                    for event in span.events:
                        values += event.attributes
                    texts = [span.name, span.status.message, *(str(_value(kv.value)) for kv in values)]
                    self.spans.append(Span(str(resource["service.name"]), span.trace_id.hex(), span.span_id.hex(),
                                           span.parent_span_id.hex(), span.name, attributes, texts))  # fmt: skip

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    async def trace_of(self, root: Callable[[Span], bool], complete: Callable[[list[Span]], bool]) -> list[Span]:
        """The spans of the trace whose root `root` matches, once `complete` says all came
        and every parent is there (the processes export in batches, a parent after its children)."""
        found: list[Span] = []
        for _ in range(300):
            roots = [span for span in self.spans if root(span)]
            if roots:
                found = [span for span in self.spans if span.trace_id == roots[0].trace_id]
                if complete(found) and not orphans(found):
                    return found
            await asyncio.sleep(0.05)
        raise AssertionError(f"incomplete trace: {[(s.service, s.name) for s in found]}, orphans {orphans(found)}")


def orphans(spans: list[Span]) -> list[str]:
    """Spans whose parent is not in `spans`: a connected trace has none."""
    ids = {span.span_id for span in spans}
    return [span.name for span in spans if span.parent_id and span.parent_id not in ids]


def children(spans: list[Span], parent: Span, name: str) -> list[Span]:
    return [span for span in spans if span.parent_id == parent.span_id and span.name == name]


def only(spans: list[Span], parent: Span, name: str) -> Span:
    found = children(spans, parent, name)
    assert len(found) == 1, f"{name} under {parent.name}: {len(found)} in\n{tree(spans)}"
    return found[0]


def tree(spans: list[Span], parent: str = "", depth: int = 0) -> str:
    """The trace as an indented outline (for failure messages)."""
    return "".join(f"{'  ' * depth}{span.name} ({span.service})\n{tree(spans, span.span_id, depth + 1)}"
                   for span in spans if span.parent_id == parent)  # fmt: skip


def spans_root(spans: list[Span]) -> Span:
    """The one span without a parent (trace_of saw to it that every other one's is there)."""
    [root] = [span for span in spans if not span.parent_id]
    return root


@dataclass
class TracedStack:
    url: str
    queue: str
    smtp_provider: str
    sms_provider: str
    receiver: OtlpReceiver
    settings: Settings

    def client(self, role: Role) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token_for(self.settings, role, f'tracing-{role.value}')}"}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
async def traced(
    settings: Settings,
    engine: AsyncEngine,
    temporal_client: Client,
    smtp_server: SmtpServer,
    gateways: Callable[[], Gateway],
    receiver: OtlpReceiver,
    tmp_path: Path,
) -> AsyncIterator[TracedStack]:
    """`marquee api` and `marquee worker` with OTEL_EXPORTER_OTLP_ENDPOINT set, on a queue
    of their own (tests.e2e.processes), with an SMTP provider and an SMS gateway stored
    before the worker starts (it loads them at once)."""
    suffix = uuid.uuid4().hex[:8]
    smtp_name, sms_name, gateway = f"trace-smtp-{suffix}", f"trace-sms-{suffix}", gateways()
    stored = [
        {"name": smtp_name, "channel": "email", "kind": "smtp", "priority": 1, "rate_limit_per_second": SMTP_RATE,
         "settings": {"host": "127.0.0.1", "port": smtp_server.port, "sender": "Marquee <news@example.com>"}},
        {"name": sms_name, "channel": "sms", "kind": "sms-json", "priority": 1,
         "settings": {"base_url": gateway.url, "sender": "Marquee", "timeout": 2},
         "secrets": {"api_key": gateway.sms_api_key}},
    ]  # fmt: skip
    async with engine.begin() as conn:
        for values in stored:
            await save_provider(conn, settings.fernet_key(), values)
    env = marquee_env(
        settings, temporal_client, tmp_path,
        MARQUEE_CAMPAIGN_BATCH_SIZE="2",
        MARQUEE_HISTORY_FLUSH_SECONDS="0.05",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        OTEL_BSP_SCHEDULE_DELAY="100",  # milliseconds: spans reach the receiver quickly
    )  # fmt: skip
    try:
        async with marquee_processes(env, tmp_path, "api", "worker") as (api, _):
            await api.wait_for_api()
            yield TracedStack(api.url, env["MARQUEE_TEMPORAL_TASK_QUEUE"], smtp_name, sms_name, receiver, settings)
    finally:
        async with engine.begin() as conn:
            await conn.execute(sa.delete(providers).where(providers.c.name.in_([smtp_name, sms_name])))


def assert_no_personal_data(receiver: OtlpReceiver, *secrets_: str) -> None:
    leaks = [(span.service, span.name, text) for span in receiver.spans for text in span.texts
             for secret in secrets_ if secret in text]  # fmt: skip
    assert not leaks


async def test_one_connected_trace_per_notification_and_per_campaign_run(
    traced: TracedStack, temporal_client: Client
) -> None:
    user = f"traced-{secrets.token_hex(5)}"
    address, phone = f"{user}@example.com", f"+1555{secrets.randbelow(10**7):07d}"
    async with traced.client(Role.service) as api:
        created = await api.post("/v1/recipients", json={"user_id": user, "email": address, "phone": phone})
        assert created.status_code == 200, created.text
        accepted = await api.post("/v1/notifications", json={"user_id": user, "type": "new_episode",
                                                              "channels": ["email", "sms"], "title": TITLE,
                                                              "body": BODY})  # fmt: skip
        assert accepted.status_code == 202, accepted.text
        notification_id = accepted.json()["id"]

        def sent(spans: list[Span]) -> bool:
            return sum(span.name in ("smtp send", "sms-json send") for span in spans) == 2 and any(
                span.name.startswith("POST") and span.parent_id
                for span in spans  # the gateway call
            )

        spans = await traced.receiver.trace_of(lambda s: s.name == "POST /v1/notifications", sent)

    # HTTP request -> workflow start -> workflow -> prepare; -> send on the provider's queue -> call.
    request = spans_root(spans)
    assert request.service == "marquee-api"
    start = only(spans, request, "StartWorkflow:NotificationWorkflow")
    # Temporal's workflow spans are instants (a run may last days and be replayed): the
    # workflow's activities hang off the start, beside RunWorkflow.
    assert only(spans, start, "RunWorkflow:NotificationWorkflow").service == "marquee-worker"
    prepare = only(spans, only(spans, start, "StartActivity:prepare_notification"), "RunActivity:prepare_notification")
    sends = [
        only(spans, scheduled, "RunActivity:send_notification")
        for scheduled in children(spans, start, "StartActivity:send_notification")
    ]
    calls = {
        call.name: call
        for send in sends
        for call in spans
        if call.parent_id == send.span_id and PROVIDER in call.attributes
    }
    assert calls["smtp send"].attributes == {PROVIDER: traced.smtp_provider, PROVIDER_KIND: "smtp", CHANNEL: "email",
                                             OUTCOME: "sent"}  # fmt: skip
    assert calls["sms-json send"].attributes == {PROVIDER: traced.sms_provider, PROVIDER_KIND: "sms-json",
                                                 CHANNEL: "sms", OUTCOME: "sent"}  # fmt: skip
    [gateway_call] = [span for span in spans if span.parent_id == calls["sms-json send"].span_id]
    assert (gateway_call.name, gateway_call.service) == ("POST", "marquee-worker")
    assert {span.attributes.get("db.system") for span in spans if span.parent_id == prepare.span_id} == {"postgresql"}
    assert any(span.attributes.get("db.system") == "postgresql" for span in children(spans, request, "INSERT"))
    # The rate-limited provider's send ran on its own queue, the other's as a local activity
    # of the workflow's worker (Temporal's history says where).
    history = await temporal_client.get_workflow_handle(f"notification-{notification_id}").fetch_history()
    queues = {event.activity_task_scheduled_event_attributes.task_queue.name for event in history.events
              if event.activity_task_scheduled_event_attributes.activity_type.name == "send_notification"}  # fmt: skip
    assert queues == {task_queue_for(traced.queue, traced.smtp_provider)}
    local = [event for event in history.events
             if event.marker_recorded_event_attributes.marker_name == "core_local_activity"]  # fmt: skip
    assert sum(b"send_notification" in event.SerializeToString() for event in local) == 1

    # A campaign run: one trace from the launch, a span per batch of two, its sends below it.
    tag = f"t{secrets.token_hex(5)}"
    async with traced.client(Role.service) as api, traced.client(Role.campaign_manager) as manager:
        emails = [f"{tag}-{n}@example.com" for n in range(3)]
        people = [{"user_id": email.split("@")[0], "email": email, "tags": [tag]} for email in emails]
        assert (await api.post("/v1/recipients/batch", json={"recipients": people})).status_code == 200
        template = {
            "key": f"traced-{tag}",
            "category": "marketing",
            "content": {"locales": {"en": {"email": {"subject": "Premiere", "html": f"<p>{BODY}</p>"}}}},
        }
        assert (await manager.post("/v1/templates", json=template)).status_code == 201
        segment = await manager.post(
            "/v1/segments", json={"name": tag, "filter": {"field": "tags", "op": "contains", "value": tag}}
        )
        campaign = await manager.post(
            "/v1/campaigns",
            json={"name": tag, "template": template["key"], "segment_id": segment.json()["id"], "channels": ["email"]},
        )
        assert campaign.status_code == 201, campaign.text
        assert (await manager.post(f"/v1/campaigns/{campaign.json()['id']}/launch")).status_code < 300

        def batches_sent(spans: list[Span]) -> bool:
            return sum(span.name == "smtp send" for span in spans) == 3 and any(
                span.name == "RunActivity:finish_campaign_run" for span in spans
            )

        run = await traced.receiver.trace_of(lambda s: s.name.endswith("/launch") and not s.parent_id, batches_sent)

    workflow = only(run, spans_root(run), "StartWorkflow:CampaignWorkflow")
    only(run, workflow, "RunWorkflow:CampaignWorkflow")
    batches = [only(run, only(run, scheduled, "RunActivity:send_campaign_batch"), "campaign batch")
               for scheduled in children(run, workflow, "StartActivity:send_campaign_batch")]  # fmt: skip
    assert sorted(batch.attributes[BATCH_SIZE] for batch in batches) == [1, 2]
    lane = bulk_queue_for(task_queue_for(traced.queue, traced.smtp_provider))
    for batch in batches:
        assert batch.attributes[CHANNEL] == ["email"]
        assert batch.attributes[PROVIDER] == [traced.smtp_provider]
        assert batch.attributes[BATCH_LANE] == lane
        assert batch.attributes[RUN_ID] == f"campaign-{campaign.json()['id']}"
        assert batch.attributes["marquee.batch.sent"] == batch.attributes[BATCH_SIZE]
        assert {span.name for span in run if span.parent_id == batch.span_id and PROVIDER in span.attributes} == {
            "smtp send"
        }

    assert_no_personal_data(traced.receiver, address, phone, TITLE, BODY, *emails)
