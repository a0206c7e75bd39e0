"""The provider interface every channel adapter implements, and the errors it raises.

The error classes tell the caller what to do next:

- `TransientSendError`: retry later (same provider); counts toward the circuit breaker.
- `ThrottledError` (a transient error): the provider asked us to slow down; retry after
  `retry_after` seconds. Not a fault of the provider: does NOT count toward the breaker.
- `PermanentSendError`: this message is refused; no retry, no failover.
- `InvalidAddressError` (a permanent error): the address or push token is dead; the
  caller suppresses it (or marks the token dead).
- `ProviderUnavailableError`: the provider refuses *us* (credentials, TLS certificate,
  configuration); fail over to the next provider now; counts toward the breaker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

# When a provider throttles without saying for how long (SMTP 421/451, HTTP 429 without
# Retry-After): long enough to let a per-second quota refill, short enough not to stall.
DEFAULT_THROTTLE_SECONDS = 5.0


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


class ThrottledError(TransientSendError):
    """The provider asked us to slow down (HTTP 429, 503 with Retry-After, SMTP 421/451/452).

    The provider is healthy, so this must not open its circuit breaker."""

    retry_after: float

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, DEFAULT_THROTTLE_SECONDS if retry_after is None else retry_after)


class PermanentSendError(SendError):
    """Retrying cannot help: invalid address, rejected content (SMTP 5xx, HTTP 4xx)."""


class InvalidAddressError(PermanentSendError):
    """The address (email, phone number, push token) is dead: stop sending to it."""

    def __init__(self, message: str, address: str) -> None:
        super().__init__(message)
        self.address = address


class ProviderUnavailableError(SendError):
    """The provider refuses us for a reason no retry fixes soon (authentication, TLS
    certificate, account or configuration): fail over to the next provider."""


def trips_breaker(error: BaseException) -> bool:
    """Whether `error` is the provider's fault and so counts toward its circuit breaker."""
    if isinstance(error, ThrottledError):
        return False
    return isinstance(error, TransientSendError | ProviderUnavailableError)


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """Parse an HTTP Retry-After header: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unparseable: the caller falls back to its default
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class Provider(Protocol):
    name: str

    async def send(self, message: OutboundMessage) -> ProviderReceipt: ...

    async def close(self) -> None: ...
