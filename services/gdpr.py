"""GDPR: everything Marquee holds about one user_id as one JSON document (export), and
all of it removed from every store (erase), leaving a record that names no one.

What each store gives up and what is kept, and why, is in docs/gdpr.md. In short:
PostgreSQL loses the recipient (preferences and segment memberships cascade), their
notifications with deliveries and dead letters, campaign deliveries, digest items,
suppressions of their addresses, sandbox messages and provider webhook events about their
messages, and pending history rows; events naming them keep their id and hash (so a
redelivery stays a duplicate) with an empty payload; audit rows that named them keep
who/what/when/why and lose the object id and details (the one UPDATE migration 0010 lets
through). ClickHouse loses their history rows (a lightweight DELETE, checked by a SELECT).
Temporal loses their notification, replay, event and digest executions (DeleteWorkflowExecution
terminates a running one first). Dev mail captured to files addressed to them is deleted.

Order: Temporal first (a running send would otherwise write again behind the erasure),
then PostgreSQL in one transaction that ClickHouse's delete, the mail files and the
record join; the transaction commits last, so a failure anywhere leaves the person
findable and erase can simply be run again (each step is idempotent).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from core.config import Settings
from core.contracts import digest_workflow_id, event_workflow_id, workflow_id_for
from core.errors import Invalid, NotFound, Unavailable
from core.models import (
    CampaignDelivery,
    DigestItem,
    Erasure,
    Event,
    EventAction,
    HistoryOutbox,
    ProviderBreaker,
    RecipientPreference,
    SandboxMessage,
    SegmentMember,
    TriggerRule,
    WebhookEvent,
)
from core.queries import dead_letters, deliveries, notifications, recipients
from services.audit import Actor, audit_log, record, record_action, required_reason
from services.dead_letters import replay_workflow_id
from services.history import HistoryReader
from services.preferences import suppressions

campaign_deliveries = CampaignDelivery.__table__  # type: ignore[attr-defined]
digest_items = DigestItem.__table__  # type: ignore[attr-defined]
erasures = Erasure.__table__  # type: ignore[attr-defined]
events = Event.__table__  # type: ignore[attr-defined]
event_actions = EventAction.__table__  # type: ignore[attr-defined]
history_outbox = HistoryOutbox.__table__  # type: ignore[attr-defined]
provider_breakers = ProviderBreaker.__table__  # type: ignore[attr-defined]
preferences = RecipientPreference.__table__  # type: ignore[attr-defined]
sandbox_messages = SandboxMessage.__table__  # type: ignore[attr-defined]
segment_members = SegmentMember.__table__  # type: ignore[attr-defined]
trigger_rules = TriggerRule.__table__  # type: ignore[attr-defined]
webhook_events = WebhookEvent.__table__  # type: ignore[attr-defined]

HASH_PURPOSE = "gdpr-erasure"
ERASED = "[erased]"
# Executions deleted side by side: each is one RPC; a person may have thousands.
_TEMPORAL_CONCURRENCY = 8
_VISIBILITY_CHUNK = 100
# The ClickHouse tables that hold people (a user_id column): found, not listed, so a new
# one is erased too. Views are skipped: they store nothing of their own.
_PEOPLE_TABLES = (
    "SELECT c.table AS name FROM system.columns c JOIN system.tables t "
    "ON t.database = c.database AND t.name = c.table "
    "WHERE c.database = currentDatabase() AND c.name = 'user_id' AND t.engine LIKE '%MergeTree' ORDER BY name"
)


@dataclass(frozen=True)
class ErasureReport:
    """What one erasure removed: the record's id, the subject's hash, counts per store."""

    erasure_id: int
    subject_hash: str
    counts: dict[str, dict[str, int]]


@dataclass
class _Subject:
    """Everything that identifies the person in the stores, gathered before anything is removed."""

    user_id: str
    recipient: dict[str, Any] | None = None
    notification_ids: list[uuid.UUID] = field(default_factory=list)
    addresses: set[tuple[str, str]] = field(default_factory=set)  # (channel, address)
    provider_message_ids: set[str] = field(default_factory=set)
    event_ids: list[str] = field(default_factory=list)
    replay_ids: list[str] = field(default_factory=list)

    @property
    def recipient_id(self) -> int | None:
        return None if self.recipient is None else int(self.recipient["id"])

    @property
    def emails(self) -> set[str]:
        return {address for channel, address in self.addresses if channel == "email"}

    def identifiers(self) -> set[str]:
        """The strings that name the person: user_id, addresses, name."""
        found = {self.user_id, *(address for _, address in self.addresses)}
        if self.recipient and self.recipient.get("name"):
            found.add(self.recipient["name"])
        return {text for text in found if text}


def subject_hash(settings: Settings, user_id: str) -> str:
    """The user_id as the erasure record keeps it: an HMAC (SHA-256) with a key derived from
    the JWT secret, so the record confirms "was X erased?" to whoever holds X and the key,
    and tells no one else anything."""
    return hmac.new(settings.signing_key(HASH_PURPOSE), user_id.encode(), hashlib.sha256).hexdigest()


# --- Finding the person ------------------------------------------------------------------------


async def _subject(conn: AsyncConnection, user_id: str) -> _Subject:
    subject = _Subject(user_id)
    row = (await conn.execute(sa.select(recipients).where(recipients.c.user_id == user_id))).mappings().first()
    if row is not None:
        subject.recipient = dict(row)
        if row["email"]:
            subject.addresses.add(("email", row["email"].lower()))
        if row["phone"]:
            subject.addresses.add(("sms", row["phone"]))
        subject.addresses.update(("push", token) for token in [*row["push_tokens"], *row["dead_push_tokens"]])
        sent = await conn.execute(
            sa.select(campaign_deliveries.c.provider_message_id).where(
                campaign_deliveries.c.recipient_id == row["id"], campaign_deliveries.c.provider_message_id.is_not(None)
            )
        )
        subject.provider_message_ids.update(sent.scalars())
    ids = await conn.execute(sa.select(notifications.c.id).where(notifications.c.user_id == user_id))
    subject.notification_ids = list(ids.scalars())
    if subject.notification_ids:
        channels = await conn.execute(
            sa.select(deliveries.c.channel, deliveries.c.address, deliveries.c.provider_message_id).where(
                deliveries.c.notification_id.in_(subject.notification_ids)
            )
        )
        for channel, address, message_id in channels:
            if address:
                subject.addresses.add((channel, address.lower() if channel == "email" else address))
            if message_id:
                subject.provider_message_ids.add(message_id)
        replayed = await conn.execute(
            sa.select(dead_letters.c.notification_id, dead_letters.c.id, dead_letters.c.replays).where(
                dead_letters.c.notification_id.in_(subject.notification_ids), dead_letters.c.replays > 0
            )
        )
        subject.replay_ids = [replay_workflow_id(notification_id, letter, number)
                              for notification_id, letter, replays in replayed
                              for number in range(1, replays + 1)]  # fmt: skip
    naming = await conn.execute(sa.select(events.c.id).where(events.c.payload["user_id"].astext == user_id))
    subject.event_ids = list(naming.scalars())
    return subject


def _address_match(table: sa.Table, addresses: Iterable[tuple[str, str]]) -> sa.ColumnElement[bool]:
    pairs = sorted(addresses)
    if not pairs:
        return sa.false()
    return sa.tuple_(table.c.channel, table.c.address).in_(pairs)


async def _history_tables(history: HistoryReader) -> list[str]:
    return [row["name"] for row in await history.query(_PEOPLE_TABLES)]


async def _history_count(history: HistoryReader, tables: Sequence[str], user_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for table in tables:  # names from system.columns, not from outside
        [row] = await history.query(f"SELECT count() AS n FROM {table} WHERE user_id = {{user:String}}",
                                    {"user": user_id})  # fmt: skip
        counts[table] = int(row["n"])
    return counts


def _reader(history: HistoryReader | None) -> HistoryReader:
    if history is None:
        raise Unavailable(
            "the history store (ClickHouse) is not reachable from this process: an export or erasure "
            "must cover it (set MARQUEE_CLICKHOUSE_URL, or run it where the worker's chDB is)",
            title="History store unavailable",
        )
    return history


# --- Export ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A value as JSON has it: times in ISO 8601, ids and decimals as text."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(item) for item in value]
    return value


async def _rows(conn: AsyncConnection, query: sa.Select[Any]) -> list[dict[str, Any]]:
    return [_plain(dict(row)) for row in (await conn.execute(query)).mappings()]


async def export(
    conn: AsyncConnection, history: HistoryReader | None, user_id: str, *, actor: Actor | None = None
) -> dict[str, Any]:
    """Everything held about `user_id`, as one JSON-ready document; NotFound if nothing is.
    With an actor, who exported whom is audited (and committed): personal data left the system."""
    reader = _reader(history)
    subject = await _subject(conn, user_id)
    rid = subject.recipient_id
    ids = subject.notification_ids
    document: dict[str, Any] = {
        "user_id": user_id,
        "exported_at": datetime.now(UTC).isoformat(),
        "recipient": _plain(subject.recipient),
        "preferences": await _rows(conn, sa.select(preferences).where(preferences.c.recipient_id == rid)
                                   .order_by(preferences.c.category, preferences.c.channel)),
        "follows": list(subject.recipient["follows"]) if subject.recipient else [],
        "segment_memberships": [row["segment_id"] for row in await _rows(
            conn, sa.select(segment_members.c.segment_id).where(segment_members.c.recipient_id == rid))],
        "suppressions": await _rows(conn, sa.select(suppressions)
                                    .where(_address_match(suppressions, subject.addresses))),
        "notifications": await _rows(conn, sa.select(notifications).where(notifications.c.id.in_(ids))
                                     .order_by(notifications.c.created_at)),
        "deliveries": await _rows(conn, sa.select(deliveries).where(deliveries.c.notification_id.in_(ids))
                                  .order_by(deliveries.c.id)),
        "dead_letters": await _rows(conn, sa.select(dead_letters).where(dead_letters.c.notification_id.in_(ids))
                                    .order_by(dead_letters.c.id)),
        "campaign_deliveries": await _rows(conn, sa.select(campaign_deliveries)
                                           .where(campaign_deliveries.c.recipient_id == rid)
                                           .order_by(campaign_deliveries.c.id)),
        "events": await _rows(conn, sa.select(events).where(events.c.id.in_(subject.event_ids))
                              .order_by(events.c.received_at)),
        "digest_items": await _rows(conn, sa.select(digest_items).where(digest_items.c.user_id == user_id)
                                    .order_by(digest_items.c.created_at)),
        "sandbox_messages": await _rows(conn, sa.select(sandbox_messages)
                                        .where(_address_match(sandbox_messages, subject.addresses))
                                        .order_by(sandbox_messages.c.id)),
        "history_pending": [row["row"] for row in await _rows(
            conn, sa.select(history_outbox.c.row).where(history_outbox.c.row["user_id"].astext == user_id))],
    }  # fmt: skip
    history_rows: list[dict[str, Any]] = []
    for table in await _history_tables(reader):
        found = await reader.query(f"SELECT * FROM {table} WHERE user_id = {{user:String}} ORDER BY event_time",
                                   {"user": user_id})  # fmt: skip
        history_rows.extend({"table": table, **row} for row in found)
    document["history"] = _plain(history_rows)
    held = [value for key, value in document.items() if key not in ("user_id", "exported_at")]
    if not any(held):
        raise NotFound(f"nothing is held about user_id {user_id!r}")
    if actor is not None:
        await record_action(conn, actor, "recipient.export", "recipient", user_id)
        await conn.commit()
    return document


# --- Erasure -----------------------------------------------------------------------------------


async def erase(
    conn: AsyncConnection,
    history: HistoryReader | None,
    temporal: Client | None,
    settings: Settings,
    user_id: str,
    actor: Actor,
    reason: str,
) -> ErasureReport:
    """Remove everything held about `user_id` from every store and record that it was done
    (an `erasures` row and an audit row, neither naming the person). Commits.

    NotFound if nothing is held; Invalid if the reason is missing or names the person (it is
    kept in the audit log, which would then hold what was erased)."""
    reader = _reader(history)
    reason = required_reason(reason)
    subject = await _subject(conn, user_id)
    tables = await _history_tables(reader)
    stored_history = await _history_count(reader, tables, user_id)
    held = (subject.recipient, subject.notification_ids, subject.event_ids, any(stored_history.values()))
    pending = await conn.scalar(sa.select(sa.func.count()).select_from(history_outbox)
                                .where(history_outbox.c.row["user_id"].astext == user_id))  # fmt: skip
    digests = await conn.scalar(sa.select(sa.func.count()).select_from(digest_items)
                                .where(digest_items.c.user_id == user_id))  # fmt: skip
    if not any(held) and not pending and not digests:
        await conn.rollback()
        raise NotFound(f"nothing is held about user_id {user_id!r}")
    _check_reason(reason, subject)
    hashed = subject_hash(settings, user_id)
    counts: dict[str, dict[str, int]] = {}
    try:
        counts["temporal"] = await _erase_temporal(conn, temporal, subject)
        counts["postgresql"] = await _erase_postgresql(conn, subject, hashed)
        counts["clickhouse"] = await _erase_history(reader, tables, user_id, stored_history)
        counts["mail_capture"] = {"files": _erase_mail(settings.mail_capture_dir, subject.emails)}
        erasure_id = await conn.scalar(
            sa.insert(erasures)
            .values(subject_hash=hashed, actor=actor.subject, role=str(actor.role), counts=counts)
            .returning(erasures.c.id)
        )
        await record(conn, actor=actor.subject, role=str(actor.role), action="recipient.erase", entity="recipient",
                     entity_id=f"erased:{hashed}", details={"erasure_id": erasure_id, "counts": counts},
                     reason=reason)  # fmt: skip
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise
    assert erasure_id is not None
    return ErasureReport(int(erasure_id), hashed, counts)


def _check_reason(reason: str, subject: _Subject) -> None:
    folded = reason.casefold()
    # Short ids and names ("7", "Al") would match ordinary words: only distinctive ones count.
    if any(len(text) >= 4 and text.casefold() in folded for text in subject.identifiers()):
        raise Invalid.field(
            "reason", "must not name the person (user_id, address or name): it is kept in the audit log"
        )


async def _erase_temporal(conn: AsyncConnection, temporal: Client | None, subject: _Subject) -> dict[str, int]:
    """Delete the person's workflow executions, every run of each id (a digest has one per
    window); a running one is terminated by the server first."""
    if temporal is None:
        return {"skipped": 1}
    rule_ids = set((await conn.execute(sa.select(trigger_rules.c.id))).scalars())
    rule_ids.update((await conn.execute(sa.select(digest_items.c.rule_id).distinct()
                                        .where(digest_items.c.user_id == subject.user_id))).scalars())  # fmt: skip
    workflow_ids = sorted(
        {workflow_id_for(notification_id) for notification_id in subject.notification_ids}
        | set(subject.replay_ids)
        | {event_workflow_id(event_id) for event_id in subject.event_ids}
        | {digest_workflow_id(rule_id, subject.user_id) for rule_id in rule_ids}
    )
    runs: set[tuple[str, str]] = set()
    for start in range(0, len(workflow_ids), _VISIBILITY_CHUNK):
        chunk = workflow_ids[start : start + _VISIBILITY_CHUNK]
        listed = ", ".join(_quoted(workflow_id) for workflow_id in chunk)
        async for execution in temporal.list_workflows(f"WorkflowId IN ({listed})"):
            runs.add((execution.id, execution.run_id))
    # Visibility trails a start by a moment: the latest run of every id is deleted by id too.
    targets = sorted(runs) + [(workflow_id, "") for workflow_id in workflow_ids]
    gate = asyncio.Semaphore(_TEMPORAL_CONCURRENCY)

    async def delete(workflow_id: str, run_id: str) -> str | None:
        request = DeleteWorkflowExecutionRequest(
            namespace=temporal.namespace, workflow_execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id)
        )
        async with gate:
            try:
                await temporal.workflow_service.delete_workflow_execution(request)
            except RPCError as err:
                if err.status == RPCStatusCode.NOT_FOUND:
                    return None  # never ran, or deleted by the run-id pass
                raise Unavailable(f"Temporal refused to delete an execution: {err.message}",
                                  title="Temporal unavailable") from err  # fmt: skip
        return workflow_id

    deleted = await asyncio.gather(*(delete(workflow_id, run_id) for workflow_id, run_id in targets))
    return {"executions": len(runs), "workflow_ids": len({found for found in deleted if found})}


def _quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


async def _count(conn: AsyncConnection, statement: sa.Executable) -> int:
    return int((await conn.execute(statement)).rowcount)


async def _erase_postgresql(conn: AsyncConnection, subject: _Subject, hashed: str) -> dict[str, int]:
    user_id, rid, ids = subject.user_id, subject.recipient_id, subject.notification_ids
    counts: dict[str, int] = {}
    message_ids = sorted(subject.provider_message_ids)
    emails = sorted(subject.emails)
    counts["webhook_events"] = await _count(conn, sa.delete(webhook_events).where(sa.or_(
        webhook_events.c.provider_message_id.in_(message_ids),
        *(sa.cast(webhook_events.c.payload, sa.Text).icontains(email, autoescape=True) for email in emails),
    )))  # fmt: skip
    counts["dead_letters"] = await _count(conn, sa.delete(dead_letters).where(dead_letters.c.notification_id.in_(ids)))
    counts["deliveries"] = await _count(conn, sa.delete(deliveries).where(deliveries.c.notification_id.in_(ids)))
    counts["notifications"] = await _count(conn, sa.delete(notifications).where(notifications.c.id.in_(ids)))
    counts["campaign_deliveries"] = await _count(
        conn, sa.delete(campaign_deliveries).where(campaign_deliveries.c.recipient_id == rid)
    )
    counts["digest_items"] = await _count(conn, sa.delete(digest_items).where(digest_items.c.user_id == user_id))
    counts["history_outbox"] = await _count(
        conn, sa.delete(history_outbox).where(history_outbox.c.row["user_id"].astext == user_id)
    )
    counts["suppressions"] = await _count(
        conn, sa.delete(suppressions).where(_address_match(suppressions, subject.addresses))
    )
    counts["sandbox_messages"] = await _count(
        conn, sa.delete(sandbox_messages).where(_address_match(sandbox_messages, subject.addresses))
    )
    # The event stays, as a duplicate-detector for a redelivery of the same id and content;
    # what it said goes. Waiting actions would cancel on a payload value: they are over.
    counts["events_blanked"] = await _count(
        conn, sa.update(events).where(events.c.id.in_(subject.event_ids)).values(payload={})
    )
    await conn.execute(
        sa.update(event_actions)
        .where(event_actions.c.event_id.in_(subject.event_ids))
        .values(correlation=None, status=sa.case((event_actions.c.status == "waiting", "cancelled"),
                                                  else_=event_actions.c.status),
                reason=sa.case((event_actions.c.status == "waiting", "recipient erased"),
                               else_=event_actions.c.reason), updated_at=sa.func.now())
    )  # fmt: skip
    for _, address in sorted(subject.addresses):  # a provider's last error may quote one
        await conn.execute(
            sa.update(provider_breakers)
            .where(provider_breakers.c.last_error.contains(address, autoescape=True))
            .values(last_error=sa.func.replace(provider_breakers.c.last_error, address, ERASED))
        )
    counts["preferences"] = await _count(conn, sa.delete(preferences).where(preferences.c.recipient_id == rid))
    counts["recipients"] = await _count(conn, sa.delete(recipients).where(recipients.c.user_id == user_id))
    counts["audit_rows_redacted"] = await _redact_audit(conn, subject, hashed)
    return counts


async def _redact_audit(conn: AsyncConnection, subject: _Subject, hashed: str) -> int:
    """Audit rows that named the person keep who did what, when and why, and lose the object
    id and details (the only UPDATE the log's trigger lets through, migration 0010)."""
    names = sorted(subject.identifiers())
    entity_ids = [f"{channel}:{address}" for channel, address in sorted(subject.addresses)]
    # A JSON string equal to one of the names, anywhere in details or changes.
    as_json = [sa.cast(sa.func.to_jsonb(sa.literal(name, sa.Text)), sa.Text) for name in names]
    in_json = [sa.func.strpos(sa.cast(column, sa.Text), quoted) > 0
               for column in (audit_log.c.details, audit_log.c.changes) for quoted in as_json]  # fmt: skip
    naming = sa.or_(
        sa.and_(audit_log.c.entity == "recipient", audit_log.c.entity_id == subject.user_id),
        sa.and_(audit_log.c.entity == "suppression", audit_log.c.entity_id.in_(entity_ids)),
        *in_json,
    )
    distinctive = [name for name in names if len(name) >= 4]
    # sa.false() first: or_() of nothing is deprecated (a warning when no name is distinctive).
    reason_names = sa.or_(sa.false(), *(audit_log.c.reason.icontains(name, autoescape=True) for name in distinctive))
    result = await conn.execute(
        sa.update(audit_log)
        .where(naming | (reason_names if distinctive else sa.false()))
        .values(entity_id=f"erased:{hashed}", details={}, changes={},
                reason=sa.case((reason_names, ERASED), else_=audit_log.c.reason) if distinctive else audit_log.c.reason)
    )  # fmt: skip
    return int(result.rowcount)


async def _erase_history(
    history: HistoryReader, tables: Sequence[str], user_id: str, stored: Mapping[str, int]
) -> dict[str, int]:
    """A lightweight DELETE per table (rows are hidden at once and dropped from disk as
    their parts merge), then a count that must be zero."""
    for table in tables:
        if stored.get(table):
            await history.query(f"DELETE FROM {table} WHERE user_id = {{user:String}}", {"user": user_id})
    left = await _history_count(history, tables, user_id)
    if any(left.values()):
        raise Unavailable(f"history rows survived the delete: {left}", title="History store did not erase")
    return dict(stored)


def _erase_mail(directory: Path, emails: Iterable[str]) -> int:
    """Captured dev mail (`marquee dev` writes each message as an .eml file) that mentions
    one of the addresses, anywhere in the message."""
    wanted = [email.encode() for email in emails]
    if not wanted or not directory.is_dir():
        return 0
    removed = 0
    for path in directory.glob("*.eml"):
        content = path.read_bytes().lower()
        if any(email in content for email in wanted):
            path.unlink(missing_ok=True)
            removed += 1
    return removed
