"""Request and response bodies of the public API."""

from __future__ import annotations

import json
import re
import uuid
import zoneinfo
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    Field,
    StrictBool,
    StringConstraints,
    field_validator,
    model_validator,
)

from core.events import Clock, EventTypeName, RuleDefinition
from core.models import Channel
from core.segments import Filter
from core.templating import TemplateContent

# Extra payloads travel in the workflow's history: keep them far below Temporal's 2 MB limit.
MAX_PAYLOAD_BYTES = 64 * 1024

UserId = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=True)]
Phone = Annotated[str, StringConstraints(pattern=r"^\+[1-9]\d{6,14}$")]
Locale = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}(-[A-Z]{2})?$")]
Country = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]
PushToken = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
Tag_ = Annotated[str, StringConstraints(min_length=1, max_length=64, strip_whitespace=True)]
# The ranges of the columns these go to (BIGINT ids, INTEGER versions and counts): a number
# beyond them is a 422 naming the field, never a query PostgreSQL refuses.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MAX = 2**63 - 1
RowId = Annotated[int, Field(ge=1, le=INT64_MAX)]
Version = Annotated[int, Field(ge=1, le=INT32_MAX)]


def _json_bounded(value: dict[str, Any]) -> dict[str, Any]:
    size = len(json.dumps(value, default=str).encode())
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(f"is {size:,} bytes as JSON; at most {MAX_PAYLOAD_BYTES:,}")
    return value


# A free-form object in a request: bounded like the payloads (nothing a client sends is unbounded).
BoundedJson = Annotated[dict[str, Any], AfterValidator(_json_bounded)]


# A date-time is ISO 8601 text (RFC 3339's shape, the zone optional where the field says so),
# never a number: pydantic's lax mode would read 0 or "1e9" as Unix time, which the OpenAPI's
# `format: date-time` does not admit. Years are bounded so that no conversion (to UTC, to
# ClickHouse's DateTime64, a period's default start) can overflow.
DATE_TIME_TEXT = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?([Zz]|[+-]\d{2}:?\d{2})?")
MIN_YEAR, MAX_YEAR = 1900, 9998


def _date_time_text(value: Any) -> Any:
    if isinstance(value, str) and DATE_TIME_TEXT.fullmatch(value.strip()):
        return value
    if isinstance(value, datetime):  # from Python callers
        return value
    raise ValueError("must be an ISO 8601 date-time, e.g. 2026-12-06T19:00:00Z")


def _sane_year(value: datetime) -> datetime:
    if not MIN_YEAR <= value.year <= MAX_YEAR:
        raise ValueError(f"the year must be {MIN_YEAR}-{MAX_YEAR}")
    return value


DateTime = Annotated[datetime, BeforeValidator(_date_time_text), AfterValidator(_sane_year)]


# The IANA zones this process knows: the OpenAPI lists them (an enum), so a client or a
# generated request can know what a timezone field admits.
TIME_ZONES = sorted(zoneinfo.available_timezones() - {"localtime", "posixrules", "Factory"})  # not IANA names
_TIME_ZONE_SET = frozenset(TIME_ZONES)
ZONE_SCHEMA: dict[str, Any] = {"enum": TIME_ZONES}


def known_timezone(value: str) -> str:
    if value not in _TIME_ZONE_SET:
        raise ValueError(f"unknown IANA time zone {value!r}")
    return value


class RecipientFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200, description="Shown in templates as recipient.name")
    email: EmailStr | None = None
    phone: Phone | None = Field(default=None, description="E.164, e.g. +15551234567")
    push_tokens: list[PushToken] = Field(default_factory=list, max_length=20)
    locale: Locale = "en"
    timezone: str = Field(
        default="UTC", description="IANA time zone, e.g. Europe/Moscow", json_schema_extra=ZONE_SCHEMA
    )
    country: Country | None = Field(default=None, description="ISO 3166-1 alpha-2")
    opted_out_channels: list[Channel] = Field(
        default_factory=list,
        max_length=3,
        description="Channels the recipient wants nothing on, but transactional types",
    )
    quiet_hours_start: Clock | None = Field(default=None, description="HH:MM local time; non-urgent sends wait")
    quiet_hours_end: Clock | None = Field(default=None, description="HH:MM local time when quiet hours end")
    tags: list[Tag_] = Field(default_factory=list, max_length=100, description="e.g. subscription plan, interests")
    last_active_at: DateTime | None = None
    attributes: BoundedJson = Field(default_factory=dict, description="Custom fields segments can filter on")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return known_timezone(value)


