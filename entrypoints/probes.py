"""The worker's health port (`marquee worker --health-port`): /healthz, /readyz and /metrics.

The worker has no web framework, and orchestrators and Prometheus need only a GET each, so
this is a few lines of HTTP/1.1 on asyncio (one request per connection). /readyz answers
what services.health finds, as the API's /readyz does; /metrics is this process's own
counters and histograms (services.metrics.PROCESS), the sends the worker made.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services import metrics
from services.health import Readiness

REQUEST_SECONDS = 5.0  # a client that does not finish its request head in time is dropped
JSON = "application/json"


async def _answer(path: str, readiness: Callable[[], Awaitable[Readiness]]) -> tuple[HTTPStatus, str, bytes]:
    if path == "/healthz":
        return HTTPStatus.OK, JSON, b'{"status":"ok"}'
    if path == "/readyz":
        found = await readiness()
        status = HTTPStatus.OK if found.ready else HTTPStatus.SERVICE_UNAVAILABLE
        return status, JSON, json.dumps(found.body()).encode()
    if path == "/metrics":
        return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(metrics.PROCESS)
    return HTTPStatus.NOT_FOUND, JSON, b'{"status":"not found"}'


async def serve_probes(host: str, port: int, readiness: Callable[[], Awaitable[Readiness]]) -> asyncio.Server:
    """Listen on host:port (0: any free port; see `.sockets`) until the server is closed."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_SECONDS)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if method in ("GET", "HEAD"):
                status, media_type, body = await _answer(target.split("?", 1)[0], readiness)
            else:
                status, media_type, body = HTTPStatus.METHOD_NOT_ALLOWED, JSON, b'{"status":"GET only"}'
            writer.write(
                f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: {media_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
                + (body if method != "HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a malformed or abandoned request: nothing to answer
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
