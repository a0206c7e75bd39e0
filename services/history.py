"""Notification history in ClickHouse: chDB in-process by default, a server by URL.

Rows are written in batches by a group-commit writer: each caller waits until the batch
holding its rows is stored, so an activity completes only after its history is durable,
yet ClickHouse sees few large inserts instead of many small ones.

Schema. `notification_history` holds one row per status event; `notification_stats` is an
AggregatingMergeTree fed by materialized views, which every dashboard query reads (see
services.analytics). Both are created and upgraded in place by MIGRATIONS, applied in
order and recorded in `marquee_migrations` (`marquee migrate`, and every worker start);
the retention TTL follows Settings on each run.

Deduplication. Writes are at least once (a retried activity, a re-shipped outbox row, a
replayed batch), so every event has a deterministic id: uuid5 of notification id, channel,
status and an occurrence ("" unless one status legitimately repeats: a dead-letter
replay's run). Each insert leaves out the rows whose event_id is already stored with an
event time in the batch's days, and an event's repeats within the batch, so the
materialized views never count an event twice: the batch's ids select the stored ones
through a bloom-filter skip index, or, for a large batch on chDB, the stored ids of those
days are read first and the batch streams past them (ChdbStore.insert). Two processes
inserting the same new event at the same instant could both miss the other's row; that
needs the same event written by two workers within one insert's duration, which a
Temporal activity (one attempt at a time) or the outbox (rows locked with SKIP LOCKED)
never does, so the window is accepted rather than paying for a Replacing design whose
queries would have to FINAL every read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import threading
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, fields, replace
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlparse

import pyarrow as pa  # type: ignore[import-untyped]  # chDB's own dependency; no type hints
import pyarrow.compute as pc  # type: ignore[import-untyped]
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from core.models import HistoryOutbox

# Event ids are uuid5 in this namespace (fixed forever: changing it would re-count history).
EVENT_NAMESPACE = uuid.UUID("8f1c7a52-4f0e-4d0b-9a51-6a0e3d2c9b17")
DEFAULT_RETENTION_DAYS = 400

HISTORY_COLUMNS = (
    "event_id",
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
    "run_id",
    "template_key",
    "template_version",
    "country",
    "timezone",
    "error_class",
    "cost",
    "currency",
    "latency_ms",
)
# Statuses whose latency_ms is meaningful (ms since the provider accepted the message).
LATENCY_STATUSES = ("delivered", "opened", "clicked")

# The first release's table, kept verbatim: migration 1 creates it, later ones upgrade it,
# so a new install and an old one end in the same schema.
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


def _uuid5_sql(name: str) -> str:
    """uuid.uuid5(EVENT_NAMESPACE, name) in ClickHouse SQL: SHA-1 of namespace and name, the
    version and variant bits set (RFC 4122 section 4.3)."""
    digest = f"SHA1(concat(unhex('{EVENT_NAMESPACE.hex}'), {name}))"
    return (
        f"toUUID(UUIDNumToString(toFixedString(concat(substring({digest}, 1, 6), "
        f"char(bitOr(bitAnd(reinterpretAsUInt8(substring({digest}, 7, 1)), 15), 80)), substring({digest}, 8, 1), "
        f"char(bitOr(bitAnd(reinterpretAsUInt8(substring({digest}, 9, 1)), 63), 128)), "
        f"substring({digest}, 10, 7)), 16)))"
    )


# Rows written before event ids existed get the id the writer would give them (occurrence "").
EVENT_ID_DEFAULT = _uuid5_sql("concat(toString(notification_id), ':', channel, ':', status, ':')")

STATS_KEY = ("hour", "channel", "provider", "campaign_id", "template_key", "category", "country", "timezone",
             "status", "currency")  # fmt: skip
# The view's query, also used once to fill the stats from rows stored before the view existed.
STATS_SELECT = f"""
SELECT toStartOfHour(event_time) AS hour, channel, provider, campaign_id, template_key, category, country, timezone,
       status, currency, toUInt64(count()) AS events, sum(cost) AS cost,
       quantilesStateIf(0.5, 0.9, 0.99)(latency_ms, status IN {LATENCY_STATUSES}) AS latency
FROM notification_history
GROUP BY {", ".join(STATS_KEY)}
"""

# Migration 7's two views of notification_stats (rows of the latency statuses; the others).
STATS_LATENCY_SELECT = f"""
SELECT toStartOfHour(event_time) AS hour, channel, provider, campaign_id, template_key, category, country, timezone,
       status, currency, toUInt64(count()) AS events, sum(cost) AS cost,
       quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency
FROM notification_history
WHERE status IN {LATENCY_STATUSES}
GROUP BY {", ".join(STATS_KEY)}
"""
STATS_COUNTS_SELECT = f"""
SELECT toStartOfHour(event_time) AS hour, channel, provider, campaign_id, template_key, category, country, timezone,
       status, currency, toUInt64(count()) AS events, sum(cost) AS cost
