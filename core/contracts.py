"""Inputs and outputs of workflows and activities.

Each workflow and activity takes one model, so fields can be added later (with defaults)
without breaking runs already in flight.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from core.config import Settings

# Workflow types, signals and queries by name: services start and steer workflows without
# importing the workflow layer above them. The names are those the classes always had, so
# running workflows and recorded histories keep matching.
NOTIFICATION_WORKFLOW = "NotificationWorkflow"
CAMPAIGN_WORKFLOW = "CampaignWorkflow"
CAMPAIGN_PAUSE = "pause"
CAMPAIGN_RESUME = "resume"
CAMPAIGN_PROGRESS = "progress"
EVENT_WORKFLOW = "EventWorkflow"
EVENT_CANCEL_ACTION = "cancel_action"  # signal: a cancelling event arrived for one rule's send
DIGEST_WORKFLOW = "DigestWorkflow"
DIGEST_ADD = "add"  # signal (with start): an event joined the digest

# ApplicationError types that activities raise and workflows branch on.
PERMANENT_ERROR = "PermanentSendError"
TRANSIENT_ERROR = "TransientSendError"
THROTTLED = "Throttled"
# The notification workflow moves on to the channel's next provider on these.
CIRCUIT_OPEN = "CircuitOpen"
PROVIDER_UNAVAILABLE = "ProviderUnavailable"
FAILURES_EXHAUSTED = "FailuresExhausted"
CAMPAIGN_NOT_FOUND = "CampaignNotFound"


def workflow_id_for(notification_id: object) -> str:
    """The NotificationWorkflow id: the notification id, itself derived from the key."""
    return f"notification-{notification_id}"


def event_workflow_id(event_id: str) -> str:
    return f"event-{event_id}"


def digest_workflow_id(rule_id: int, user_id: str) -> str:
    """One id per (rule, recipient); each window is one run of it."""
    return f"digest-{rule_id}-{user_id}"


def campaign_workflow_id(campaign_id: object) -> str:
    return f"campaign-{campaign_id}"


def schedule_id_for(campaign_id: object) -> str:
    """The Temporal Schedule of a recurring campaign."""
    return f"campaign-{campaign_id}"


def _setting(name: str) -> Any:
    """A Settings default: a workflow input recorded before one of these fields existed
    decodes with it, so the defaults are declared once, in Settings."""
    return Settings.model_fields[name].default


class RetryOptions(BaseModel):
    """How a notification retries, taken from Settings when it is accepted
    (services.notifications.retry_options) and carried in its workflow input."""

    initial_seconds: float = _setting("send_retry_initial_seconds")
    max_seconds: float = _setting("send_retry_max_seconds")
    max_attempts: int = _setting("send_retry_max_attempts")
    timeout_seconds: float = _setting("send_timeout_seconds")
    # Failures on a provider before the channel moves to the next one (when there is one).
    failover_after: int = _setting("send_failover_after")
    # How long a send may wait on a provider's task queue (its rate limit, or no worker
    # polling it because the provider was disabled) before the next provider is tried.
    queue_timeout_seconds: float = _setting("provider_queue_timeout_seconds")


class NotificationInput(BaseModel):
    notification_id: uuid.UUID
    idempotency_key: str
    request_hash: str
    requested_by: str
    user_id: str
    content_id: str | None = None
    category: str
    channels: list[str]
    # Either raw content (title, body, data) or a pinned template version with variables.
    title: str | None = None
    body: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    template_key: str | None = None
    template_version: int | None = None
    variables: dict[str, Any] = Field(default_factory=dict)
    retry: RetryOptions = Field(default_factory=RetryOptions)
    # Urgent sends (and transactional categories) are not held back by quiet hours.
    priority: str = "normal"
    # Set when an operator replays a dead letter: the run resends only its channel.
    replay_of: int | None = None
    # Submitted by a version that sends through providers without a shared rate limit as a
    # local activity. The workflow's version marker, carried in its input: runs started
    # before (and their recorded histories) lack it and replay their regular activities, at
    # no cost to new runs (workflow.patched would add a marker and a search-attribute
    # update, a visibility write, to every notification).
    send_locally: bool = False


class ProviderRoute(BaseModel):
    """One provider a channel may go through, and the task queue its sends run on."""

    provider: str
    task_queue: str
    # No rate limit to share across workers: the send may run as a local activity of the
    # workflow's own worker (the provider's max_concurrency then holds per worker in-process).
    local: bool = False


class ChannelPlan(BaseModel):
    channel: str
    address: str | None
    skip_reason: str | None = None  # set when the channel is not sent (opt-out, no contact, render error)
    suppress: bool = False  # skipped by the recipient's choice or a suppressed address, not a failure
    unreachable: bool = False  # no such recipient, or no contact for the channel: recorded, not a failure
    # The rendered content when the notification uses a template.
    title: str | None = None
    body: str | None = None
    data: dict[str, Any] | None = None
    # Providers in priority order; an empty list means the worker's default for the channel.
    routes: list[ProviderRoute] = Field(default_factory=list)


class HistoryTags(BaseModel):
    """What a notification's history events are grouped by in analytics, decided by prepare
    and carried to each later step. Empty in runs recorded before it existed."""

    run_id: str = ""
    template_key: str = ""
    template_version: int = 0
    country: str = ""
    timezone: str = ""
    occurrence: str = ""  # a dead-letter replay's run: its events repeat the original's statuses


class DeliveryPlan(BaseModel):
    locale: str
    channels: list[ChannelPlan]
    # Quiet hours: sends wait until then (in UTC); None sends now.
    defer_until: datetime | None = None
    tags: HistoryTags = Field(default_factory=HistoryTags)


class SendInput(BaseModel):
    notification_id: uuid.UUID
    idempotency_key: str
    channel: str
    address: str
    user_id: str
    category: str
    title: str
    body: str
    data: dict[str, Any] = Field(default_factory=dict)
    provider: str | None = None  # the route's provider; None: the channel's default provider
    # Failures (not throttles) this route may have before the workflow moves on.
    max_failures: int = 8
    # True when a later route exists: an open circuit then skips this provider.
    may_skip: bool = False
    tags: HistoryTags = Field(default_factory=HistoryTags)


class SendResult(BaseModel):
    provider: str
    provider_message_id: str
    already_sent: bool = False


class FailureInput(BaseModel):
    notification_id: uuid.UUID
    channel: str
    reason: str
    error: str
    request: NotificationInput
    tags: HistoryTags = Field(default_factory=HistoryTags)


class CancelInput(BaseModel):
    notification_id: uuid.UUID
    user_id: str
    category: str
    tags: HistoryTags = Field(default_factory=HistoryTags)


class ChannelOutcome(BaseModel):
    channel: str
    status: str
    provider_message_id: str | None = None
    error: str | None = None


class NotificationOutcome(BaseModel):
    notification_id: uuid.UUID
    channels: list[ChannelOutcome]


# --- Campaigns -----------------------------------------------------------------------------


class CampaignInput(BaseModel):
    campaign_id: uuid.UUID
    not_before: datetime | None = None  # a campaign scheduled "at" a time waits in its run
    batch_size: int = 1000
    window: int = 4  # batches in flight
    recurring: bool = False  # started by a Temporal Schedule: the campaign stays scheduled
    # Carried over continue-as-new:
    run_id: str | None = None
    zone_index: int = 0
    zone_started: bool = False  # the zone's local send time has come already
    cursor: int = 0
    paused: bool = False
    # Recipients in their quiet hours wait for another pass over the segment.
    deferred_until: datetime | None = None
    deferred_pass: bool = False  # the run continued as new during such a pass


class StartRunInput(BaseModel):
    campaign_id: uuid.UUID
    run_id: str
    now: datetime


class ZoneStart(BaseModel):
    time_zone: str
    fire_at: datetime


class ChannelLane(BaseModel):
    """Where one channel's batches of a multi-channel campaign run, and how fast."""

    channel: str | None = None  # None: every channel of the campaign
    queue: str | None = None  # the first provider's bulk queue; None: the main queue
    provider_rate: float | None = None


