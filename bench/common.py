"""What the benchmarks need: a fresh database on this machine's PostgreSQL (or an embedded
one), and the whole service in one process as `marquee dev` runs it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from api.app import create_app
from core.config import Settings
from core.db import create_engine
from core.migrate import upgrade_async
from core.temporal import connect
from entrypoints.embedded import (
    EmbeddedPostgres,
    MailCapture,
    TemporalDevServer,
    free_port,
    start_capture_smtp,
    venv_binary,
)
from worker import create_worker, worker_services


async def fresh_database(workdir: Path) -> tuple[str, EmbeddedPostgres | None]:
    """A new database URL (and the embedded server to stop afterwards, if one was started)."""
    try:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres", timeout=2)
        server, embedded = "postgresql://postgres@127.0.0.1:5432", None
    except OSError:
        embedded = EmbeddedPostgres(workdir / "pg", free_port())
        server = await asyncio.to_thread(embedded.start)
        conn = await asyncpg.connect(f"{server}/postgres")
    name = f"marquee_bench_{uuid.uuid4().hex[:8]}"
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    return f"{server}/{name}", embedded


async def drop_database(database_url: str) -> None:
    """Drop a database fresh_database made (its connections closed first)."""
    server, name = database_url.rsplit("/", 1)
    conn = await asyncpg.connect(f"{server}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@dataclass
class Stack:
    settings: Settings
    api_url: str
    temporal: Client
    engine: AsyncEngine


@asynccontextmanager
async def in_process_stack(workdir: Path, capture: MailCapture, **settings: Any) -> AsyncIterator[Stack]:
    """The Temporal dev server (SQLite file with WAL, as the dev stack runs it), a fresh
    database, an aiosmtpd sink with `capture`, a worker and the API on uvicorn, in this process."""
    database_url, embedded = await fresh_database(workdir)
    await upgrade_async(database_url)
    smtp = start_capture_smtp(None, free_port(), capture)
    temporal_port = free_port()
    temporal = TemporalDevServer(workdir / "temporal.db", temporal_port, free_port(), workdir / "temporal.log")
    await asyncio.to_thread(temporal.start)
    api_port = free_port()
    config = Settings(
        _env_file=None,
        data_dir=workdir,
        database_url=database_url,
        temporal_address=f"127.0.0.1:{temporal_port}",
        jwt_secret=secrets.token_urlsafe(32),
        smtp_port=smtp.port,
        smtp_pool_size=20,
        database_pool_size=20,
        public_url=f"http://127.0.0.1:{api_port}",
        rate_limit_enabled=False,  # the benchmark's one token would be throttled: it measures the service
        **settings,
    )
    try:
        client = await connect(config)
        engine = create_engine(database_url, config.database_pool_size)
        async with worker_services(config, engine) as services:
            worker = create_worker(client, config, services)
            app = create_app(config, engine=engine, temporal=client)
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=api_port, log_level="warning"))
            async with worker:
                serving = asyncio.create_task(server.serve())
                while not server.started:  # noqa: ASYNC110 - uvicorn only offers a flag
                    await asyncio.sleep(0.02)
                try:
                    yield Stack(config, f"http://127.0.0.1:{api_port}", client, engine)
                finally:
                    server.should_exit = True
                    await serving
        await engine.dispose()
    finally:
        smtp.stop()
        await asyncio.to_thread(temporal.stop)
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        else:
            await drop_database(database_url)


RESULTS = Path(__file__).resolve().parent.parent / ".data" / "bench"


def save_result(name: str, result: dict[str, Any]) -> Path:
    """The run's figures as .data/bench/<name>.json, for bench/report.py."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    stamp = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "load_average": os.getloadavg()}
    path.write_text(json.dumps({**stamp, **result}, indent=1))
    return path


def profile_path(bench: str, process: str) -> Path:
    """Where a run's raw py-spy stacks are kept (.data/bench/profiles/)."""
    (RESULTS / "profiles").mkdir(parents=True, exist_ok=True)
    return RESULTS / "profiles" / f"{bench}-{process}.txt"


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) so far, in MiB; 0 once it is gone."""
    return _status_mib(pid, "VmHWM")


def rss_mib(pid: int) -> float:
    """The process's resident set (VmRSS) now, in MiB; 0 once it is gone."""
    return _status_mib(pid, "VmRSS")