class RecipientUpsert(RecipientFields):
    user_id: UserId


class RecipientBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipients: list[RecipientUpsert] = Field(min_length=1, max_length=1000)


class RecipientOut(RecipientFields):
    model_config = ConfigDict(extra="ignore", from_attributes=True)

    # What is stored is shown as it is, even if stored before requests were bounded.
    attributes: dict[str, Any] = Field(default_factory=dict)
    user_id: str
    created_at: datetime
    updated_at: datetime


class BatchResult(BaseModel):
    upserted: int


class NotificationCreate(BaseModel):
    # oneOf: the OpenAPI states what _content_or_template enforces (a template, or title and body).
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["template"],
                    "properties": {"template": {"type": "string"}, "title": {"type": "null"}, "body": {"type": "null"}},
                },
                {
                    "required": ["title", "body"],
                    "properties": {
                        "title": {"type": "string"},
                        "body": {"type": "string"},
                        "template": {"type": "null"},
                        "template_version": {"type": "null"},
                        "variables": {"maxProperties": 0},
                    },
                },
            ]
        },
    )

    user_id: UserId
    content_id: str | None = Field(default=None, max_length=128)
    type: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")] = Field(
        description="Category, e.g. new_episode, password_reset"
    )
    channels: list[Channel] = Field(min_length=1, max_length=3)
    title: Annotated[str, StringConstraints(min_length=1, max_length=998)] | None = Field(
        default=None, description="Raw content: title (email subject); give title and body, or a template"
    )
    body: Annotated[str, StringConstraints(min_length=1, max_length=100_000)] | None = None
    data: dict[str, Any] = Field(default_factory=dict, description="Extra payload (push data, html body)")
    template: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")] | None = Field(
        default=None, description="Template key; the active version unless template_version is given"
    )
    template_version: Version | None = Field(default=None)
    variables: dict[str, Any] = Field(default_factory=dict, description="Values for the template's variables")
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = Field(
        default=None, description="Same as the Idempotency-Key header; one of the two is enough"
    )
    priority: Literal["normal", "urgent"] = Field(
        default="normal", description="urgent ignores the recipient's quiet hours (as transactional types do)"
    )

    @field_validator("channels")
    @classmethod
    def _distinct(cls, value: list[Channel]) -> list[Channel]:
        if len(set(value)) != len(value):
            raise ValueError("each channel may appear once")
        return value

    @field_validator("data", "variables")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value, default=str).encode())
        if size > MAX_PAYLOAD_BYTES:
            raise ValueError(f"is {size:,} bytes as JSON; at most {MAX_PAYLOAD_BYTES:,}")
        return value

    @model_validator(mode="after")
    def _content_or_template(self) -> NotificationCreate:
        if self.template is None:
            if self.title is None or self.body is None:
                raise ValueError("give title and body, or a template")
            if self.variables or self.template_version is not None:
                raise ValueError("variables and template_version go with a template")
        elif self.title is not None or self.body is not None:
            raise ValueError("give either a template or title and body, not both")
        return self


class DeliveryOut(BaseModel):
    channel: str
    status: str
    address: str | None
    attempts: int
    provider: str | None
    provider_message_id: str | None
    error: str | None
    queued_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None
    opened_at: datetime | None
    clicked_at: datetime | None = None
    failed_at: datetime | None
    bounced_at: datetime | None = None
    updated_at: datetime


class NotificationOut(BaseModel):
    id: uuid.UUID
    status: str
    user_id: str
    content_id: str | None
    type: str
    title: str | None
    template: str | None = None
    template_version: int | None = None
    channels: list[DeliveryOut]
    workflow_id: str
    run_id: str | None
    created_at: datetime
    updated_at: datetime
    links: dict[str, str]


