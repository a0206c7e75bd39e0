"""What the benchmarks need: a fresh database on this machine's PostgreSQL (or an embedded
one), and the whole service in one process as `marquee dev` runs it."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from api.app import create_app
from core.config import Settings
from core.db import create_engine
from core.migrate import upgrade_async
from core.temporal import connect
from entrypoints.embedded import EmbeddedPostgres, MailCapture, TemporalDevServer, free_port, start_capture_smtp
from worker import create_worker, worker_services


async def fresh_database(workdir: Path) -> tuple[str, EmbeddedPostgres | None]:
    """A new database URL (and the embedded server to stop afterwards, if one was started)."""
    try:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres", timeout=2)
        server, embedded = "postgresql://postgres@127.0.0.1:5432", None
    except OSError:
        embedded = EmbeddedPostgres(workdir / "pg", free_port())
        server = await asyncio.to_thread(embedded.start)
        conn = await asyncpg.connect(f"{server}/postgres")
    name = f"marquee_bench_{uuid.uuid4().hex[:8]}"
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    return f"{server}/{name}", embedded


async def drop_database(database_url: str) -> None:
    """Drop a database fresh_database made (its connections closed first)."""
    server, name = database_url.rsplit("/", 1)
    conn = await asyncpg.connect(f"{server}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@dataclass
class Stack:
    settings: Settings
    api_url: str
    temporal: Client
    engine: AsyncEngine


@asynccontextmanager
async def in_process_stack(workdir: Path, capture: MailCapture, **settings: Any) -> AsyncIterator[Stack]:
    """The Temporal dev server (SQLite file with WAL, as the dev stack runs it), a fresh
    database, an aiosmtpd sink with `capture`, a worker and the API on uvicorn, in this process."""
    database_url, embedded = await fresh_database(workdir)
    await upgrade_async(database_url)
    smtp = start_capture_smtp(None, free_port(), capture)
    temporal_port = free_port()
    temporal = TemporalDevServer(workdir / "temporal.db", temporal_port, free_port(), workdir / "temporal.log")
    await asyncio.to_thread(temporal.start)
    api_port = free_port()
    config = Settings(
        _env_file=None,
        data_dir=workdir,
        database_url=database_url,
        temporal_address=f"127.0.0.1:{temporal_port}",
        jwt_secret=secrets.token_urlsafe(32),
        smtp_port=smtp.port,
        smtp_pool_size=20,
        database_pool_size=20,
        public_url=f"http://127.0.0.1:{api_port}",
        rate_limit_enabled=False,  # the benchmark's one token would be throttled: it measures the service
        **settings,
    )
    try:
        client = await connect(config)
        engine = create_engine(database_url, config.database_pool_size)
        async with worker_services(config, engine) as services:
            worker = create_worker(client, config, services)
            app = create_app(config, engine=engine, temporal=client)
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=api_port, log_level="warning"))
            async with worker:
                serving = asyncio.create_task(server.serve())
                while not server.started:  # noqa: ASYNC110 - uvicorn only offers a flag
                    await asyncio.sleep(0.02)
                try:
                    yield Stack(config, f"http://127.0.0.1:{api_port}", client, engine)
                finally:
                    server.should_exit = True
                    await serving
        await engine.dispose()
    finally:
        smtp.stop()
        await asyncio.to_thread(temporal.stop)
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        else:
            await drop_database(database_url)
