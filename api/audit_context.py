"""The client address every audit row carries, set per request at the edge.

A pure ASGI middleware (no extra task, so the context variable reaches the endpoint and the
services it calls): the address is scope["client"], which uvicorn rewrites from
X-Forwarded-For when the peer is a trusted proxy (--proxy-headers, --forwarded-allow-ips).
It wraps the whole app, the mounted admin panel included. services.audit reads it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from services import audit


class ClientAddress:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        with audit.client_address(client[0] if client else None):
            await self.app(scope, receive, send)