FROM notification_history
WHERE status NOT IN {LATENCY_STATUSES}
GROUP BY {", ".join(STATS_KEY)}
"""

# Rollups, each fed by its own materialized view, so the common questions read a few
# thousand rows instead of notification_stats' millions (a group per raw row or so at volume):
# by channel and provider only (the dashboard, latency by channel), and one campaign's sends
# and failures per minute (the campaign report's timeline and failure reasons), and by
# campaign per hour (its funnel and cost).
CHANNEL_STATS_KEY = ("hour", "channel", "provider", "status", "currency")
CHANNEL_STATS_SELECT = f"""
SELECT toStartOfHour(event_time) AS hour, channel, provider, status, currency, toUInt64(count()) AS events,
       sum(cost) AS cost, quantilesStateIf(0.5, 0.9, 0.99)(latency_ms, status IN {LATENCY_STATUSES}) AS latency
FROM notification_history
GROUP BY {", ".join(CHANNEL_STATS_KEY)}
"""
CAMPAIGN_STATS_SELECT = """
SELECT campaign_id, toStartOfHour(event_time) AS hour, status, currency, toUInt64(count()) AS events, sum(cost) AS cost
FROM notification_history
GROUP BY campaign_id, hour, status, currency
"""
CAMPAIGN_MINUTES_SELECT = """
SELECT campaign_id, toStartOfMinute(event_time) AS minute, status, error_class, toUInt64(count()) AS events
FROM notification_history
WHERE campaign_id != '' AND status IN ('sent', 'failed')
GROUP BY campaign_id, minute, status, error_class
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS = (
    Migration(1, "notification history", (
        SCHEMA,
        "ALTER TABLE notification_history ADD COLUMN IF NOT EXISTS campaign_id String DEFAULT ''",
    )),
    Migration(2, "analytics columns, event ids and skip indexes", (
        f"""ALTER TABLE notification_history
            ADD COLUMN IF NOT EXISTS event_id UUID DEFAULT {EVENT_ID_DEFAULT},
            ADD COLUMN IF NOT EXISTS run_id String DEFAULT '',
            ADD COLUMN IF NOT EXISTS template_key LowCardinality(String) DEFAULT '',
            ADD COLUMN IF NOT EXISTS template_version UInt32 DEFAULT 0,
            ADD COLUMN IF NOT EXISTS country LowCardinality(String) DEFAULT '',
            ADD COLUMN IF NOT EXISTS timezone LowCardinality(String) DEFAULT '',
            ADD COLUMN IF NOT EXISTS error_class LowCardinality(String) DEFAULT '',
            ADD COLUMN IF NOT EXISTS cost Decimal(18, 6) DEFAULT 0,
            ADD COLUMN IF NOT EXISTS currency LowCardinality(String) DEFAULT '',
            ADD COLUMN IF NOT EXISTS latency_ms UInt32 DEFAULT 0,
            ADD INDEX IF NOT EXISTS event_id_bloom event_id TYPE bloom_filter(0.001) GRANULARITY 1,
            ADD INDEX IF NOT EXISTS campaign_bloom campaign_id TYPE bloom_filter(0.01) GRANULARITY 1""",
        # Old rows keep the computed id on disk, and the indexes cover old parts too.
        "ALTER TABLE notification_history MATERIALIZE COLUMN event_id SETTINGS mutations_sync = 2",
        "ALTER TABLE notification_history MATERIALIZE INDEX event_id_bloom SETTINGS mutations_sync = 2",
        "ALTER TABLE notification_history MATERIALIZE INDEX campaign_bloom SETTINGS mutations_sync = 2",
    )),
    Migration(3, "notification_stats and its materialized view", (
        """CREATE TABLE IF NOT EXISTS notification_stats (
            hour DateTime('UTC'),
            channel LowCardinality(String),
            provider LowCardinality(String),
            campaign_id String,
            template_key LowCardinality(String),
            category LowCardinality(String),
            country LowCardinality(String),
            timezone LowCardinality(String),
            status LowCardinality(String),
            currency LowCardinality(String),
            events SimpleAggregateFunction(sum, UInt64),
            cost SimpleAggregateFunction(sum, Decimal(38, 6)),  -- what sum() of Decimal(18, 6) returns
            -- quantiles keeps every sample up to 8,192 per group (exact), a reservoir beyond
            latency AggregateFunction(quantiles(0.5, 0.9, 0.99), UInt32)
        ) ENGINE = AggregatingMergeTree
        PARTITION BY toYYYYMM(hour)
        ORDER BY (hour, channel, provider, campaign_id, template_key, category, country, timezone, status, currency)""",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS notification_stats_mv TO notification_stats AS {STATS_SELECT}",
        # Rows stored before the view: counted once whether or not a run stopped half-way
        # (a writer inserting between these two statements would be counted twice: run
        # `marquee migrate` before starting upgraded workers).
        "TRUNCATE TABLE notification_stats",
        f"INSERT INTO notification_stats {STATS_SELECT}",
    )),
    Migration(4, "rollups by channel and by campaign minute; no campaign_id skip index", (
        """CREATE TABLE IF NOT EXISTS notification_stats_channel (
            hour DateTime('UTC'),
            channel LowCardinality(String),
            provider LowCardinality(String),
            status LowCardinality(String),
            currency LowCardinality(String),
            events SimpleAggregateFunction(sum, UInt64),
            cost SimpleAggregateFunction(sum, Decimal(38, 6)),
            latency AggregateFunction(quantiles(0.5, 0.9, 0.99), UInt32)
        ) ENGINE = AggregatingMergeTree
        PARTITION BY toYYYYMM(hour)
        ORDER BY (hour, channel, provider, status, currency)""",
        """CREATE TABLE IF NOT EXISTS notification_campaign_minutes (
            campaign_id String,
            minute DateTime('UTC'),
            status LowCardinality(String),
            error_class LowCardinality(String),
            events SimpleAggregateFunction(sum, UInt64)
        ) ENGINE = AggregatingMergeTree
        PARTITION BY toYYYYMM(minute)
        ORDER BY (campaign_id, minute, status, error_class)""",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS notification_stats_channel_mv TO notification_stats_channel AS "
        f"{CHANNEL_STATS_SELECT}",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS notification_campaign_minutes_mv TO notification_campaign_minutes AS "
        f"{CAMPAIGN_MINUTES_SELECT}",
        # As migration 3: rows stored before the views, counted once.
        "TRUNCATE TABLE notification_stats_channel",
        f"INSERT INTO notification_stats_channel {CHANNEL_STATS_SELECT}",
        "TRUNCATE TABLE notification_campaign_minutes",
        f"INSERT INTO notification_campaign_minutes {CAMPAIGN_MINUTES_SELECT}",
        # The campaign report reads notification_campaign_minutes now: the index only cost inserts.
        "ALTER TABLE notification_history DROP INDEX IF EXISTS campaign_bloom",
    )),
    Migration(5, "rollup by campaign and hour", (
        """CREATE TABLE IF NOT EXISTS notification_campaign_stats (
            campaign_id String,
            hour DateTime('UTC'),
            status LowCardinality(String),
            currency LowCardinality(String),
            events SimpleAggregateFunction(sum, UInt64),
            cost SimpleAggregateFunction(sum, Decimal(38, 6))
        ) ENGINE = AggregatingMergeTree
        PARTITION BY toYYYYMM(hour)
        ORDER BY (campaign_id, hour, status, currency)""",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS notification_campaign_stats_mv TO notification_campaign_stats AS "
        f"{CAMPAIGN_STATS_SELECT}",
        "TRUNCATE TABLE notification_campaign_stats",
        f"INSERT INTO notification_campaign_stats {CAMPAIGN_STATS_SELECT}",
    )),
    # Each insert writes a part to every table; a Wide part is two or more files per column
    # (80 for a 100,000-row history batch, 55 for its notification_stats part), a Compact one
    # about 13: 174 files per 100,000-row insert become 66, and creating a file costs 0.1 ms
    # of kernel time on our VMs (0.75 ms in a fresh VM's first minutes). Parts stay Compact
    # up to a million rows (merges past that still go Wide); stored parts are left as they are.
    Migration(6, "compact parts for inserts", tuple(
        f"ALTER TABLE {table} MODIFY SETTING min_rows_for_wide_part = 1000000"
        for table in ("notification_history", "notification_stats", "notification_stats_channel",
                      "notification_campaign_minutes", "notification_campaign_stats")
    )),
    # An insert writes the history part, then runs the views side by side (the writer's
    # parallel_view_processing); notification_stats' view was the longest of them by far. Two
    # views share its rows: the delivered, opened and clicked ones with their latency states,
    # and the rest, whose rows take the column's default (an empty state) instead of
    # computing one. The same groups and sums, in two parts an insert instead of one.
    Migration(7, "notification_stats fed by two views", (
        "DROP VIEW IF EXISTS notification_stats_mv",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS notification_stats_latency_mv TO notification_stats AS "
        f"{STATS_LATENCY_SELECT}",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS notification_stats_counts_mv TO notification_stats AS "
        f"{STATS_COUNTS_SELECT}",
    )),
)  # fmt: skip

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS marquee_migrations (
    version UInt32,
    name String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = MergeTree
ORDER BY version
"""

# Raw rows and their aggregates age out together, so both answer the same questions.
RETENTION = {"notification_history": "toDateTime(event_time)", "notification_stats": "hour",
             "notification_stats_channel": "hour", "notification_campaign_minutes": "minute",
             "notification_campaign_stats": "hour"}  # fmt: skip


def _uuid5(name: str, namespace: bytes | None = None) -> str:
    """uuid.uuid5(namespace, name) as 32 hex digits (EVENT_NAMESPACE by default), without
    building a UUID object (the writer and a campaign chunk compute one per row): SHA-1's
    first 16 bytes, version 5, RFC 4122 variant."""
    digest = hashlib.sha1((namespace or _NAMESPACE_BYTES) + name.encode()).hexdigest()
    return f"{digest[:12]}5{digest[13:16]}{_VARIANT[digest[16]]}{digest[17:32]}"


_NAMESPACE_BYTES = EVENT_NAMESPACE.bytes
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}  # bits 10xx


def event_id(notification_id: str, channel: str, status: str, occurrence: str = "") -> uuid.UUID:
    return uuid.UUID(hex=_uuid5(f"{notification_id}:{channel}:{status}:{occurrence}"))


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
    run_id: str = ""
    template_key: str = ""
    template_version: int = 0
    country: str = ""
    timezone: str = ""
    error_class: str = ""
    cost: Decimal = Decimal(0)
    currency: str = ""
    latency_ms: int = 0
    # "" unless the status repeats for this channel legitimately (a dead-letter replay's run).
    occurrence: str = ""

    @property
    def event_id(self) -> uuid.UUID:
        return event_id(self.notification_id, self.channel, self.status, self.occurrence)

    def stamped(self) -> HistoryRow:
        """The row with its event time fixed (now, if the caller gave none)."""
        return self if self.event_time is not None else replace(self, event_time=datetime.now(UTC))

    def as_json(self) -> dict[str, Any]:
        """The row as JSON (outbox queue and chDB's JSONEachRow)."""
        row = asdict(self)
        row["cost"] = str(self.cost)
        row["event_time"] = (self.event_time or datetime.now(UTC)).isoformat()
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> HistoryRow:
        """as_json's inverse; rows queued before a field existed take its default."""
        known = {name: value for name, value in row.items() if name in cls.__dataclass_fields__}
        known["event_time"] = datetime.fromisoformat(row["event_time"])
        if "cost" in known:
            known["cost"] = Decimal(str(known["cost"]))
        return cls(**known)

    def values(self) -> list[Any]:
        """HISTORY_COLUMNS' values, event_time as stored (UTC, milliseconds)."""
        row = {**asdict(self), "event_id": self.event_id, "event_time": self.stamped().event_time}
        return [row[column] for column in HISTORY_COLUMNS]


def campaign_send_id(campaign_id: uuid.UUID, run_id: str, recipient_id: int, channel: str) -> str:
    """The notification id a campaign send's history rows carry (campaign sends have no
    notifications row): the same for the batch that sent it and the events that follow.
    str(uuid.uuid5(campaign_id, name)), written from _uuid5's hex digits (a campaign chunk
    computes one a row: UUID objects cost about four times as much)."""
    hex_id = _uuid5(f"{run_id}:{recipient_id}:{channel}", campaign_id.bytes)
    return f"{hex_id[:8]}-{hex_id[8:12]}-{hex_id[12:16]}-{hex_id[16:20]}-{hex_id[20:]}"


# Every field of a HistoryRow by default, in declaration order (the first five have none).
_ROW_DEFAULTS: dict[str, Any] = {
    field.name: field.default if field.default is not MISSING else "" for field in fields(HistoryRow)
}


def _history_row(values: dict[str, Any]) -> HistoryRow:
    """The HistoryRow of these values, every field present in declaration order (`_ROW_DEFAULTS`
    updated), equal to HistoryRow(**values): a frozen dataclass refuses attribute assignment,
    not its __dict__, so the row skips __init__'s setattr per field (~2 µs instead of 10)."""
    row = object.__new__(HistoryRow)
    row.__dict__.update(values)
    return row


@dataclass(frozen=True)
class HistorySubject:
    """Whose history rows these are: the one place a notification's or campaign send's
    history event is put together, with what analytics groups it by."""

    notification_id: str
    user_id: str
    category: str
    campaign_id: str = ""
    run_id: str = ""
    template_key: str = ""
    template_version: int = 0
    country: str = ""
    timezone: str = ""
    occurrence: str = ""

    def event(self, channel: str, status: str, **details: Any) -> HistoryRow:
        """details: provider, attempt, error (cut to 1,000 characters), error_class, cost,
        currency, latency_ms, event_time."""
        return self.event_of({}, channel, status, **details)

    def event_of(self, subject: Mapping[str, Any], channel: str, status: str, **details: Any) -> HistoryRow:
        """event() of the subject that is this one but for `subject`'s fields: a campaign
        chunk's rows (recipients that share the campaign's fields) without a subject each."""
        if "error" in details:
            details["error"] = (details["error"] or "")[:1000]
        if not _SUBJECT_FIELDS.issuperset(subject) or not _EVENT_DETAILS.issuperset(details):
            unknown = (set(subject) - _SUBJECT_FIELDS) | (set(details) - _EVENT_DETAILS)
            raise TypeError(f"not a history subject field or event detail: {', '.join(sorted(unknown))}")
        return _history_row({**self._row_fields, **subject, "channel": channel, "status": status, **details})

    def batch_of(self, columns: Mapping[str, list[Any]], **shared: Any) -> HistoryBatch:
        """The events event_of would give, as one batch and without a row object each (a
        campaign chunk's): `columns` the fields that vary, a list each, as long as each other;
        `shared` the fields every event has (channel, status, details as event() takes them);
        this subject's fields and the defaults for the rest."""
        unknown = (set(columns) | set(shared)) - _ROW_DEFAULTS.keys()
        if unknown:
            raise TypeError(f"not a history subject field or event detail: {', '.join(sorted(unknown))}")
        count = len(next(iter(columns.values()))) if columns else 0
        every = {**self._row_fields, **shared}
        if isinstance(every["event_time"], datetime):
            every["event_time"] = epoch_ms(every["event_time"])
        batch = {name: columns[name] if name in columns else [every[name]] * count for name in _ROW_DEFAULTS}
        if "event_time" in columns:
            batch["event_time"] = _epoch_times(batch["event_time"])
        batch["error"] = [(error or "")[:1000] for error in batch["error"]]
        return HistoryBatch(batch)

    @functools.cached_property
    def _row_fields(self) -> dict[str, Any]:
        """A row's fields with this subject's values, once (asdict copied them for every event)."""
        return {**_ROW_DEFAULTS, **{name: getattr(self, name) for name in _SUBJECT_FIELDS}}


_SUBJECT_FIELDS = frozenset(field.name for field in fields(HistorySubject))
_EVENT_DETAILS = frozenset(_ROW_DEFAULTS) - {"channel", "status", *_SUBJECT_FIELDS}


def _utc(at: datetime) -> datetime:
    return at.astimezone(UTC) if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _stored_time(at: datetime) -> str:
    return _utc(at).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def epoch_ms(at: datetime) -> int:
    """An event time as stored: milliseconds since the epoch in UTC (a naive time read as
    UTC), the microseconds dropped."""
    return (_utc(at) - _EPOCH) // _MILLISECOND


def _epoch_times(times: Sequence[datetime | None]) -> list[int | None]:
    return [None if at is None else epoch_ms(at) for at in times]


class HistoryBatch:
    """History events as columns: a list per HistoryRow field, in its order, event_time as
    `epoch_ms` gives it (None: the time of the insert). What the writer buffers and a store
    inserts, and what a producer of many events hands the writer (HistorySubject.batch_of):
    reading every field of a million row objects was half the writer's time
    (docs/benchmarks.md), a list per column of a chunk is a fraction of it."""

    __slots__ = ("columns",)

    def __init__(self, columns: Mapping[str, list[Any]]) -> None:
        if set(columns) != _ROW_DEFAULTS.keys():
            raise TypeError(f"a history batch has a column per HistoryRow field, not {', '.join(sorted(columns))}")
        if len({len(column) for column in columns.values()}) > 1:
            raise ValueError("a history batch's columns differ in length")
        self.columns = {name: list(columns[name]) for name in _ROW_DEFAULTS}

    @classmethod
    def of(cls, rows: Sequence[HistoryRow]) -> HistoryBatch:
        columns = {name: list(map(attrgetter(name), rows)) for name in _ROW_DEFAULTS}
        columns["event_time"] = _epoch_times(columns["event_time"])
        return cls(columns)

    def __len__(self) -> int:
        return len(self.columns["notification_id"])

    def extend(self, other: HistoryBatch) -> None:
        for name, column in self.columns.items():
            column.extend(other.columns[name])


class HistoryReader(Protocol):
    """What reads history: the HistoryWriter a process holds, or the API's lazy reader."""

    async def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]: ...


class HistoryStore(Protocol):
    def ensure_schema(self) -> None: ...

    def insert(self, batch: HistoryBatch) -> None: ...

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class _ClickHouse:
    """What both stores share: migrations, retention and the deduplicating insert. A
    subclass runs statements (`_command`, `query`) and inserts rows as they are (`_insert`)."""

    retention_days: int

    def _command(self, sql: str) -> None:
        raise NotImplementedError

    def _insert(self, table: pa.Table) -> None:
        raise NotImplementedError

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        raise NotImplementedError

    def ensure_schema(self) -> None:
        """Apply the migrations not yet recorded, in order, then the retention TTL; idempotent."""
        self._command(MIGRATIONS_TABLE)
        applied = {int(row["version"]) for row in self.query("SELECT version FROM marquee_migrations")}
        for migration in MIGRATIONS:
            if migration.version in applied:
                continue
            for statement in migration.statements:
                self._command(statement)
            self.query(
                "INSERT INTO marquee_migrations (version, name) VALUES ({version:UInt32}, {name:String})",
                {"version": migration.version, "name": migration.name},
            )
        self._apply_retention()

    def _apply_retention(self) -> None:
        for table, column in RETENTION.items():
            ttl = f"TTL {column} + toIntervalDay({int(self.retention_days)})"
            [row] = self.query(
                "SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = {table:String}",
                {"table": table},
            )
            if ttl not in row["engine_full"]:  # MODIFY TTL rewrites every part: only on a change
                self._command(f"ALTER TABLE {table} MODIFY {ttl}")

    def insert(self, batch: HistoryBatch) -> None:
        """Insert the events not stored yet (by event_id); see the module's note on the race.

        The batch is handled as columns, never row by row (building JSON text capped the
        writer at a few thousand rows a second): an Arrow table, whose event ids and
        duplicate check each store computes as cheaply as it can (`_insert_new`)."""
        if not len(batch):
            return
        now = datetime.now(UTC)
        # The batch's days as one range, so the sort key's event_time prunes the lookup.
        self._insert_new(_arrow_batch(batch, now), *_days(batch.columns["event_time"], now))

    def _insert_new(self, batch: pa.Table, since: date, until: date) -> None:
        """Insert the batch's events (HISTORY_COLUMNS but event_id, plus occurrence) whose
        id is neither stored with an event time in [since, until) nor earlier in the batch.
        Here: ids hashed in Python, one lookup, then the rest inserted as it is."""
        ids = [_uuid5(f"{notification}:{channel}:{status}:{occurrence}") for notification, channel, status, occurrence
               in zip(*(batch.column(name).to_pylist() for name in _ID_PARTS), strict=True)]  # fmt: skip
        # Each event's first row: the dict keeps the lowest index, as reversed assignment wins.
        first = dict(zip(reversed(ids), range(len(ids) - 1, -1, -1), strict=True))
        table = batch.drop_columns(["occurrence"]).add_column(0, "event_id", pa.array(ids, pa.string()))
        if len(first) < len(ids):
            table = table.take(sorted(first.values()))
        stored = self._stored_ids(table.select(["event_id"]), since, until)
        if stored:
            table = table.filter(pc.invert(pc.is_in(table.column("event_id"), pa.array(stored))))
        if table.num_rows:
            self._insert(table)

    def _stored_ids(self, ids: pa.Table, since: date, until: date) -> list[str]:
        """Which of these event ids (32 hex digits) are stored with an event time in [since, until)."""
        # Literals from hex digits and date objects only: no outside text.
        listed = ", ".join(f"'{identity}'" for identity in ids.column("event_id").to_pylist() if identity.isalnum())
        found = self.query(
            f"SELECT DISTINCT {_HEX_ID} AS id FROM notification_history WHERE event_time >= '{since}' "
            f"AND event_time < '{until}' AND event_id IN ({listed})"
        )
        return [row["id"] for row in found]


_ID_PARTS = ("notification_id", "channel", "status", "occurrence")
_HEX_ID = "replaceAll(toString(event_id), '-', '')"  # as _uuid5 writes it
_ARROW_TYPES = {"event_time": pa.timestamp("ms", tz="UTC"), "attempt": pa.uint16(), "template_version": pa.uint32(),
                "latency_ms": pa.uint32(), "cost": pa.decimal128(18, 6)}  # fmt: skip
# The columns of an insert, in order: HISTORY_COLUMNS but event_id (computed by the insert), then occurrence.
_INSERT_FIELDS = (*HISTORY_COLUMNS[1:], "occurrence")
MICRO = Decimal("0.000001")
_FILLS = {"attempt": 0, "template_version": 0, "latency_ms": 0, "cost": Decimal(0)}  # a null's default; others ""


def _arrow_columns(batch: HistoryBatch, start: int, stop: int, now: datetime) -> list[pa.Array]:
    """The batch's events [start, stop) as Arrow columns of _INSERT_FIELDS: no event time is
    `now`, another None a null."""
    columns = []
    for name in _INSERT_FIELDS:
        values = batch.columns[name][start:stop]
        if name == "event_time":
            column = pc.fill_null(pa.array(values, pa.int64()), epoch_ms(now)).cast(_ARROW_TYPES["event_time"])
        elif name == "cost":  # few distinct costs: convert each once, then index
            distinct: dict[Any, int] = {}
            indices = [distinct.setdefault(cost, len(distinct)) for cost in values]
            exact = [None if cost is None else Decimal(str(cost)).quantize(MICRO, ROUND_DOWN) for cost in distinct]
            dictionary = pa.array(exact, _ARROW_TYPES["cost"])
            column = pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), dictionary).dictionary_decode()
        else:
            column = pa.array(values, _ARROW_TYPES.get(name, pa.string()))
        columns.append(column)
    return columns


