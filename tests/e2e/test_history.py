"""ClickHouse history through chDB: group commit, and failures reach every waiter."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from services import history as history_module
from services.history import HistoryBatch, HistoryRow, HistoryStore, HistorySubject, HistoryWriter
from worker import WorkerServices


def _row(notification_id: str, status: str = "sent", user_id: str = "u") -> HistoryRow:
    return HistoryRow(notification_id=notification_id, channel="email", status=status, user_id=user_id, category="c")


class CountingStore:
    """The real chDB store, counting the inserts that reach it."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        self.inserts = 0

    def insert(self, batch: HistoryBatch) -> None:
        self.inserts += 1
        self.store.insert(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_concurrent_records_share_inserts_and_all_land(services: WorkerServices) -> None:
    counting = CountingStore(services.history.store)
    history = HistoryWriter(counting, flush_seconds=0.05)
    ids = [str(uuid.uuid4()) for _ in range(200)]
    await asyncio.gather(*(history.record([_row(nid, "pending"), _row(nid)]) for nid in ids))
    listed = ", ".join(f"'{nid}'" for nid in ids)
    [counted] = await history.query(
        f"SELECT count() AS n, uniqExact(notification_id) AS ids FROM notification_history "
        f"WHERE notification_id IN ({listed})"
    )
    assert int(counted["n"]) == 400
    assert int(counted["ids"]) == 200
    assert counting.inserts <= 2  # 200 callers, one batch (two if a flush raced the last callers)


async def test_a_failed_insert_fails_every_waiter_then_recovers(services: WorkerServices) -> None:
    history = services.history
    broken = _row("not-a-uuid")
    good = str(uuid.uuid4())
    results = await asyncio.gather(history.record([broken]), history.record([_row(good)]), return_exceptions=True)
    assert all(isinstance(result, Exception) for result in results)  # one batch, one fate
    await history.record([_row(good)])
    [row] = await history.query(f"SELECT count() AS n FROM notification_history WHERE notification_id = '{good}'")
    assert int(row["n"]) == 1


@pytest.mark.parametrize("status", ["pending", "sent", "failed"])
async def test_rows_keep_their_fields(services: WorkerServices, status: str) -> None:
    nid = str(uuid.uuid4())
    row = HistoryRow(
        notification_id=nid, channel="sms", status=status, user_id="u-9", category="promo", provider="p", attempt=3,
        error="boom",
    )  # fmt: skip
    await services.history.record([row])
    [stored] = await services.history.query(
        f"SELECT channel, status, user_id, category, provider, attempt, error FROM notification_history "
        f"WHERE notification_id = '{nid}'"
    )
    assert stored == {
        "channel": "sms", "status": status, "user_id": "u-9", "category": "promo", "provider": "p", "attempt": 3,
        "error": "boom",
    }  # fmt: skip


@pytest.fixture
def streaming(services: WorkerServices, monkeypatch: pytest.MonkeyPatch) -> HistoryWriter:
    """The worker's writer, streaming any batch (ChdbStore.insert) in chunks of 3 rows."""
    monkeypatch.setattr(history_module, "STREAM_MIN_ROWS", 1)
    monkeypatch.setattr(history_module, "CHUNK_ROWS", 3)
    monkeypatch.setattr(history_module, "STREAM_MAX_STORED", 1_000_000)
    monkeypatch.setattr(services.history.store, "_crowded_until", date.min)
    return services.history


async def _stored(history: HistoryWriter, ids: list[str]) -> int:
    listed = ", ".join(f"'{nid}'" for nid in ids)
    [row] = await history.query(f"SELECT count() AS n FROM notification_history WHERE notification_id IN ({listed})")
    return int(row["n"])


async def test_a_streamed_batch_is_stored_whole_or_not_at_all(streaming: HistoryWriter) -> None:
    ids = [str(uuid.uuid4()) for _ in range(10)]
    rows = [_row(nid) for nid in ids]
    # The malformed id is in the second chunk: the first one's rows are not stored either.
    with pytest.raises(RuntimeError, match="UUID"):
        await streaming.record([*rows[:5], _row("not-a-uuid"), *rows[5:]])
    assert await _stored(streaming, ids) == 0
    await streaming.record(rows)
    assert await _stored(streaming, ids) == 10


async def test_a_streamed_batch_over_crowded_days_is_inserted_as_a_small_one(
    streaming: HistoryWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    today = datetime.now(UTC)
    stored = [str(uuid.uuid4()) for _ in range(10)]
    await streaming.record([HistoryRow(nid, "email", "sent", "u", "c", event_time=today) for nid in stored])
    # Today now holds more stored ids than 1 per row of the next batch: it gives up streaming
    # before reading the batch, inserts it as a small batch, and so do the batches after it.
    monkeypatch.setattr(history_module, "STREAM_MAX_STORED", 1)
    ids = [str(uuid.uuid4()) for _ in range(2)]
    rows = [HistoryRow(nid, "email", "sent", "u", "c", event_time=today) for nid in ids]
    await streaming.record(rows)
    assert streaming.store._crowded_until > today.date()  # type: ignore[attr-defined]
    await streaming.record([*rows, *rows])
    assert await _stored(streaming, [*stored, *ids]) == 12


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_batch_of_columns_is_stored_as_its_rows_would_be(
    services: WorkerServices, streaming: HistoryWriter, monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    if not streamed:
        monkeypatch.setattr(history_module, "STREAM_MIN_ROWS", 1_000_000)
    subject = HistorySubject("", "", "promo", template_key="welcome", template_version=2)
    ids = [str(uuid.uuid4()) for _ in range(4)]
    at = datetime(2026, 12, 6, 21, 30, 5, 123456)  # naive: read as UTC, stored to the millisecond
    columns: dict[str, list[Any]] = {"notification_id": ids, "user_id": ["u-1", "u-2", "u-3", "u-4"]}
    columns |= {"event_time": [at, None, at, at], "cost": [Decimal("0.25"), None, 0, 1]}
    before = datetime.now(UTC)
    await streaming.record(subject.batch_of(columns, channel="push", status="sent", provider="fcm"))
    listed = ", ".join(f"'{nid}'" for nid in ids)
    stored = await streaming.query(
        "SELECT toString(notification_id) AS id, user_id, channel, status, provider, category, template_key, "
        "template_version, toString(cost) AS cost, event_time FROM notification_history "
        f"WHERE notification_id IN ({listed})"
    )
    found = {row.pop("id"): row for row in stored}
    assert [found[nid]["user_id"] for nid in ids] == ["u-1", "u-2", "u-3", "u-4"]
    shared = {(row["channel"], row["status"], row["provider"], row["category"], row["template_key"],
               row["template_version"]) for row in stored}  # fmt: skip
    assert shared == {("push", "sent", "fcm", "promo", "welcome", 2)}
    assert [found[nid]["cost"] for nid in ids] == ["0.25", "0", "0", "1"]  # None: the column's default
    assert found[ids[0]]["event_time"] == "2026-12-06 21:30:05.123"
    stamped = datetime.fromisoformat(found[ids[1]]["event_time"]).replace(tzinfo=UTC)
    assert before - timedelta(milliseconds=1) <= stamped <= datetime.now(UTC)  # None: the insert's time


async def test_a_streamed_batch_of_one_event_without_a_time_is_stamped(streaming: HistoryWriter) -> None:
    nid = str(uuid.uuid4())
    await streaming.record([_row(nid)])  # its days come from the insert's time
    assert await _stored(streaming, [nid]) == 1