class NotificationPage(BaseModel):
    items: list[NotificationOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end")


TemplateKey = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


class TemplateCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: TemplateKey = Field(description="Stable identifier, e.g. new-episode")
    category: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
    description: str = Field(default="", max_length=1000)
    content: TemplateContent
    change_note: str = Field(default="created", max_length=1000)


class TemplateUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: TemplateContent
    change_note: str = Field(min_length=1, max_length=1000, description="Why this change; kept in the history")
    category: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")] | None = None
    description: str | None = Field(default=None, max_length=1000)


class TemplateOut(BaseModel):
    key: str
    category: str
    description: str
    version: int
    active_version: int
    channels: list[str]
    content: TemplateContent
    author: str
    change_note: str
    created_at: datetime


class TemplateSummary(BaseModel):
    key: str
    category: str
    description: str
    active_version: int
    updated_at: datetime


class VersionSummary(BaseModel):
    version: int
    active: bool
    author: str
    change_note: str
    created_at: datetime


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Version
    reason: str = Field(min_length=3, max_length=1000)


class TemplateDiff(BaseModel):
    key: str
    from_version: int
    to_version: int
    parts: dict[str, str] = Field(description="Unified diff per changed part, e.g. en.email.html")


class PreviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variables: BoundedJson = Field(default_factory=dict, description="Missing ones use the examples")
    user_id: str | None = Field(default=None, description="Render for this recipient's data and locale")
    version: Version | None = None
    locale: str | None = None


class PreviewEmail(BaseModel):
    subject: str
    html: str
    text: str


class PreviewPush(BaseModel):
    title: str
    body: str
    data: dict[str, str]
    payload_bytes: int


class PreviewSms(BaseModel):
    text: str
    encoding: str
    segments: int
    characters: int


class PreviewOut(BaseModel):
    key: str
    version: int
    locale: str
    email: PreviewEmail | None = None
    push: PreviewPush | None = None
    sms: PreviewSms | None = None


# --- Segments and campaigns ----------------------------------------------------------------

CronExpression = Annotated[str, StringConstraints(pattern=r"^\S+(\s+\S+){4}$")]


class SegmentCreate(BaseModel):
    # oneOf: the OpenAPI states what _one_kind enforces.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["filter"], "properties": {"filter": {"type": "object"}}},
                {"required": ["user_ids"], "properties": {"user_ids": {"type": "array"}}},
            ]
        },
    )

    name: Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]
    description: str = Field(default="", max_length=1000)
    filter: Filter | None = Field(default=None, description="A structured filter (see docs/campaigns.md)")
    user_ids: list[UserId] | None = Field(default=None, max_length=100_000, description="A static list instead")

    @model_validator(mode="after")
    def _one_kind(self) -> SegmentCreate:
        if (self.filter is None) == (self.user_ids is None):
            raise ValueError("give either filter or user_ids")
        return self


class SegmentOut(BaseModel):
    id: int
    name: str
    description: str
    kind: str
    filter: dict[str, Any] | None
    members: int | None = Field(default=None, description="Static segments: how many recipients are listed")
    unknown_user_ids: list[str] = Field(default_factory=list, description="Given user_ids with no recipient")
    created_by: str
    created_at: datetime


class MembersResult(BaseModel):
    added: int
    already_members: int
    unknown_user_ids: list[str]


class SegmentCount(BaseModel):
    matches: int
    opted_out: dict[str, int]
    reachable: dict[str, int]
    summary: str


