"""ClickHouse history through chDB: group commit, and failures reach every waiter."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from services.history import HistoryRow, HistoryStore, HistoryWriter
from worker import WorkerServices


def _row(notification_id: str, status: str = "sent", user_id: str = "u") -> HistoryRow:
    return HistoryRow(notification_id=notification_id, channel="email", status=status, user_id=user_id, category="c")


class CountingStore:
    """The real chDB store, counting the inserts that reach it."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        self.inserts = 0

    def insert(self, rows: list[HistoryRow]) -> None:
        self.inserts += 1
        self.store.insert(rows)

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
