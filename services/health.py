"""Readiness: do PostgreSQL, Temporal and ClickHouse answer, each within a timeout?

The API's /readyz and the worker's health port (`marquee worker --health-port`) report the
same checks, each by name in the body; the process is ready only when none is down. The
checks run side by side, so a probe takes at most the timeout however many are down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from clickhouse_connect.driver.exceptions import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from core.errors import Unavailable
from services.analytics import AnalyticsReader
from services.history import ClickHouseServer, HistoryWriter, open_store

UP, DOWN, SKIPPED = "up", "down", "skipped"


@dataclass(frozen=True)
class Check:
    status: str  # up, down, or skipped (not configured for this process)
    detail: str = ""
    seconds: float = 0.0

    def body(self) -> dict[str, Any]:
        found: dict[str, Any] = {"status": self.status, "seconds": round(self.seconds, 4)}
        if self.detail:
            found["detail"] = self.detail
        return found


@dataclass(frozen=True)
class Readiness:
    checks: dict[str, Check]

    @property
    def ready(self) -> bool:
        return all(check.status != DOWN for check in self.checks.values())

    def body(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.ready else "not ready",
            "checks": {name: check.body() for name, check in self.checks.items()},
        }


Probe = Callable[[], Awaitable[str | None]]  # raises (or times out) when down; may return a detail


async def _timed(probe: Probe, seconds: float) -> Check:
    started = time.perf_counter()
    try:
        detail = await asyncio.wait_for(probe(), seconds)
    except TimeoutError:
        return Check(DOWN, f"no answer within {seconds:g} s", time.perf_counter() - started)
    except Exception as err:
        return Check(DOWN, f"{type(err).__name__}: {err}"[:300], time.perf_counter() - started)
    return Check(UP, detail or "", time.perf_counter() - started)


def postgresql(engine: AsyncEngine) -> Probe:
    async def probe() -> None:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    return probe


def temporal(client: Client, timeout: float) -> Probe:
    async def probe() -> None:
        if not await client.service_client.check_health(timeout=timedelta(seconds=timeout)):
            raise RuntimeError("the frontend reports itself not serving")

    return probe


def clickhouse_server(clickhouse_url: str, timeout: float) -> Probe:
    async def probe() -> None:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            (await client.get(ClickHouseServer.parse(clickhouse_url).http_base + "ping")).raise_for_status()

    return probe


def embedded_history(reader: AnalyticsReader) -> Probe:
    async def probe() -> str:
        await reader.query("SELECT 1")
        return "chDB, in this process"

    return probe


async def readiness(
    engine: AsyncEngine,
    client: Client | None,
    *,
    clickhouse_url: str | None,
    history: AnalyticsReader | None,
    within: float,
) -> Readiness:
    """Each dependency checked at once, each given `within` seconds. ClickHouse: the server's /ping
    when MARQUEE_CLICKHOUSE_URL is set, else the embedded store if this process has one,
    else skipped (an API without a history store answers analytics with 503)."""
    probes: dict[str, Probe | Check] = {
        "postgresql": postgresql(engine),
        "temporal": temporal(client, within) if client is not None else Check(DOWN, "not connected"),
    }
    if clickhouse_url:
        probes["clickhouse"] = clickhouse_server(clickhouse_url, within)
    elif history is not None:
        probes["clickhouse"] = embedded_history(history)
    else:
        probes["clickhouse"] = Check(SKIPPED, "no MARQUEE_CLICKHOUSE_URL and no embedded store in this process")
    names = list(probes)
    done = await asyncio.gather(
        *(_constant(probe) if isinstance(probe, Check) else _timed(probe, within) for probe in probes.values())
    )
    return Readiness(dict(zip(names, done, strict=True)))


async def _constant(check: Check) -> Check:
    return check


class LazyHistoryReader:
    """Analytics reads from a ClickHouse server, connected at the first query rather than
    at start: an API whose ClickHouse is down still starts, and its analytics answer 503
    (Unavailable) until the server is back."""

    def __init__(self, clickhouse_url: str, chdb_path: Path, retention_days: int) -> None:
        self._url = clickhouse_url
        self._chdb_path = chdb_path
        self._retention_days = retention_days
        self._writer: HistoryWriter | None = None
        self._opening = asyncio.Lock()

    def _unavailable(self, err: Exception) -> Unavailable:
        where = ClickHouseServer.parse(self._url).place
        return Unavailable(f"ClickHouse at {where} does not answer: {err}", title="Analytics unavailable")

    async def _open(self) -> HistoryWriter:
        async with self._opening:
            if self._writer is None:
                try:
                    store = await asyncio.to_thread(open_store, self._url, self._chdb_path, self._retention_days)
                except Exception as err:  # connection refused, DNS, authentication: try again next time
                    raise self._unavailable(err) from err
                self._writer = HistoryWriter(store)
            return self._writer

    async def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        writer = await self._open()
        try:
            return await writer.query(sql, params)
        except OperationalError as err:  # went away after connecting
            raise self._unavailable(err) from err

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
