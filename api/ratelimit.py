"""Rate limits per principal and route class, with the `limits` library's async storage: in
memory (each process its own count) or Redis (every API process sharing one count).

Who: the bearer token's subject when the token verifies (decoded here once; the route's guard
reuses it, api.deps.authenticate), else the client address. What: the route class, each with
its own rate (MARQUEE_RATE_LIMIT_SENDING, _READING, _ADMIN). Over it: 429 problem with
Retry-After. Not limited here: health and metrics (probes and scrapers must always get
through), tracking pixels, click links and unsubscribe pages (mail clients and their image
proxies share addresses; each hit is a signed token checked cheaply), provider webhooks
(signed, from few addresses, in bursts), the admin panel (its own sign-in) and the docs."""

from __future__ import annotations

import math
import time
from typing import Literal

import structlog
from limits import RateLimitItem, parse_many
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import authenticate
from api.problems import problem_response
from core.auth import Principal
from core.config import Settings
from core.limits_storage import async_storage

logger = structlog.get_logger("marquee.ratelimit")

RouteClass = Literal["sending", "reading", "admin"]

UNLIMITED_PREFIXES = ("/healthz", "/readyz", "/metrics", "/t/", "/u/", "/v1/webhooks/", "/dev", "/docs", "/redoc",
                      "/openapi.json")  # fmt: skip
SENDING_PATHS = ("/v1/notifications", "/v1/events")

STRATEGIES: dict[str, type[RateLimiter]] = {
    "fixed-window": FixedWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
    "moving-window": MovingWindowRateLimiter,
}


def route_class(method: str, path: str) -> RouteClass | None:
    """The class whose rate applies, or None for the routes not limited by principal."""
    if path.startswith(UNLIMITED_PREFIXES) or (path.startswith("/admin") and path != "/admin/bulk"):
        return None
    if method in ("GET", "HEAD", "OPTIONS"):
        return "reading"
    if method == "POST" and (path in SENDING_PATHS or path.startswith("/v1/notifications/")):
        return "sending"
    return "admin"


class RateLimits:
    def __init__(self, settings: Settings) -> None:
        self.storage = async_storage(settings.rate_limit_storage)
        self.limiter = STRATEGIES[settings.rate_limit_strategy](self.storage)
        self.rates: dict[RouteClass, list[RateLimitItem]] = {
            "sending": parse_many(settings.rate_limit_sending),
            "reading": parse_many(settings.rate_limit_reading),
            "admin": parse_many(settings.rate_limit_admin),
        }
        self._failure_logged_at = float("-inf")

    async def hit(self, kind: RouteClass, who: str) -> int | None:
        """Count one request; None if it is within every rate of its class, else the seconds
        until the exhausted window resets (at least 1)."""
        for item in self.rates[kind]:
            try:
                if await self.limiter.hit(item, "marquee", kind, who):
                    continue
                reset_at = (await self.limiter.get_window_stats(item, "marquee", kind, who)).reset_time
            except Exception as err:
                self._log_failure(err)
                return None
            return max(1, math.ceil(reset_at - time.time()))
        return None

    def _log_failure(self, err: Exception) -> None:
        # Once a minute at most: a Redis outage must not flood the logs.
        if time.monotonic() - self._failure_logged_at >= 60:
            self._failure_logged_at = time.monotonic()
            logger.error("rate limit storage failed; requests are let through", error=repr(err))


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limits: RateLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = route_class(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if kind is None:
            await self.app(scope, receive, send)
            return
        auth = await authenticate(Request(scope))
        if isinstance(auth, Principal):
            who = f"sub:{auth.subject}"
        else:
            client = scope.get("client")
            who = f"addr:{client[0] if client else 'unknown'}"
        retry_after = await self.limits.hit(kind, who)
        if retry_after is None:
            await self.app(scope, receive, send)
            return
        detail = f"too many {kind} requests; retry in {retry_after} s"
        response = problem_response(429, "Too many requests", detail, headers={"Retry-After": str(retry_after)})
        await response(scope, receive, send)
