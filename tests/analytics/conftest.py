"""Analytics tests: the reading functions against a synthetic history with known answers.

chDB opens one path per process and the session's worker store already holds it, so the
chDB case writes through that HistoryWriter (tests.stack's `services`) and isolates itself
by a category of its own; again with every batch streamed (ChdbStore.insert's path for
large batches, in chunks of 7 rows); and on a ClickHouse server as well when
MARQUEE_TEST_CLICKHOUSE_URL is set.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import date

import pytest

from services import history as history_module
from services.history import ClickHouseServerStore, HistoryWriter
from worker import WorkerServices

SERVER_URL = os.environ.get("MARQUEE_TEST_CLICKHOUSE_URL")


@pytest.fixture(params=["chdb", "chdb-streamed", "server"])
async def history(
    request: pytest.FixtureRequest, services: WorkerServices, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[HistoryWriter]:
    """A history writer (and analytics reader) on chDB, on chDB streaming every batch, then on
    a ClickHouse server."""
    if request.param == "chdb-streamed":
        monkeypatch.setattr(history_module, "STREAM_MIN_ROWS", 1)
        monkeypatch.setattr(history_module, "CHUNK_ROWS", 7)
        # The session's other tests may have stored many rows in these days: stream anyway.
        monkeypatch.setattr(history_module, "STREAM_MAX_STORED", 1_000_000)
        monkeypatch.setattr(services.history.store, "_crowded_until", date.min)

        def fell_back(self: object, rows: list[object]) -> None:
            raise AssertionError("the streamed insert fell back to the batch insert")

        monkeypatch.setattr(history_module._ClickHouse, "insert", fell_back)
    if request.param != "server":
        yield services.history
        return
    if not SERVER_URL:
        pytest.skip("MARQUEE_TEST_CLICKHOUSE_URL is not set: no ClickHouse server to run the same queries on")
    store = ClickHouseServerStore(SERVER_URL)
    store.ensure_schema()
    writer = HistoryWriter(store, flush_seconds=0.01)
    yield writer
    await writer.close()
