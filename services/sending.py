"""The worker's side of an instant notification: plan its channels, send one channel
through one provider, record a failure or a cancellation. NotificationWorkflow's
activities call these; what goes wrong comes back as a SendFailure naming its kind."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from channels.base import (
    InvalidAddressError,
    OutboundMessage,
    PermanentSendError,
    Provider,
    ProviderUnavailableError,
    ThrottledError,
    TransientSendError,
)
from core.config import Settings
from core.contracts import (
    CIRCUIT_OPEN,
    FAILURES_EXHAUSTED,
    PERMANENT_ERROR,
    PROVIDER_UNAVAILABLE,
    THROTTLED,
    TRANSIENT_ERROR,
    CancelInput,
    ChannelPlan,
    DeliveryPlan,
    FailureInput,
    HistoryTags,
    NotificationInput,
    SendInput,
    SendResult,
    workflow_id_for,
)
from core.models import DeliveryStatus
from core.queries import (
    LOCK_NOTIFICATION,
    NOTIFICATION_ID,
    REFRESH_NOTIFICATION_STATUS,
    SEND_COLUMNS,
    dead_letters,
    deliveries,
    lock_notification,
    notification_row,
    notifications,
    recipients,
    refresh_notification_status,
    select_recipients_to_send,
)
from core.templating import RenderError, checked_variables, render_for_recipient
from core.tracking import InstantDelivery
from services import breaker, delivery, metrics
from services import preferences as prefs
from services.delivery_events import (
    EARLY_EVENTS,
    HISTORY_INSERT,
    apply_early_rows,
    early_event_forms,
    history_rows,
    queue_history,
)
from services.history import HistoryRow, HistorySubject
from services.providers import message_cost
from services.routing import ProviderDirectory
from services.templates import PinnedVersions, TemplateNotFound

logger = structlog.get_logger("marquee.notifications")
NO_CHOICES = delivery.Choices({}, {})  # no recipient: nothing to read


# The hot statements of prepare and the send, built once (see core.queries'
# NOTIFICATION_ID: building one and working out its cache key cost more than its round trip).


@functools.cache
def _facts_statement(fields: tuple[str, ...]) -> sa.Select[Any]:
    """prepare's one read: the notification upserted (the API wrote it before starting the
    workflow; the upsert makes the workflow whole should that transaction have been lost
    after the start), with its accepted time, the recipient and the preferences and
    suppressed contacts that delivery.decide reads. `fields`: notification_row's, as `n_*`."""
    values: dict[str, Any] = {name[2:]: sa.bindparam(name, type_=notifications.c[name[2:]].type) for name in fields}
    run_id = sa.bindparam("the_run", type_=notifications.c.run_id.type)
    accepted = (
        insert(notifications)
        .values({**values, "id": NOTIFICATION_ID, "run_id": run_id})
        .on_conflict_do_update(index_elements=["id"], set_={"run_id": run_id})
        .returning(notifications.c.created_at)
        .cte("accepted")
    )
    return (
        select_recipients_to_send()
        .add_columns(
            accepted.c.created_at.label("accepted_at"),
            prefs.preferences_of(recipients.c.id).label("wanted"),
            prefs.suppressions_of(recipients.c.email, recipients.c.phone, recipients.c.push_tokens).label("blocked"),
        )
        .select_from(accepted.outerjoin(recipients, recipients.c.user_id == values["user_id"]))
    )


