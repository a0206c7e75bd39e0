"""Activities of NotificationWorkflow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from channels.base import (
    InvalidAddressError,
    OutboundMessage,
    PermanentSendError,
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
    NotificationInput,
    SendInput,
    SendResult,
    workflow_id_for,
)
from core.models import DeliveryStatus
from core.queries import (
    dead_letters,
    deliveries,
    lock_notification,
    notification_row,
    notifications,
    recipients,
    refresh_notification_status,
)
from core.templating import Rendered, RenderError, coerce_variables, recipient_context, render
from core.tracking import InstantDelivery
from services import breaker
from services import preferences as prefs
from services.delivery_events import apply_early_events
from services.history import HistoryRow, HistoryWriter
from services.outbound import finish_email
from services.routing import ProviderDirectory
from services.templates import PinnedVersions, TemplateNotFound

SENT_OR_LATER = (
    DeliveryStatus.sent.value,
    DeliveryStatus.delivered.value,
    DeliveryStatus.opened.value,
    DeliveryStatus.clicked.value,
    DeliveryStatus.bounced.value,
)


class NotificationActivities:
    """Built once per worker with its clients; Temporal calls the decorated methods."""

    def __init__(
        self,
        engine: AsyncEngine,
        directory: ProviderDirectory,
        history: HistoryWriter,
        settings: Settings,
        templates: PinnedVersions | None = None,
    ) -> None:
        self._engine = engine
        self._directory = directory
        self._history = history
        self._settings = settings
        self._templates = templates or PinnedVersions()

    @activity.defn(name="prepare_notification")
    async def prepare(self, request: NotificationInput) -> DeliveryPlan:
        """Ensure the rows exist, and decide per channel where to send or why not."""
        info = activity.info()
        async with self._engine.begin() as conn:
            # The API wrote this row before starting the workflow; the upsert makes the
            # workflow whole even if that transaction was lost after the start.
            await conn.execute(
                insert(notifications)
                .values(
                    {
                        **notification_row(request, workflow_id_for(request.notification_id)),
                        "run_id": info.workflow_run_id,
                    }
                )
                .on_conflict_do_update(index_elements=["id"], set_={"run_id": info.workflow_run_id})
            )
            if request.replay_of is not None:
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
            recipient = (
                await conn.execute(sa.select(recipients).where(recipients.c.user_id == request.user_id))
            ).first()
            transactional = request.category in self._settings.transactional_categories
            plans = await self._plan_channels(conn, request, recipient, transactional)
            if request.template_key is not None and recipient is not None:
                plans = await self._render(conn, request, recipient, plans)
            plans = [self._finish(request, plan) for plan in plans]
            for plan in plans:
                status = DeliveryStatus.suppressed if plan.suppress else DeliveryStatus.pending
                await conn.execute(
                    insert(deliveries)
                    .values(
                        notification_id=request.notification_id,
                        channel=plan.channel,
                        address=plan.address,
                        status=status.value,
                        error=plan.skip_reason if status is DeliveryStatus.suppressed else None,
                    )
                    # A replay (or a retried prepare) finds the row pending; a channel the
                    # recipient no longer wants must not stay pending forever.
                    .on_conflict_do_update(
                        constraint="uq_delivery_channel",
                        set_={"status": status.value, "error": plan.skip_reason, "updated_at": sa.func.now()},
                        where=sa.and_(
                            deliveries.c.status == DeliveryStatus.pending.value,
                            sa.literal(status is DeliveryStatus.suppressed),
                        ),
                    )
                )
            await refresh_notification_status(conn, request.notification_id)
        await self._history.record(
            [
                HistoryRow(
                    notification_id=str(request.notification_id),
                    channel=plan.channel,
                    status="suppressed" if plan.suppress else "pending",
                    user_id=request.user_id,
                    category=request.category,
                )
                for plan in plans
            ]
        )
        defer_until = None
        if recipient is not None and request.priority != "urgent" and not transactional:
            defer_until = prefs.quiet_until(
                datetime.now(UTC), recipient.timezone, recipient.quiet_hours_start, recipient.quiet_hours_end
            )
        return DeliveryPlan(locale=recipient.locale if recipient else "en", channels=plans, defer_until=defer_until)

    def _finish(self, request: NotificationInput, plan: ChannelPlan) -> ChannelPlan:
        if plan.channel != "email" or plan.skip_reason is not None:
            return plan
        data = dict(plan.data if plan.data is not None else request.data)
        html = data.get("html")
        finished = finish_email(
            self._settings,
            text=plan.body if plan.body is not None else request.body or "",
            html=html if isinstance(html, str) and html else None,
            user_id=request.user_id,
            category=request.category,
            delivery=InstantDelivery(request.notification_id, plan.channel),
        )
        data.update({"html": finished.html, "headers": finished.headers})
        return plan.model_copy(update={"body": finished.text, "data": data})

    async def _plan_channels(
        self, conn: AsyncConnection, request: NotificationInput, recipient: sa.Row[Any] | None, transactional: bool
    ) -> list[ChannelPlan]:
        if recipient is None:
            return [ChannelPlan(channel=ch, address=None, skip_reason="recipient not found") for ch in request.channels]
        wanted = (await prefs.load(conn, [recipient.id])).get(recipient.id, [])
        plans = []
        for channel in request.channels:
            address = contact_for(channel, recipient.email, recipient.phone, recipient.push_tokens)
            if not prefs.wants(
                wanted,
                category=request.category,
                channel=channel,
                transactional=transactional,
                opted_out_channels=recipient.opted_out_channels,
            ):
                plans.append(ChannelPlan(channel=channel, address=address, skip_reason="opted_out", suppress=True))
            elif address is None:
                plans.append(
                    ChannelPlan(channel=channel, address=None, skip_reason=f"recipient has no {channel} contact")
                )
            elif self._directory.no_provider(channel):
                disabled = f"no enabled {channel} provider (all are disabled)"
                plans.append(ChannelPlan(channel=channel, address=address, skip_reason=disabled))
            else:
                plans.append(ChannelPlan(channel=channel, address=address, routes=self._directory.routes(channel)))
        sendable = [(plan.channel, plan.address) for plan in plans if plan.address and not plan.skip_reason]
        blocked = await prefs.suppressed(conn, sendable)
        for index, plan in enumerate(plans):
            reason = blocked.get((plan.channel, plan.address or ""))
            if reason is not None and not plan.skip_reason:
                plans[index] = plan.model_copy(
                    update={"skip_reason": f"address suppressed: {reason}", "suppress": True}
                )
        return plans

    async def _render(
        self, conn: AsyncConnection, request: NotificationInput, recipient: sa.Row[Any], plans: list[ChannelPlan]
    ) -> list[ChannelPlan]:
        """Render the pinned template version for this recipient into each sendable channel."""
        assert request.template_key is not None
        assert request.template_version is not None
        sendable = [plan.channel for plan in plans if plan.skip_reason is None]
        try:
            content = await self._templates.get(conn, request.template_key, request.template_version)
            variables, problems = coerce_variables(content.variables, request.variables)
            if problems:
                raise RenderError("; ".join(f"{p.part}: {p.message}" for p in problems))
            rendered = render(
                content,
                locale_wanted=recipient.locale,
                variables=variables,
                recipient=recipient_context(dict(recipient._mapping)),
                channels=sendable,
            )
        except (RenderError, TemplateNotFound) as err:
            reason = f"template {request.template_key} v{request.template_version} failed to render: {err}"
            return [plan if plan.skip_reason else plan.model_copy(update={"skip_reason": reason}) for plan in plans]
        return [_with_content(plan, rendered) for plan in plans]

    @activity.defn(name="send_notification")
    async def send(self, request: SendInput) -> SendResult:
        """Send one channel through one provider and record it right after acceptance.

        Runs on the provider's own task queue (its rate limit) or, for the channel's
        default provider, on the main one. Failures count against `max_failures` on this
        provider; throttling only delays; an open circuit or an unavailable provider makes
        the workflow move to the next provider."""
        default = self._directory.defaults.get(request.channel)
        name = request.provider or (default.name if default else request.channel)
        async with self._engine.begin() as conn:
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
                    )
                )
            ).first()
        attempt = row.attempts if row is not None else activity.info().attempt
        if row is not None and row.status in SENT_OR_LATER:
            # A retry after the provider took it but before the activity completed.
            await self._record_history(request, "sent", row.provider or "", attempt)
            return SendResult(
                provider=row.provider or "", provider_message_id=row.provider_message_id or "", already_sent=True
            )

        provider = self._directory.provider(request.channel, request.provider)
        if provider is None:
            if request.provider is None:
                raise ApplicationError(
                    f"no provider configured for channel {request.channel!r}", type=PERMANENT_ERROR, non_retryable=True
                )
            # Removed or disabled since the plan was made, or not loaded here yet.
            raise ApplicationError(f"provider {name!r} is not available", type=PROVIDER_UNAVAILABLE, non_retryable=True)
        if request.may_skip and not await breaker.allow(self._engine, name, self._directory.breaker_cooldown):
            raise ApplicationError(f"circuit of provider {name!r} is open", type=CIRCUIT_OPEN, non_retryable=True)
        message = OutboundMessage(
            channel=request.channel,
            address=request.address,
            title=request.title,
            body=request.body,
            idempotency_key=f"{request.idempotency_key}:{request.channel}",
            data=request.data,
        )
        try:
            receipt = await provider.send(message)
        except InvalidAddressError as err:
            await retire_address(
                self._engine, request.channel, request.user_id, err.address or request.address, str(err)
            )
            raise ApplicationError(str(err), type=PERMANENT_ERROR, non_retryable=True) from err
        except PermanentSendError as err:
            raise ApplicationError(str(err), type=PERMANENT_ERROR, non_retryable=True) from err
        except ThrottledError as err:
            # The provider is fine but busy: wait as asked, without spending the budget.
            await self._note_error(request, str(err), failed=False)
            raise ApplicationError(str(err), type=THROTTLED, next_retry_delay=_delay(err.retry_after)) from err
        except (TransientSendError, ProviderUnavailableError) as err:
            await self._directory.failed(name, err)
            failures = await self._note_error(request, str(err), failed=True)
            if isinstance(err, ProviderUnavailableError):
                raise ApplicationError(str(err), type=PROVIDER_UNAVAILABLE, non_retryable=True) from err
            if failures >= request.max_failures:
                raise ApplicationError(
                    f"{failures} failures on provider {name!r}, the last: {err}",
                    type=FAILURES_EXHAUSTED,
                    non_retryable=True,
                ) from err
            raise ApplicationError(str(err), type=TRANSIENT_ERROR, next_retry_delay=_delay(err.retry_after)) from err
        await self._directory.succeeded(name, was_open=True)

        async with self._engine.begin() as conn:
            await lock_notification(conn, request.notification_id)
            await conn.execute(
                deliveries.update()
                .where(deliveries.c.notification_id == request.notification_id)
                .where(deliveries.c.channel == request.channel)
                # A send that was already under way when the run was cancelled did go out:
                # the record says so rather than "cancelled".
                .where(deliveries.c.status.in_([DeliveryStatus.pending.value, DeliveryStatus.cancelled.value]))
                .values(
                    status=DeliveryStatus.sent.value,
                    provider=receipt.provider,
                    provider_message_id=receipt.message_id,
                    sent_at=sa.func.now(),
                    updated_at=sa.func.now(),
                    error=None,
                )
            )
            # A fast provider may have reported on this message before this commit.
            await apply_early_events(conn, receipt.message_id)
            await refresh_notification_status(conn, request.notification_id)
        await self._record_history(request, "sent", receipt.provider, attempt)
        return SendResult(provider=receipt.provider, provider_message_id=receipt.message_id)

    @activity.defn(name="record_notification_failure")
    async def record_failure(self, failure: FailureInput) -> None:
        """Mark a channel failed for good and keep a dead letter for replay."""
        async with self._engine.begin() as conn:
            await lock_notification(conn, failure.notification_id)
            attempts = await conn.scalar(
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
                .returning(deliveries.c.attempts)
            )
            if attempts is None:  # already recorded by an earlier attempt of this activity
                return
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
            await refresh_notification_status(conn, failure.notification_id)
        await self._history.record(
            [
                HistoryRow(
                    notification_id=str(failure.notification_id),
                    channel=failure.channel,
                    status="failed",
                    user_id=failure.request.user_id,
                    category=failure.request.category,
                    attempt=attempts,
                    error=failure.error[:1000],
                )
            ]
        )

    @activity.defn(name="record_notification_cancelled")
    async def record_cancelled(self, cancel: CancelInput) -> None:
        """A cancelled run leaves its unsent channels `cancelled`, not pending forever."""
        async with self._engine.begin() as conn:
            await lock_notification(conn, cancel.notification_id)
            result = await conn.execute(
                deliveries.update()
                .where(deliveries.c.notification_id == cancel.notification_id)
                .where(deliveries.c.status == DeliveryStatus.pending.value)
                .values(status=DeliveryStatus.cancelled.value, updated_at=sa.func.now())
                .returning(deliveries.c.channel)
            )
            channels = [row.channel for row in result]
            await refresh_notification_status(conn, cancel.notification_id)
            # Cancelled before any channel was planned: nothing to summarise, say cancelled.
            await conn.execute(
                notifications.update()
                .where(notifications.c.id == cancel.notification_id)
                .where(~sa.exists().where(deliveries.c.notification_id == cancel.notification_id))
                .values(status=DeliveryStatus.cancelled.value, updated_at=sa.func.now())
            )
        if channels:
            await self._history.record(
                [
                    HistoryRow(
                        notification_id=str(cancel.notification_id),
                        channel=channel,
                        status="cancelled",
                        user_id=cancel.user_id,
                        category=cancel.category,
                    )
                    for channel in channels
                ]
            )

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

    async def _record_history(self, request: SendInput, status: str, provider: str, attempt: int) -> None:
        await self._history.record(
            [
                HistoryRow(
                    notification_id=str(request.notification_id),
                    channel=request.channel,
                    status=status,
                    user_id=request.user_id,
                    category=request.category,
                    provider=provider,
                    attempt=attempt,
                )
            ]
        )


def _with_content(plan: ChannelPlan, rendered: Rendered) -> ChannelPlan:
    if plan.skip_reason is not None:
        return plan
    if plan.channel == "email" and rendered.email:
        email = rendered.email
        return plan.model_copy(update={"title": email.subject, "body": email.text, "data": {"html": email.html}})
    if plan.channel == "push" and rendered.push:
        push = rendered.push
        return plan.model_copy(update={"title": push.title, "body": push.body, "data": push.data})
    if plan.channel == "sms" and rendered.sms:
        return plan.model_copy(update={"title": "", "body": rendered.sms.text, "data": {}})
    return plan


def contact_for(channel: str, email: str | None, phone: str | None, push_tokens: list[str]) -> str | None:
    """Where a channel reaches a recipient. Push uses the most recently registered token."""
    if channel == "email":
        return email
    if channel == "sms":
        return phone
    if channel == "push":
        return push_tokens[-1] if push_tokens else None
    return None


def _delay(retry_after: float | None) -> timedelta | None:
    return timedelta(seconds=retry_after) if retry_after else None


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