class FilterCount(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filter: Filter
    channels: list[Channel] = Field(
        default_factory=lambda: [Channel.email], min_length=1, max_length=3, json_schema_extra={"uniqueItems": True}
    )

    @field_validator("channels")
    @classmethod
    def _distinct(cls, value: list[Channel]) -> list[Channel]:
        if len(set(value)) != len(value):
            raise ValueError("each channel may appear once")
        return value


class SendWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: Clock
    end: Clock
    timezone: str = Field(default="UTC", json_schema_extra=ZONE_SCHEMA)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return known_timezone(value)


class CampaignSchedule(BaseModel):
    """When: now, at a time, or recurring (cron, or the daily/weekly/monthly shortcuts)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["now", "at", "cron", "daily", "weekly", "monthly"] = "now"
    at: DateTime | None = Field(default=None, description="kind=at: when (with an offset)")
    cron: CronExpression | None = Field(default=None, description="kind=cron: five fields")
    time: Clock | None = Field(default=None, description="daily/weekly/monthly: the time of day")
    weekday: int | None = Field(default=None, ge=0, le=6, description="weekly: 0 = Sunday")
    day: int | None = Field(default=None, ge=1, le=28, description="monthly: day of the month")
    timezone: str = Field(
        default="UTC",
        description="The time zone of cron and time (the window has its own)",
        json_schema_extra=ZONE_SCHEMA,
    )
    local_time: Clock | None = Field(default=None, description="Deliver at this time in each recipient's own time zone")
    window: SendWindow | None = Field(default=None, description="Send only inside this daily window")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return known_timezone(value)

    @model_validator(mode="after")
    def _consistent(self) -> CampaignSchedule:
        if self.kind == "at" and (self.at is None or self.at.tzinfo is None):
            raise ValueError("kind 'at' needs 'at': a time with its UTC offset")
        if self.kind == "cron" and self.cron is None:
            raise ValueError("kind 'cron' needs 'cron'")
        if self.kind in ("daily", "weekly", "monthly") and self.time is None:
            raise ValueError(f"kind {self.kind!r} needs 'time' (HH:MM)")
        if self.kind == "weekly" and self.weekday is None:
            raise ValueError("kind 'weekly' needs 'weekday' (0 = Sunday)")
        if self.kind == "monthly" and self.day is None:
            raise ValueError("kind 'monthly' needs 'day' (1-28)")
        return self

    def cron_expression(self) -> str | None:
        """The recurring schedule as one cron expression (None for now/at)."""
        if self.kind == "cron":
            return self.cron
        if self.time is None or self.kind in ("now", "at"):
            return None
        hours, minutes = (int(part) for part in self.time.split(":"))
        day = str(self.day) if self.kind == "monthly" else "*"
        weekday = str(self.weekday) if self.kind == "weekly" else "*"
        return f"{minutes} {hours} {day} * {weekday}"


class CampaignCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]
    category: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")] = "marketing"
    template: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
    template_version: Version | None = Field(default=None, description="Pinned; the active version by default")
    segment_id: RowId
    channels: list[Channel] = Field(min_length=1, max_length=3)
    variables: BoundedJson = Field(default_factory=dict)
    schedule: CampaignSchedule = Field(default_factory=CampaignSchedule)
    throttle_per_second: int | None = Field(default=None, ge=1, le=100_000, description="Messages per second")

    @field_validator("channels")
    @classmethod
    def _distinct(cls, value: list[Channel]) -> list[Channel]:
        if len(set(value)) != len(value):
            raise ValueError("each channel may appear once")
        return value


class CampaignAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=1000)


class CampaignCancel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, StringConstraints(min_length=3, max_length=1000, strip_whitespace=True)]


class RunOut(BaseModel):
    id: str
    status: str
    targeted: int
    sent: int
    failed: int
    suppressed: int
    unreachable: int  # no contact for the channel
    skipped_duplicate: int
    started_at: datetime
    finished_at: datetime | None
    live: dict[str, Any] | None = Field(default=None, description="The running workflow's own view")


class CampaignOut(BaseModel):
    id: uuid.UUID
    name: str
    category: str
    status: str
    status_reason: str | None
    template: str
    template_version: int
    segment_id: int
    channels: list[str]
    variables: dict[str, Any]
    schedule: dict[str, Any]
    throttle_per_second: int | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    runs: list[RunOut]
    next_run_times: list[datetime] = Field(default_factory=list)
    links: dict[str, str]


class ScheduledSend(BaseModel):
    """The spec's POST /v1/notifications/scheduled: a one-off or recurring templated send."""

    # oneOf: the OpenAPI states the audience rule of _audience.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["user_ids"], "properties": {"user_ids": {"type": "array"}}},
                {"required": ["segment_id"], "properties": {"segment_id": {"type": "integer"}}},
            ]
        },
    )

    name: str | None = Field(default=None, max_length=200)
    category: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")] = "scheduled"
    template: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
    template_version: Version | None = Field(default=None)
    channels: list[Channel] = Field(min_length=1, max_length=3)
    variables: BoundedJson = Field(default_factory=dict)
    user_ids: list[UserId] | None = Field(default=None, max_length=100_000)
    segment_id: RowId | None = None
    schedule: CampaignSchedule

    @model_validator(mode="after")
    def _audience(self) -> ScheduledSend:
        if (self.user_ids is None) == (self.segment_id is None):
            raise ValueError("give either user_ids or segment_id")
        if self.schedule.kind == "now":
            raise ValueError("a scheduled send needs a schedule kind other than 'now'")
        return self


PreferenceCategory = Annotated[str, StringConstraints(pattern=r"^(\*|[a-z0-9][a-z0-9_.-]{0,63})$")]


class PreferenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    category: PreferenceCategory = Field(description='A notification type, or "*" for all of them')
    channel: Literal["email", "push", "sms", "*"] = Field(description='A channel, or "*" for all of them')
    enabled: StrictBool  # true or false: not 0, 1 or "yes", which the OpenAPI's boolean does not admit


class PreferencesPut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preferences: list[PreferenceIn] = Field(max_length=200)

    @field_validator("preferences")
    @classmethod
    def _distinct(cls, value: list[PreferenceIn]) -> list[PreferenceIn]:
        keys = [(item.category, item.channel) for item in value]
        if len(set(keys)) != len(keys):
            raise ValueError("each (category, channel) may appear once")
        return value


class PreferenceOut(BaseModel):
    category: str
    channel: str
    enabled: bool
    source: str
    updated_at: datetime


# --- Providers ------------------------------------------------------------------------------


class ProviderWrite(BaseModel):
    """A provider's whole definition (PUT replaces it); only `secrets` may be left out to keep them."""

    model_config = ConfigDict(extra="forbid")

    channel: str = Field(description="email, push or sms")
    kind: str = Field(description="smtp, fcm, sms-json, twilio or sandbox")
    priority: int = Field(
        default=100, ge=INT32_MIN, le=INT32_MAX, description="Lower is tried first within the channel"
    )
    settings: BoundedJson = Field(default_factory=dict, description="The kind's settings (not secret)")
    secrets: BoundedJson | None = Field(
        default=None,
        description='Write-only. Left out: the stored secrets stay; a field set to "" is removed; '
        "other fields given replace the stored ones.",
    )
    rate_limit_per_second: float | None = Field(default=None, description="Across all workers; empty = no limit")
    max_concurrency: int = Field(
        default=10, ge=INT32_MIN, le=INT32_MAX, description="Sends in flight at once, per worker"
    )
    cost_per_message: float = Field(default=0.0)
    currency: str = Field(default="USD", description="ISO 4217 code of cost_per_message, such as USD or EUR")
    enabled: bool = True


class BreakerOut(BaseModel):
    state: str = "closed"
    consecutive_failures: int = 0
    last_error: str | None = None
    opened_at: datetime | None = None


class ProviderOut(BaseModel):
    name: str
    channel: str
    kind: str
    priority: int
    enabled: bool
    rate_limit_per_second: float | None
    max_concurrency: int
    cost_per_message: float
    currency: str = "USD"
    task_queue: str
    breaker: BreakerOut
    # Shown to admins only (None for other roles): the settings and the names of the secrets set.
    settings: dict[str, Any] | None = None
    secrets_set: list[str] | None = None
    secrets_unreadable: bool = Field(
        default=False, description="The stored secrets do not decrypt with MARQUEE_SECRETS_KEY (was it changed?)"
    )
    updated_at: datetime


class ProviderTestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str = Field(min_length=1, max_length=4096, description="Email address, E.164 phone number or push token")
    title: str = Field(default="Marquee test message", max_length=255)
    body: str = Field(default="This is a test message sent from Marquee.", max_length=4000)


class ProviderTestResult(BaseModel):
    ok: bool
    provider: str
    provider_message_id: str


# --- analytics (/v1/analytics) ---------------------------------------------------------------

AnalyticsGranularity = Literal["hour", "day", "all"]
AnalyticsRowT = TypeVar("AnalyticsRowT", bound="AnalyticsRow")


class AnalyticsRow(BaseModel):
    """What a row is grouped by: only the keys the query asked for are present."""

    bucket: datetime | None = Field(default=None, description="Start of the hour or day (UTC); absent for 'all'")
    channel: str | None = None
    provider: str | None = None
    campaign: str | None = Field(default=None, description="The campaign id ('' for instant notifications)")
    template: str | None = None
    category: str | None = None
    country: str | None = None
    timezone: str | None = None


class CountsRow(AnalyticsRow):
    sent: int
    delivered: int
    failed: int
    opened: int
    clicked: int
    bounced: int
    complained: int
    unreachable: int
    suppressed: int


class RatesRow(AnalyticsRow):
    sent: int = Field(description="The denominator of every rate")
    delivered: int
    opened: int
    clicked: int
    delivery_rate: float | None = Field(description="delivered / sent; null when nothing was sent")
    open_rate: float | None = Field(description="opened / sent; null when nothing was sent")
    click_rate: float | None = Field(description="clicked / sent; null when nothing was sent")


