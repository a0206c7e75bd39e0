"""Which providers a channel goes through, as this worker knows them.

`ProviderDirectory` holds the providers built from the `providers` table (refreshed every
few seconds) and the environment-configured default per channel. Instant sends are routed
by the workflow (one activity per provider task queue); campaign batches send through
`ChannelRouter`, which fails over in priority order inside the batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
import structlog
from aiolimiter import AsyncLimiter
from sqlalchemy.ext.asyncio import AsyncEngine

from channels.base import (
    InvalidAddressError,
    OutboundMessage,
    PermanentSendError,
    Provider,
    ProviderReceipt,
    ProviderUnavailableError,
    ThrottledError,
    TransientSendError,
    trips_breaker,
)
from channels.sandbox import SandboxProvider
from core import tracing
from core.contracts import ProviderRoute
from core.secretbox import SecretsUnreadable
from services import breaker, metrics
from services.providers import ProviderRecord, provider_record, providers, task_queue_for

logger = structlog.get_logger("marquee.providers")

BuildProvider = Callable[[ProviderRecord], Provider]
BREAKER_CACHE_SECONDS = 1.0
# A failed provider call's outcome on its span, first match wins (subclasses first).
CALL_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (ThrottledError, "throttled"),
    (InvalidAddressError, "invalid_address"),
    (PermanentSendError, "rejected"),
    (ProviderUnavailableError, "unavailable"),
    (TransientSendError, "transient_error"),
    (asyncio.CancelledError, "cancelled"),
)


@dataclass
class LoadedProvider:
    record: ProviderRecord
    provider: Provider
    # Campaign batches pace themselves with this, per worker process; instant sends are
    # paced by the Temporal server through the provider's task queue.
    limiter: AsyncLimiter | None
    # Instant sends in flight at once in this process (max_concurrency): the provider
    # queue's worker bounds them too, a local send only by this.
    slots: asyncio.Semaphore


class ProviderDirectory:
    def __init__(
        self,
        engine: AsyncEngine,
        defaults: dict[str, Provider],
        *,
        fernet_key: bytes,
        base_queue: str,
        build: BuildProvider,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 30.0,
    ) -> None:
        self.engine = engine
        self.defaults = defaults
        self.base_queue = base_queue
        self.breaker_threshold = breaker_threshold
        self.breaker_cooldown = breaker_cooldown
        self._key = fernet_key
        self._build = build
        self._loaded: dict[str, LoadedProvider] = {}
        self._open: set[str] = set()  # providers whose circuit was not closed at the last look
        self.configured_channels: set[str] = set()
        self._failed_since_success: set[str] = set()
        self._routes: dict[str, list[ProviderRoute]] = {}
        self._breakers_read = 0.0
        self._breakers_reading = asyncio.Lock()

    def another(self, base_queue: str | None = None) -> ProviderDirectory:
        """The same configuration, none of the state: what a second worker process would
        have (tests run one in-process), optionally for another task queue."""
        return ProviderDirectory(
            self.engine,
            self.defaults,
            fernet_key=self._key,
            base_queue=base_queue or self.base_queue,
            build=self._build,
            breaker_threshold=self.breaker_threshold,
            breaker_cooldown=self.breaker_cooldown,
        )

    @property
    def loaded(self) -> dict[str, LoadedProvider]:
        return self._loaded

    async def refresh(self) -> tuple[list[LoadedProvider], list[LoadedProvider]]:
        """Load enabled providers; rebuild the changed ones. Returns (started, retired)."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(providers).order_by(providers.c.name))).all()
        self.configured_channels = {row.channel for row in rows}
        records: dict[str, ProviderRecord] = {}
        for row in rows:
            if not row.enabled:
                continue
            try:
                records[row.name] = provider_record(row, self._key)
            except SecretsUnreadable:  # sealed with another key: skip it, keep the others running
                logger.error("provider secrets do not decrypt; is MARQUEE_SECRETS_KEY right?", provider=row.name)
        started: list[LoadedProvider] = []
        retired: list[LoadedProvider] = []
        for name, current in list(self._loaded.items()):
            fresh = records.get(name)
            if fresh is None or fresh.version != current.record.version:
                retired.append(self._loaded.pop(name))
        for name, record in records.items():
            if name in self._loaded:
                continue
            try:
                provider = self._build(record)
            except Exception as err:  # a bad row must not stop the others (it was validated on save)
                logger.error("provider could not be built", provider=name, error=str(err))
                continue
            rate = record.rate_limit_per_second
            loaded = LoadedProvider(record, provider, AsyncLimiter(1, 1 / rate) if rate else None,
                                    asyncio.Semaphore(record.max_concurrency))  # fmt: skip
            self._loaded[name] = loaded
            started.append(loaded)
        # Worked out once per refresh: campaign batches ask for every message they send.
        chain = sorted((loaded.record for loaded in self._loaded.values()), key=lambda r: (r.priority, r.name))
        self._routes = {}
        for record in chain:
            route = ProviderRoute(provider=record.name, task_queue=task_queue_for(self.base_queue, record.name),
                                  local=not record.rate_limit_per_second)  # fmt: skip
            self._routes.setdefault(record.channel, []).append(route)
        return started, retired

    def routes(self, channel: str) -> list[ProviderRoute]:
        """The channel's stored providers in priority order; empty: the default provider."""
        return self._routes.get(channel, [])

    def first_in_line(self, channel: str, routes: list[ProviderRoute]) -> str:
        """The provider a send tries first: its first route, or the channel's default."""
        if routes:
            return routes[0].provider
        default = self.defaults.get(channel)
        return default.name if default else ""

    def no_provider(self, channel: str) -> bool:
        """True when a channel has stored providers, none enabled, and its environment
        default is the sandbox: sending there would report messages sent that no one gets."""
        default = self.defaults.get(channel)
        return (
            not self.routes(channel)
            and channel in self.configured_channels
            and (default is None or isinstance(default, SandboxProvider))
        )

    def provider(self, channel: str, name: str | None) -> Provider | None:
        """A stored provider by name, or the channel's default (name None or its own)."""
        if name is not None and name in self._loaded:
            return self._loaded[name].provider
        default = self.defaults.get(channel)
        if default is not None and name in (None, default.name):
            return default
        return None

    async def send(self, name: str, provider: Provider, message: OutboundMessage) -> ProviderReceipt:
        """Every provider call, instant or campaign, goes through here: one span each
        (core.tracing), with the provider, its kind, the channel and the outcome."""
        loaded = self._loaded.get(name)
        # Not stored: the environment's default, SMTP for email and the sandbox otherwise.
        kind = loaded.record.kind if loaded else "sandbox" if isinstance(provider, SandboxProvider) else "smtp"
        with tracing.provider_call(name, kind, message.channel) as span:
            try:
                receipt = await provider.send(message)
            except BaseException as err:
                outcome = next((outcome for error, outcome in CALL_OUTCOMES if isinstance(err, error)), "error")
                tracing.finished(span, outcome, err)
                raise
            tracing.finished(span, "sent")
            return receipt

    async def is_open(self, name: str) -> bool:
        """Circuit state as of at most a second ago (campaign batches ask per message)."""
        if time.monotonic() - self._breakers_read > BREAKER_CACHE_SECONDS:
            # One reader at a time: the others take what it read. (Every sender of a campaign
            # batch found the state stale at once and read it too, on connections of their own.)
            async with self._breakers_reading:
                if time.monotonic() - self._breakers_read > BREAKER_CACHE_SECONDS:
                    async with self.engine.connect() as conn:
                        found = await breaker.states(conn)
                    self._open = {name for name, state in found.items() if state.state != breaker.BreakerState.closed}
                    self._breakers_read = time.monotonic()
        return name in self._open

    async def failed(self, name: str, error: BaseException) -> None:
        if trips_breaker(error):
            state = await breaker.record_failure(self.engine, name, str(error), self.breaker_threshold)
            self._failed_since_success.add(name)
            if state != breaker.BreakerState.closed:
                self._open.add(name)

    async def succeeded(self, name: str, was_open: bool) -> None:
        """A success ends a run of failures: written only when there was one, so campaign
        batches do not write to PostgreSQL for every message."""
        if was_open or name in self._failed_since_success:
            await breaker.record_success(self.engine, name)
            self._open.discard(name)
            self._failed_since_success.discard(name)

    async def close(self) -> None:
        for loaded in self._loaded.values():
            await loaded.provider.close()
        self._loaded.clear()
        self._routes.clear()
        for provider in self.defaults.values():
            await provider.close()


