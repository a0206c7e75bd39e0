"""Load shedding at the door: above capacity, intake (POST /v1/notifications and
/v1/events) is refused with 503 problem+json and Retry-After before its body is read or its
token checked, so a refusal costs the saturated machine as little as possible. Whether the
service is over capacity is services.admission's call (the workers' backlog)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import problem_response
from services.admission import Admission, Overloaded

INTAKE = frozenset({("POST", "/v1/notifications"), ("POST", "/v1/events")})


class SheddingMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"].rstrip("/")) in INTAKE:
            admission: Admission = scope["app"].state.admission
            try:
                admission.check()
            except Overloaded as refused:
                headers = {"Retry-After": str(refused.retry_after)} if refused.retry_after else None
                await problem_response(503, refused.title, refused.detail, headers=headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)
