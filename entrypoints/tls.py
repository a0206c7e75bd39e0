"""HTTPS for the processes that listen (API and admin, the dev stack, the codec server):
TLS 1.3 and nothing older, from MARQUEE_TLS_CERT / MARQUEE_TLS_KEY or the CLI's flags."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import uvicorn

from core.config import Settings


def with_tls(settings: Settings, cert: Path | None = None, key: Path | None = None) -> Settings:
    """`settings` with the flags' certificate and key (over the environment's), and a public
    URL of https when none was configured (links the worker writes must use the scheme the
    API is served with)."""
    if (cert is None) != (key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    updates: dict[str, object] = {"tls_cert": cert, "tls_key": key} if cert is not None else {}
    if (cert or settings.tls_cert) is not None and "public_url" not in settings.model_fields_set:
        updates["public_url"] = urlparse(settings.public_url)._replace(scheme="https").geturl()
    return settings.model_copy(update=updates) if updates else settings


def _tls13_only(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    context = default()  # uvicorn's: the certificate chain and key loaded
    # A floor, not a pin (later versions welcome): a client offering at most TLS 1.2 fails
    # the handshake.
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def uvicorn_tls(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config / uvicorn.run options serving HTTPS, TLS 1.3 only; none without a certificate."""
    if settings.tls_cert is None or settings.tls_key is None:
        return {}
    for path in (settings.tls_cert, settings.tls_key):
        if not path.is_file():
            raise SystemExit(f"TLS: no such file {path}")
    return {
        "ssl_certfile": str(settings.tls_cert),
        "ssl_keyfile": str(settings.tls_key),
        "ssl_context_factory": _tls13_only,
    }
