"""SMS over HTTP: a generic JSON gateway and Twilio's Messages API.

Both send the message's idempotency key, so a retry after a timeout (the gateway may
have taken the first attempt) does not text the person twice.
"""

from __future__ import annotations

from typing import Any

import httpx

from channels.base import (
    InvalidAddressError,
    OutboundMessage,
    PermanentSendError,
    ProviderReceipt,
    ProviderUnavailableError,
    SendError,
    ThrottledError,
    TransientSendError,
    retry_after_seconds,
)
from channels.http import json_object, post

# Twilio error codes (https://www.twilio.com/docs/api/errors) that mean "this number is dead to us".
TWILIO_INVALID_TO = 21211  # invalid 'To' phone number
TWILIO_NOT_MOBILE = 21614  # 'To' is not a valid mobile number
TWILIO_UNSUBSCRIBED = 21610  # the person replied STOP
TWILIO_DEAD_NUMBER_CODES = frozenset({TWILIO_INVALID_TO, TWILIO_NOT_MOBILE, TWILIO_UNSUBSCRIBED})
TWILIO_TOO_MANY_REQUESTS = 20429
TWILIO_AUTH_FAILED = 20003


class JsonSmsGatewayProvider:
    """A generic JSON SMS gateway: `POST {base_url}/messages {"to", "from", "text"}`,
    Bearer API key, `Idempotency-Key` header; replies `{"id": ...}`."""

    def __init__(
        self,
        *,
        base_url: str,
        sender: str,
        api_key: str,
        timeout: float = 10.0,
        max_connections: int = 100,
        name: str = "sms-json",
    ) -> None:
        self.name = name
        self._sender = sender
        self._client = _client(base_url, timeout, max_connections, headers={"Authorization": f"Bearer {api_key}"})

    async def send(self, message: OutboundMessage) -> ProviderReceipt:
        payload = {"to": message.address, "from": self._sender, "text": message.body}
        headers = {"Idempotency-Key": message.idempotency_key}
        response = await post(self._client, "/messages", what="SMS gateway", json=payload, headers=headers)
        if response.status_code in (200, 201, 202):
            return ProviderReceipt(provider=self.name, message_id=str(json_object(response).get("id", "")))
        raise self._classify(response, message.address)

    async def close(self) -> None:
        await self._client.aclose()

    @staticmethod
    def _classify(response: httpx.Response, address: str) -> SendError:
        status = response.status_code
        error = json_object(response).get("error")
        code = str(error.get("code", "")) if isinstance(error, dict) else ""
        text = str(error.get("message", "")) if isinstance(error, dict) else response.text[:200]
        detail = f"SMS gateway HTTP {status} {code}: {text}".rstrip(": ")
        if status in (400, 422) and code == "invalid_number":
            return InvalidAddressError(detail, address)
        return _classify_http(status, detail, response)


class TwilioSmsProvider:
    """Twilio's Messages API: form-encoded `To`, `From` or `MessagingServiceSid`, `Body`,
    HTTP Basic auth with the account SID and auth token; replies 201 `{"sid": "SM..."}`."""

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        sender: str | None = None,
        messaging_service_sid: str | None = None,
        base_url: str = "https://api.twilio.com",
        status_callback_url: str | None = None,
        timeout: float = 10.0,
        max_connections: int = 100,
        name: str = "twilio",
    ) -> None:
        if not sender and not messaging_service_sid:
            raise ValueError("give a sender number or a messaging_service_sid")
        self.name = name
        self._path = f"/2010-04-01/Accounts/{account_sid}/Messages.json"
        # A messaging service picks the sender itself (number pools, sticky sender).
        self._origin = {"MessagingServiceSid": messaging_service_sid} if messaging_service_sid else {"From": sender}
        self._status_callback = status_callback_url
        self._client = _client(base_url, timeout, max_connections, auth=httpx.BasicAuth(account_sid, auth_token))

    async def send(self, message: OutboundMessage) -> ProviderReceipt:
        form = {"To": message.address, **self._origin, "Body": message.body}
        if self._status_callback:
            form["StatusCallback"] = self._status_callback
        headers = {"I-Twilio-Idempotency-Token": message.idempotency_key}
        response = await post(self._client, self._path, what="Twilio", data=form, headers=headers)
        if response.status_code in (200, 201):
            return ProviderReceipt(provider=self.name, message_id=str(json_object(response).get("sid", "")))
        raise self._classify(response, message.address)

    async def close(self) -> None:
        await self._client.aclose()

    @staticmethod
    def _classify(response: httpx.Response, address: str) -> SendError:
        status = response.status_code
        body = json_object(response)
        code = body.get("code")
        detail = f"Twilio HTTP {status} error {code}: {body.get('message') or response.text[:200]}"
        if code in TWILIO_DEAD_NUMBER_CODES:
            return InvalidAddressError(detail, address)
        if code == TWILIO_TOO_MANY_REQUESTS:
            return ThrottledError(detail, retry_after_seconds(response.headers.get("retry-after")))
        if code == TWILIO_AUTH_FAILED:
            return ProviderUnavailableError(detail)
        return _classify_http(status, detail, response)


def _classify_http(status: int, detail: str, response: httpx.Response) -> SendError:
    """The HTTP status alone, once the provider's own error codes were looked at."""
    retry_after = retry_after_seconds(response.headers.get("retry-after"))
    if status == 429 or (status == 503 and retry_after is not None):
        return ThrottledError(detail, retry_after)
    if status >= 500:
        return TransientSendError(detail, retry_after)
    if status in (401, 403):
        return ProviderUnavailableError(detail)
    if status == 404:
        # The endpoint itself (base URL, account SID) is wrong: every message would fail.
        return ProviderUnavailableError(detail)
    return PermanentSendError(detail)


def _client(base_url: str, timeout: float, max_connections: int, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        **kwargs,
    )