def _arrow_batch(batch: HistoryBatch, now: datetime) -> pa.Table:
    """The batch as an Arrow table (`_arrow_columns`)."""
    columns = _arrow_columns(batch, 0, len(batch), now)
    # A column without nulls is declared not null: chDB's Python() then reads a plain column
    # rather than a Nullable one the insert converts (~0.2 µs a row less of chDB's CPU).
    fields = [pa.field(name, column.type, nullable=column.null_count > 0)
              for name, column in zip(_INSERT_FIELDS, columns, strict=True)]  # fmt: skip
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


# A streamed batch's chunks (ChdbStore.insert) share one schema, every column not null.
_CHUNK_SCHEMA = pa.schema([pa.field(name, _ARROW_TYPES.get(name, pa.string()), nullable=False)
                           for name in _INSERT_FIELDS])  # fmt: skip


def _arrow_chunk(batch: HistoryBatch, start: int, stop: int, now: datetime) -> pa.RecordBatch:
    """The batch's events [start, stop) as one record batch of _CHUNK_SCHEMA, stored as
    _arrow_batch's table would be: no event time is `now`, another None its column's default
    (ClickHouse stores a null as that), and a row missing a part of its event id is left out
    (a null id: the table's insert leaves it out too)."""
    columns = _arrow_columns(batch, start, stop, now)
    if any(column.null_count for column in columns):  # rare: None where a value is due
        keep = pc.is_valid(columns[_INSERT_FIELDS.index(_ID_PARTS[0])])
        for name in _ID_PARTS[1:]:
            keep = pc.and_(keep, pc.is_valid(columns[_INSERT_FIELDS.index(name)]))
        columns = [(pc.fill_null(column, pa.scalar(_FILLS.get(name, ""), column.type)) if column.null_count
                    else column).filter(keep) for name, column in zip(_INSERT_FIELDS, columns, strict=True)
                   ]  # fmt: skip
    return pa.RecordBatch.from_arrays(columns, schema=_CHUNK_SCHEMA)


