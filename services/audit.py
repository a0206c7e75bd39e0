"""The audit log: who changed what, written in the same transaction as the change (FR-008).

Each row holds the actor and their role, the action, the object (entity, entity_id), the
before/after difference (`changes`), the reason (required of destructive and risky
actions: the API and the admin ask for it), the client address and the time. PostgreSQL
keeps the log append-only (migration 0009's trigger refuses UPDATE, DELETE, TRUNCATE).

The client address comes from the edge: the API's ClientAddress middleware (api/audit_context.py,
which covers the mounted admin panel too) puts the request's client address, as uvicorn
resolved it behind trusted proxies (X-Forwarded-For with --proxy-headers), in a context
variable for the request's task; `record` reads it. A context variable rather than a
parameter because every service call that audits would otherwise need the request (or an
address on every Principal and admin user) threaded through; outside a request (CLI,
workflows) it is None.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.errors import Invalid
from core.models import AuditEntry

audit_log = AuditEntry.__table__  # type: ignore[attr-defined]

MIN_REASON = 3
MAX_REASON = 1000
CSV_COLUMNS = ("id", "at", "actor", "role", "action", "entity", "entity_id", "reason", "client_address",
               "changes", "details")  # fmt: skip
_EXPORT_BATCH = 1000

_client_address: ContextVar[str | None] = ContextVar("audit_client_address", default=None)


class Actor(Protocol):
    """Who acts: an API principal, or an admin panel user (email and role)."""

    @property
    def subject(self) -> str: ...

    @property
    def role(self) -> str: ...


class InvalidFilter(Exception):
    """A search filter or cursor that cannot be used; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ReasonRequired(Invalid):
    """A destructive or risky action asked for without a reason: a domain error like any
    Invalid (a 422 naming `reason` at the API), its text the message alone for form errors."""

    def __init__(self, message: str) -> None:
        super().__init__([("reason", message)])
        self.detail = message
        self.args = (message,)


# --- Where from -----------------------------------------------------------------------------


@contextlib.contextmanager
def client_address(address: str | None) -> Iterator[None]:
    """Audit rows written inside carry `address` (the edge sets it per request)."""
    token = _client_address.set(address)
    try:
        yield
    finally:
        _client_address.reset(token)


def current_client_address() -> str | None:
    return _client_address.get()


# --- Writing --------------------------------------------------------------------------------


def required_reason(reason: str | None) -> str:
    """The reason, stripped; ReasonRequired when there is none worth the name."""
    text = (reason or "").strip()
    if len(text) < MIN_REASON:
        raise ReasonRequired(f"a reason of at least {MIN_REASON} characters is required")
    return text[:MAX_REASON]


def diff(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> dict[str, Any]:
    """{field: {"before": old, "after": new}} for each field whose value differs (absent is None)."""
    old, new = dict(before or {}), dict(after or {})
    return {
        field: {"before": old.get(field), "after": new.get(field)}
        for field in sorted(old.keys() | new.keys())
        if old.get(field) != new.get(field)
    }


async def record_action(
    conn: AsyncConnection,
    actor: Actor | None,
    action: str,
    entity: str,
    entity_id: object,
    details: dict[str, Any] | None = None,
    *,
    reason: str | None = None,
    changes: dict[str, Any] | None = None,
) -> None:
    """Audit what a person did; None (a schedule, a benchmark) is not a person's action."""
    if actor is not None:
        await record(conn, actor=actor.subject, role=str(actor.role), action=action, entity=entity,
                     entity_id=entity_id, details=details, reason=reason, changes=changes)  # fmt: skip


async def record(
    conn: AsyncConnection,
    *,
    actor: str,
    role: str,
    action: str,
    entity: str,
    entity_id: object,
    details: dict[str, Any] | None = None,
    reason: str | None = None,
    changes: dict[str, Any] | None = None,
) -> None:
    await conn.execute(
        sa.insert(audit_log).values(
            actor=actor, role=role, action=action, entity=entity, entity_id=str(entity_id), details=details or {},
            reason=reason, changes=changes or {}, client_address=_client_address.get(),
        )
    )  # fmt: skip


# --- Searching and exporting ----------------------------------------------------------------


@dataclass(frozen=True)
class AuditFilter:
    """Which rows: every given criterion must hold; `since` inclusive, `until` exclusive."""

    actor: str | None = None
    action: str | None = None
    entity: str | None = None
    entity_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        log = audit_log
        given = ((log.c.actor, self.actor), (log.c.action, self.action), (log.c.entity, self.entity),
                 (log.c.entity_id, self.entity_id))  # fmt: skip
        where: list[sa.ColumnElement[bool]] = [column == value for column, value in given if value is not None]
        if self.since is not None:
            where.append(log.c.at >= _aware(self.since))
        if self.until is not None:
            where.append(log.c.at < _aware(self.until))
        return where


@dataclass(frozen=True)
class Page:
    rows: list[sa.Row[Any]]
    next_cursor: str | None


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _query(filters: AuditFilter, after: tuple[datetime, int] | None) -> sa.Select[Any]:
    log = audit_log
    query = sa.select(log).where(*filters.conditions())
    if after is not None:
        query = query.where(
            sa.tuple_(log.c.at, log.c.id)
            < sa.tuple_(sa.literal(after[0], sa.DateTime(timezone=True)), sa.literal(after[1], sa.BigInteger))
        )
    return query.order_by(log.c.at.desc(), log.c.id.desc())


def check(filters: AuditFilter) -> None:
    """InvalidFilter if the filters cannot match anything by construction."""
    if filters.since is not None and filters.until is not None and _aware(filters.since) >= _aware(filters.until):
        raise InvalidFilter("until", "must be after since")


async def search(conn: AsyncConnection, filters: AuditFilter, *, limit: int = 50, cursor: str | None = None) -> Page:
    """Rows newest first, in keyset pages: pass `next_cursor` back as `cursor`."""
    check(filters)
    after = decode_cursor(cursor) if cursor is not None else None
    rows = list((await conn.execute(_query(filters, after).limit(limit + 1))).all())
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].at, page[-1].id) if len(rows) > limit else None
    return Page(page, next_cursor)


async def export(engine: AsyncEngine, filters: AuditFilter) -> AsyncIterator[sa.Row[Any]]:
    """Every matching row, newest first, read in keyset batches on a connection of its own
    (a streamed response outlives the request's connection)."""
    after: tuple[datetime, int] | None = None
    while True:
        async with engine.connect() as conn:
            rows = list((await conn.execute(_query(filters, after).limit(_EXPORT_BATCH))).all())
        for row in rows:
            yield row
        if len(rows) < _EXPORT_BATCH:
            return
        after = (rows[-1].at, rows[-1].id)


def csv_header() -> str:
    return _csv_line(CSV_COLUMNS)


def csv_row(row: sa.Row[Any]) -> str:
    mapping = row._mapping
    return _csv_line(_cell(mapping[column]) for column in CSV_COLUMNS)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return _json(value)
    text = str(value)
    # A cell a spreadsheet would run as a formula is quoted as text (CSV injection).
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _csv_line(cells: Iterable[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(list(cells))
    return out.getvalue()


def encode_cursor(moment: datetime, row_id: int) -> str:
    return base64.urlsafe_b64encode(f"{moment.isoformat()}|{row_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        moment, row_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(moment), int(row_id)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidFilter("cursor", "not a cursor returned by this API") from err
