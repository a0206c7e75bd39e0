"""What the admin's pages need of the request besides the session: CSRF tokens and the
nonce of the Content-Security-Policy.

CSRF: each session holds a random token (made the first time a page with a form renders);
every POST, PUT, PATCH or DELETE to the admin must carry it, in the form field `csrf_token`
or the `X-CSRF-Token` header (SQLAdmin's scripts: its delete and CSV import), or is refused
with 403 before any view runs. The session cookie is SameSite=Strict already; the token also
covers browsers or setups where SameSite does not hold (a sibling subdomain is same-site).

Templates are not edited one by one: `TemplateHooks` rewrites each template's *source* as
Jinja loads it (SQLAdmin's own templates and ours), adding the hidden field after every
`<form method="post">` tag and a `nonce` to every `<script>` and `<style>` tag. Only tags
written in template files get them: markup that reaches a page through a variable is
escaped, or, if marked safe, is not in the source and so gets no nonce.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import parse_qs

from jinja2 import Environment
from jinja2.ext import Extension
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

FIELD = "csrf_token"
HEADER = "x-csrf-token"
SESSION_KEY = "csrf"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REFUSED = (
    "<!doctype html><title>Refused</title><p>This form has expired or did not come from the admin panel "
    "(its CSRF token is missing or wrong). Go back, reload the page and try again.</p>"
)

# The session of the request being handled (the template functions have no request).
_session: ContextVar[dict[str, Any] | None] = ContextVar("admin_session", default=None)
_nonce: ContextVar[str] = ContextVar("csp_nonce", default="")


def csrf_token() -> str:
    """The session's token, made on first use (a template rendering a form)."""
    session = _session.get()
    if session is None:
        return ""
    token = session.get(SESSION_KEY)
    if not isinstance(token, str):
        token = session[SESSION_KEY] = secrets.token_urlsafe(32)
    return token


@contextmanager
def script_nonce(nonce: str) -> Iterator[None]:
    """Pages rendered inside mark their inline scripts and styles with `nonce` (the edge sets
    it per request, with the Content-Security-Policy naming it)."""
    token = _nonce.set(nonce)
    try:
        yield
    finally:
        _nonce.reset(token)


def csp_nonce() -> str:
    return _nonce.get()


class CsrfMiddleware:
    """Inside SessionMiddleware (it needs the session): checks the token of every unsafe request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        session = scope.get("session")
        context = _session.set(session if isinstance(session, dict) else None)
        try:
            if scope["method"] in UNSAFE_METHODS:
                try:
                    body = await _read_body(receive)
                except HTTPException as err:  # the edge's body limit (api.bodylimit)
                    await HTMLResponse(str(err.detail), status_code=err.status_code)(scope, receive, send)
                    return
                receive = _replay(body, receive)
                expected = session.get(SESSION_KEY) if isinstance(session, dict) else None
                given = await _submitted_token(scope, body)
                if not (isinstance(expected, str) and given and hmac.compare_digest(expected, given)):
                    await HTMLResponse(REFUSED, status_code=403)(scope, receive, send)
                    return
            await self.app(scope, receive, send)
        finally:
            _session.reset(context)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once more for the view; then whatever the client sends (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _submitted_token(scope: Scope, body: bytes) -> str | None:
    headers = Headers(scope=scope)
    if HEADER in headers:
        return headers[HEADER]
    content_type = headers.get("content-type", "")
    if content_type.startswith("application/x-www-form-urlencoded"):
        values = parse_qs(body.decode("latin-1"), keep_blank_values=True).get(FIELD)
        return values[0] if values else None
    if content_type.startswith("multipart/form-data"):
        request = Request(scope, _replay(body, _no_more))
        try:
            async with request.form() as form:
                value = form.get(FIELD)
        except (MultiPartException, ValueError):
            return None
        return value if isinstance(value, str) else None
    return None


async def _no_more() -> Message:
    return {"type": "http.disconnect"}


# A tag, with Jinja expressions and statements inside it taken whole (they may hold ">").
_FORM_TAG = re.compile(r"<form\b(?:\{\{.*?\}\}|\{%.*?%\}|[^>])*>", re.IGNORECASE | re.DOTALL)
_POST = re.compile(r"""\bmethod\s*=\s*["']?post\b""", re.IGNORECASE)
_SCRIPT_OR_STYLE = re.compile(r"<(script|style)\b(?![^>]*\bnonce\s*=)", re.IGNORECASE)
HIDDEN_FIELD = f'<input type="hidden" name="{FIELD}" value="{{{{ csrf_token() }}}}">'


class TemplateHooks(Extension):
    """Adds the CSRF field to POST forms and the CSP nonce to scripts and styles of every
    template's source (see the module's docstring)."""

    def preprocess(self, source: str, name: str | None, filename: str | None = None) -> str:
        source = _FORM_TAG.sub(lambda tag: tag[0] + HIDDEN_FIELD if _POST.search(tag[0]) else tag[0], source)
        return _SCRIPT_OR_STYLE.sub(r'<\1 nonce="{{ csp_nonce() }}"', source)


def install(env: Environment) -> None:
    """Before the first template loads (preprocessing applies when a template is compiled)."""
    env.add_extension(TemplateHooks)
    env.globals["csrf_token"] = csrf_token
    env.globals["csp_nonce"] = csp_nonce
