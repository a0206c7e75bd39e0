"""`marquee dev | api | worker | codec-server | events consume`: the long-running processes.
Each imports its whole stack, so the CLI loads this module only for these commands.

Each runs on uvloop, as uvicorn runs the API: libuv's socket handling in C costs the worker
less CPU a message than asyncio's selector loop (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import contextlib

import uvicorn
import uvloop

from api.app import create_app
from core.codec import CodecKeyError
from core.config import Settings
from core.logging import configure_logging
from core.tracing import tracing
from entrypoints.codec_server import create_codec_app
from entrypoints.dev import run_dev
from entrypoints.event_consumer import NatsUnavailable, run_consumer
from entrypoints.tls import uvicorn_tls, with_tls
from worker import run_worker


def dev(settings: Settings, _: argparse.Namespace) -> int:
    with tracing(settings, "marquee-dev"):
        uvloop.run(run_dev(settings))
    return 0


def api(settings: Settings, args: argparse.Namespace) -> int:
    settings = with_tls(settings, args.tls_cert, args.tls_key)
    configure_logging(settings)
    with tracing(settings, "marquee-api"):
        uvicorn.run(create_app(settings), host=args.host or settings.api_host, port=args.port or settings.api_port,
                    log_config=None, proxy_headers=True, **uvicorn_tls(settings))  # fmt: skip
    return 0


def codec_server(settings: Settings, args: argparse.Namespace) -> int:
    settings = with_tls(settings, args.tls_cert, args.tls_key)
    configure_logging(settings)
    try:
        app = create_codec_app(settings)
    except (CodecKeyError, RuntimeError) as err:
        raise SystemExit(f"marquee codec-server: {err}") from err
    uvicorn.run(app, host=args.host or settings.codec_server_host, port=args.port or settings.codec_server_port,
                log_config=None, **uvicorn_tls(settings))  # fmt: skip
    return 0


def worker(settings: Settings, args: argparse.Namespace) -> int:
    if args.health_port is not None:
        settings = settings.model_copy(update={"worker_health_port": args.health_port})
    configure_logging(settings)
    with tracing(settings, "marquee-worker"), contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run_worker(settings))
    return 0


def events_consume(settings: Settings, _: argparse.Namespace) -> int:
    if not settings.database_url:
        raise SystemExit("marquee events consume: MARQUEE_DATABASE_URL is not set")
    configure_logging(settings)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(run_consumer(settings))
    except NatsUnavailable as err:
        raise SystemExit(f"marquee events consume: {err}") from err
    return 0
