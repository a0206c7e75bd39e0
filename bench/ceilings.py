"""What this machine allows, measured in the same run as the service (so the service's
figures read as a share of it):

- smtp: Postfix's smtp-source -> smtp-sink, C to C, 20 persistent sessions, 1 KB messages;
- aiosmtplib: a bare Python loop, N aiosmtplib connections sending pre-built bytes -> smtp-sink;
- temporal: the dev server's rate for a trivial workflow (32 concurrent starters and a
  worker in one process) in three shapes: one regular activity, one local activity, one
  local activity started with request_eager_start=True.

    .venv/bin/python -m bench.ceilings [--smtp-messages 100000] [--workflows 600]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiosmtplib
from temporalio.client import Client
from temporalio.worker import Worker

from bench.ceiling_workflows import OneActivity, OneLocalActivity, echo
from bench.common import percentile, save_result
from bench.postfix import Postfix, find_postfix, smtp_source, start_sink
from entrypoints.embedded import TemporalDevServer, free_port

SHAPES = (
    ("one regular activity", OneActivity, False),
    ("one local activity", OneLocalActivity, False),
    ("one local activity, request_eager_start=True", OneLocalActivity, True),
)


def message_bytes(size: int = 1024) -> bytes:
    """A pre-rendered message of about `size` bytes (what smtp-source sends, give or take)."""
    head = b"From: bench@example.com\r\nTo: to@example.com\r\nSubject: ceiling\r\nMessage-ID: <c@example.com>\r\n\r\n"
    line = b"x" * 70 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def smtp_c_to_c(postfix: Postfix, workdir: Path, messages: int, sessions: int = 20) -> dict[str, Any]:
    """smtp-source -> a fresh smtp-sink; the sink's count must equal what was sent."""
    sink = start_sink(workdir, postfix)
    try:
        seconds = smtp_source(postfix, sink.port, messages, sessions)
        received = sink.wait_for(messages, 10)
    finally:
        sink.stop()
    return {"messages": messages, "sessions": sessions, "received": received, "seconds": seconds,
            "per_minute": messages / seconds * 60}  # fmt: skip


async def aiosmtplib_loop(
    postfix: Postfix | None, workdir: Path, messages: int, connections: int = 20
) -> dict[str, Any]:
    """`connections` aiosmtplib sessions, each sending its share of pre-built bytes, -> smtp-sink."""
    sink = start_sink(workdir, postfix)
    payload = message_bytes()
    try:

        async def session(count: int) -> None:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False) as smtp:
                for _ in range(count):
                    await smtp.sendmail("bench@example.com", ["to@example.com"], payload)

        shares = [messages // connections + (1 if n < messages % connections else 0) for n in range(connections)]
        began = time.perf_counter()
        await asyncio.gather(*(session(share) for share in shares))
        seconds = time.perf_counter() - began
        received = await asyncio.to_thread(sink.wait_for, messages, 10)
    finally:
        await asyncio.to_thread(sink.stop)
    return {"messages": messages, "connections": connections, "received": received, "seconds": seconds,
            "per_minute": messages / seconds * 60, "receiver": sink.kind}  # fmt: skip


async def temporal_shapes(address: str, count: int, starters: int = 32) -> list[dict[str, Any]]:
    """Each shape: `count` workflows started by `starters` concurrent callers, each awaiting its
    result; workflows/s over the whole batch, start and end-to-end p95 per workflow."""
    client = await Client.connect(address)
    queue = f"ceiling-{uuid.uuid4().hex[:8]}"
    results = []
    async with Worker(client, task_queue=queue, workflows=[OneActivity, OneLocalActivity], activities=[echo]):
        for name, workflow_class, eager in SHAPES:
            results.append({"shape": name, **await _shape(client, queue, workflow_class, eager, count, starters)})
    return results


async def _shape(
    client: Client, queue: str, workflow_class: Any, eager: bool, count: int, starters: int
) -> dict[str, Any]:
    starts: list[float] = []
    ends: list[float] = []
    pending = iter(range(count))

    async def starter() -> None:
        for n in pending:
            began = time.perf_counter()
            handle = await client.start_workflow(
                workflow_class.run, "x", id=f"{queue}-{workflow_class.__name__}-{eager}-{n}",
                task_queue=queue, request_eager_start=eager,
            )  # fmt: skip
            starts.append(time.perf_counter() - began)
            await handle.result()
            ends.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(starter() for _ in range(starters)))
    seconds = time.perf_counter() - began
    return {
        "workflows": count,
        "starters": starters,
        "seconds": seconds,
        "per_second": count / seconds,
        "start_p95_ms": percentile(starts, 0.95) * 1000,
        "end_to_end_p95_ms": percentile(ends, 0.95) * 1000,
    }


async def measure(workdir: Path, smtp_messages: int, loop_connections: int, workflows: int) -> dict[str, Any]:
    """Every ceiling, the Temporal ones on a dev server of their own (WAL, as the dev stack runs it)."""
    postfix = find_postfix()
    result: dict[str, Any] = {"postfix": postfix.version() if postfix else None}
    if smtp_messages:
        if postfix is not None:
            result["smtp"] = await asyncio.to_thread(smtp_c_to_c, postfix, workdir, smtp_messages)
        result["aiosmtplib"] = await aiosmtplib_loop(postfix, workdir, smtp_messages, loop_connections)
    if workflows:
        port = free_port()
        server = TemporalDevServer(workdir / "ceiling-temporal.db", port, free_port(), workdir / "ceiling-temporal.log")
        await asyncio.to_thread(server.start)
        try:
            result["temporal"] = await temporal_shapes(f"127.0.0.1:{port}", workflows)
        finally:
            await asyncio.to_thread(server.stop)
    return result


def print_ceilings(result: dict[str, Any]) -> None:
    for key in ("smtp", "aiosmtplib"):
        if key in result:
            row = result[key]
            print(f"{key}: {row['messages']:,} messages in {row['seconds']:.1f} s = {row['per_minute']:,.0f}/min "
                  f"(received {row['received']:,})")  # fmt: skip
    for row in result.get("temporal", []):
        print(f"temporal, {row['shape']}: {row['per_second']:.1f} workflows/s, start p95 "
              f"{row['start_p95_ms']:.0f} ms, end-to-end p95 {row['end_to_end_p95_ms']:.0f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smtp-messages", type=int, default=100_000, help="0 skips the SMTP ceilings")
    parser.add_argument("--loop-connections", type=int, default=20)
    parser.add_argument("--workflows", type=int, default=600, help="per shape; 0 skips the Temporal ceilings")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="marquee-ceilings-"))
    result = asyncio.run(measure(workdir, args.smtp_messages, args.loop_connections, args.workflows))
    print_ceilings(result)
    print(f"written to {save_result('ceilings', result)}")


if __name__ == "__main__":
    main()
