"""Security headers on every response: a Content-Security-Policy, no framing
(frame-ancestors 'none' and X-Frame-Options: DENY), X-Content-Type-Options: nosniff and
Referrer-Policy: strict-origin-when-cross-origin (another site learns our origin, never a path).

The policy depends on the page:

- the admin (/admin): its own files only. Scripts and <style> blocks from the admin's static
  files, or inline with this response's nonce (admin.csrf marks the inline ones its
  templates hold); style attributes are allowed (style-src-attr), as SQLAdmin's templates,
  ours and Tabler's scripts use them and a nonce cannot mark an attribute; images from the
  admin or data: URIs (Tabler's icons in CSS); no remote image, so an email previewed in
  its sandboxed iframe (which inherits this policy) shows no tracking pixel either.
- the API docs (/docs, /redoc): FastAPI's pages load Swagger UI and ReDoc from
  cdn.jsdelivr.net and start them with an inline script, which this policy allows there and
  nowhere else; they hold no session.
- everything else (JSON, the unsubscribe page, the dev outbox): nothing loads but inline
  styles; forms post to us only.

A header a route set itself is kept.
"""

from __future__ import annotations

import secrets

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from admin.csrf import script_nonce

ADMIN_POLICY = (
    "default-src 'none'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'nonce-{nonce}'; "
    "style-src-attr 'unsafe-inline'; img-src 'self' data:; font-src 'self'; connect-src 'self'; frame-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_POLICY = (
    "default-src 'none'; script-src https://cdn.jsdelivr.net 'unsafe-inline'; "
    "style-src https://cdn.jsdelivr.net https://fonts.googleapis.com 'unsafe-inline'; "
    "font-src https://fonts.gstatic.com; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; connect-src 'self'; worker-src blob:; "
    "base-uri 'none'; frame-ancestors 'none'"
)
DEFAULT_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_PATHS = ("/docs", "/redoc")
FIXED = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "strict-origin-when-cross-origin",
}


def policy_for(path: str, nonce: str) -> str:
    if path == "/admin" or path.startswith("/admin/"):
        return ADMIN_POLICY.format(nonce=nonce)
    if path.startswith(DOCS_PATHS):
        return DOCS_POLICY
    return DEFAULT_POLICY


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(16)
        policy = policy_for(scope["path"], nonce)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in (("Content-Security-Policy", policy), *FIXED.items()):
                    if name not in headers:
                        headers[name] = value
            await send(message)

        with script_nonce(nonce):
            await self.app(scope, receive, send_with_headers)
