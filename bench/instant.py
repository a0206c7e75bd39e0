"""Instant notifications end to end: HTTP API -> Temporal -> SMTP, on this machine.

Starts the real pieces in one process (as `marquee dev` does): the Temporal dev server
(SQLite file with WAL, as the dev stack runs it), PostgreSQL (the machine's at
127.0.0.1:5432 when it answers, else embedded), chDB, an aiosmtpd sink, a worker and the
API on uvicorn. Then sends N notifications with C concurrent HTTP clients and reports API
latency and the end-to-end rate (accepted -> the SMTP server has the message).

    .venv/bin/python -m bench.instant --count 2000 --concurrency 50
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import in_process_stack
from core.auth import Role, create_token
from core.config import Settings
from entrypoints.embedded import MailCapture


async def run(count: int, concurrency: int) -> dict[str, float]:
    capture = MailCapture(None)
    async with in_process_stack(Path(tempfile.mkdtemp(prefix="marquee-bench-")), capture) as stack:
        return await _drive(stack.settings, stack.api_url, capture, count, concurrency)


async def _drive(
    settings: Settings, api_url: str, capture: MailCapture, count: int, concurrency: int
) -> dict[str, float]:
    token = create_token(settings.resolved_jwt_secret(), "bench", Role.service, 3600)
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=api_url, headers=headers, limits=limits) as api:
        users = [{"user_id": f"bench-{n}", "email": f"bench-{n}@example.com"} for n in range(count)]
        for start in range(0, count, 1000):
            batch = {"recipients": users[start : start + 1000]}
            (await api.post("/v1/recipients/batch", json=batch)).raise_for_status()

        latencies: list[float] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(count):
            queue.put_nowait(n)

        async def client() -> None:
            while not queue.empty():
                n = queue.get_nowait()
                body = {"user_id": f"bench-{n}", "type": "bench", "channels": ["email"], "title": f"#{n}", "body": "x"}
                started = time.perf_counter()
                response = await api.post("/v1/notifications", json=body)
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        accepted_in = time.perf_counter() - began
        while len(capture.messages) < count:  # noqa: ASYNC110 - the SMTP thread appends, no event to await
            await asyncio.sleep(0.05)
        delivered_in = time.perf_counter() - began

    latencies.sort()
    return {
        "notifications": count,
        "concurrency": concurrency,
        "api_accept_per_s": count / accepted_in,
        "api_p50_ms": statistics.median(latencies) * 1000,
        "api_p95_ms": latencies[int(len(latencies) * 0.95) - 1] * 1000,
        "end_to_end_per_s": count / delivered_in,
        "end_to_end_per_min": count / delivered_in * 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    result = asyncio.run(run(args.count, args.concurrency))
    print("| metric | value |\n|---|---|")
    for name, value in result.items():
        print(f"| {name} | {value:,.1f} |" if isinstance(value, float) else f"| {name} | {value} |")


if __name__ == "__main__":
    main()
