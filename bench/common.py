"""What the benchmarks need: a fresh database on this machine's PostgreSQL, or an embedded one."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg

from entrypoints.embedded import EmbeddedPostgres, free_port


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
