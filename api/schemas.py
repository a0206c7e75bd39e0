"""Request and response bodies of the public API."""

from __future__ import annotations

import uuid
import zoneinfo
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints, field_validator

from core.models import Channel

UserId = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=True)]
Phone = Annotated[str, StringConstraints(pattern=r"^\+[1-9]\d{6,14}$")]
Locale = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}(-[A-Z]{2})?$")]
Country = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]
PushToken = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class RecipientFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr | None = None
    phone: Phone | None = Field(default=None, description="E.164, e.g. +15551234567")
    push_tokens: list[PushToken] = Field(default_factory=list, max_length=20)
    locale: Locale = "en"
    timezone: str = Field(default="UTC", description="IANA time zone, e.g. Europe/Moscow")
    country: Country | None = Field(default=None, description="ISO 3166-1 alpha-2")
    opted_out_channels: list[Channel] = Field(default_factory=list)
    attributes: dict[str, Any] = Field(default_factory=dict)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"unknown IANA time zone {value!r}") from err
        return value


class RecipientUpsert(RecipientFields):
    user_id: UserId


class RecipientBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipients: list[RecipientUpsert] = Field(min_length=1, max_length=1000)


class RecipientOut(RecipientFields):
    model_config = ConfigDict(extra="ignore", from_attributes=True)

    user_id: str
    created_at: datetime
    updated_at: datetime


class BatchResult(BaseModel):
    upserted: int


class NotificationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: UserId
    content_id: str | None = Field(default=None, max_length=128)
    type: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")] = Field(
        description="Category, e.g. new_episode, password_reset"
    )
    channels: list[Channel] = Field(min_length=1, max_length=3)
    title: Annotated[str, StringConstraints(min_length=1, max_length=998)]
    body: Annotated[str, StringConstraints(min_length=1, max_length=100_000)]
    data: dict[str, Any] = Field(default_factory=dict, description="Extra payload (push data, html body)")
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = Field(
        default=None, description="Same as the Idempotency-Key header; one of the two is enough"
    )

    @field_validator("channels")
    @classmethod
    def _distinct(cls, value: list[Channel]) -> list[Channel]:
        if len(set(value)) != len(value):
            raise ValueError("each channel may appear once")
        return value


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
    failed_at: datetime | None
    updated_at: datetime


class NotificationOut(BaseModel):
    id: uuid.UUID
    status: str
    user_id: str
    content_id: str | None
    type: str
    title: str
    channels: list[DeliveryOut]
    workflow_id: str
    run_id: str | None
    created_at: datetime
    updated_at: datetime
    links: dict[str, str]


class NotificationPage(BaseModel):
    items: list[NotificationOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end")
