"""The provider interface every channel adapter implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class OutboundMessage:
    channel: str
    address: str
    title: str
    body: str
    # Derived from (notification, channel): the provider-side dedup key and the email Message-ID.
    idempotency_key: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProviderReceipt:
    provider: str
    message_id: str


class SendError(Exception):
    """A provider refused or could not take a message."""


class TransientSendError(SendError):
    """Worth retrying: the provider is down, busy or asked us to slow down."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentSendError(SendError):
    """Retrying cannot help: invalid address, rejected content (SMTP 5xx, HTTP 4xx)."""


class Provider(Protocol):
    name: str

    async def send(self, message: OutboundMessage) -> ProviderReceipt: ...

    async def close(self) -> None: ...
