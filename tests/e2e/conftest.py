"""End-to-end tests against the real stack (tests.stack): PostgreSQL, Temporal, the worker, the API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from tests.e2e.gateways import Gateway
from tests.stack import settle_providers


@pytest.fixture(autouse=True)
async def _providers_settled() -> AsyncIterator[None]:
    """The next test sends with the providers this one left (see settle_providers)."""
    yield
    await settle_providers()


@pytest.fixture
def gateways() -> Iterator[Callable[[], Gateway]]:
    started: list[Gateway] = []

    def make() -> Gateway:
        gateway = Gateway().start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.stop()
