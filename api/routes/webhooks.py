"""Provider delivery webhooks: POST /v1/webhooks/{provider}.

Providers call these, so there is no bearer token: each request is authenticated by its
signature with the provider's own secret (`webhook_secret`, or Twilio's `auth_token`).
Every event is stored once per (provider, event id) and applied in the same transaction,
so a provider retrying an event (at-least-once delivery) never applies it twice.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qsl

import structlog
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from api.deps import ConnectionDep, SettingsDep
from api.problems import Problem
from core.config import Settings
from core.secretbox import SecretsUnreadable
from services import delivery_events
from services.delivery_events import Outcome, ProviderEvent
from services.providers import ProviderRecord, get_provider

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
logger = structlog.get_logger("marquee.webhooks")

SIGNATURE_HEADER = "X-Marquee-Signature"
TWILIO_SIGNATURE_HEADER = "X-Twilio-Signature"
MAX_BODY_BYTES = 1_000_000
# Twilio error codes that mean the number will never take a message: suppress it.
# 21211 invalid number, 21610 replied STOP, 21614 not a mobile number, 30003 unreachable
# handset, 30005 unknown or inactive number, 30006 landline or unreachable carrier.
TWILIO_DEAD_NUMBER_CODES = frozenset({"21211", "21610", "21614", "30003", "30005", "30006"})


class EventIn(BaseModel):
    """One event of a signed JSON webhook; fields beyond these are kept in the payload."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1, max_length=255, description="Unique per provider: the deduplication key")
    type: Literal["delivered", "bounced", "complained", "opened", "clicked", "failed"]
    message_id: str = Field(min_length=1, max_length=998, description="The provider's id of the message")
    timestamp: datetime = Field(description="When it happened (ISO-8601; UTC if no offset)")
    reason: str | None = Field(default=None, max_length=2000)
    bounce_type: Literal["hard", "soft"] = "hard"


class EventBatch(BaseModel):
    events: list[EventIn] = Field(max_length=1000)


class WebhookSummary(BaseModel):
    accepted: int = Field(description="New events applied to a known delivery")
    duplicates: int = Field(description="Events received before: acknowledged, not applied again")
    unknown: int = Field(description="New events for a message id no delivery has (yet); stored")


class SignatureInvalid(Exception):
    pass


