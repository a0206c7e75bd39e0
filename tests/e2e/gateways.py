"""Test-owned HTTP providers: FCM (with Google's OAuth token endpoint), a JSON SMS gateway
and Twilio, on one real HTTP server bound to 127.0.0.1.

Each endpoint checks credentials and request shape the way the real service does, records
every request, and can be told to fail:

    with Gateway() as gateway:                      # or start() / stop()
        gateway.fail_next(status=429, retry_after=2)    # the next API call is throttled
        gateway.fail_next(timeout=True)                 # ... or hangs past the client timeout
        gateway.fail_always(503); gateway.recover()     # an outage, then recovery
        gateway.mark_unregistered("token-1")            # FCM answers UNREGISTERED for it
        gateway.requests_to("fcm")[-1].json()           # what the provider sent

The server runs in its own thread and event loop, so it serves sync and async tests alike
and a hanging response never blocks the test's loop.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ROUTES = ("token", "fcm", "sms", "twilio")

_FCM_SEND = re.compile(r"^/v1/projects/(?P<project>[^/]+)/messages:send$")
_TWILIO_SEND = re.compile(r"^/2010-04-01/Accounts/(?P<sid>[^/]+)/Messages\.json$")
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")

# Default error per HTTP status, as each API spells it.
_GRPC_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}  # fmt: skip
# (401 and 403 carry no FcmError detail: that is how FCM refuses a bad token or permission.)
_FCM_ERROR_CODE = {400: "INVALID_ARGUMENT", 404: "UNREGISTERED", 429: "QUOTA_EXCEEDED", 500: "INTERNAL",
                   503: "UNAVAILABLE"}  # fmt: skip
_TWILIO_CODE = {400: 21211, 401: 20003, 404: 20404, 429: 20429, 500: 20500, 503: 20503}


@dataclass
class RecordedRequest:
    route: str  # one of ROUTES, or "unknown"
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int | None = None  # what the gateway answered (None: still hanging or client gave up)
    at: float = field(default_factory=time.monotonic)  # when it arrived

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return {key: values[-1] for key, values in parse_qs(self.body.decode(), keep_blank_values=True).items()}

    def basic_auth(self) -> tuple[str, str] | None:
        scheme, _, value = self.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        user, _, password = base64.b64decode(value).decode().partition(":")
        return user, password


@dataclass(frozen=True)
class Failure:
    status: int = 500
    retry_after: float | str | None = None  # seconds, or an HTTP-date string
    code: str | int | None = None  # FCM errorCode / SMS error code / Twilio code; None: the status's default
    timeout: bool = False  # hang past the client's timeout instead of answering
    route: str | None = None  # None: any route but the OAuth token endpoint


@dataclass
class _State:
    requests: list[RecordedRequest] = field(default_factory=list)
    pending: list[Failure] = field(default_factory=list)
    always: Failure | None = None
    unregistered: set[str] = field(default_factory=set)
    invalid_tokens: set[str] = field(default_factory=set)
    invalid_numbers: set[str] = field(default_factory=set)
    unsubscribed: set[str] = field(default_factory=set)
    access_tokens: set[str] = field(default_factory=set)
    pushes: list[dict[str, Any]] = field(default_factory=list)
    sms: dict[str, dict[str, Any]] = field(default_factory=dict)  # idempotency key -> accepted message
    twilio: dict[str, dict[str, Any]] = field(default_factory=dict)


class Gateway:
    """FCM + OAuth token endpoint + JSON SMS gateway + Twilio on one 127.0.0.1 port."""

    def __init__(self, *, fcm_project: str = "marquee-test", token_lifetime: int = 3600, hang_seconds: float = 5.0):
        self.fcm_project = fcm_project
        self.token_lifetime = token_lifetime
        self.hang_seconds = hang_seconds  # how long `timeout=True` failures hang
        self.client_email = f"marquee-sender@{fcm_project}.iam.gserviceaccount.com"
        # A fresh key per gateway: only the service account built from it gets tokens.
        self._private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._key_id = secrets.token_hex(20)
        self.static_token = f"static-{secrets.token_urlsafe(16)}"
        self.sms_api_key = f"sms-{secrets.token_urlsafe(16)}"
        self.twilio_account_sid = "AC" + secrets.token_hex(16)
        self.twilio_auth_token = secrets.token_hex(16)
        self._state = _State()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> Gateway:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))  # port chosen and held by us: no race with other tests
        self.port = sock.getsockname()[1]
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "PUT", "DELETE"])])
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("test gateway did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._stopping.set()  # ends hanging responses at once
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def service_account(self) -> dict[str, Any]:
        """A Google service-account JSON key whose tokens this gateway accepts."""
        pem = self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return {"type": "service_account", "project_id": self.fcm_project, "private_key_id": self._key_id,
                "private_key": pem, "client_email": self.client_email, "token_uri": self.token_url}  # fmt: skip

    # --- scripting -------------------------------------------------------------------------

    def fail_next(
        self,
        status: int = 500,
        *,
        retry_after: float | str | None = None,
        code: str | int | None = None,
        timeout: bool = False,
        route: str | None = None,
        times: int = 1,
    ) -> None:
        """Fail the next `times` matching requests (in order, after earlier scripted ones)."""
        assert route is None or route in ROUTES, route
        with self._lock:
            self._state.pending += [Failure(status, retry_after, code, timeout, route)] * times

    def fail_always(
        self, status: int = 503, *, retry_after: float | str | None = None, code: str | int | None = None,
        timeout: bool = False, route: str | None = None,
    ) -> None:  # fmt: skip
        """Fail every matching request until `recover()`: an outage."""
        with self._lock:
            self._state.always = Failure(status, retry_after, code, timeout, route)

    def recover(self) -> None:
        """End the outage and drop scripted failures not yet used."""
        with self._lock:
            self._state.always = None
            self._state.pending.clear()

    def reset(self) -> None:
        """Forget everything but the credentials (between tests)."""
        with self._lock:
            self._state = _State()

    def mark_unregistered(self, token: str) -> None:
        with self._lock:
            self._state.unregistered.add(token)

    def mark_invalid_token(self, token: str) -> None:
        with self._lock:
            self._state.invalid_tokens.add(token)

    def mark_invalid_number(self, number: str) -> None:
        with self._lock:
            self._state.invalid_numbers.add(number)

    def mark_unsubscribed(self, number: str) -> None:
        with self._lock:
            self._state.unsubscribed.add(number)

    def revoke_tokens(self) -> None:
        """Invalidate every OAuth access token issued so far (FCM then answers 401)."""
        with self._lock:
            self._state.access_tokens.clear()

    # --- observations ----------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._state.requests)

    def requests_to(self, route: str) -> list[RecordedRequest]:
        return [request for request in self.requests if request.route == route]

    @property
    def pushes(self) -> list[dict[str, Any]]:
        """FCM `message` objects accepted."""
        with self._lock:
            return list(self._state.pushes)

    @property
    def sms_messages(self) -> list[dict[str, Any]]:
        """Messages the JSON gateway accepted, one per idempotency key."""
        with self._lock:
            return list(self._state.sms.values())

    @property
    def twilio_messages(self) -> list[dict[str, Any]]:
        """Messages Twilio accepted, one per idempotency token."""
        with self._lock:
            return list(self._state.twilio.values())

    # --- the server ------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        path = request.url.path
        route = (
            "token" if path == "/token"
            else "fcm" if _FCM_SEND.match(path)
            else "sms" if path == "/messages"
            else "twilio" if _TWILIO_SEND.match(path)
            else "unknown"
        )  # fmt: skip
        recorded = RecordedRequest(route, request.method, path, dict(request.headers), await request.body())
        with self._lock:
            self._state.requests.append(recorded)
            failure = self._take_failure(route)
        if failure is not None and failure.timeout:
            await self._hang()
            response: Response = Response(status_code=504)
        elif failure is not None:
            response = self._failure_response(route, failure)
        elif route == "token":
            response = self._token(recorded)
        elif route == "fcm":
            response = self._fcm(recorded)
        elif route == "sms":
            response = self._sms(recorded)
        elif route == "twilio":
            response = self._twilio(recorded)
        else:
            response = JSONResponse({"error": "not found"}, status_code=404)
        recorded.status = response.status_code
        return response

    def _take_failure(self, route: str) -> Failure | None:
        def applies(failure: Failure) -> bool:
            return failure.route == route if failure.route else route != "token"

        for index, failure in enumerate(self._state.pending):
            if applies(failure):
                return self._state.pending.pop(index)
        always = self._state.always
        return always if always is not None and applies(always) else None

    async def _hang(self) -> None:
        # Waits in a worker thread so that stop() (another thread) ends it at once.
        await asyncio.to_thread(self._stopping.wait, self.hang_seconds)

    def _failure_response(self, route: str, failure: Failure) -> Response:
        status = failure.status
        headers = {"Retry-After": str(failure.retry_after)} if failure.retry_after is not None else {}
        body: dict[str, Any]
        if route == "fcm":
            error_code = failure.code or _FCM_ERROR_CODE.get(status)
            grpc_status = _GRPC_STATUS.get(status, "UNKNOWN")
            body = _fcm_error(status, grpc_status, f"scripted {status}", str(error_code) if error_code else None)
        elif route == "twilio":
            code = failure.code or _TWILIO_CODE.get(status, 20500)
            body = {"code": int(code), "message": f"scripted {status}", "status": status,
                    "more_info": f"https://www.twilio.com/docs/errors/{code}"}  # fmt: skip
        elif route == "token":
            body = {"error": failure.code or "invalid_grant", "error_description": f"scripted {status}"}
        else:
            body = {"error": {"code": failure.code or f"http_{status}", "message": f"scripted {status}"}}
        return JSONResponse(body, status_code=status, headers=headers)

    # Google OAuth 2 token endpoint (JWT bearer grant, RFC 7523).
    def _token(self, request: RecordedRequest) -> Response:
        form = request.form()
        if form.get("grant_type") != JWT_BEARER_GRANT:
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        try:
            claims = jwt.decode(
                form.get("assertion", ""),
                self._private_key.public_key(),
                algorithms=["RS256"],
                audience=self.token_url,
                options={"require": ["iss", "aud", "iat", "exp"]},
            )
        except jwt.PyJWTError as err:
            return JSONResponse({"error": "invalid_grant", "error_description": str(err)}, status_code=400)
        if claims["iss"] != self.client_email or FCM_SCOPE not in str(claims.get("scope", "")).split():
            return JSONResponse({"error": "invalid_scope", "error_description": "wrong issuer or scope"}, 400)
        token = f"ya29.test-{secrets.token_urlsafe(24)}"
        with self._lock:
            self._state.access_tokens.add(token)
        return JSONResponse({"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"})

    # FCM HTTP v1: POST /v1/projects/{project}/messages:send
    def _fcm(self, request: RecordedRequest) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        with self._lock:
            authorised = scheme == "Bearer" and (token == self.static_token or token in self._state.access_tokens)
        if not authorised:
            message = "Request had invalid authentication credentials."
            return JSONResponse(_fcm_error(401, "UNAUTHENTICATED", message), status_code=401)
        match = _FCM_SEND.match(request.path)
        if match is None or match["project"] != self.fcm_project:
            return JSONResponse(_fcm_error(404, "NOT_FOUND", "Requested entity was not found."), status_code=404)
        try:
            message = request.json()["message"]
            target = message["token"]
        except (ValueError, KeyError, TypeError):
            return JSONResponse(_fcm_error(400, "INVALID_ARGUMENT", "Recipient of the message is not set."), 400)
        for index, value in enumerate((message.get("data") or {}).values()):
            if not isinstance(value, str):
                text = f"Invalid value at 'message.data[{index}].value' (TYPE_STRING), {value}"
                return JSONResponse(_fcm_error(400, "INVALID_ARGUMENT", text), status_code=400)
        with self._lock:
            if target in self._state.unregistered:
                body = _fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
                return JSONResponse(body, status_code=404)
            if target in self._state.invalid_tokens:
                text = "The registration token is not a valid FCM registration token"
                return JSONResponse(_fcm_error(400, "INVALID_ARGUMENT", text, "INVALID_ARGUMENT"), status_code=400)
            self._state.pushes.append(message)
        return JSONResponse({"name": f"projects/{self.fcm_project}/messages/0:{next(self._ids)}%{self._key_id[:16]}"})

    # A generic JSON SMS gateway: POST /messages {"to", "from", "text"}
    def _sms(self, request: RecordedRequest) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.sms_api_key}":
            return JSONResponse({"error": {"code": "unauthorized", "message": "bad API key"}}, status_code=401)
        try:
            body = request.json()
            to, sender, text = str(body["to"]), str(body["from"]), str(body["text"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": {"code": "bad_request", "message": "to, from, text required"}}, 400)
        key = request.headers.get("idempotency-key") or secrets.token_hex(8)
        with self._lock:
            if not _E164.match(to) or to in self._state.invalid_numbers:
                return JSONResponse(
                    {"error": {"code": "invalid_number", "message": f"{to} is not a valid number"}}, 422
                )
            if key in self._state.sms:  # a replay: the first answer again, nothing sent twice
                return JSONResponse({"id": self._state.sms[key]["id"]}, status_code=200)
            accepted = {"id": f"msg_{next(self._ids)}", "to": to, "from": sender, "text": text, "key": key}
            self._state.sms[key] = accepted
        return JSONResponse({"id": accepted["id"], "status": "accepted"}, status_code=202)

    # Twilio: POST /2010-04-01/Accounts/{sid}/Messages.json (form-encoded)
    def _twilio(self, request: RecordedRequest) -> Response:
        match = _TWILIO_SEND.match(request.path)
        auth = request.basic_auth()
        if auth != (self.twilio_account_sid, self.twilio_auth_token) or match is None or match["sid"] != auth[0]:
            return _twilio_error(401, 20003, "Authenticate")
        form = request.form()
        to = form.get("To", "")
        if not form.get("Body"):
            return _twilio_error(400, 21602, "Message body is required.")
        if not (form.get("From") or form.get("MessagingServiceSid")):
            return _twilio_error(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required")
        key = request.headers.get("i-twilio-idempotency-token") or secrets.token_hex(8)
        with self._lock:
            if not _E164.match(to) or to in self._state.invalid_numbers:
                return _twilio_error(400, 21211, f"Invalid 'To' Phone Number: {to}")
            if to in self._state.unsubscribed:
                return _twilio_error(400, 21610, "Attempt to send to unsubscribed recipient")
            if key not in self._state.twilio:
                sid = "SM" + secrets.token_hex(16)
                self._state.twilio[key] = {"sid": sid, "to": to, "from": form.get("From"), "body": form["Body"],
                                           "messaging_service_sid": form.get("MessagingServiceSid"),
                                           "status_callback": form.get("StatusCallback"), "key": key}  # fmt: skip
            accepted = self._state.twilio[key]
        return JSONResponse({**accepted, "account_sid": self.twilio_account_sid, "status": "queued"}, status_code=201)


def _fcm_error(status: int, grpc_status: str, message: str, error_code: str | None = None) -> dict[str, Any]:
    details = [{"@type": FCM_ERROR_TYPE, "errorCode": error_code}] if error_code else []
    return {"error": {"code": status, "message": message, "status": grpc_status, "details": details}}


def _twilio_error(status: int, code: int, message: str) -> Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return JSONResponse(body, status_code=status)
