"""The admin in Chromium, against the same real stack as e2e (tests.stack)."""

from __future__ import annotations

from tests.e2e.conftest import _providers_settled  # noqa: F401 - the same autouse settling as e2e