def marquee_signature(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of f"{timestamp}." + body: the v1= part of X-Marquee-Signature."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify_marquee_signature(header: str | None, body: bytes, secret: str, *, tolerance: int, now: float) -> None:
    """Check `t=<unix seconds>,v1=<hex>[,v1=<hex>...]`; any v1 may match (secret rotation)."""
    if not header:
        raise SignatureInvalid(f"missing {SIGNATURE_HEADER} header")
    timestamp: str | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            timestamp = value.strip()
        elif name == "v1":
            signatures.append(value.strip().lower())
    if timestamp is None or not timestamp.isdigit():
        raise SignatureInvalid(f"{SIGNATURE_HEADER} has no t=<unix seconds>")
    if not signatures:
        raise SignatureInvalid(f"{SIGNATURE_HEADER} has no v1=<signature>")
    if abs(now - int(timestamp)) > tolerance:
        raise SignatureInvalid(f"timestamp is more than {tolerance} s away from now (replayed, or a clock is off)")
    expected = marquee_signature(secret, int(timestamp), body).encode()
    if not any(hmac.compare_digest(expected, signature.encode()) for signature in signatures):
        raise SignatureInvalid("signature does not match the body (wrong webhook_secret?)")


def twilio_signature(auth_token: str, url: str, params: list[tuple[str, str]]) -> str:
    """Twilio's X-Twilio-Signature: base64 HMAC-SHA1 of the URL and the sorted key+value pairs."""
    data = url + "".join(name + value for name, value in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()).decode()


@router.post("/{provider}", response_model=WebhookSummary)
async def receive_events(provider: str, request: Request, conn: ConnectionDep, settings: SettingsDep) -> Any:
    """Delivery events from a provider: signed JSON (`X-Marquee-Signature`) or, for Twilio
    providers, Twilio's form-encoded status callbacks (`X-Twilio-Signature`)."""
    record = await _provider(conn, settings, provider)
    body = await _read_body(request)
    try:
        if record.kind == "twilio":
            events = _twilio_events(request, settings, record, body)
        else:
            events = _signed_json_events(request, settings, record, body)
    except SignatureInvalid as err:
        logger.warning("webhook signature rejected", provider=record.name, reason=str(err))
        raise Problem(401, "Unauthorized", f"webhook signature: {err}") from err
    await conn.rollback()  # end the read-only transaction of the provider lookup

    summary = WebhookSummary(accepted=0, duplicates=0, unknown=0)
    for event, raw in events:
        # One transaction per event: the event row and its effect commit together, and
        # each notification lock is held only for its own event.
        outcome = await delivery_events.record_event(conn, record.name, event, raw)
        await conn.commit()
        if outcome is None:
            summary.duplicates += 1
        elif outcome is Outcome.unknown:
            summary.unknown += 1
        else:
            summary.accepted += 1
    return summary


async def _provider(conn: AsyncConnection, settings: Settings, name: str) -> ProviderRecord:
    try:
        record = await get_provider(conn, settings.fernet_key(), name)
    except SecretsUnreadable as err:
        raise Problem(500, "Provider secrets unreadable", f"provider {name!r}: {err}") from err
    if record is None:
        raise Problem(404, "Not found", f"no provider {name!r}")
    return record


async def _read_body(request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Problem(413, "Payload too large", f"send at most {MAX_BODY_BYTES} bytes per request")
        chunks.append(chunk)
    return b"".join(chunks)


def _signed_json_events(
    request: Request, settings: Settings, record: ProviderRecord, body: bytes
) -> list[tuple[ProviderEvent, dict[str, Any]]]:
    secret = record.secrets.get("webhook_secret")
    if not secret:
        raise SignatureInvalid(f"provider {record.name!r} has no webhook_secret configured")
    verify_marquee_signature(
        request.headers.get(SIGNATURE_HEADER),
        body,
        str(secret),
        tolerance=settings.webhook_tolerance_seconds,
        now=time.time(),
    )
    try:
        batch = EventBatch.model_validate_json(body)
    except ValidationError as err:
        # Answered like any request body FastAPI validates: one problem per field.
        errors = [{**error, "loc": ("body", *error["loc"])} for error in err.errors()]
        raise RequestValidationError(errors) from err
    return [(_event(item), item.model_dump(mode="json")) for item in batch.events]


def _event(item: EventIn) -> ProviderEvent:
    at = item.timestamp if item.timestamp.tzinfo is not None else item.timestamp.replace(tzinfo=UTC)
    return ProviderEvent(
        event_id=item.id,
        type=item.type,
        message_id=item.message_id,
        at=at,
        reason=item.reason,
        # A "failed" event is a provider giving up, not proof that the address is dead.
        permanent=item.type == "bounced" and item.bounce_type == "hard",
    )


def _twilio_events(
    request: Request, settings: Settings, record: ProviderRecord, body: bytes
) -> list[tuple[ProviderEvent, dict[str, Any]]]:
    auth_token = record.secrets.get("auth_token")
    if not auth_token:
        raise SignatureInvalid(f"provider {record.name!r} has no auth_token configured")
    try:
        params = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as err:
        raise Problem(422, "Invalid request", "body: not form-encoded UTF-8") from err
    # Twilio signs the URL it called; behind a proxy that is the public URL, not our Host.
    url = settings.public_url.rstrip("/") + request.url.path + (f"?{request.url.query}" if request.url.query else "")
    given = request.headers.get(TWILIO_SIGNATURE_HEADER)
    if not given:
        raise SignatureInvalid(f"missing {TWILIO_SIGNATURE_HEADER} header")
    if not hmac.compare_digest(twilio_signature(str(auth_token), url, params).encode(), given.strip().encode()):
        raise SignatureInvalid(f"{TWILIO_SIGNATURE_HEADER} does not match (wrong auth_token, or public_url?)")

    form = dict(params)
    for name in ("MessageSid", "MessageStatus"):
        if not form.get(name):
            raise Problem(422, "Invalid request", f"{name}: required", [{"field": name, "message": "required"}])
    sid, status = form["MessageSid"], form["MessageStatus"].lower()
    code = form.get("ErrorCode") or None
    event_type: delivery_events.EventType = "ignored"  # queued, sent, accepted, sending: nothing new
    if status == "delivered":
        event_type = "delivered"
    elif status in ("undelivered", "failed"):
        event_type = "bounced"
    elif status == "read":
        event_type = "opened"
    event = ProviderEvent(
        event_id=f"{sid}:{status}",
        type=event_type,
        message_id=sid,
        at=datetime.now(UTC),
        reason=f"twilio {status}" + (f" (error {code})" if code else "") if event_type == "bounced" else None,
        permanent=code in TWILIO_DEAD_NUMBER_CODES,
    )
    return [(event, form)]
