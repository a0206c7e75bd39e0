"""PostgreSQL round trips of one instant notification's prepare and send: a count, pinned as
an upper bound (each round trip is worker CPU; see docs/benchmarks.md, instant section)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection, event
from sqlalchemy.ext.asyncio import AsyncEngine

from core.config import Settings
from core.contracts import CancelInput, ChannelPlan, NotificationInput, SendInput
from core.db import create_engine
from core.queries import deliveries, notification_row, notifications, recipients, select_recipients_to_send
from services import delivery
from services import preferences as prefs
from services.sending import InstantSender
from worker import WorkerServices

# Statements plus BEGIN/COMMIT: what a notification costs the worker in round trips.
PREPARE_BUDGET = 2
SEND_BUDGET = 5


@dataclass
class Trips:
    statements: list[str] = field(default_factory=list)

    def reset(self) -> list[str]:
        seen, self.statements = self.statements, []
        return seen


@pytest.fixture
async def counted(settings: Settings) -> AsyncIterator[tuple[AsyncEngine, Trips]]:
    """An engine of its own, so the session worker's background statements are not counted."""
    assert settings.database_url
    engine = create_engine(settings.database_url, pool_size=2)
    trips = Trips()

    def statement(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        trips.statements.append(" ".join(sql.split())[:120])

    event.listen(engine.sync_engine, "before_cursor_execute", statement)

    def control(name: str) -> Callable[[Connection], None]:
        def listener(conn: Connection) -> None:
            # An autocommitted connection sends no BEGIN or COMMIT (asyncpg starts no transaction).
            if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
                trips.statements.append(name)

        return listener

    event.listen(engine.sync_engine, "begin", control("BEGIN"))
    event.listen(engine.sync_engine, "commit", control("COMMIT"))
    async with engine.connect() as conn:  # the pool's first connection (dialect setup) not counted
        await conn.execute(sa.text("SELECT 1"))
    trips.reset()
    yield engine, trips
    await engine.dispose()


def _email_request(user_id: str) -> NotificationInput:
    """One email notification to this user, as the API would start it."""
    notification_id = uuid.uuid4()
    return NotificationInput(
        notification_id=notification_id, idempotency_key=f"budget-{notification_id}", request_hash="h",
        requested_by="test", user_id=user_id, category="new_episode", channels=["email"],
        title="Episode 5", body="Out tonight.", send_locally=True,
    )  # fmt: skip


async def test_one_email_notification_round_trips(
    counted: tuple[AsyncEngine, Trips], services: WorkerServices, settings: Settings, recipient: dict
) -> None:
    engine, trips = counted
    sender = InstantSender(engine, services.directory, settings)
    request = _email_request(recipient["user_id"])
    notification_id = request.notification_id
    plan = await sender.prepare(request, "run-1")
    prepared = trips.reset()
    [channel] = plan.channels
    assert channel.skip_reason is None
    assert channel.address == recipient["email"]
    assert channel.title is not None
    assert channel.body is not None
    result = await sender.send(
        SendInput(notification_id=notification_id, idempotency_key=request.idempotency_key, channel="email",
                  address=channel.address, user_id=request.user_id, category=request.category, title=channel.title,
                  body=channel.body, data=channel.data or {}, tags=plan.tags),
        attempt=1,
    )  # fmt: skip
    sent = trips.reset()
    print("\nprepare:", *prepared, "send:", *sent, sep="\n  ")
    assert result.provider_message_id
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(deliveries.c.status, deliveries.c.attempts, notifications.c.status.label("summary"))
                .join(notifications, notifications.c.id == deliveries.c.notification_id)
                .where(deliveries.c.notification_id == notification_id)
            )
        ).one()
    assert (row.status, row.attempts, row.summary) == ("sent", 1, "sent")
    assert len(prepared) <= PREPARE_BUDGET, prepared
    assert len(sent) <= SEND_BUDGET, sent


async def test_the_one_read_decides_as_load_choices_does(
    counted: tuple[AsyncEngine, Trips], services: WorkerServices, settings: Settings, recipient: dict
) -> None:
    """prepare reads preferences and suppressions with the recipient; the decision made from
    them is the one campaigns make from load_choices (an opt-out, a suppressed push token)."""
    engine, trips = counted
    async with engine.begin() as conn:
        row = (
            await conn.execute(select_recipients_to_send().where(recipients.c.user_id == recipient["user_id"]))
        ).one()
        await prefs.opt_out(conn, recipient_id=row.id, category="new_episode", channel="sms", source="test")
        await prefs.suppress(conn, "push", recipient["push_tokens"][-1], "dead token", source="test")
        loaded = await delivery.load_choices(conn, [row], ["email", "sms", "push"])
    expected = {
        channel: delivery.decide(row, channel, category="new_episode", choices=loaded, directory=services.directory,
                                 settings=settings, now=datetime.now(UTC)).status
        for channel in ("email", "sms", "push")
    }  # fmt: skip
    assert expected == {"email": "pending", "sms": "suppressed", "push": "suppressed"}
    notification_id = uuid.uuid4()
    request = NotificationInput(
        notification_id=notification_id, idempotency_key=f"budget-{notification_id}", request_hash="h",
        requested_by="test", user_id=recipient["user_id"], category="new_episode", channels=["email", "sms", "push"],
        title="Episode 5", body="Out tonight.", send_locally=True,
    )  # fmt: skip
    trips.reset()
    plan = await InstantSender(engine, services.directory, settings).prepare(request, "run-1")
    assert len(trips.reset()) <= PREPARE_BUDGET  # as many statements for three channels as for one
    assert {channel.channel: _status(channel) for channel in plan.channels} == expected
    async with engine.connect() as conn:
        stored: dict[str, str] = dict((await conn.execute(
            sa.select(deliveries.c.channel, deliveries.c.status).where(deliveries.c.notification_id == notification_id)
        )).all())  # fmt: skip
    assert stored == expected


def _status(plan: ChannelPlan) -> str:
    return "suppressed" if plan.suppress else "unreachable" if plan.unreachable else "pending"


async def test_a_cancellation_recorded_before_the_deliveries_leaves_none_pending(
    counted: tuple[AsyncEngine, Trips], services: WorkerServices, settings: Settings, recipient: dict
) -> None:
    """prepare's two statements commit each on their own: a run cancelled in between records
    its cancellation (no channel yet: the notification reads cancelled) before the second,
    which then writes no delivery that would stay pending."""
    engine, _ = counted
    sender = InstantSender(engine, services.directory, settings)
    request = _email_request(recipient["user_id"])
    notification_id = request.notification_id
    async with engine.begin() as conn:  # as the API writes it
        await conn.execute(sa.insert(notifications).values(notification_row(request, "notification-x")))
    await sender.record_cancelled(CancelInput(notification_id=notification_id, user_id=request.user_id,
                                              category=request.category))  # fmt: skip
    await sender.prepare(request, "run-1")
    async with engine.connect() as conn:
        status = await conn.scalar(sa.select(notifications.c.status).where(notifications.c.id == notification_id))
        channels = await conn.scalar(
            sa.select(sa.func.count()).select_from(deliveries).where(deliveries.c.notification_id == notification_id)
        )
    assert (status, channels) == ("cancelled", 0)