class ChannelRouter:
    """Campaign sends: the channel's providers in priority order, skipping open circuits
    while another provider remains, failing over on provider trouble (not on a refused
    address, and not on throttling, which interrupts the batch to be retried later)."""

    def __init__(self, directory: ProviderDirectory) -> None:
        self._directory = directory

    async def send(self, message: OutboundMessage) -> ProviderReceipt:
        directory = self._directory
        chain = [(route.provider, directory.provider(message.channel, route.provider))
                 for route in directory.routes(message.channel)]  # fmt: skip
        if not chain:
            default = directory.defaults.get(message.channel)
            if default is None or directory.no_provider(message.channel):
                # Transient: the batch waits (with backoff) until an operator enables one.
                raise TransientSendError(f"no enabled provider for channel {message.channel!r}")
            chain = [(default.name, default)]
        last_error: BaseException | None = None
        for index, (name, provider) in enumerate(chain):
            if provider is None:
                continue
            was_open = await directory.is_open(name)
            skippable = index < len(chain) - 1
            if was_open and skippable and not await breaker.allow(directory.engine, name, directory.breaker_cooldown):
                continue
            loaded = directory.loaded.get(name)
            if loaded is not None and loaded.limiter is not None:
                await loaded.limiter.acquire()
            try:
                with metrics.provider_call(message.channel, name):
                    receipt = await directory.send(name, provider, message)
            except (TransientSendError, ProviderUnavailableError) as err:
                await directory.failed(name, err)
                if not trips_breaker(err):
                    raise  # throttled: slow down, do not move traffic
                last_error = err
                continue
            await directory.succeeded(name, was_open)
            return receipt
        if isinstance(last_error, TransientSendError):
            raise last_error
        raise TransientSendError(f"every {message.channel} provider failed: {last_error}")
