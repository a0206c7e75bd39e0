"""Inputs and outputs of workflows and activities.

Each workflow and activity takes one model, so fields can be added later (with defaults)
without breaking runs already in flight.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, Field


class RetryOptions(BaseModel):
    initial_seconds: float = 1.0
    max_seconds: float = 60.0
    max_attempts: int = 8
    timeout_seconds: float = 30.0


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


class ChannelPlan(BaseModel):
    channel: str
    address: str | None
    skip_reason: str | None = None  # set when the channel is not sent (opt-out, no contact, render error)
    # The rendered content when the notification uses a template.
    title: str | None = None
    body: str | None = None
    data: dict[str, Any] | None = None


class DeliveryPlan(BaseModel):
    locale: str
    channels: list[ChannelPlan]


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


class CancelInput(BaseModel):
    notification_id: uuid.UUID
    user_id: str
    category: str


class ChannelOutcome(BaseModel):
    channel: str
    status: str
    provider_message_id: str | None = None
    error: str | None = None


class NotificationOutcome(BaseModel):
    notification_id: uuid.UUID
    channels: list[ChannelOutcome]
