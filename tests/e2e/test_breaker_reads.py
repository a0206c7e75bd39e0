"""A worker reads the providers' circuit states once however many sends ask at once."""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from services import breaker
from services.providers import breakers
from worker import WorkerServices

NAME = "breaker-reads"  # a provider of this test's own


async def test_senders_asking_at_once_share_one_read(services: WorkerServices, engine: AsyncEngine) -> None:
    directory = services.directory.another()  # its own cache, as a fresh worker's
    reads: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if f"FROM {breakers.name}" in statement:
            reads.append(statement)

    sa.event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        answers = await asyncio.gather(*(directory.is_open(NAME) for _ in range(50)))
        assert answers == [False] * 50
        assert len(reads) == 1
        await breaker.record_failure(engine, NAME, "down", threshold=1)  # opens it
        directory._breakers_read = 0.0  # a second has passed
        answers = await asyncio.gather(*(directory.is_open(NAME) for _ in range(50)))
        assert answers == [True] * 50  # each sees the state read after the change
        assert len(reads) == 2
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", count)
        async with engine.begin() as conn:
            await conn.execute(breakers.delete().where(breakers.c.provider == NAME))
