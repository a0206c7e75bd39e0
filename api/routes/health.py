"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from core.config import Settings
from services import health

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def live() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok"}


class CheckOut(BaseModel):
    status: Literal["up", "down", "skipped"] = Field(description="skipped: not configured for this process")
    seconds: float
    detail: str | None = None


class ReadinessOut(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, CheckOut]


# Not a problem document: a load balancer and a person read the same body either way.
READINESS = {"application/json": {"schema": {"$ref": "#/components/schemas/ReadinessOut"}}}


@router.get(
    "/readyz",
    response_model=ReadinessOut,
    responses={503: {"description": "A dependency is down (named in `checks`)", "content": READINESS}},
)
async def ready(request: Request) -> JSONResponse:
    """PostgreSQL, Temporal and ClickHouse, each checked within MARQUEE_READINESS_TIMEOUT_SECONDS
    and reported by name; 200 when none is down, 503 otherwise."""
    state: Any = request.app.state
    settings: Settings = state.settings
    found = await health.readiness(
        state.engine,
        getattr(state, "temporal", None),  # None until the lifespan connected
        clickhouse_url=settings.clickhouse_url,
        history=state.history,
        within=settings.readiness_timeout_seconds,
    )
    return JSONResponse(found.body(), status_code=200 if found.ready else 503)
