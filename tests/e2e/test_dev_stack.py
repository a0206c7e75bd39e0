"""`marquee dev` (what `make run` starts), run for real: embedded PostgreSQL, the Temporal dev
server, the capture SMTP server, API, admin and worker, on free ports and a fresh data dir."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from entrypoints.embedded import EMBEDDED_PG_USER, _embedded_pg_bin, free_port, port_is_free
from tests import admin_session

MARQUEE = Path(sys.executable).parent / "marquee"
BANNER = "Marquee is running"
START_SECONDS = 90
STOP_SECONDS = 30


@dataclass
class Stack:
    data_dir: Path
    api_port: int
    temporal_port: int
    temporal_ui_port: int
    smtp_port: int
    pg_port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def ports(self) -> dict[str, int]:
        return {
            "api": self.api_port,
            "temporal": self.temporal_port,
            "temporal ui": self.temporal_ui_port,
            "smtp": self.smtp_port,
            "postgres": self.pg_port,
        }

    def env(self) -> dict[str, str]:
        # Nothing from the caller's MARQUEE_* (DATABASE_URL, TEMPORAL_ADDRESS, SMTP_HOST would
        # switch the embedded services off): every port is ours.
        env = {key: value for key, value in os.environ.items() if not key.startswith("MARQUEE_")}
        env.update(
            MARQUEE_DATA_DIR=str(self.data_dir),
            MARQUEE_API_PORT=str(self.api_port),
            MARQUEE_PUBLIC_URL=self.api_url,
            MARQUEE_TEMPORAL_PORT=str(self.temporal_port),
            MARQUEE_TEMPORAL_UI_PORT=str(self.temporal_ui_port),
            MARQUEE_CAPTURE_SMTP_PORT=str(self.smtp_port),
            MARQUEE_EMBEDDED_PG_PORT=str(self.pg_port),
            # Nothing listens there: the NATS intake is off (the machine's NATS is not ours to consume).
            MARQUEE_NATS_URL=f"nats://127.0.0.1:{free_port()}",
        )
        return env


def _tail(path: Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as err:
        return f"({err})"


@dataclass
class Run:
    process: asyncio.subprocess.Process
    stderr: Path
    data_dir: Path
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "".join(self.lines)

    def diagnostics(self) -> str:
        """What to read when the stack misbehaves: its output and the embedded servers' logs."""
        parts = [f"stdout:\n{self.output()}", f"stderr:\n{_tail(self.stderr, 12_000)}"]
        for log in (self.data_dir / "postgres" / "server.log", self.data_dir / "temporal.log"):
            parts.append(f"{log.name}:\n{_tail(log, 2_000)}")
        return "\n".join(parts)

    async def read_until(self, text: str, seconds: float) -> None:
        """Read stdout line by line until a line contains `text`."""
        assert self.process.stdout is not None
        try:
            async with asyncio.timeout(seconds):
                while not any(text in line for line in self.lines):
                    line = await self.process.stdout.readline()
                    if not line:
                        code = await self.process.wait()
                        raise AssertionError(f"marquee dev exited with {code} before {text!r}\n{self.diagnostics()}")
                    self.lines.append(line.decode(errors="replace"))
        except TimeoutError:
            raise AssertionError(f"no {text!r} on stdout after {seconds:g} s\n{self.diagnostics()}") from None

    async def read_rest(self) -> None:
        assert self.process.stdout is not None
        self.lines.append((await self.process.stdout.read()).decode(errors="replace"))


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return Stack(tmp_path / "data", free_port(), free_port(), free_port(), free_port(), free_port())


def _temporal_pids(stack: Stack) -> list[int]:
    """The Temporal dev server this stack started (its own session: not in our process group)."""
    marker = str(stack.data_dir / "temporal.db").encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop_embedded_services(stack: Stack) -> None:
    """Stop what `marquee dev` started in sessions of their own, by pid or through pg_ctl."""
    for pid in _temporal_pids(stack):
        os.kill(pid, signal.SIGKILL)
    pgdata = stack.data_dir / "postgres"
    if (pgdata / "postmaster.pid").exists():
        # Run pg_ctl the way entrypoints.embedded runs it: as the embedded_postgres user when we are root.
        as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            as_user = {"user": EMBEDDED_PG_USER, "group": pwd.getpwnam(EMBEDDED_PG_USER).pw_gid, "extra_groups": []}
        command = [str(_embedded_pg_bin() / "pg_ctl"), "-D", str(pgdata), "-m", "immediate", "stop"]
        subprocess.run(command, capture_output=True, timeout=30, check=False, **as_user)
    if (pgdata / "postmaster.pid").exists() and not port_is_free("127.0.0.1", stack.pg_port):
        # pg_ctl could not reach it (as embedded_postgres): immediate shutdown by the postmaster's pid.
        os.kill(int((pgdata / "postmaster.pid").read_text().split()[0]), signal.SIGQUIT)


@asynccontextmanager
async def marquee_dev(stack: Stack, name: str) -> AsyncIterator[Run]:
    """Start `marquee dev`, wait for its banner; on the way out make sure none of it is left."""
    stack.data_dir.mkdir(exist_ok=True)
    stderr = stack.data_dir.parent / f"{name}.err"
    with stderr.open("wb") as stderr_file:
        process = await asyncio.create_subprocess_exec(
            str(MARQUEE), "dev",
            env=stack.env(),
            cwd=stack.data_dir.parent,  # not the repository: no ./.env, no ./.data
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr_file,
            start_new_session=True,  # its own process group, to kill it whole on failure
        )  # fmt: skip
    run = Run(process, stderr, stack.data_dir)
    try:
        await run.read_until(BANNER, START_SECONDS)
        await run.read_until("export TOKEN=", 5)  # the banner's last line, printed in the same flush
        yield run
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        if not all(port_is_free("127.0.0.1", port) for port in stack.ports.values()) or _temporal_pids(stack):
            await asyncio.to_thread(_stop_embedded_services, stack)


