"""`marquee api` and `marquee worker` as child processes against the session's PostgreSQL,
Temporal and SMTP server, on a task queue of their own, for tests of what a process
configures for itself: its log format on stdout, its Sentry client (global per process).
Also a Sentry ingest endpoint of the test's own that decodes the envelopes it receives."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client

from core.config import Settings
from entrypoints.embedded import free_port, venv_binary


def marquee_env(settings: Settings, temporal: Client, data_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a child process sharing the session's servers; its own task queue
    (so only it runs the workflows its API starts) and data dir (chDB is one process's)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MARQUEE_", "OTEL_"))}
    assert settings.jwt_secret is not None
    assert settings.database_url is not None
    env.update(
        MARQUEE_DATABASE_URL=settings.database_url,
        MARQUEE_TEMPORAL_ADDRESS=temporal.service_client.config.target_host,
        MARQUEE_TEMPORAL_TASK_QUEUE=f"marquee-child-{uuid.uuid4().hex[:8]}",
        MARQUEE_JWT_SECRET=settings.jwt_secret.get_secret_value(),
        MARQUEE_SMTP_HOST=settings.smtp_host,
        MARQUEE_SMTP_PORT=str(settings.smtp_port),
        MARQUEE_SEND_RETRY_INITIAL_SECONDS="0.2",
        MARQUEE_SEND_RETRY_MAX_SECONDS="1",
        MARQUEE_DATA_DIR=str(data_dir),
        MARQUEE_DEV_TOOLS="true",
        MARQUEE_API_PORT=str(free_port()),
    )
    env.update(overrides)
    return env


class MarqueeProcess:
    """One `marquee <command>` with its stdout and stderr in files."""

    def __init__(self, command: str, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.stdout = logs / f"{command}.out"
        self.stderr = logs / f"{command}.err"
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen([str(venv_binary("marquee")), command], env=env, stdout=out, stderr=err)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['MARQUEE_API_PORT']}"

    def output(self) -> str:
        return self.stdout.read_text(errors="replace")

    def diagnostics(self) -> str:
        return f"stdout:\n{self.output()[-6000:]}\nstderr:\n{self.stderr.read_text(errors='replace')[-6000:]}"

    async def wait_for(self, text: str, seconds: float = 20) -> None:
        """Until `text` shows in its log (stdout for JSON lines, stderr for text)."""
        for _ in range(int(seconds / 0.1)):
            if text in self.output() or text in self.stderr.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                break
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {text!r} from marquee\n{self.diagnostics()}")

    async def wait_for_api(self, seconds: float = 20) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(int(seconds / 0.1)):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{self.url}/healthz")).status_code == 200:
                        return
                if self.process.poll() is not None:
                    break
                await asyncio.sleep(0.1)
        raise AssertionError(f"the API did not answer\n{self.diagnostics()}")

    async def stop(self) -> None:
        """SIGTERM, as an orchestrator stops it; its last lines are flushed by then."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, 15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)


@contextlib.asynccontextmanager
async def marquee_processes(env: dict[str, str], logs: Path, *commands: str) -> AsyncIterator[list[MarqueeProcess]]:
    processes = [MarqueeProcess(command, env, logs) for command in commands]
    try:
        yield processes
    finally:
        await asyncio.gather(*(process.stop() for process in processes))


class SentryReceiver:
    """Sentry's ingest API as far as a client uses it: POST /api/<project>/envelope/, whose
    body (gzip or not) is a JSON header line, then item header and payload lines."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self.path.endswith("/envelope/"):  # an OTLP exporter may post here too
                    self.send_response(200)
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.raw.append(body)
                lines = body.split(b"\n")
                # Items: a header line naming the type, then its payload line.
                for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                    if header.strip() and json.loads(header).get("type") == "event":
                        receiver.events.append(json.loads(payload))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def dsn(self) -> str:
        return f"http://public-key@127.0.0.1:{self._server.server_address[1]}/1"

    def __enter__(self) -> SentryReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    async def wait_for_event(self, seconds: float = 20, **tags: str) -> dict[str, Any]:
        """The first event whose tags include `tags`."""
        for _ in range(int(seconds / 0.1)):
            for event in self.events:
                if tags.items() <= dict(_tags(event)).items():
                    return event
            await asyncio.sleep(0.1)
        raise AssertionError(f"no Sentry event tagged {tags}; received: {self.events}")


def _tags(event: dict[str, Any]) -> list[tuple[str, str]]:
    """Tags as sent: a dict, or a list of pairs."""
    tags = event.get("tags") or {}
    return list(tags.items()) if isinstance(tags, dict) else [tuple(pair) for pair in tags]
