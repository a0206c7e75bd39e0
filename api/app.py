"""The ASGI application: public API, admin panel and (in dev) the outbox pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from admin import mount_admin
from api import problems
from api.audit_context import ClientAddress
from api.bodylimit import BodyLimitMiddleware
from api.deps import token_verifier
from api.ratelimit import RateLimitMiddleware, RateLimits, route_class
from api.routes import (
    analytics,
    audit,
    campaigns,
    dead_letters,
    dev,
    events,
    health,
    metrics,
    notifications,
    providers,
    recipients,
    segments,
    suppressions,
    templates,
    tracking,
    webhooks,
)
from api.security_headers import SecurityHeaders
from api.shedding import SheddingMiddleware
from core.config import Settings
from core.db import create_engine
from core.temporal import connect
from core.tracing import instrument_app, instrument_engine
from services.admission import Admission
from services.analytics import AnalyticsReader
from services.health import LazyHistoryReader


def create_app(
    settings: Settings,
    *,
    engine: AsyncEngine | None = None,
    temporal: Client | None = None,
    history: AnalyticsReader | None = None,
) -> FastAPI:
    """Build the app. Pass an engine and a Temporal client to share them (dev stack, tests);
    otherwise the app opens its own on startup. `history` is what analytics reads: the
    worker's HistoryWriter when both run in one process (chDB allows one process per path);
    without it the app reads MARQUEE_CLICKHOUSE_URL if set, connecting at the first query so
    that a ClickHouse outage neither stops the start nor anything but analytics (503 until it
    is back; /readyz reports it), and analytics answers 503 if it is not set."""

    own_engine = engine is None
    if engine is None:
        if not settings.database_url:
            raise RuntimeError("MARQUEE_DATABASE_URL is not set (the dev stack sets it: `marquee dev`)")
        engine = create_engine(settings.database_url, settings.database_pool_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if temporal is None:
            app.state.temporal = await connect(settings)
            app.state.admission = admission_for(app.state.temporal)
        own_history = None
        if history is None and settings.clickhouse_url:
            # Reads only: the workers apply the ClickHouse migrations and write the rows.
            app.state.history = own_history = LazyHistoryReader(
                settings.clickhouse_url, settings.chdb_path, settings.history_retention_days
            )
        try:
            yield
        finally:
            if own_history is not None:
                await own_history.close()
            if own_engine:
                await app.state.engine.dispose()

    app = FastAPI(
        title="Marquee",
        version="0.1.0",
        summary="Notifications by email, push and SMS, each one a durable Temporal workflow.",
        lifespan=lifespan,
    )

    def admission_for(client: Client) -> Admission:
        return Admission(client, settings.temporal_task_queue, settings.admission_max_backlog_seconds,
                         settings.admission_check_seconds)  # fmt: skip

    app.state.settings = settings
    if temporal is not None:  # given (tests, the dev stack): usable without the lifespan too
        app.state.temporal = temporal
        app.state.admission = admission_for(temporal)
    app.state.jwt_secret = settings.resolved_jwt_secret()
    app.state.tokens = token_verifier(settings, app.state.jwt_secret)
    app.state.engine = engine
    app.state.history = history
    # Spans for each request and SQL statement when tracing is on (core.tracing).
    instrument_app(app)
    instrument_engine(engine)
    problems.install(app)
    # The OpenAPI shows each operation's problem answers (401/403/404/409/413/422/429/503).
    problems.document(app, rate_limited=lambda method, path: route_class(method, path) is not None)
    app.add_middleware(ClientAddress)  # audit rows carry the request's client address
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(recipients.router)
    # Before /v1/notifications/{id}: the scheduled alias must win the path match.
    app.include_router(campaigns.aliases)
    app.include_router(notifications.router)
    app.include_router(templates.router)
    app.include_router(segments.router)
    app.include_router(campaigns.router)
    app.include_router(providers.router)
    app.include_router(dead_letters.router)
    app.include_router(audit.router)
    app.include_router(suppressions.router)
    app.include_router(webhooks.router)
    app.include_router(tracking.router)
    app.include_router(analytics.router)
    app.include_router(events.router)
    if settings.dev_tools:
        app.include_router(dev.router)
    mount_admin(app, engine, settings)
    # The last added runs first: the rate limit refuses before any body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, upload_bytes=settings.max_upload_bytes)
    if settings.rate_limit_enabled:
        app.add_middleware(RateLimitMiddleware, limits=RateLimits(settings))
    app.add_middleware(SheddingMiddleware)  # over capacity, intake is refused before anything else
    app.add_middleware(SecurityHeaders)  # outermost: refusals (413, 429, 503) carry the headers too
    return app
