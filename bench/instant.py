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
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import uvicorn

from api.app import create_app
from bench.common import fresh_database
from core.auth import Role, create_token
from core.config import Settings
from core.db import create_engine
from core.migrate import upgrade_async
from core.temporal import connect
from entrypoints.embedded import MailCapture, TemporalDevServer, free_port, start_capture_smtp
from worker import create_worker, worker_services


async def run(count: int, concurrency: int) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="marquee-bench-"))
    database_url, embedded = await fresh_database(workdir)
    await upgrade_async(database_url)
    capture = MailCapture(None)
    smtp = start_capture_smtp(None, free_port(), capture)
    temporal_port = free_port()
    temporal = TemporalDevServer(workdir / "temporal.db", temporal_port, free_port(), workdir / "temporal.log")
    await asyncio.to_thread(temporal.start)
    api_port = free_port()
    settings = Settings(
        _env_file=None,
        data_dir=workdir,
        database_url=database_url,
        temporal_address=f"127.0.0.1:{temporal_port}",
        jwt_secret=secrets.token_urlsafe(32),
        smtp_port=smtp.port,
        smtp_pool_size=20,
        database_pool_size=20,
        public_url=f"http://127.0.0.1:{api_port}",
    )
    try:
        client = await connect(settings)
        engine = create_engine(database_url, settings.database_pool_size)
        async with worker_services(settings, engine) as services:
            worker = create_worker(client, settings, services)
            app = create_app(settings, engine=engine, temporal=client)
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=api_port, log_level="warning"))
            async with worker:
                serving = asyncio.create_task(server.serve())
                while not server.started:  # noqa: ASYNC110 - uvicorn only offers a flag
                    await asyncio.sleep(0.02)
                result = await _drive(settings, api_port, capture, count, concurrency)
                server.should_exit = True
                await serving
        await engine.dispose()
        return result
    finally:
        smtp.stop()
        await asyncio.to_thread(temporal.stop)
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def _drive(settings: Settings, port: int, capture: MailCapture, count: int, concurrency: int) -> dict[str, float]:
    token = create_token(settings.resolved_jwt_secret(), "bench", Role.service, 3600)
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, limits=limits) as api:
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
