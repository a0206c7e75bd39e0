"""Analytics tests: the reading functions against a synthetic history with known answers.

chDB opens one path per process and the session's worker store already holds it, so the
chDB case writes through that HistoryWriter (tests.stack's `services`) and isolates itself
by a category of its own; a ClickHouse server is used as well when
MARQUEE_TEST_CLICKHOUSE_URL is set.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from services.history import ClickHouseServerStore, HistoryWriter
from worker import WorkerServices

SERVER_URL = os.environ.get("MARQUEE_TEST_CLICKHOUSE_URL")


@pytest.fixture(params=["chdb", "server"])
async def history(request: pytest.FixtureRequest, services: WorkerServices) -> AsyncIterator[HistoryWriter]:
    """A history writer (and analytics reader) on chDB, then on a ClickHouse server."""
    if request.param == "chdb":
        yield services.history
        return
    if not SERVER_URL:
        pytest.skip("MARQUEE_TEST_CLICKHOUSE_URL is not set: no ClickHouse server to run the same queries on")
    store = ClickHouseServerStore(SERVER_URL)
    store.ensure_schema()
    writer = HistoryWriter(store, flush_seconds=0.01)
    yield writer
    await writer.close()