def _plan_deliveries() -> sa.Insert:
    """prepare's write: every channel's delivery (arrays `channels`, `addresses`, `statuses`,
    `errors`: a multi-row VALUES is compiled anew every time) and history row. It takes the
    notification's lock as the run's other writers do: a cancellation recorded since prepare's
    read (a run cancelled during prepare) leaves no channel pending behind it; one recorded
    after finds the channels to cancel."""
    live = (
        sa.select(notifications.c.id)
        .where(notifications.c.id == NOTIFICATION_ID)
        .where(notifications.c.status != DeliveryStatus.cancelled.value)
        .with_for_update()
        .cte("live")
    )
    arrays = [sa.bindparam(name, type_=pg.ARRAY(sa.Text)) for name in ("channels", "addresses", "statuses", "errors")]
    unnested = sa.func.unnest(*arrays).table_valued("channel", "address", "status", "error")
    rows = unnested.render_derived(name="planned_rows")
    planned = insert(deliveries).from_select(
        ["notification_id", "channel", "address", "status", "error"],
        sa.select(NOTIFICATION_ID, rows.c.channel, rows.c.address, rows.c.status, rows.c.error).where(
            sa.exists(sa.select(live.c.id))
        ),
    )
    # A replay (or a retried prepare) finds the row pending; a channel the recipient no
    # longer wants (or can no longer be reached on) must not stay pending forever.
    planned = planned.on_conflict_do_update(
        constraint="uq_delivery_channel",
        set_={"status": planned.excluded.status, "error": planned.excluded.error, "updated_at": sa.func.now()},
        where=sa.and_(deliveries.c.status == DeliveryStatus.pending.value,
                      planned.excluded.status != DeliveryStatus.pending.value),
    )  # fmt: skip
    return HISTORY_INSERT.add_cte(planned.cte("planned"))


PLAN_DELIVERIES = _plan_deliveries()
# The send's record, first statement: the notification's lock taken (as its every writer does
# first) and the delivery recorded sent. A send that was already under way when the run was
# cancelled did go out: the record says so rather than "cancelled".
_LOCKED = LOCK_NOTIFICATION.cte("locked")
RECORD_SENT = (
    deliveries.update()
    .where(deliveries.c.notification_id == NOTIFICATION_ID)
    .where(deliveries.c.channel == sa.bindparam("sent_channel", type_=sa.Text))
    # Always true (a delivery's notification exists): it makes PostgreSQL run the lock's CTE,
    # which it skips when nothing reads it.
    .where(sa.exists(sa.select(_LOCKED.c.id)))
    .where(deliveries.c.status.in_([DeliveryStatus.pending.value, DeliveryStatus.cancelled.value]))
    .values(
        status=DeliveryStatus.sent.value,
        provider=sa.bindparam("sent_provider", type_=sa.Text),
        provider_message_id=sa.bindparam("sent_message_id", type_=sa.Text),
        sent_at=sa.func.now(),
        updated_at=sa.func.now(),
        error=None,
    )
    .returning(deliveries.c.sent_at)
)
# The second, seeing every channel committed: its history row queued, the summary refreshed
# and the provider's events that came before this commit found.
RECORDED_SENT = EARLY_EVENTS.add_cte(HISTORY_INSERT.cte("queued"), REFRESH_NOTIFICATION_STATUS.cte("refreshed"))


