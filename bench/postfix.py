"""The benchmarks' SMTP receiver and C load generator: Postfix's `smtp-sink` and `smtp-source`.

Taken from Debian's postfix package without installing or starting Postfix (`apt-get
download postfix`, `dpkg -x`) into .data/postfix, once. When that fails (no apt, offline),
the receiver falls back to bench/smtp_sink.py (aiosmtpd, which costs a Python core) with a
printed warning, and the C-to-C ceiling is not measured.

Both receivers write a running count (`mesg=N`) to a file; the count is read from its tail,
so it can be sampled during a run (sends per second over time) and checked at the end
(every recipient once).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from entrypoints.embedded import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
POSTFIX_DIR = ROOT / ".data" / "postfix"
_COUNT = re.compile(rb"mesg=(\d+)")


@dataclass(frozen=True)
class Postfix:
    root: Path  # the unpacked package: usr/sbin/smtp-sink, usr/lib/postfix/*.so

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "LD_LIBRARY_PATH": str(self.root / "usr" / "lib" / "postfix")}

    def binary(self, name: str) -> str:
        return str(self.root / "usr" / "sbin" / name)

    def version(self) -> str:
        found = sorted(POSTFIX_DIR.glob("postfix_*.deb"))
        return found[-1].name.removeprefix("postfix_").split("_")[0] if found else "unknown"


def find_postfix() -> Postfix | None:
    """The unpacked binaries, fetched when missing; None (with the reason printed) if that fails."""
    postfix = Postfix(POSTFIX_DIR / "root")
    if Path(postfix.binary("smtp-sink")).exists():
        return postfix
    POSTFIX_DIR.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", "postfix"], cwd=POSTFIX_DIR, check=True, capture_output=True)
        [deb] = sorted(POSTFIX_DIR.glob("postfix_*.deb"))[-1:]
        subprocess.run(["dpkg", "-x", str(deb), str(postfix.root)], check=True, capture_output=True)
    except (OSError, ValueError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        print(f"WARNING: could not fetch Postfix's smtp-sink ({error} {detail.decode(errors='replace')[-300:]})")
        return None
    return postfix if Path(postfix.binary("smtp-sink")).exists() else None


class Sink:
    """An SMTP receiver in its own process that counts what it accepts."""

    def __init__(self, kind: str, command: list[str], env: dict[str, str], port: int, counts: Path) -> None:
        self.kind = kind
        self.port = port
        self.counts = counts
        with counts.open("wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", port, 15)

    @property
    def pid(self) -> int:
        return self.process.pid

    def count(self) -> int:
        """Messages received so far (the last `mesg=N` the receiver wrote)."""
        with self.counts.open("rb") as counts:
            counts.seek(max(0, counts.seek(0, os.SEEK_END) - 256))
            found = _COUNT.findall(counts.read())
        return int(found[-1]) if found else 0

    def wait_for(self, expected: int, seconds: float) -> int:
        """Until `expected` messages arrived or `seconds` passed; the count then."""
        deadline = time.monotonic() + seconds
        while (received := self.count()) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return received

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.count()


def start_sink(workdir: Path, postfix: Postfix | None, prefer_python: bool = False) -> Sink:
    """smtp-sink on a free port (aiosmtpd when Postfix is missing or `prefer_python`)."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    counts = workdir / f"sink-{port}.counts"
    if postfix is None or prefer_python:
        if not prefer_python:
            print("WARNING: smtp-sink unavailable; the receiver is aiosmtpd (bench/smtp_sink.py), a Python process")
        return Sink("aiosmtpd", [sys.executable, "-m", "bench.smtp_sink", str(port)], dict(os.environ), port, counts)
    # -c: running counters on stdout; -u: smtp-sink refuses to run as root without it.
    user = ["-u", "root"] if os.geteuid() == 0 else []
    command = [postfix.binary("smtp-sink"), "-c", *user, f"127.0.0.1:{port}", "1024"]
    return Sink("smtp-sink", command, postfix.env, port, counts)


def smtp_source(postfix: Postfix, port: int, messages: int, sessions: int = 20, size: int = 1024) -> float:
    """Seconds for smtp-source to send `messages` of `size` bytes over `sessions` persistent
    sessions (-d: the next message on the same connection, as a pooled sender does)."""
    command = [postfix.binary("smtp-source"), "-d", "-s", str(sessions), "-l", str(size), "-m", str(messages),
               "-f", "bench@example.com", "-t", "to@example.com", f"127.0.0.1:{port}"]  # fmt: skip
    began = time.perf_counter()
    subprocess.run(command, env=postfix.env, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - began
