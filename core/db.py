"""Async SQLAlchemy engine and sessions over asyncpg."""

from __future__ import annotations

from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession


def async_url(url: str) -> str:
    """Accept plain postgresql:// URLs from operators and use the asyncpg driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+asyncpg://" + url[len(prefix) :]
            break
    # SQLAlchemy hands the query to asyncpg.connect() as keywords, where libpq's `sslmode`
    # is spelled `ssl` (same values: disable ... verify-full). pg_dump and asyncpg DSNs
    # read sslmode, so operators write that one URL for everything.
    parts = urlsplit(url)
    if url.startswith("postgresql+asyncpg://") and "sslmode" in parse_qs(parts.query):
        query = [("ssl" if name == "sslmode" else name, value) for name, value in parse_qsl(parts.query)]
        url = urlunsplit(parts._replace(query=urlencode(query)))
    return url


def create_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    # No pre-ping (a round trip per checkout): a connection that died is invalidated when
    # its statement fails, and the activity or request is retried.
    return create_async_engine(async_url(url), pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