class LatencyRow(AnalyticsRow):
    delivered: int = Field(description="How many delivery times the quantiles cover")
    deliver_p50_ms: float | None
    deliver_p90_ms: float | None
    deliver_p99_ms: float | None
    opened: int = Field(description="How many open times the quantiles cover")
    open_p50_ms: float | None
    open_p90_ms: float | None
    open_p99_ms: float | None


class GeographyRow(AnalyticsRow):
    sent: int
    delivered: int
    opened: int
    delivery_rate: float | None
    open_rate: float | None


class SpendRow(AnalyticsRow):
    currency: str
    sent: int
    cost: Decimal = Field(description="Summed per currency, never converted (a decimal string)")


class AnalyticsOut(BaseModel, Generic[AnalyticsRowT]):
    """The period and grouping as applied (defaults filled in), and the rows."""

    start: datetime
    end: datetime
    granularity: AnalyticsGranularity
    by: list[str]
    filters: dict[str, str]
    rows: list[AnalyticsRowT]


class ReportCampaign(BaseModel):
    id: uuid.UUID
    name: str
    status: str
    category: str
    channels: list[str]
    template_key: str
    template_version: int
    created_at: datetime
    first_run_at: datetime | None
    finished_at: datetime | None


class ReportFunnel(BaseModel):
    targeted: int
    sent: int
    delivered: int
    opened: int
    clicked: int


class ReportFailure(BaseModel):
    reason: str
    count: int


class ReportMinute(BaseModel):
    minute: datetime
    sent: int
    failed: int


class ReportCost(BaseModel):
    currency: str
    cost: Decimal


class CampaignReportOut(BaseModel):
    campaign: ReportCampaign
    funnel: ReportFunnel
    failures: list[ReportFailure]
    timeline: list[ReportMinute] = Field(description="Sends and failures per minute (UTC)")
    cost: list[ReportCost]


# --- Events ---------------------------------------------------------------------------------

# Ids go into URLs (/v1/events/{id}) and workflow ids as they are: no "/", "?", "#" or spaces.
EventId = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]*$")]


class EventIn(BaseModel):
    """A fact another service publishes; its id is the deduplication key, over HTTP and NATS alike."""

    model_config = ConfigDict(extra="forbid")
    id: EventId = Field(description="The publisher's unique id: the same id is the same event, once")
    type: EventTypeName = Field(description="A registered event type, e.g. episode.released")
    occurred_at: DateTime = Field(description="When it happened, with its UTC offset")
    payload: dict[str, Any] = Field(default_factory=dict, description="Checked against the type's JSON Schema")

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("needs a UTC offset, e.g. 2026-12-06T19:00:00+00:00")
        return value

    @field_validator("payload")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value)) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"larger than {MAX_PAYLOAD_BYTES} bytes")
        return value


class EventActionOut(BaseModel):
    rule_id: int
    rule: str
    status: str = Field(description="waiting, sent, digested, cancelled, skipped or failed")
    fire_at: datetime | None = None
    notification_id: uuid.UUID | None = None
    campaign_id: uuid.UUID | None = None
    digest: str | None = Field(default=None, description="The digest workflow this event joined")
    reason: str | None = None


class EventOut(BaseModel):
    id: str
    type: str
    occurred_at: datetime
    received_at: datetime
    source: str
    workflow_id: str
    actions: list[EventActionOut] = Field(description="What each matching rule made of it")
    links: dict[str, str]


class EventTypeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = Field(default="", max_length=1000)
    payload_schema: BoundedJson = Field(
        alias="schema",
        description="A JSON Schema (2020-12) of type object for the payload",
        # What the OpenAPI can say of it: its "type" is "object" (its validity as a JSON Schema,
        # checked too, it cannot).
        json_schema_extra={"required": ["type"], "properties": {"type": {"const": "object"}}},
    )


class EventTypeOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str
    description: str
    payload_schema: dict[str, Any] = Field(serialization_alias="schema")
    created_by: str
    updated_at: datetime


class TriggerRuleIn(RuleDefinition):
    name: str = Field(min_length=1, max_length=200)
    event_type: EventTypeName
    enabled: StrictBool = True


class TriggerRuleOut(TriggerRuleIn):
    id: int
    created_by: str
    updated_at: datetime


class FollowsPut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    follows: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] = Field(
        max_length=10_000, description='What the recipient follows, e.g. "series:42"; replaces the list'
    )