def _days(times: list[int | None], now: datetime) -> tuple[date, date]:
    """[first day, day after the last) of these event times (epoch_ms; None: `now`) in UTC."""
    # min() of a single None is None, not a TypeError: look for one instead.
    known = [at if at is not None else epoch_ms(now) for at in times] if None in times else cast("list[int]", times)
    first, last = min(known), max(known)
    return (_EPOCH + first * _MILLISECOND).date(), (_EPOCH + last * _MILLISECOND).date() + timedelta(days=1)


_BATCH_ID = _uuid5_sql("concat(notification_id, ':', channel, ':', status, ':', occurrence)")
# A Nullable Python() column's cast to UUID stores zeros for a malformed id: fail instead.
_BATCH_VALUES = ", ".join(HISTORY_COLUMNS[1:]).replace("notification_id", "toUUID(assumeNotNull(notification_id))")
# The batch's two halves, read as two streams: chDB hashes and checks them on two threads.
_BATCH = "(SELECT * FROM Python(first) UNION ALL SELECT * FROM Python(second))"
_INSERT_NEW = (
    f"INSERT INTO notification_history ({', '.join(HISTORY_COLUMNS)}) "
    f"SELECT {_BATCH_ID} AS id, {_BATCH_VALUES} FROM {_BATCH} "
    "WHERE id NOT IN (SELECT event_id FROM notification_history "
    "WHERE event_time >= {since:Date} AND event_time < {until:Date} "
    f"AND event_id IN (SELECT {_BATCH_ID} FROM {_BATCH})) "
    # Repeats of an event within a batch are the same row: any one of them will do (LIMIT BY
    # also joins the streams, so each table still gets one part per insert).
    "LIMIT 1 BY id "
    # The history part and the four views' parts are written side by side, not one by one.
    "SETTINGS max_insert_threads = 2, optimize_on_insert = 0, parallel_view_processing = 1"
)
# A large batch streams (ChdbStore.insert): the stored ids of its days are read into a set
# first, then chDB pulls the batch chunk by chunk, each built by Python while the one before
# is hashed, checked and squashed; parts and views are written once the last has arrived.
_INSERT_STREAMED = (
    f"INSERT INTO notification_history ({', '.join(HISTORY_COLUMNS)}) "
    f"SELECT {_BATCH_ID} AS id, {_BATCH_VALUES} FROM Python(stream) "
    "WHERE id NOT IN (SELECT event_id FROM notification_history "
    "WHERE event_time >= {since:Date} AND event_time < {until:Date}) "
    "LIMIT 1 BY id SETTINGS max_insert_threads = 2, optimize_on_insert = 0, parallel_view_processing = 1"
)
STREAM_MIN_ROWS = 10_000  # smaller batches: one insert as every store does (_ClickHouse.insert)
STREAM_MAX_STORED = 8  # stored rows in the batch's days per batch row, at most, to stream it
CHUNK_ROWS = 8192  # rows per streamed chunk: about 10 ms of Python holding the GIL


