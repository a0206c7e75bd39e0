"""Events end to end: intake over HTTP and over NATS JetStream -> trigger rule -> notification -> SMTP.

The whole service in one process (bench.common.in_process_stack) with an event type and a
rule that mails the user the payload names. Then:
- HTTP: N events posted by C concurrent clients; accepted events/s and API latency;
- NATS: N events published to JetStream (the machine's nats-server at 127.0.0.1:4222, or
  MARQUEE_NATS_URL) and consumed by the real consumer; accepted events/s (publish of the
  first to the last event's row in PostgreSQL);
and for both, event -> SMTP latency (the event's publish to its message at the SMTP server)
and the end-to-end rate. A burst of N queues behind the slowest stage, so its latency is
mostly waiting; a paced run first (50 events at 5/s) gives the latency without a backlog.

    .venv/bin/python -m bench.events --count 1000 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import sqlalchemy as sa
from aiosmtpd.smtp import SMTP, Envelope, Session

from bench.common import Stack, in_process_stack, post_admitted
from core.auth import Role, create_token
from entrypoints.embedded import MailCapture
from entrypoints.event_consumer import NatsUnavailable, nats_url, open_consumer

EVENT_TYPE = "bench.password_reset"
PACED_COUNT, PACED_RATE = 50, 5.0
SCHEMA = {
    "type": "object",
    "required": ["user_id", "link"],
    "properties": {"user_id": {"type": "string"}, "link": {"type": "string"}},
}
TEMPLATE = {
    "key": "bench-reset",
    "category": "security",
    "content": {
        "variables": [{"name": "link", "type": "url", "example": "https://cinema.example/r"}],
        "locales": {"en": {"email": {"subject": "Reset your password", "html": "<p>Open {{ link }}</p>"}}},
    },
}


class TimedCapture(MailCapture):
    """The SMTP sink, noting when each recipient's message arrived."""

    def __init__(self) -> None:
        super().__init__(None)
        self.arrived: dict[str, float] = {}

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.perf_counter()
        for rcpt in envelope.rcpt_tos:
            self.arrived.setdefault(str(rcpt), now)
        return await super().handle_DATA(server, session, envelope)


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * share) - 1)]


def _event(n: int, phase: str) -> dict[str, Any]:
    return {
        "id": f"{phase}-{n}-{uuid.uuid4().hex[:6]}",
        "type": EVENT_TYPE,
        "occurred_at": datetime.now(UTC).isoformat(),
        "payload": {"user_id": f"{phase}-{n}", "link": f"https://cinema.example/reset/{n}"},
    }


async def _setup(api: httpx.AsyncClient, manager: httpx.AsyncClient, count: int) -> None:
    (await manager.put(f"/v1/event-types/{EVENT_TYPE}", json={"schema": SCHEMA})).raise_for_status()
    (await manager.post("/v1/templates", json=TEMPLATE)).raise_for_status()
    rule = {
        "name": "bench reset",
        "event_type": EVENT_TYPE,
        "template": TEMPLATE["key"],
        "channels": ["email"],
        "category": "security",
    }
    (await manager.post("/v1/trigger-rules", json=rule)).raise_for_status()
    for phase in ("http", "nats", "paced"):
        people = [{"user_id": f"{phase}-{n}", "email": f"{phase}-{n}@example.com"} for n in range(count)]
        for start in range(0, count, 1000):
            batch = {"recipients": people[start : start + 1000]}
            (await api.post("/v1/recipients/batch", json=batch)).raise_for_status()


async def _delivered(capture: TimedCapture, phase: str, count: int) -> None:
    async with asyncio.timeout(600):  # the SMTP thread records arrivals: no event to await
        while sum(1 for rcpt in list(capture.arrived) if rcpt.startswith(f"{phase}-")) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def _figures(
    phase: str,
    began: float,
    accepted_at: float,
    sent_at: dict[int, float],
    capture: TimedCapture,
    extra: dict[str, float],
) -> dict[str, float]:
    arrivals = {n: capture.arrived[f"{phase}-{n}@example.com"] for n in sent_at}
    to_smtp = [(arrivals[n] - sent_at[n]) * 1000 for n in sent_at]
    done = max(arrivals.values())
    return {
        f"{phase}_accepted_per_s": len(sent_at) / (accepted_at - began),
        **extra,
        f"{phase}_event_to_smtp_p50_ms": statistics.median(to_smtp),
        f"{phase}_event_to_smtp_p95_ms": _percentile(to_smtp, 0.95),
        f"{phase}_end_to_end_per_s": len(sent_at) / (done - began),
    }