class RunPlan(BaseModel):
    throttle_per_second: int | None
    zones: list[ZoneStart] = Field(default_factory=list)  # local-time delivery: one start per zone
    has_window: bool = False
    # A one-channel campaign whose first provider has a rate limit: its batches run on that
    # provider's bulk task queue, where the Temporal server paces them for all workers.
    batch_queue: str | None = None
    provider_rate: float | None = None
    # A multi-channel campaign with a rate-limited provider: each range of recipients gets a
    # batch per channel, on that channel's lane. Empty: one batch per range, all channels.
    channel_lanes: list[ChannelLane] = Field(default_factory=list)


class RangeInput(BaseModel):
    campaign_id: uuid.UUID
    after_id: int
    limit: int
    time_zone: str | None = None


class WindowInput(BaseModel):
    campaign_id: uuid.UUID
    now: datetime


class WindowState(BaseModel):
    open: bool
    until: datetime  # when the answer changes


class BatchInput(BaseModel):
    campaign_id: uuid.UUID
    run_id: str
    after_id: int
    upto_id: int
    time_zone: str | None = None
    rate_per_second: float | None = None
    now: datetime | None = None  # the workflow's clock: quiet hours are judged by it
    # False on a pass for recipients who were in their quiet hours: the others were sent.
    count_duplicates: bool = True
    channel: str | None = None  # only this one of the campaign's channels (a channel lane)


class BatchResult(BaseModel):
    sent: int = 0
    failed: int = 0
    suppressed: int = 0
    unreachable: int = 0
    skipped_duplicate: int = 0
    # Left for later: the recipients' quiet hours; the earliest moment one of them ends.
    deferred: int = 0
    deferred_until: datetime | None = None


class FinishRunInput(BaseModel):
    campaign_id: uuid.UUID
    run_id: str
    status: str
    recurring: bool = False


class CampaignProgress(BaseModel):
    run_id: str
    state: str  # waiting, running, paused, finishing
    cursor: int
    zone: str | None
    batches_in_flight: int
    batches_done: int
    totals: BatchResult


# --- Events ---------------------------------------------------------------------------------


class EventInput(BaseModel):
    event_id: str


class RuleAction(BaseModel):
    """One matching rule's send for an event, due at `fire_at` (None: now)."""

    rule_id: int
    fire_at: datetime | None = None


class CancelTarget(BaseModel):
    """A waiting send this event cancels: the rule's send for an earlier event."""

    event_id: str
    rule_id: int


class EventPlan(BaseModel):
    actions: list[RuleAction] = Field(default_factory=list)
    cancels: list[CancelTarget] = Field(default_factory=list)


class ActionInput(BaseModel):
    event_id: str
    rule_id: int


class ActionEnd(BaseModel):
    event_id: str
    rule_id: int
    status: str
    reason: str | None = None


class ActionOutcome(BaseModel):
    status: str
    reason: str | None = None


class DigestInput(BaseModel):
    rule_id: int
    user_id: str
    closes_at: datetime


class DigestBatch(BaseModel):
    rule_id: int
    user_id: str
    batch: str  # the send's key: a retried send lists the same events


class DigestSent(BaseModel):
    listed: int