def _bound(params: Mapping[str, Any] | None) -> dict[str, str]:
    """Query parameters as ClickHouse reads them in text: datetimes in UTC with milliseconds."""
    return {name: _stored_time(value) if isinstance(value, datetime) else str(value)
            for name, value in (params or {}).items()}  # fmt: skip


def _escaped(params: dict[str, str]) -> dict[str, str]:
    """chDB reads parameters in ClickHouse's escaped text format, where a tab or newline ends
    the value (a 500 for a filter holding one): escape as clickhouse-connect does for HTTP."""
    return {name: "".join("\\" + c if c in "\\\t\n'" else c for c in value) for name, value in params.items()}


class ChdbStore(_ClickHouse):
    """chDB: ClickHouse's engine inside this process. A path may be open in one process only."""

    _lock = threading.Lock()

    def __init__(self, path: Path, retention_days: int = DEFAULT_RETENTION_DAYS) -> None:
        from chdb import session

        path.mkdir(parents=True, exist_ok=True)
        self.retention_days = retention_days
        self._session = session.Session(str(path))
        # Batches whose days start before this do not stream (see insert).
        self._crowded_until = date.min

    def _command(self, sql: str) -> None:
        with self._lock:
            self._session.query(sql)

    def insert(self, batch: HistoryBatch) -> None:
        """A large batch streams into one INSERT (_INSERT_STREAMED): building its Arrow
        chunks runs beside chDB's work instead of before it. Its duplicate check reads every
        stored id of the batch's days, so it gives up (before reading the batch) when they are
        more than STREAM_MAX_STORED a batch row, and so do the next batches until their days
        are past those; then, and for small batches (whose ids select the stored ones through
        the bloom filter instead of reading a day's ids), the insert every store makes
        (_ClickHouse.insert, _insert_new)."""
        if len(batch) < STREAM_MIN_ROWS:
            super().insert(batch)
            return
        now = datetime.now(UTC)
        since, until = _days(batch.columns["event_time"], now)
        if since < self._crowded_until:
            super().insert(batch)
            return
        chunks = (_arrow_chunk(batch, start, start + CHUNK_ROWS, now) for start in range(0, len(batch), CHUNK_ROWS))
        stream = pa.RecordBatchReader.from_batches(_CHUNK_SCHEMA, chunks)  # noqa: F841  (Python(stream))
        try:
            self.query(f"{_INSERT_STREAMED}, max_rows_in_set = {STREAM_MAX_STORED * len(batch)}, "
                       "set_overflow_mode = 'throw'", {"since": since, "until": until})  # fmt: skip
        except RuntimeError as error:  # chDB's errors are RuntimeErrors that name their code
            if "SET_SIZE_LIMIT_EXCEEDED" not in str(error):
                raise
            self._crowded_until = until
            super().insert(batch)

    def _insert_new(self, batch: pa.Table, since: date, until: date) -> None:
        # One statement: chDB reads the Arrow tables `first` and `second` from this frame,
        # hashes the event ids in SQL (Python's hashing was a third of the writer's time) and
        # leaves out the stored ones (through the event_id bloom filter) and the batch's repeats.
        first, second = batch.slice(0, batch.num_rows // 2), batch.slice(batch.num_rows // 2)  # noqa: F841
        self.query(_INSERT_NEW, {"since": since, "until": until})

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            result = self._session.query(sql, "JSONEachRow", params=_escaped(_bound(params)) or None)
        text = result.bytes().decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def close(self) -> None:
        with self._lock:
            self._session.close()


@dataclass(frozen=True)
class ClickHouseServer:
    """Where MARQUEE_CLICKHOUSE_URL points (http[s]://user:password@host:port/database),
    with ClickHouse's defaults for what it leaves out. One reading for the store, the
    readiness probe and backups."""

    scheme: str
    host: str
    port: int
    username: str
    password: str
    database: str

    @classmethod
    def parse(cls, url: str) -> ClickHouseServer:
        parsed = urlparse(url)
        return cls(
            scheme=parsed.scheme or "http",
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or (8443 if parsed.scheme == "https" else 8123),  # ClickHouse's HTTP(S) ports
            username=parsed.username or "default",
            password=parsed.password or "",
            database=(parsed.path or "/").lstrip("/") or "default",
        )

    @property
    def http_base(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/"

    @property
    def place(self) -> str:
        """Host, port and database, never the credentials (for messages)."""
        return f"{self.host}:{self.port}/{self.database}"


class ClickHouseServerStore(_ClickHouse):
    """A ClickHouse server through clickhouse-connect (production)."""

    def __init__(self, url: str, retention_days: int = DEFAULT_RETENTION_DAYS) -> None:
        import clickhouse_connect

        server = ClickHouseServer.parse(url)
        self.retention_days = retention_days
        self._client = clickhouse_connect.get_client(
            host=server.host,
            port=server.port,
            username=server.username,
            password=server.password,
            database=server.database,
            secure=server.scheme == "https",
        )

    def _command(self, sql: str) -> None:
        self._client.command(sql)

    def _insert(self, table: pa.Table) -> None:
        self._client.insert_arrow("notification_history", table)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        return list(self._client.query(sql, parameters=_bound(params)).named_results())

    def close(self) -> None:
        self._client.close()


def open_store(
    clickhouse_url: str | None, chdb_path: Path, retention_days: int = DEFAULT_RETENTION_DAYS
) -> HistoryStore:
    if clickhouse_url:
        return ClickHouseServerStore(clickhouse_url, retention_days)
    return ChdbStore(chdb_path, retention_days)


class HistoryWriter:
    """Group commit over a HistoryStore; blocking store calls run on one thread."""

    def __init__(self, store: HistoryStore, flush_seconds: float = 1.0, flush_rows: int = 100_000) -> None:
        self.store = store
        self._flush_seconds = flush_seconds
        self._flush_rows = flush_rows
        self._pending = HistoryBatch.of([])
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._full = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history")

    async def record(self, events: HistoryBatch | Sequence[HistoryRow]) -> None:
        """Queue events and return once they are stored (raises if the insert failed)."""
        batch = events if isinstance(events, HistoryBatch) else HistoryBatch.of(events)
        if not len(batch):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.extend(batch)
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
        batch, waiters = self._pending, self._waiters
        self._pending, self._waiters = HistoryBatch.of([]), []
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.store.insert, batch)
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
        if len(self._pending):
            # Rows that arrived during the insert found this task running: flush them next.
            self._flusher = asyncio.create_task(self._flush_soon())

    async def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run a query on the store's thread; params bind `{name:Type}` placeholders."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.store.query, sql, params)

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
            await history.record([HistoryRow.from_json(row) for row in queued])
    return len(queued)
