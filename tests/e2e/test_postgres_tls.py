"""MARQUEE_DATABASE_URL with libpq's `sslmode` reaches PostgreSQL over TLS through Marquee's
engine (asyncpg under SQLAlchemy): a PostgreSQL of the test's own with TLS on and a trustme
certificate; verify-full checks it against PGSSLROOTCERT and refuses another CA's."""

from __future__ import annotations

import asyncio
import os
import pwd
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
import trustme

from core.db import create_engine
from entrypoints.embedded import EMBEDDED_PG_USER, EmbeddedPostgres, free_port


def _system_pg_bin() -> Path | None:
    """The distribution's PostgreSQL binaries: the embedded wheel's are built without TLS."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return found[-1].parent if found else None


@pytest.fixture
async def tls_postgres(tmp_path: Path) -> AsyncIterator[tuple[str, trustme.CA]]:
    binaries = _system_pg_bin()
    if binaries is None:
        pytest.skip("no PostgreSQL built with TLS on this machine (/usr/lib/postgresql/*/bin)")
    ca = trustme.CA()
    server = EmbeddedPostgres(tmp_path / "pg", free_port())
    server._bin = binaries  # same initdb/pg_ctl flags, a build with OpenSSL
    url = await asyncio.to_thread(server.start)
    try:
        leaf = ca.issue_cert("127.0.0.1")
        cert, key = server.pgdata / "server.crt", server.pgdata / "server.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)  # PostgreSQL refuses a key others can read
        if os.geteuid() == 0:  # the server runs as its own system user, who must own the files
            entry = pwd.getpwnam(EMBEDDED_PG_USER)
            for path in (cert, key):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        conn = await asyncpg.connect(f"{url}/postgres")
        try:
            await conn.execute("ALTER SYSTEM SET ssl = on")
            await conn.execute("SELECT pg_reload_conf()")  # TLS settings take effect on reload
        finally:
            await conn.close()
        yield url, ca
    finally:
        await asyncio.to_thread(server.stop)


async def _over_tls(url: str) -> tuple[bool, str]:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(sa.text("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
            ).one()
    finally:
        await engine.dispose()
    return bool(row.ssl), str(row.version)


async def test_sslmode_in_the_database_url(
    tls_postgres: tuple[str, trustme.CA], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, ca = tls_postgres
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("PGSSLROOTCERT", str(ca_file))

    for _ in range(50):  # the reload is asynchronous
        try:
            encrypted, version = await _over_tls(f"{url}/postgres?sslmode=verify-full")
            break
        except (OSError, asyncpg.PostgresError, ConnectionError):
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("PostgreSQL never accepted TLS")
    assert encrypted
    assert version.startswith("TLSv1.")
    assert await _over_tls(f"{url}/postgres?sslmode=require") == (True, version)
    assert (await _over_tls(f"{url}/postgres?sslmode=disable"))[0] is False

    # verify-full really verifies: a certificate of another CA is refused.
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    monkeypatch.setenv("PGSSLROOTCERT", str(other))
    with pytest.raises(Exception, match=r"(?i)certificate verify failed"):
        await _over_tls(f"{url}/postgres?sslmode=verify-full")
