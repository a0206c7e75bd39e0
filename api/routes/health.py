"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Request

from api.deps import TemporalDep
from api.problems import Problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def ready(request: Request, temporal: TemporalDep) -> dict[str, str]:
    """200 only when PostgreSQL and Temporal both answer; 503 naming the one that does not."""
    try:
        async with request.app.state.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except Exception as err:
        raise Problem(503, "Not ready", f"database: {err}") from err
    try:
        healthy = await temporal.service_client.check_health()
    except Exception as err:
        raise Problem(503, "Not ready", f"temporal: {err}") from err
    if not healthy:
        raise Problem(503, "Not ready", "temporal: health check failed")
    return {"status": "ready"}
