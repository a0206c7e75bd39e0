"""Push notifications through Firebase Cloud Messaging's HTTP v1 API.

`POST {base_url}/v1/projects/{project_id}/messages:send` with an OAuth 2 access token,
obtained from a Google service account (a JWT signed RS256, exchanged at the account's
token_uri: RFC 7523) or given directly (gateways that take a static token).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

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

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
ASSERTION_LIFETIME_SECONDS = 3600  # the most Google accepts
# Renew this long before expiry, so a token never dies between our check and FCM's.
REFRESH_MARGIN_SECONDS = 60.0
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"


class ServiceAccountTokens:
    """Access tokens for a Google service account, cached until shortly before expiry."""

    def __init__(self, service_account: Mapping[str, Any], client: httpx.AsyncClient, scope: str = FCM_SCOPE) -> None:
        try:
            self._email = str(service_account["client_email"])
            key = load_pem_private_key(str(service_account["private_key"]).encode(), password=None)
        except KeyError as err:
            raise ValueError(f"service account lacks {err.args[0]!r}") from err
        if not isinstance(key, RSAPrivateKey):
            raise ValueError("service account private_key is not an RSA key")
        self._key = key  # parsed once: signing is then cheap
        self._key_id = service_account.get("private_key_id")
        self._token_uri = str(service_account.get("token_uri") or GOOGLE_TOKEN_URI)
        self._scope = scope
        self._client = client
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._expires_at = 0.0

    async def get(self, *, rejected: str | None = None) -> str:
        """A valid access token. `rejected`: a token the API just refused with 401; a new
        one is fetched unless another caller has already replaced it (no refresh stampede)."""
        async with self._lock:
            fresh = self._token is not None and time.monotonic() < self._expires_at
            if self._token is not None and fresh and self._token != rejected:
                return self._token
            self._token, lifetime = await self._fetch()
            self._expires_at = time.monotonic() + max(0.0, lifetime - REFRESH_MARGIN_SECONDS)
            return self._token

    def assertion(self) -> str:
        now = int(time.time())
        claims = {"iss": self._email, "scope": self._scope, "aud": self._token_uri, "iat": now,
                  "exp": now + ASSERTION_LIFETIME_SECONDS}  # fmt: skip
        headers = {"kid": str(self._key_id)} if self._key_id else None
        return jwt.encode(claims, self._key, algorithm="RS256", headers=headers)

    async def _fetch(self) -> tuple[str, float]:
        form = {"grant_type": JWT_BEARER_GRANT, "assertion": self.assertion()}
        response = await post(self._client, self._token_uri, what="OAuth token endpoint", data=form)
        body = json_object(response)
        if response.status_code == 200 and isinstance(body.get("access_token"), str):
            return body["access_token"], float(body.get("expires_in") or ASSERTION_LIFETIME_SECONDS)
        detail = f"OAuth token endpoint HTTP {response.status_code}: {body.get('error') or response.text[:200]}"
        if response.status_code == 429:
            raise ThrottledError(detail, retry_after_seconds(response.headers.get("retry-after")))
        if response.status_code >= 500 or response.status_code == 200:
            raise TransientSendError(detail)
        # invalid_grant / invalid_client: the key was revoked or the account deleted.
        raise ProviderUnavailableError(detail)


class FcmProvider:
    """Sends to FCM registration tokens. Give either `service_account` (the JSON key as a
    dict) or a static `access_token`."""

    def __init__(
        self,
        *,
        project_id: str,
        service_account: Mapping[str, Any] | None = None,
        access_token: str | None = None,
        base_url: str = "https://fcm.googleapis.com",
        timeout: float = 10.0,
        max_connections: int = 100,
        name: str = "fcm",
    ) -> None:
        if (service_account is None) == (access_token is None):
            raise ValueError("give exactly one of service_account and access_token")
        self.name = name
        self._url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._static_token = access_token
        self._tokens = ServiceAccountTokens(service_account, self._client) if service_account is not None else None

    async def send(self, message: OutboundMessage) -> ProviderReceipt:
        payload = {"message": fcm_message(message)}
        token = await self._access_token()
        response = await self._post(payload, token)
        if response.status_code == 401 and self._tokens is not None:
            error = FcmError.parse(response)
            if error.error_code != "THIRD_PARTY_AUTH_ERROR":  # APNs/web-push credentials: a new token won't help
                # Revoked or expired early: one new token, one more try.
                token = await self._tokens.get(rejected=token)
                response = await self._post(payload, token)
        if response.status_code == 200:
            # FCM has taken the message; a body we cannot read must not make us send it again.
            return ProviderReceipt(provider=self.name, message_id=str(json_object(response).get("name", "")))
        raise classify_fcm_response(response, message.address)

    async def close(self) -> None:
        await self._client.aclose()

    async def _access_token(self) -> str:
        if self._tokens is not None:
            return await self._tokens.get()
        assert self._static_token is not None
        return self._static_token

    async def _post(self, payload: dict[str, Any], token: str) -> httpx.Response:
        # No idempotency key exists in FCM: a timeout after FCM took the message may
        # duplicate the push on retry. Accepted: a rare duplicate beats a lost message.
        headers = {"Authorization": f"Bearer {token}"}
        return await post(self._client, self._url, what="FCM", json=payload, headers=headers)


def fcm_message(message: OutboundMessage) -> dict[str, Any]:
    """The v1 `message` object. FCM data values must be strings: others are sent as JSON."""
    body: dict[str, Any] = {"token": message.address}
    if message.title or message.body:
        body["notification"] = {"title": message.title, "body": message.body}
    if message.data:
        body["data"] = {str(key): _data_value(value) for key, value in message.data.items()}
    return body


def _data_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class FcmError:
    """The parts of a google.rpc.Status error body that decide what to do."""

    status: str = ""
    message: str = ""
    error_code: str = ""  # FcmError.errorCode, e.g. UNREGISTERED
    fields: tuple[str, ...] = ()  # BadRequest.fieldViolations[].field

    @classmethod
    def parse(cls, response: httpx.Response) -> FcmError:
        error = json_object(response).get("error")
        if not isinstance(error, dict):
            return cls(message=response.text[:200])
        error_code, fields = "", []
        for detail in error.get("details") or []:
            if not isinstance(detail, dict):
                continue
            if detail.get("@type") == FCM_ERROR_TYPE:
                error_code = str(detail.get("errorCode", ""))
            elif detail.get("@type") == BAD_REQUEST_TYPE:
                fields += [str(v.get("field", "")) for v in detail.get("fieldViolations") or [] if isinstance(v, dict)]
        return cls(str(error.get("status", "")), str(error.get("message", "")), error_code, tuple(fields))

    @property
    def about_token(self) -> bool:
        return "message.token" in self.fields or "registration token" in self.message.lower()


def classify_fcm_response(response: httpx.Response, address: str) -> SendError:
    """Map an FCM error response to the send-error taxonomy (see channels.base)."""
    status = response.status_code
    error = FcmError.parse(response)
    retry_after = retry_after_seconds(response.headers.get("retry-after"))
    detail = f"FCM HTTP {status} {error.error_code or error.status}: {error.message}".rstrip(": ")
    if error.error_code == "UNREGISTERED":
        return InvalidAddressError(detail, address)
    if status == 400 and error.error_code in ("INVALID_ARGUMENT", "") and error.about_token:
        return InvalidAddressError(detail, address)
    if status == 429 or error.error_code == "QUOTA_EXCEEDED" or error.status == "RESOURCE_EXHAUSTED":
        return ThrottledError(detail, retry_after)
    if status == 503 and retry_after is not None:
        return ThrottledError(detail, retry_after)
    if status >= 500 or error.error_code in ("UNAVAILABLE", "INTERNAL"):
        return TransientSendError(detail, retry_after)
    if error.error_code == "SENDER_ID_MISMATCH":
        # The token belongs to another Firebase project: this message can never go here.
        return PermanentSendError(detail)
    if status in (401, 403, 404):
        # Credentials, permissions or a wrong project id: every message would fail alike.
        return ProviderUnavailableError(detail)
    return PermanentSendError(detail)
