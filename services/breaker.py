"""Circuit breakers per provider, shared by every worker through PostgreSQL.

closed: sends go through; `threshold` failures in a row open it. open: callers that have
another provider skip this one until `cooldown` has passed; then one caller wins the
half-open probe (an atomic UPDATE), and its success closes the circuit while its failure
opens it again for another cool-down. Throttling (429, SMTP 421) is not a failure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.providers import breakers


class BreakerState(enum.StrEnum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


# Numeric form for metrics: 0 closed, 1 half-open, 2 open.
STATE_VALUE = {BreakerState.closed: 0, BreakerState.half_open: 1, BreakerState.open: 2}


@dataclass(frozen=True)
class Breaker:
    provider: str
    state: BreakerState
    consecutive_failures: int
    opened_at: datetime | None
    last_error: str | None
    last_failure_at: datetime | None
    last_success_at: datetime | None


async def states(conn: AsyncConnection) -> dict[str, Breaker]:
    rows = await conn.execute(sa.select(breakers))
    return {
        row.provider: Breaker(
            provider=row.provider,
            state=BreakerState(row.state),
            consecutive_failures=row.consecutive_failures,
            opened_at=row.opened_at,
            last_error=row.last_error,
            last_failure_at=row.last_failure_at,
            last_success_at=row.last_success_at,
        )
        for row in rows
    }


async def allow(engine: AsyncEngine, provider: str, cooldown_seconds: float) -> bool:
    """May a send go to `provider` now? True when closed, or for the one caller that
    takes the half-open probe after the cool-down (or after a probe that went silent)."""
    async with engine.begin() as conn:
        state = await conn.scalar(sa.select(breakers.c.state).where(breakers.c.provider == provider))
        if state is None or state == BreakerState.closed:
            return True
        cooled = breakers.c.opened_at <= sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, cooldown_seconds)
        probe = await conn.scalar(
            breakers.update()
            .where(breakers.c.provider == provider, breakers.c.state != BreakerState.closed.value, cooled)
            # The probe restarts the clock: another caller may probe only after a further cool-down.
            .values(state=BreakerState.half_open.value, opened_at=sa.func.now(), updated_at=sa.func.now())
            .returning(breakers.c.provider)
        )
        return probe is not None


async def record_success(engine: AsyncEngine, provider: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            breakers.update()
            .where(
                breakers.c.provider == provider,
                sa.or_(breakers.c.state != BreakerState.closed.value, breakers.c.consecutive_failures > 0),
            )
            .values(
                state=BreakerState.closed.value,
                consecutive_failures=0,
                opened_at=None,
                last_success_at=sa.func.now(),
                updated_at=sa.func.now(),
            )
        )


async def record_failure(engine: AsyncEngine, provider: str, error: str, threshold: int) -> BreakerState:
    """Count a failure; open the circuit at the threshold, or again after a failed probe."""
    failures = breakers.c.consecutive_failures + 1
    opens = sa.or_(failures >= threshold, breakers.c.state == BreakerState.half_open.value)
    statement = insert(breakers).values(
        provider=provider,
        state=BreakerState.open.value if threshold <= 1 else BreakerState.closed.value,
        consecutive_failures=1,
        opened_at=sa.func.now() if threshold <= 1 else None,
        last_error=error[:1000],
        last_failure_at=sa.func.now(),
    )
    statement = statement.on_conflict_do_update(
        index_elements=["provider"],
        set_={
            "consecutive_failures": failures,
            "state": sa.case((opens, BreakerState.open.value), else_=breakers.c.state),
            # An open circuit keeps its opening time; a newly opened one starts its cool-down now.
            "opened_at": sa.case(
                (sa.and_(opens, breakers.c.state != BreakerState.open.value), sa.func.now()),
                else_=breakers.c.opened_at,
            ),
            "last_error": error[:1000],
            "last_failure_at": sa.func.now(),
            "updated_at": sa.func.now(),
        },
    )
    async with engine.begin() as conn:
        state = await conn.scalar(statement.returning(breakers.c.state))
    return BreakerState(state)


async def reset(conn: AsyncConnection, provider: str) -> None:
    """Close a circuit by hand (admin), e.g. after fixing a provider's credentials."""
    await conn.execute(
        breakers.update()
        .where(breakers.c.provider == provider)
        .values(state=BreakerState.closed.value, consecutive_failures=0, opened_at=None, updated_at=sa.func.now())
    )
