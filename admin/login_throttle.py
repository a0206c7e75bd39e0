"""Failed admin sign-ins, counted per account and per client address with the `limits`
library (memory, or Redis from MARQUEE_RATE_LIMIT_STORAGE so that every API process shares
the count): over either limit the login answers 429 with Retry-After, without checking the
password (a right guess must not be told apart while the lock holds).

Only failures count: a person signing in successfully many times from one office address is
never throttled. Each failure also waits FAILURE_DELAY_SECONDS before the answer (an
asyncio sleep: no worker is held), and attempts on one account run one at a time in a
process, so parallel guesses cannot all pass the check before the first failure is counted.
Keys are hashed: Redis holds neither emails nor addresses.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import weakref

import structlog
from limits import RateLimitItem, parse
from limits.aio.strategies import MovingWindowRateLimiter

from core.limits_storage import async_storage

logger = structlog.get_logger("marquee.admin.login")

PER_ACCOUNT = "5/15 minutes"
PER_ADDRESS = "20/15 minutes"
FAILURE_DELAY_SECONDS = 0.5


def _key(kind: str, value: str) -> str:
    return f"{kind}:{hashlib.sha256(value.encode()).hexdigest()[:32]}"


class LoginThrottle:
    def __init__(
        self,
        storage_uri: str,
        *,
        per_account: str = PER_ACCOUNT,
        per_address: str = PER_ADDRESS,
        failure_delay: float = FAILURE_DELAY_SECONDS,
    ) -> None:
        # A moving window: no burst of twice the limit across a window's edge.
        self.limiter = MovingWindowRateLimiter(async_storage(storage_uri))
        self.per_account: RateLimitItem = parse(per_account)
        self.per_address: RateLimitItem = parse(per_address)
        self.failure_delay = failure_delay
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._failure_logged_at = float("-inf")

    def _checks(self, email: str, address: str) -> list[tuple[RateLimitItem, str]]:
        return [
            (self.per_account, _key("account", email.strip().lower())),
            (self.per_address, _key("address", address)),
        ]

    def lock(self, email: str) -> asyncio.Lock:
        """Held from the check to the count of one attempt on this account."""
        key = email.strip().lower()
        found = self._locks.get(key)
        if found is None:
            found = self._locks[key] = asyncio.Lock()
        return found

    async def retry_after(self, email: str, address: str) -> int | None:
        """None if another attempt may be made, else the seconds until one may (at least 1)."""
        for item, key in self._checks(email, address):
            try:
                if await self.limiter.test(item, "admin-login", key):
                    continue
                reset_at = (await self.limiter.get_window_stats(item, "admin-login", key)).reset_time
            except Exception as err:
                self._log_failure(err)
                return None
            return max(1, math.ceil(reset_at - time.time()))
        return None

    async def failed(self, email: str, address: str) -> None:
        """Count a failed attempt, then make its answer wait."""
        for item, key in self._checks(email, address):
            try:
                await self.limiter.hit(item, "admin-login", key)
            except Exception as err:
                self._log_failure(err)
        await asyncio.sleep(self.failure_delay)

    def _log_failure(self, err: Exception) -> None:
        # A storage outage lets sign-ins through (as the API's limits do), logged once a minute.
        if time.monotonic() - self._failure_logged_at >= 60:
            self._failure_logged_at = time.monotonic()
            logger.error("login throttle storage failed; sign-ins are not throttled", error=repr(err))