class SendFailure(Exception):
    """A send that did not go through. `kind` is one of core.contracts' error types, which
    the workflow branches on; `final` sends are not retried on this provider."""

    def __init__(self, message: str, kind: str, *, final: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.final = final
        self.retry_after = retry_after

    @property
    def retry_delay(self) -> timedelta | None:
        return timedelta(seconds=self.retry_after) if self.retry_after else None


SENT_OR_LATER = (
    DeliveryStatus.sent.value,
    DeliveryStatus.delivered.value,
    DeliveryStatus.opened.value,
    DeliveryStatus.clicked.value,
    DeliveryStatus.bounced.value,
)


class InstantSender:
    """Built once per worker with its clients."""

    def __init__(
        self,
        engine: AsyncEngine,
        directory: ProviderDirectory,
        settings: Settings,
        templates: PinnedVersions | None = None,
    ) -> None:
        self._engine = engine
        self._directory = directory
        self._settings = settings
        self._templates = templates or PinnedVersions()

    @asynccontextmanager
    async def _autocommitted(self) -> AsyncIterator[AsyncConnection]:
        """A connection whose statements commit each on its own: no BEGIN and COMMIT round trips."""
        async with self._engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    async def prepare(self, request: NotificationInput, workflow_run_id: str) -> DeliveryPlan:
        """Ensure the rows exist, and decide per channel where to send or why not.

        Two statements, each committed on its own (a replay's run in one transaction): the
        notification's upsert with everything the decision reads, then the deliveries with
        their history rows. A prepare retried after the first finds its row and does the same."""
        replay = request.replay_of is not None
        async with self._engine.begin() if replay else self._autocommitted() as conn:
            # The API wrote this row before starting the workflow; the upsert makes the
            # workflow whole even if that transaction was lost after the start.
            notification = notification_row(request, workflow_id_for(request.notification_id))
            params = {f"n_{name}": value for name, value in notification.items() if name != "id"}
            facts = (
                await conn.execute(
                    _facts_statement(tuple(params)),
                    {**params, "notification": request.notification_id, "the_run": workflow_run_id},
                )
            ).one()
            accepted_at = facts.accepted_at
            if replay:
                # An operator replays a dead letter: the failed channel starts over.
                await conn.execute(
                    deliveries.update()
                    .where(deliveries.c.notification_id == request.notification_id)
                    .where(deliveries.c.channel.in_(request.channels))
                    .where(deliveries.c.status == DeliveryStatus.failed.value)
                    .values(
                        status=DeliveryStatus.pending.value,
                        failures=0,
                        error=None,
                        failed_at=None,
                        updated_at=sa.func.now(),
                    )
                )
            fields: dict[str, Any] = {name: facts._mapping[name] for name in SEND_COLUMNS}
            recipient = SimpleNamespace(**fields) if facts.id is not None else None
            choices = delivery.choices_of(facts.id, facts.wanted, facts.blocked) if recipient else NO_CHOICES
            decisions = [
                delivery.decide(
                    recipient,
                    channel,
                    category=request.category,
                    choices=choices,
                    directory=self._directory,
                    settings=self._settings,
                    now=datetime.now(UTC),
                    urgent=request.priority == "urgent",
                )
                for channel in request.channels
            ]
            plans = [_plan(channel, decision) for channel, decision in zip(request.channels, decisions, strict=True)]
            if recipient is not None:
                plans = await self._content(conn, request, fields, plans)
            tags = HistoryTags(
                run_id=workflow_run_id,
                template_key=request.template_key or "",
                template_version=request.template_version or 0,
                country=(recipient.country or "") if recipient else "",
                timezone=recipient.timezone if recipient else "",
                # A replay's events repeat the original run's statuses: its own run tells them apart.
                occurrence=workflow_run_id if request.replay_of is not None else "",
            )
            # The accepted time of the notification, so that a retried prepare writes the same row.
            at = datetime.now(UTC) if request.replay_of is not None or accepted_at is None else accepted_at
            subject = _subject(request, tags)
            if plans:
                # The deliveries and their history rows: one statement. It takes the
                # notification's lock as the run's other writers do: a cancellation recorded
                # since the first statement (a run cancelled during prepare) leaves no channel
                # pending behind it; one recorded after finds the channels to cancel.
                recorded = [_recorded_status(plan) for plan in plans]
                errors = [plan.skip_reason if status != DeliveryStatus.pending.value else None
                          for plan, status in zip(plans, recorded, strict=True)]  # fmt: skip
                events = [subject.event(plan.channel, status, event_time=at)
                          for plan, status in zip(plans, recorded, strict=True)]  # fmt: skip
                await conn.execute(
                    PLAN_DELIVERIES,
                    {"notification": request.notification_id, "channels": [plan.channel for plan in plans],
                     "addresses": [plan.address for plan in plans], "statuses": recorded, "errors": errors,
                     "history_rows": history_rows(events)},
                )  # fmt: skip
            if replay or all(_recorded_status(plan) != DeliveryStatus.pending.value for plan in plans):
                # Otherwise a channel is pending, so the notification stays as the API wrote it.
                # After the deliveries' statement: the summary reads them.
                await refresh_notification_status(conn, request.notification_id)
        for plan in plans:
            if _recorded_status(plan) == DeliveryStatus.pending.value:
                first = self._directory.first_in_line(plan.channel, plan.routes)
                metrics.ACCEPTED.labels(plan.channel, first, "instant").inc()
        quiet = [decision.until for decision in decisions if decision.until is not None]
        logger.info("notification prepared", send=[plan.channel for plan in plans if plan.skip_reason is None],
                    skip={plan.channel: _recorded_status(plan) for plan in plans if plan.skip_reason is not None},
                    deferred=bool(quiet))  # fmt: skip
        return DeliveryPlan(locale=recipient.locale if recipient else "en", channels=plans,
                            defer_until=min(quiet) if quiet else None, tags=tags)  # fmt: skip

    async def _content(
        self, conn: AsyncConnection, request: NotificationInput, recipient: dict[str, Any], plans: list[ChannelPlan]
    ) -> list[ChannelPlan]:
        """Each sendable channel's finished message: the pinned template version rendered for
        this recipient, or the request's own title and body."""
        sendable = [plan.channel for plan in plans if plan.skip_reason is None]
        contents: dict[str, delivery.Content] = {}
        if request.template_key is not None and sendable:
            assert request.template_version is not None
            try:
                template = await self._templates.get(conn, request.template_key, request.template_version)
                variables = checked_variables(template, request.variables)
                rendered = render_for_recipient(template, recipient, variables, sendable)
                contents = {channel: delivery.rendered_content(rendered, channel) for channel in sendable}
            except (RenderError, TemplateNotFound, ValueError) as err:
                reason = f"template {request.template_key} v{request.template_version} failed to render: {err}"
                return [plan if plan.skip_reason else plan.model_copy(update={"skip_reason": reason}) for plan in plans]
        else:
            raw = delivery.Content(request.title or "", request.body or "", dict(request.data))
            contents = dict.fromkeys(sendable, raw)
        finished = []
        for plan in plans:
            if plan.channel in contents:
                content = delivery.compose(self._settings, contents[plan.channel], channel=plan.channel,
                                           user_id=request.user_id, category=request.category,
                                           delivery=InstantDelivery(request.notification_id, plan.channel))  # fmt: skip
                plan = plan.model_copy(update={"title": content.title, "body": content.body, "data": content.data})
            finished.append(plan)
        return finished

    async def send(self, request: SendInput, attempt: int) -> SendResult:
        """Send one channel through one provider and record it right after acceptance.

        Runs on the provider's own task queue (its rate limit) or, for the channel's
        default provider, on the main one. Failures count against `max_failures` on this
        provider; throttling only delays; an open circuit or an unavailable provider makes
        the workflow move to the next provider."""
        default = self._directory.defaults.get(request.channel)
        name = request.provider or (default.name if default else request.channel)
        # One statement: committed on its own, without BEGIN and COMMIT round trips.
        async with self._autocommitted() as conn:
            row = (
                await conn.execute(
                    deliveries.update()
                    .where(deliveries.c.notification_id == request.notification_id)
                    .where(deliveries.c.channel == request.channel)
                    .values(
                        attempts=deliveries.c.attempts + 1,
                        # The failure budget is per provider: a new provider starts afresh.
                        failures=sa.case(
                            (deliveries.c.provider.is_distinct_from(name), 0), else_=deliveries.c.failures
                        ),
                        provider=sa.case(
                            (deliveries.c.status.in_(SENT_OR_LATER), deliveries.c.provider), else_=sa.literal(name)
                        ),
                        updated_at=sa.func.now(),
                    )
                    .returning(
                        deliveries.c.status,
                        deliveries.c.provider,
                        deliveries.c.provider_message_id,
                        deliveries.c.attempts,
                        deliveries.c.sent_at,
                    )
                )
            ).first()
        attempt = row.attempts if row is not None else attempt
        if row is not None and row.status in SENT_OR_LATER:
            # A retry after the provider took it but before the activity completed (its
            # history event was queued when it was recorded sent).
            return SendResult(
                provider=row.provider or "", provider_message_id=row.provider_message_id or "", already_sent=True
            )

        if request.provider is None and self._directory.no_provider(request.channel):
            # Every stored provider of the channel is disabled: wait for one, as a campaign does.
            reason = delivery.no_provider_reason(request.channel)
            failures = await self._note_error(request, reason, failed=True)
            raise self._transient(reason, None, failures, request, None)
        provider = self._directory.provider(request.channel, request.provider)
        if provider is None:
            if request.provider is None:
                raise SendFailure(
                    f"no provider configured for channel {request.channel!r}", PERMANENT_ERROR, final=True
                )
            # Removed or disabled since the plan was made, or not loaded here yet.
            raise SendFailure(f"provider {name!r} is not available", PROVIDER_UNAVAILABLE, final=True)
        if request.may_skip and not await breaker.allow(self._engine, name, self._directory.breaker_cooldown):
            raise SendFailure(f"circuit of provider {name!r} is open", CIRCUIT_OPEN, final=True)
        message = OutboundMessage(
            channel=request.channel,
            address=request.address,
            title=request.title,
            body=request.body,
            idempotency_key=f"{request.idempotency_key}:{request.channel}",
            data=request.data,
        )
        # Shielded: a cancelled run (or activity) does not cut an attempt off mid-conversation
        # with the provider; it finishes, and what the provider took is recorded sent.
        return await asyncio.shield(self._call(request, name, provider, message, attempt))

    async def _call(
        self, request: SendInput, name: str, provider: Provider, message: OutboundMessage, attempt: int
    ) -> SendResult:
        """One attempt through one provider, then its record: sent, or the error's kind."""
        loaded = self._directory.loaded.get(name)
        slots: AbstractAsyncContextManager[Any] = loaded.slots if loaded else nullcontext()
        try:
            with metrics.provider_call(request.channel, name):
                async with slots:
                    receipt = await self._directory.send(name, provider, message)
        except InvalidAddressError as err:
            await retire_address(
                self._engine, request.channel, request.user_id, err.address or request.address, str(err)
            )
            raise SendFailure(str(err), PERMANENT_ERROR, final=True) from err
        except PermanentSendError as err:
            raise SendFailure(str(err), PERMANENT_ERROR, final=True) from err
        except ThrottledError as err:
            # The provider is fine but busy: wait as asked, without spending the budget.
            await self._note_error(request, str(err), failed=False)
            raise SendFailure(str(err), THROTTLED, final=False, retry_after=err.retry_after) from err
        except (TransientSendError, ProviderUnavailableError) as err:
            await self._directory.failed(name, err)
            failures = await self._note_error(request, str(err), failed=True)
            if isinstance(err, ProviderUnavailableError):
                raise SendFailure(str(err), PROVIDER_UNAVAILABLE, final=True) from err
            raise self._transient(str(err), name, failures, request, err.retry_after) from err
        # Written only when a circuit may need closing (the probe of a skippable route, or
        # one this process saw open): not a PostgreSQL transaction per message.
        await self._directory.succeeded(name, was_open=request.may_skip or await self._directory.is_open(name))

        # Two statements: the notification's lock taken (as its every writer does first) and
        # the delivery recorded sent; then, seeing every channel committed, its history row
        # queued, the summary refreshed and the events that came before this commit found.
        async with self._engine.begin() as conn:
            sent_at = await conn.scalar(
                RECORD_SENT,
                {"notification": request.notification_id, "sent_channel": request.channel,
                 "sent_provider": receipt.provider, "sent_message_id": receipt.message_id},
            )  # fmt: skip
            # A fast provider may have reported on this message before this commit.
            event = self._sent_event(request, receipt.provider, attempt, sent_at)
            found = (
                await conn.execute(
                    RECORDED_SENT,
                    {"notification": request.notification_id, "history_rows": history_rows([event]),
                     "message_id_forms": early_event_forms([receipt.message_id])},
                )
            ).all()  # fmt: skip
            await apply_early_rows(conn, found)
        metrics.SENT.labels(request.channel, receipt.provider, "instant").inc()
        logger.info("notification sent", channel=request.channel, provider=receipt.provider, attempt=attempt)
        return SendResult(provider=receipt.provider, provider_message_id=receipt.message_id)

    @staticmethod
    def _transient(
        error: str, provider: str | None, failures: int, request: SendInput, retry_after: float | None
    ) -> SendFailure:
        """Retried on this provider (None: waiting for one) until the route's failure budget is spent."""
        if failures >= request.max_failures:
            summary = f"{failures} failures on provider {provider!r}, the last: {error}" if provider else error
            return SendFailure(summary, FAILURES_EXHAUSTED, final=True)
        return SendFailure(error, TRANSIENT_ERROR, final=False, retry_after=retry_after)

    async def record_failure(self, failure: FailureInput) -> None:
        """Mark a channel failed for good and keep a dead letter for replay."""
        async with self._engine.begin() as conn:
            await lock_notification(conn, failure.notification_id)
            failed = (
                await conn.execute(
                    deliveries.update()
                    .where(deliveries.c.notification_id == failure.notification_id)
                    .where(deliveries.c.channel == failure.channel)
                    .where(deliveries.c.status == DeliveryStatus.pending.value)
                    .values(
                        status=DeliveryStatus.failed.value,
                        error=failure.error,
                        failed_at=sa.func.now(),
                        updated_at=sa.func.now(),
                    )
                    .returning(deliveries.c.attempts, deliveries.c.failed_at, deliveries.c.provider)
                )
            ).first()
            if failed is None:  # already recorded by an earlier attempt of this activity
                return
            attempts = failed.attempts
            await conn.execute(
                insert(dead_letters)
                .values(
                    notification_id=failure.notification_id,
                    channel=failure.channel,
                    reason=failure.reason,
                    last_error=failure.error,
                    attempts=attempts,
                    request=failure.request.model_dump(mode="json"),
                )
                # A replay that failed again reopens its dead letter.
                .on_conflict_do_update(
                    constraint="uq_dead_letter_channel",
                    set_={
                        "status": "open",
                        "reason": failure.reason,
                        "last_error": failure.error,
                        "attempts": attempts,
                        "updated_at": sa.func.now(),
                    },
                )
            )
            event = _subject(failure.request, failure.tags).event(
                failure.channel, "failed", attempt=attempts, error=failure.error,
                error_class=error_class(failure.reason, failure.error), event_time=failed.failed_at,
            )  # fmt: skip
            await queue_history(conn, [event])
            await refresh_notification_status(conn, failure.notification_id)
        metrics.FAILED.labels(failure.channel, failed.provider or "", "instant").inc()
        logger.warning("notification dead-lettered", channel=failure.channel, reason=failure.reason, attempts=attempts)

    async def record_cancelled(self, cancel: CancelInput) -> None:
        """A cancelled run leaves its unsent channels `cancelled`, not pending forever."""
        async with self._engine.begin() as conn:
            await lock_notification(conn, cancel.notification_id)
            result = await conn.execute(
                deliveries.update()
                .where(deliveries.c.notification_id == cancel.notification_id)
                .where(deliveries.c.status == DeliveryStatus.pending.value)
                .values(status=DeliveryStatus.cancelled.value, updated_at=sa.func.now())
                .returning(deliveries.c.channel, deliveries.c.updated_at)
            )
            cancelled = result.all()
            subject = _subject(cancel, cancel.tags)
            await queue_history(conn, [subject.event(row.channel, "cancelled", event_time=row.updated_at)
                                       for row in cancelled])  # fmt: skip
            await refresh_notification_status(conn, cancel.notification_id)
            # Cancelled before any channel was planned: nothing to summarise, say cancelled.
            await conn.execute(
                notifications.update()
                .where(notifications.c.id == cancel.notification_id)
                .where(~sa.exists().where(deliveries.c.notification_id == cancel.notification_id))
                .values(status=DeliveryStatus.cancelled.value, updated_at=sa.func.now())
            )
        logger.info("notification cancelled", channels=[row.channel for row in cancelled])

    async def _note_error(self, request: SendInput, error: str, *, failed: bool) -> int:
        """Keep the last error on the delivery; count it when it is the provider's failure."""
        async with self._engine.begin() as conn:
            failures = await conn.scalar(
                deliveries.update()
                .where(deliveries.c.notification_id == request.notification_id)
                .where(deliveries.c.channel == request.channel)
                .values(
                    error=error,
                    failures=deliveries.c.failures + (1 if failed else 0),
                    updated_at=sa.func.now(),
                )
                .returning(deliveries.c.failures)
            )
        return int(failures or 0)

    def _sent_event(self, request: SendInput, provider: str, attempt: int, sent_at: datetime | None) -> HistoryRow:
        """The `sent` event at the stored sent_at, with the provider's price."""
        loaded = self._directory.loaded.get(provider)
        return _subject(request, request.tags).event(request.channel, "sent", provider=provider, attempt=attempt,
                                                     event_time=sent_at,
                                                     **message_cost(loaded.record if loaded else None))  # fmt: skip


def _subject(request: NotificationInput | SendInput | CancelInput, tags: HistoryTags) -> HistorySubject:
    return HistorySubject(str(request.notification_id), request.user_id, request.category, **tags.model_dump())


def error_class(reason: str, error: str) -> str:
    """What analytics groups a failure by: the workflow's reason (rejected by provider,
    retries exhausted, provider unavailable, undeliverable), a render failure named as such."""
    return "render failed" if "failed to render" in error else reason


def _plan(channel: str, decision: delivery.ChannelDecision) -> ChannelPlan:
    """The workflow's view of a decision: quiet hours are the plan's defer_until, and a
    channel with no enabled provider is sent and waits in its retries."""
    if decision.final:
        return ChannelPlan(channel=channel, address=decision.address, skip_reason=decision.reason,
                           suppress=decision.status == DeliveryStatus.suppressed.value,
                           unreachable=decision.outcome is delivery.Outcome.unreachable)  # fmt: skip
    return ChannelPlan(channel=channel, address=decision.address, routes=decision.routes)


def _recorded_status(plan: ChannelPlan) -> str:
    if plan.suppress:
        return DeliveryStatus.suppressed.value
    if plan.unreachable:
        return DeliveryStatus.unreachable.value
    return DeliveryStatus.pending.value


async def retire_address(engine: AsyncEngine, channel: str, user_id: str, address: str, reason: str) -> None:
    """A dead push token leaves the recipient's tokens; a dead email or number is
    suppressed, so no later notification or campaign tries it again."""
    async with engine.begin() as conn:
        if channel == "push":
            await conn.execute(
                recipients.update()
                .where(recipients.c.user_id == user_id)
                .values(
                    push_tokens=sa.func.array_remove(recipients.c.push_tokens, address),
                    dead_push_tokens=sa.func.array_append(
                        sa.func.array_remove(recipients.c.dead_push_tokens, address), address
                    ),
                    updated_at=sa.func.now(),
                )
            )
        else:
            await prefs.suppress(conn, channel, address, reason, source="provider")