async def stop_with_ctrl_c(stack: Stack, run: Run) -> None:
    run.process.send_signal(signal.SIGINT)
    try:
        code = await asyncio.wait_for(run.process.wait(), STOP_SECONDS)
    except TimeoutError:
        raise AssertionError(f"still running {STOP_SECONDS} s after SIGINT\n{run.diagnostics()}") from None
    await run.read_rest()
    assert code == 0, run.diagnostics()
    assert "Stopping..." in run.output()
    still_open = [name for name, port in stack.ports.items() if not port_is_free("127.0.0.1", port)]
    assert still_open == [], f"still listening after exit: {still_open}\n{run.diagnostics()}"
    assert _temporal_pids(stack) == []


def banner(run: Run) -> dict[str, str]:
    """The banner's `  name   where` lines as a mapping."""
    return dict(re.findall(r"^  (\S.*?) {2,}(\S.*)$", run.output(), flags=re.MULTILINE))


def banner_token(run: Run) -> str:
    [token] = re.findall(r"^  export TOKEN=(\S+)$", run.output(), flags=re.MULTILINE)
    return token


def banner_admin_password(stack: Stack, run: Run) -> str:
    match = re.fullmatch(
        rf"{re.escape(stack.api_url)}/admin  \(admin@marquee\.localhost / (\S+)\)", banner(run)["Admin"]
    )
    assert match, banner(run)
    return match[1]


async def admin_users(stack: Stack) -> list[str]:
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{stack.pg_port}/marquee")
    try:
        return [row["email"] for row in await conn.fetch("SELECT email FROM admin_users ORDER BY id")]
    finally:
        await conn.close()


async def test_marquee_dev_sends_mail_stops_on_ctrl_c_and_restarts(stack: Stack) -> None:
    async with marquee_dev(stack, "first") as run:
        lines = banner(run)
        assert lines["API"] == stack.api_url
        assert lines["Captured mail and sandbox push/SMS"] == f"{stack.api_url}/dev"
        assert lines["PostgreSQL (embedded)"] == f"postgresql://postgres@127.0.0.1:{stack.pg_port}/marquee"
        assert lines["Temporal Web UI"] == f"http://127.0.0.1:{stack.temporal_ui_port}"
        assert lines["Temporal frontend"] == f"127.0.0.1:{stack.temporal_port}"
        assert lines["Capture SMTP server"] == f"127.0.0.1:{stack.smtp_port}"
        assert lines["NATS event intake"].startswith("off: NATS at nats://127.0.0.1:")
        password = banner_admin_password(stack, run)
        assert (stack.data_dir / "admin-password").read_text() == password
        token = banner_token(run)

        # A client timeout above the server's own wait (30 s): a slow send reads as its 504 problem.
        async with httpx.AsyncClient(
            base_url=stack.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as api:
            assert (await api.get("/readyz")).status_code == 200

            created = await api.post("/v1/recipients", json={"user_id": "dev-user", "email": "dev-user@example.com"})
            assert created.status_code == 200, created.text
            sent = await api.post(
                "/v1/notifications?wait=true",
                json={
                    "user_id": "dev-user",
                    "type": "premiere",
                    "channels": ["email"],
                    "title": "Premiere tonight at the dev stack",
                    "body": "Dune: Part Three starts at 20:00.",
                },
            )
            assert sent.status_code == 200, sent.text
            notification = sent.json()
            assert notification["status"] == "sent"
            [channel] = notification["channels"]
            assert channel["status"] == "sent"

            mail = (await api.get("/dev/mail")).json()
            [message] = [m for m in mail if m["message_id"] == channel["provider_message_id"]]
            assert message["subject"] == "Premiere tonight at the dev stack"
            assert message["to"] == "dev-user@example.com"
            assert len(list((stack.data_dir / "mail").glob("*.eml"))) == 1

            outbox = await api.get("/dev")
            assert outbox.status_code == 200
            assert outbox.headers["content-type"].startswith("text/html")
            assert "Premiere tonight at the dev stack" in outbox.text

        async with httpx.AsyncClient(timeout=10) as plain:
            ui = await plain.get(f"http://127.0.0.1:{stack.temporal_ui_port}/")
            assert ui.status_code == 200
            assert ui.headers["content-type"].startswith("text/html")

        assert await admin_users(stack) == ["admin@marquee.localhost"]
        await stop_with_ctrl_c(stack, run)

    # Same data dir again: migrations are idempotent, the admin and the data survive.
    async with marquee_dev(stack, "second") as run:
        assert banner_admin_password(stack, run) == password
        assert await admin_users(stack) == ["admin@marquee.localhost"]
        async with httpx.AsyncClient(
            base_url=stack.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as api:
            # The first run's token still works: the JWT secret under data_dir was reused.
            again = await api.get(f"/v1/notifications/{notification['id']}")
            assert again.status_code == 200, again.text
            assert again.json()["status"] == "sent"
            signed_in, _ = await admin_session.sign_in(api, "admin@marquee.localhost", password)
            assert signed_in.status_code == 302
            assert signed_in.headers["location"] == f"{stack.api_url}/admin/"
        # A directory above the data dir loses the o+x the stack granted it at start (a new pytest
        # session does that to its temp root): Ctrl-C must still stop the embedded PostgreSQL.
        stack.data_dir.parent.chmod(0o700)
        await stop_with_ctrl_c(stack, run)
