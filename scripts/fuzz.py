"""`make fuzz`: Schemathesis against the OpenAPI of a dev stack of its own, with every role's
token and every check; the stack (embedded PostgreSQL, Temporal, capture SMTP, in a temporary
directory, on free ports) is started first and stopped after. Exit status: non-zero if any
role's run found a failure. Usage: python scripts/fuzz.py [--max-examples N] [--role R ...] [-- schemathesis options]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from core.auth import Role, create_token
from core.config import Settings
from entrypoints.embedded import free_port

BIN = Path(sys.executable).parent
CONFIG = Path(__file__).resolve().parent.parent / "schemathesis.toml"  # what the checks may not expect, and why


def _wait_healthy(url: str, stack: subprocess.Popen[bytes], seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if stack.poll() is not None:
            raise SystemExit(f"the dev stack exited ({stack.returncode}); see its log above")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the dev stack did not answer at {url} within {seconds:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-examples", type=int, default=100, help="per operation and role")
    parser.add_argument("--role", action="append", choices=[role.value for role in Role], help="only these roles")
    parser.add_argument("extra", nargs="*", help="more schemathesis run options, after --")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="marquee-fuzz-"))
    port = free_port()
    env = {
        **os.environ,
        "MARQUEE_DATA_DIR": str(data_dir),
        "MARQUEE_API_PORT": str(port),
        "MARQUEE_TEMPORAL_PORT": str(free_port()),
        "MARQUEE_TEMPORAL_UI_PORT": str(free_port()),
        "MARQUEE_CAPTURE_SMTP_PORT": str(free_port()),
        "MARQUEE_EMBEDDED_PG_PORT": str(free_port()),
        "MARQUEE_CODEC_SERVER_PORT": str(free_port()),
        "MARQUEE_NATS_URL": "nats://127.0.0.1:1",  # no event consumer: the HTTP API is the subject
        "MARQUEE_RATE_LIMIT_ENABLED": "false",  # one token per role would be throttled
    }
    env.pop("MARQUEE_DATABASE_URL", None)  # the stack's own embedded PostgreSQL
    url = f"http://127.0.0.1:{port}"
    stack = subprocess.Popen([BIN / "marquee", "dev"], env=env, start_new_session=True)
    failed: list[str] = []
    try:
        _wait_healthy(url, stack)
        secret = Settings(_env_file=None, data_dir=data_dir).resolved_jwt_secret()
        for role in Role:
            if args.role and role.value not in args.role:
                continue
            token = create_token(secret, f"fuzz-{role.value}", role, 3600)
            print(f"\n=== schemathesis as {role.value}", flush=True)
            command = [BIN / "schemathesis", "--config-file", CONFIG,
                       "run", f"{url}/openapi.json", "--header", f"Authorization: Bearer {token}",
                       "--checks", "all", "--phases", "examples,coverage,fuzzing", "--generation-database", "none",
                       "--max-examples", str(args.max_examples), *args.extra]  # fmt: skip
            if subprocess.run(command, check=False).returncode != 0:
                failed.append(role.value)
    finally:
        os.killpg(stack.pid, signal.SIGINT)  # `marquee dev` stops everything it started on Ctrl-C
        try:
            stack.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)
            stack.wait()
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"\nfailures as: {', '.join(failed)}" if failed else "\nno failures, every role", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
