"""Notification history in ClickHouse: chDB in-process by default, a server by URL.

Rows are written in batches by a group-commit writer: each caller waits until the batch
holding its rows is stored, so an activity completes only after its history is durable,
yet ClickHouse sees few large inserts instead of many small ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from core.models import HistoryOutbox

HISTORY_COLUMNS = (
    "event_time",
    "notification_id",
    "channel",
    "status",
    "user_id",
    "category",
    "provider",
    "attempt",
    "error",
    "campaign_id",
)

# Columns added after the first release, for tables created before them.
UPGRADES = ["ALTER TABLE notification_history ADD COLUMN IF NOT EXISTS campaign_id String DEFAULT ''"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS notification_history (
    event_time DateTime64(3, 'UTC'),
    notification_id UUID,
    channel LowCardinality(String),
    status LowCardinality(String),
    user_id String,
    category LowCardinality(String),
    provider LowCardinality(String),
    attempt UInt16,
    error String,
    campaign_id String DEFAULT ''
) ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (channel, status, event_time)
"""


@dataclass(frozen=True)
class HistoryRow:
    notification_id: str
    channel: str
    status: str
    user_id: str
    category: str
    provider: str = ""
    attempt: int = 0
    error: str = ""
    campaign_id: str = ""
    event_time: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        row = asdict(self)
        when = self.event_time or datetime.now(UTC)
        row["event_time"] = when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        return row


def campaign_send_id(campaign_id: uuid.UUID, run_id: str, recipient_id: int, channel: str) -> str:
    """The notification id a campaign send's history rows carry (campaign sends have no
    notifications row): the same for the batch that sent it and the events that follow."""
    return str(uuid.uuid5(campaign_id, f"{run_id}:{recipient_id}:{channel}"))


@dataclass(frozen=True)
class HistorySubject:
    """Whose history rows these are: the one place a notification's or campaign send's
    history event is put together."""

    notification_id: str
    user_id: str
    category: str
    campaign_id: str = ""

    def outbox_row(self, channel: str, status: str, at: datetime, provider: str = "") -> dict[str, Any]:
        """The event as the API queues it in the history outbox (JSON), for workers to ship."""
        return {**asdict(self.event(channel, status, provider=provider)), "event_time": at.isoformat()}

    def event(self, channel: str, status: str, **details: Any) -> HistoryRow:
        """details: provider, attempt, error (cut to 1,000 characters), event_time."""
        if "error" in details:
            details["error"] = (details["error"] or "")[:1000]
        return HistoryRow(notification_id=self.notification_id, channel=channel, status=status, user_id=self.user_id,
                          category=self.category, campaign_id=self.campaign_id, **details)  # fmt: skip


class HistoryStore(Protocol):
    def ensure_schema(self) -> None: ...

    def insert(self, rows: list[HistoryRow]) -> None: ...

    def query(self, sql: str) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class ChdbStore:
    """chDB: ClickHouse's engine inside this process. A path may be open in one process only."""

    _lock = threading.Lock()

    def __init__(self, path: Path) -> None:
        from chdb import session

        path.mkdir(parents=True, exist_ok=True)
        self._session = session.Session(str(path))

    def ensure_schema(self) -> None:
        with self._lock:
            for statement in (SCHEMA, *UPGRADES):
                self._session.query(statement)

    def insert(self, rows: list[HistoryRow]) -> None:
        body = "\n".join(json.dumps(row.as_json()) for row in rows)
        with self._lock:
            self._session.query(f"INSERT INTO notification_history FORMAT JSONEachRow\n{body}")

    def query(self, sql: str) -> list[dict[str, Any]]:
        with self._lock:
            result = self._session.query(sql, "JSONEachRow")
        text = result.bytes().decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def close(self) -> None:
        with self._lock:
            self._session.close()


class ClickHouseServerStore:
    """A ClickHouse server through clickhouse-connect (production)."""

    def __init__(self, url: str) -> None:
        import clickhouse_connect

        parsed = urlparse(url)
        self._client = clickhouse_connect.get_client(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 8123,
            username=parsed.username or "default",
            password=parsed.password or "",
            database=(parsed.path or "/").lstrip("/") or "default",
            secure=parsed.scheme == "https",
        )

    def ensure_schema(self) -> None:
        for statement in (SCHEMA, *UPGRADES):
            self._client.command(statement)

    def insert(self, rows: list[HistoryRow]) -> None:
        now = datetime.now(UTC)
        data = [
            [(row.event_time or now) if column == "event_time" else getattr(row, column) for column in HISTORY_COLUMNS]
            for row in rows
        ]
        self._client.insert("notification_history", data, column_names=list(HISTORY_COLUMNS))

    def query(self, sql: str) -> list[dict[str, Any]]:
        return list(self._client.query(sql).named_results())

    def close(self) -> None:
        self._client.close()


def open_store(clickhouse_url: str | None, chdb_path: Path) -> HistoryStore:
    if clickhouse_url:
        return ClickHouseServerStore(clickhouse_url)
    return ChdbStore(chdb_path)


class HistoryWriter:
    """Group commit over a HistoryStore; blocking store calls run on one thread."""

    def __init__(self, store: HistoryStore, flush_seconds: float = 0.2, flush_rows: int = 5000) -> None:
        self.store = store
        self._flush_seconds = flush_seconds
        self._flush_rows = flush_rows
        self._pending: list[HistoryRow] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._full = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history")

    async def record(self, rows: list[HistoryRow]) -> None:
        """Queue rows and return once they are stored (raises if the insert failed)."""
        if not rows:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.extend(rows)
        self._waiters.append(waiter)
        if len(self._pending) >= self._flush_rows:
            self._full.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())
        await waiter

    async def _flush_soon(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._full.wait(), timeout=self._flush_seconds)
        self._full.clear()
        rows, waiters = self._pending, self._waiters
        self._pending, self._waiters = [], []
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.store.insert, rows)
            error: BaseException | None = None
        except Exception as err:
            error = err
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)
        if self._pending:
            # Rows that arrived during the insert found this task running: flush them next.
            self._flusher = asyncio.create_task(self._flush_soon())

    async def query(self, sql: str) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.store.query, sql)

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._executor, self.store.close)
        self._executor.shutdown(wait=True)


async def ship_outbox(engine: AsyncEngine, history: HistoryWriter, limit: int = 1000) -> int:
    """Move rows queued in PostgreSQL (`history_outbox`) to ClickHouse; returns how many.

    The rows are deleted in the transaction that waits for their insert: if ClickHouse
    fails, nothing is deleted. SKIP LOCKED lets any number of workers ship side by side."""
    outbox = HistoryOutbox.__table__  # type: ignore[attr-defined]
    batch = sa.select(outbox.c.id).order_by(outbox.c.id).limit(limit).with_for_update(skip_locked=True)
    async with engine.begin() as conn:
        taken = sa.delete(outbox).where(outbox.c.id.in_(batch.scalar_subquery())).returning(outbox.c.row)
        queued = (await conn.execute(taken)).scalars().all()
        if queued:
            await history.record(
                [HistoryRow(**{**row, "event_time": datetime.fromisoformat(row["event_time"])}) for row in queued]
            )
    return len(queued)
