"""`marquee api --tls-cert --tls-key` as a child process: HTTPS with TLS 1.3 and nothing older
(a client capped at TLS 1.2 fails the handshake), and the admin's session cookie is Secure.
Certificates from trustme (a throwaway CA)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
import trustme
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from core.auth import Role
from core.config import Settings
from entrypoints.embedded import venv_binary
from services import admin_users
from tests import admin_session
from tests.e2e.processes import marquee_env


def _client_context(ca: trustme.CA, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if maximum is not None:
        context.maximum_version = maximum
    return context


async def _wait_for_https(url: str, context: ssl.SSLContext, process: subprocess.Popen[bytes], logs: Path) -> None:
    async with httpx.AsyncClient(verify=context) as client:
        for _ in range(300):
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(f"{url}/healthz")).status_code == 200:
                    return
            if process.poll() is not None:
                break
            await asyncio.sleep(0.1)
    output = await asyncio.to_thread(logs.read_text, errors="replace")
    raise AssertionError(f"the API did not answer over HTTPS:\n{output[-4000:]}")


def _start_api(env: dict[str, str], cert: Path, key: Path, logs: Path) -> subprocess.Popen[bytes]:
    with logs.open("wb") as out:
        return subprocess.Popen(
            [str(venv_binary("marquee")), "api", "--tls-cert", str(cert), "--tls-key", str(key)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _handshake(port: int, context: ssl.SSLContext) -> str | None:
    """The TLS version a blocking client agrees with the server."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version()


async def test_api_serves_tls_13_only_with_a_secure_admin_cookie(
    tmp_path: Path, settings: Settings, temporal_client: Client, engine: AsyncEngine
) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    for blob in leaf.cert_chain_pems[1:]:
        blob.write_to_path(str(cert), append=True)

    env = marquee_env(settings, temporal_client, tmp_path / "data")
    url = f"https://127.0.0.1:{env['MARQUEE_API_PORT']}"
    logs = tmp_path / "api.log"
    process = await asyncio.to_thread(_start_api, env, cert, key, logs)
    try:
        await _wait_for_https(url, _client_context(ca), process, logs)

        # TLS 1.3: the handshake completes, and on that version.
        async with httpx.AsyncClient(verify=_client_context(ca), base_url=url) as client:
            response = await client.get("/healthz")
            assert response.status_code == 200
            assert response.extensions["network_stream"].get_extra_info("ssl_object").version() == "TLSv1.3"

            # The admin's session cookie is Secure: never sent back over plain HTTP.
            email, password = f"tls-{uuid.uuid4().hex[:8]}@example.com", uuid.uuid4().hex
            async with engine.begin() as conn:
                await admin_users.create(conn, email, password, Role.admin)
            login, _ = await admin_session.sign_in(client, email, password)
            assert login.status_code == 302, login.text
            session = [value for value in login.headers.get_list("set-cookie") if value.startswith("session=")]
            assert session, login.headers
            attributes = {part.strip().split("=")[0].lower() for part in session[0].split(";")[1:]}
            assert {"secure", "httponly"} <= attributes, session[0]

        # A client that goes no higher than TLS 1.2 fails the handshake (the server closes the
        # connection on the ClientHello); the same client allowed 1.3 gets through.
        port = int(env["MARQUEE_API_PORT"])
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await asyncio.to_thread(_handshake, port, _client_context(ca, maximum=ssl.TLSVersion.TLSv1_2))
        assert await asyncio.to_thread(_handshake, port, _client_context(ca)) == "TLSv1.3"
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 15)
