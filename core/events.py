"""Trigger rules as data: what a rule says, and the pure decisions it makes about an event.

A rule turns one published event into notifications: to the user the payload names, or to
everyone a segment filter matches (the filter may quote payload values as `${field}`),
optionally only when a condition on the payload holds, optionally later (a delay from the
event or from a time in the payload, then the next HH:MM in the recipient's time zone), and
optionally collected into a digest. Which rows and workflows that makes is the services'
business (services.events); this module only reads a rule and a payload.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from core.clock import next_local_time
from core.models import Channel

Clock = Annotated[str, StringConstraints(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
# A payload field: a property name, or a dotted path into nested objects.
FieldPath = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")]
EventTypeName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$", max_length=100)]
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.]*)\}")
_MISSING = object()
MAX_DELAY = timedelta(days=366)


class UserAudience(BaseModel):
    """The one user the payload names."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["user"] = "user"
    field: FieldPath = Field(default="user_id", description="The payload field holding the recipient's user_id")


class SegmentAudience(BaseModel):
    """Everyone a segment filter matches; string values may quote the payload: `series:${series_id}`.
    The fan-out runs as one batched campaign run, never a workflow per recipient."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["segment"] = "segment"
    filter: dict[str, Any] = Field(description="A segment filter (see /v1/segments); values may hold ${field}")


Audience = Annotated[UserAudience | SegmentAudience, Field(discriminator="kind")]


class PayloadCondition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    field: FieldPath
    op: Literal["eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "exists", "not_exists"]
    value: Any = None

    @model_validator(mode="after")
    def _value_fits(self) -> PayloadCondition:
        if self.op in ("exists", "not_exists") and self.value is not None:
            raise ValueError(f"{self.op!r} takes no value")
        if self.op in ("in", "not_in") and not (isinstance(self.value, list) and self.value):
            raise ValueError(f"{self.op!r} needs a non-empty list")
        if self.op in ("eq", "ne", "gt", "gte", "lt", "lte") and (
            self.value is None or isinstance(self.value, dict | list)
        ):
            raise ValueError(f"{self.op!r} needs a single value")
        return self


class Delay(BaseModel):
    """When to send: `offset_seconds` after the event (or after/before the time in `from_field`,
    e.g. -259200 from `expires_at` for "3 days before expiry"), then, with `at_local_time`,
    the next such wall-clock time in the recipient's own time zone."""

    model_config = ConfigDict(extra="forbid")
    offset_seconds: int = Field(default=0, ge=-MAX_DELAY.days * 86400, le=MAX_DELAY.days * 86400)
    from_field: FieldPath | None = Field(default=None, description="A payload field with an ISO 8601 time")
    at_local_time: Clock | None = None


class Digest(BaseModel):
    """Collect a recipient's events for a window, then send one message listing them.
    The digest template gets `events` (each event's variables, oldest first) and `count`."""

    model_config = ConfigDict(extra="forbid")
    window_seconds: int | None = Field(default=None, ge=1, le=7 * 86400)
    at_local_time: Clock | None = Field(default=None, description="Instead of a window: daily at this local time")
    template: str
    template_version: int | None = Field(default=None, ge=1)
    single_as_message: bool = Field(default=False, description="A digest of one event is sent as the rule's message")

    @model_validator(mode="after")
    def _one_window(self) -> Digest:
        if (self.window_seconds is None) == (self.at_local_time is None):
            raise ValueError("a digest needs exactly one of window_seconds and at_local_time")
        return self


class RuleDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    template: str
    template_version: int | None = Field(default=None, ge=1, description="Pinned; empty: the active version")
    channels: list[Channel] = Field(min_length=1, max_length=3)
    category: str = Field(min_length=1, max_length=64, description="For preferences and analytics")
    priority: Literal["normal", "urgent"] = "normal"
    audience: Audience = Field(default_factory=UserAudience)
    condition: list[PayloadCondition] = Field(default_factory=list, max_length=20, description="All must hold")
    variables: dict[str, FieldPath] = Field(
        default_factory=dict,
        max_length=100,
        description="Template variable -> payload field; unlisted variables take the same name",
    )
    delay: Delay | None = None
    cancel_on: list[EventTypeName] = Field(default_factory=list, max_length=20)
    correlate_on: FieldPath = Field(
        default="user_id", description="The payload field a cancelling event must share with this one"
    )
    digest: Digest | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RuleDefinition:
        if len(set(self.channels)) != len(self.channels):
            raise ValueError("channels are listed twice")
        if self.digest is not None and self.audience.kind != "user":
            raise ValueError("a digest collects one user's events: it needs the user audience")
        return self