def _status_mib(pid: int, field: str) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else 0.0


def reset_peak_rss(pid: int) -> None:
    """Start the process's VmHWM again from its current RSS (Linux: "5" to clear_refs), so
    a later peak_rss_mib is the peak since now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class Profiler:
    """py-spy sampling one process for the length of a run (`--profile`): raw collapsed stacks
    into `output`, summarised by summarise_profile."""

    def __init__(self, pid: int, output: Path) -> None:
        self.output = output
        command = [str(venv_binary("py-spy")), "record", "--pid", str(pid), "--rate", "100",
                   "--format", "raw", "--output", str(output), "--nonblocking"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> dict[str, Any]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            _, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        if not self.output.exists():
            return {"error": (err or b"").decode(errors="replace")[-500:], "top": []}
        return summarise_profile(self.output)


_LINE = re.compile(r":\d+\)$")


def summarise_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """The functions with the most own samples (the stack's leaf) and their total share."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # Frames read "function (file:line)": the line is dropped so a function counts once.
        frames = [_LINE.sub(")", frame) for frame in stack.split(";") if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return {
        "file": str(raw),
        "samples": samples,
        "top": [
            {"function": name, "own": count / samples, "total": total[name] / samples}
            for name, count in own.most_common(top)
        ],
    }


def marquee_env(
    database_url: str, temporal_address: str, smtp_port: int, jwt_secret: str, **overrides: str
) -> dict[str, str]:
    """The environment of a `marquee api` / `marquee worker` child: the run's servers, the
    machine's MARQUEE_* settings left out so a developer's .env does not change the figures."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MARQUEE_", "OTEL_"))}
    env.update(
        MARQUEE_DATABASE_URL=database_url,
        MARQUEE_TEMPORAL_ADDRESS=temporal_address,
        MARQUEE_SMTP_HOST="127.0.0.1",
        MARQUEE_SMTP_PORT=str(smtp_port),
        MARQUEE_JWT_SECRET=jwt_secret,  # workers sign tracking links; the API checks the bench's token
        MARQUEE_LOG_LEVEL="WARNING",
        MARQUEE_DEV_TOOLS="true",  # no warning per process about clear Temporal payloads
        MARQUEE_RATE_LIMIT_ENABLED="false",  # the benchmark's one token would be throttled: it measures the service
    )
    env.update(overrides)
    return env


async def post_admitted(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[httpx.Response, int]:
    """POST as a well-behaved client does above capacity: a shed request (429/503) is sent
    again after its Retry-After. The final answer, and how many times it was shed."""
    shed = 0
    while True:
        response = await http.post(url, json=body)
        if response.status_code not in (429, 503):
            return response, shed
        shed += 1
        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/PID/stat, its own threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MarqueeChild:
    """`marquee <command>` as its own process, output in files under `logs`."""

    def __init__(self, command: str, env: dict[str, str], logs: Path, name: str | None = None) -> None:
        self.name = name or command
        if command == "worker":  # its health port says when it polls: the bench times nothing before
            env = {**env, "MARQUEE_WORKER_HEALTH_PORT": str(free_port())}
            self.ready_url = f"http://127.0.0.1:{env['MARQUEE_WORKER_HEALTH_PORT']}/readyz"
        else:
            self.ready_url = f"http://127.0.0.1:{env['MARQUEE_API_PORT']}/healthz"
        logs.mkdir(parents=True, exist_ok=True)
        self.log = logs / f"{self.name}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen([str(venv_binary("marquee")), command], env=env, stdout=out, stderr=out)

    @property
    def pid(self) -> int:
        return self.process.pid

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.process.pid)

    def reset_peak_rss(self) -> float:
        """The peak so far, then the peak starts again from the current RSS."""
        peak = self.peak_rss_mib()
        reset_peak_rss(self.process.pid)
        return peak

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")

    async def wait_ready(self, seconds: float = 60) -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            for _ in range(int(seconds / 0.1)):
                self.check_alive()
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(self.ready_url)).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} was not ready in {seconds} s; see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
