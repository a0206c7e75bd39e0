"""Activities of EventWorkflow and DigestWorkflow: thin calls into services.events."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.config import Settings
from core.contracts import ActionEnd, ActionInput, ActionOutcome, DigestBatch, DigestSent, EventInput, EventPlan
from core.errors import NotFound, Unavailable
from services import events


class EventActivities:
    def __init__(self, engine: AsyncEngine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings

    @activity.defn(name="plan_event")
    async def plan(self, request: EventInput) -> EventPlan:
        async with self._engine.connect() as conn:
            try:
                return await events.plan(conn, request.event_id, datetime.now(UTC))
            except NotFound as err:  # the row was erased (or its start failed): nothing to act on
                raise ApplicationError(err.detail, type="EventNotFound", non_retryable=True) from err

    @activity.defn(name="dispatch_event_action")
    async def dispatch(self, request: ActionInput) -> ActionOutcome:
        async with self._engine.connect() as conn:
            try:
                return await events.dispatch(conn, activity.client(), self._settings, request.event_id,
                                             request.rule_id, datetime.now(UTC))  # fmt: skip
            except Unavailable as err:  # Temporal did not answer: retried
                raise ApplicationError(err.detail, type="Unavailable") from err

    @activity.defn(name="settle_event_action")
    async def settle(self, end: ActionEnd) -> None:
        async with self._engine.connect() as conn:
            await events.settle(conn, end.event_id, end.rule_id, end.status, end.reason)

    @activity.defn(name="send_digest")
    async def send_digest(self, request: DigestBatch) -> DigestSent:
        async with self._engine.connect() as conn:
            try:
                return await events.send_digest(conn, activity.client(), self._settings, request.rule_id,
                                                request.user_id, request.batch)  # fmt: skip
            except Unavailable as err:
                raise ApplicationError(err.detail, type="Unavailable") from err