def lookup(payload: dict[str, Any], path: str) -> Any:
    """The value at a dotted path, or _MISSING."""
    value: Any = payload
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def has(payload: dict[str, Any], path: str) -> bool:
    return lookup(payload, path) is not _MISSING


def value_at(payload: dict[str, Any], path: str) -> Any:
    found = lookup(payload, path)
    return None if found is _MISSING else found


def placeholders(value: Any) -> list[str]:
    """Every ${field} a filter (any JSON) quotes."""
    if isinstance(value, str):
        return _PLACEHOLDER.findall(value)
    if isinstance(value, dict):
        return [name for item in value.values() for name in placeholders(item)]
    if isinstance(value, list):
        return [name for item in value for name in placeholders(item)]
    return []


def fill(value: Any, payload: dict[str, Any]) -> Any:
    """The filter with its ${field}s replaced by the payload's values; a string that is one
    placeholder takes the value as it is (a number stays a number)."""
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole:
            return value_at(payload, whole.group(1))
        return _PLACEHOLDER.sub(lambda match: str(value_at(payload, match.group(1))), value)
    if isinstance(value, dict):
        return {key: fill(item, payload) for key, item in value.items()}
    if isinstance(value, list):
        return [fill(item, payload) for item in value]
    return value


def _compare(op: str, left: Any, right: Any) -> bool:
    try:
        return bool({"gt": left > right, "gte": left >= right, "lt": left < right, "lte": left <= right}[op])
    except TypeError:
        return False  # a string against a number: the condition does not hold


def holds(condition: list[PayloadCondition], payload: dict[str, Any]) -> bool:
    """Whether every condition holds for the payload."""
    for item in condition:
        found = lookup(payload, item.field)
        if item.op == "exists":
            ok = found is not _MISSING
        elif item.op == "not_exists":
            ok = found is _MISSING
        elif found is _MISSING:
            ok = item.op in ("ne", "not_in")
        elif item.op == "eq":
            ok = found == item.value
        elif item.op == "ne":
            ok = found != item.value
        elif item.op == "in":
            ok = found in item.value
        elif item.op == "not_in":
            ok = found not in item.value
        else:
            ok = _compare(item.op, found, item.value)
        if not ok:
            return False
    return True


def template_variables(rule: RuleDefinition, declared: list[str], payload: dict[str, Any]) -> dict[str, Any]:
    """The template's variables taken from the payload (absent ones are left to their defaults)."""
    values: dict[str, Any] = {}
    for name in declared:
        found = lookup(payload, rule.variables.get(name, name))
        if found is not _MISSING:
            values[name] = found
    return values


class BadTime(ValueError):
    pass


def fire_at(delay: Delay | None, occurred_at: datetime, payload: dict[str, Any], time_zone: str) -> datetime | None:
    """When the rule's send is due (None: at once). BadTime when `from_field` is not a time."""
    if delay is None:
        return None
    base = occurred_at
    if delay.from_field is not None:
        raw = value_at(payload, delay.from_field)
        try:
            base = datetime.fromisoformat(str(raw))
        except ValueError as err:
            raise BadTime(f"payload.{delay.from_field} is not an ISO 8601 time: {raw!r}") from err
        if base.tzinfo is None:
            raise BadTime(f"payload.{delay.from_field} has no UTC offset: {raw!r}")
    due = base + timedelta(seconds=delay.offset_seconds)
    if delay.at_local_time is not None:
        due = next_local_time(due, time_zone, delay.at_local_time)
    return due
