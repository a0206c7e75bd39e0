"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter

from api.deps import ConnectionDep, TemporalDep
from api.problems import Problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def ready(conn: ConnectionDep, temporal: TemporalDep) -> dict[str, str]:
    try:
        await conn.execute(sa.text("SELECT 1"))
    except Exception as err:
        raise Problem(503, "Not ready", f"database: {err}") from err
    if not await temporal.service_client.check_health():
        raise Problem(503, "Not ready", "temporal: health check failed")
    return {"status": "ready"}
