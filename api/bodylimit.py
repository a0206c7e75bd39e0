"""A ceiling on request bodies: 413 problem above MARQUEE_MAX_BODY_BYTES, checked on the
Content-Length header before anything is read and counted while the body streams in (a
chunked body has no Content-Length), so an oversized body is never held in memory whole."""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import problem_response

# The routes whose bodies are lists of up to 100,000 user_ids (or 10,000 follows, or a
# filter's 10,000 values): MARQUEE_MAX_UPLOAD_BYTES instead.
LARGE_BODIES = re.compile(
    r"(POST /v1/segments(/count|/[^/]+/members)?|POST /v1/notifications/scheduled|PUT /v1/recipients/[^/]+/follows)"
)


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI lets an HTTPException out of its body parsing as it is,
    so the app's own handler answers it as a problem (api.problems)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit:,} bytes")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int, upload_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = upload_bytes

    def limit(self, method: str, path: str) -> int:
        return self.upload_bytes if LARGE_BODIES.fullmatch(f"{method} {path}") else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["method"], scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge:
            # Read outside FastAPI's handlers (e.g. by a mounted app): answer here if still possible.
            if started:
                raise
            await self._refuse(scope, receive, send, limit)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        detail = f"the request body is larger than {limit:,} bytes"
        await problem_response(413, "Content too large", detail)(scope, receive, send)