async def _over_http(api: httpx.AsyncClient, capture: TimedCapture, count: int, concurrency: int) -> dict[str, float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        queue.put_nowait(n)
    latencies: list[float] = []
    sent_at: dict[int, float] = {}
    shed = 0

    async def client() -> None:
        nonlocal shed
        while not queue.empty():
            n = queue.get_nowait()
            body = _event(n, "http")
            started = sent_at[n] = time.perf_counter()
            # Above capacity the API sheds (503 + Retry-After): latency runs until accepted.
            response, times = await post_admitted(api, "/v1/events", body)
            latencies.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            shed += times

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    accepted_at = time.perf_counter()
    await _delivered(capture, "http", count)
    api_latency = {"http_api_p50_ms": statistics.median(latencies), "http_api_p95_ms": _percentile(latencies, 0.95),
                   "http_shed": float(shed)}  # fmt: skip
    return _figures("http", began, accepted_at, sent_at, capture, api_latency)


async def _paced(api: httpx.AsyncClient, capture: TimedCapture, count: int, rate: float) -> dict[str, float]:
    """Events at a steady rate the service keeps up with: latency without a backlog."""
    sent_at: dict[int, float] = {}
    began = time.perf_counter()
    for n in range(count):
        await asyncio.sleep(max(0.0, began + n / rate - time.perf_counter()))
        sent_at[n] = time.perf_counter()
        (await post_admitted(api, "/v1/events", _event(n, "paced")))[0].raise_for_status()
    await _delivered(capture, "paced", count)
    to_smtp = [(capture.arrived[f"paced-{n}@example.com"] - sent_at[n]) * 1000 for n in sent_at]
    return {
        "paced_rate_per_s": rate,
        "paced_event_to_smtp_p50_ms": statistics.median(to_smtp),
        "paced_event_to_smtp_p95_ms": _percentile(to_smtp, 0.95),
    }


async def _over_nats(stack: Stack, capture: TimedCapture, count: int) -> dict[str, float]:
    try:
        consumer, close = await open_consumer(stack.settings, stack.engine, stack.temporal, wait_seconds=3)
    except NatsUnavailable as err:
        print(f"NATS part skipped: {err}")
        return {}
    stop = asyncio.Event()
    consuming = asyncio.create_task(consumer.run(stop))
    publisher = await nats.connect(nats_url(stack.settings))
    js = publisher.jetstream()
    sent_at: dict[int, float] = {}
    try:
        began = time.perf_counter()
        for start in range(0, count, 100):
            acks = []
            for n in range(start, min(count, start + 100)):
                body = _event(n, "nats")
                sent_at[n] = time.perf_counter()
                acks.append(js.publish(consumer.names.subject(EVENT_TYPE), json.dumps(body).encode()))
            await asyncio.gather(*acks)
        published_at = time.perf_counter()
        async with stack.engine.connect() as conn:
            while (await conn.scalar(sa.text("SELECT count(*) FROM events WHERE source = 'nats'"))) < count:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        accepted_at = time.perf_counter()
        await _delivered(capture, "nats", count)
    finally:
        stop.set()
        await consuming
        await js.delete_stream(consumer.names.stream)
        await js.delete_stream(consumer.names.dead_stream)
        await publisher.close()
        await close()
    return _figures(
        "nats", began, accepted_at, sent_at, capture, {"nats_published_per_s": count / (published_at - began)}
    )


async def run(count: int, concurrency: int) -> dict[str, float]:
    capture = TimedCapture()
    workdir = Path(tempfile.mkdtemp(prefix="marquee-bench-"))
    prefix = f"bench{uuid.uuid4().hex[:6]}"  # streams of its own: never the machine's other traffic
    async with in_process_stack(workdir, capture, nats_prefix=prefix) as stack:
        secret = stack.settings.resolved_jwt_secret()
        service = {"Authorization": f"Bearer {create_token(secret, 'bench', Role.service, 3600)}"}
        editor = {"Authorization": f"Bearer {create_token(secret, 'bench-cm', Role.campaign_manager, 3600)}"}
        limits = httpx.Limits(max_connections=concurrency)
        async with (
            httpx.AsyncClient(base_url=stack.api_url, headers=service, limits=limits, timeout=60) as api,
            httpx.AsyncClient(base_url=stack.api_url, headers=editor, timeout=60) as manager,
        ):
            await _setup(api, manager, count)
            result = {"events": float(count), "concurrency": float(concurrency)}
            result |= await _paced(api, capture, PACED_COUNT, PACED_RATE)
            result |= await _over_http(api, capture, count, concurrency)
        result |= await _over_nats(stack, capture, count)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    result = asyncio.run(run(args.count, args.concurrency))
    print("| metric | value |\n|---|---|")
    for name, value in result.items():
        print(f"| {name} | {value:,.1f} |")


if __name__ == "__main__":
    main()
