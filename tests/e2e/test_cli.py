"""The `marquee` command, run as a subprocess the way an operator runs it."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

import core.models  # noqa: F401 - registers the tables on SQLModel.metadata
from core.auth import Role, decode_token, verify_password
from core.migrate import alembic_config

MARQUEE = Path(sys.executable).parent / "marquee"


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment without MARQUEE_* settings, with an empty data dir."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MARQUEE_")}
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env["MARQUEE_DATA_DIR"] = str(data_dir)
    return env


async def marquee(
    env: dict[str, str], *args: str, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    # Run from an empty directory: Settings also reads ./.env, and the repository's .data must not count.
    return await asyncio.to_thread(
        subprocess.run,
        [str(MARQUEE), *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd or env["MARQUEE_DATA_DIR"],
    )


def server_of(database_url: str) -> str:
    return database_url.rsplit("/", 1)[0]


@pytest.fixture
async def fresh_database(database_url: str) -> AsyncIterator[str]:
    """A brand-new, empty database on the tests' PostgreSQL server (127.0.0.1:5432 normally)."""
    server = server_of(database_url)
    name = f"marquee_cli_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(f"{server}/postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        yield f"{server}/{name}"
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def test_token_create_prints_a_jwt_the_api_accepts(cli_env: dict[str, str]) -> None:
    secret = secrets.token_urlsafe(32)
    result = await marquee(
        {**cli_env, "MARQUEE_JWT_SECRET": secret}, "token", "create", "--role", "analyst", "--subject", "x"
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2
    assert "\n" not in token

    principal = decode_token(secret, token)
    assert principal.role is Role.analyst
    assert principal.subject == "x"


async def test_token_create_rejects_an_unknown_role(cli_env: dict[str, str]) -> None:
    result = await marquee({**cli_env, "MARQUEE_JWT_SECRET": "s"}, "token", "create", "--role", "root")
    assert result.returncode == 2
    assert result.stdout == ""
    assert (
        "argument --role: invalid choice: 'root' (choose from 'service', 'admin', 'campaign_manager', 'analyst')"
        in result.stderr
    )


async def test_token_create_without_a_secret_names_the_variable(cli_env: dict[str, str]) -> None:
    result = await marquee(cli_env, "token", "create", "--role", "service")
    assert result.returncode != 0
    assert result.stdout == ""
    assert "MARQUEE_JWT_SECRET" in result.stderr
    assert result.stderr.startswith("marquee token create:")
    # Nothing was created on the way: the data dir stays empty.
    assert await asyncio.to_thread(os.listdir, cli_env["MARQUEE_DATA_DIR"]) == []


async def test_migrate_creates_the_tables_in_a_new_database(cli_env: dict[str, str], fresh_database: str) -> None:
    result = await marquee({**cli_env, "MARQUEE_DATABASE_URL": fresh_database}, "migrate")
    assert result.returncode == 0, result.stderr
    assert "database migrated to head" in result.stdout

    conn = await asyncpg.connect(fresh_database)
    try:
        tables = {
            row["tablename"] for row in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        version = await conn.fetchval("SELECT version_num FROM alembic_version")
    finally:
        await conn.close()
    # Every table of the models, at the newest revision.
    assert {"alembic_version", *SQLModel.metadata.tables} <= tables
    assert {"admin_users", "notifications", "deliveries", "dead_letters", "recipients", "sandbox_messages"} <= tables
    assert version == ScriptDirectory.from_config(alembic_config(fresh_database)).get_current_head()


async def test_migrate_without_a_database_url_says_so(cli_env: dict[str, str]) -> None:
    result = await marquee(cli_env, "migrate")
    assert result.returncode != 0
    assert "MARQUEE_DATABASE_URL is not set" in result.stderr


async def test_user_create_stores_a_verifiable_password_once(cli_env: dict[str, str], database_url: str) -> None:
    env = {**cli_env, "MARQUEE_DATABASE_URL": database_url}
    email = f"Manager-{uuid.uuid4().hex[:10]}@Example.com"
    password = "correct horse battery"

    result = await marquee(
        env, "user", "create", "--email", email, "--role", "campaign_manager", "--password-stdin", stdin=password + "\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"created campaign_manager {email}"

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT email, role, is_active, password_hash FROM admin_users WHERE email = $1",
                                email.lower())  # fmt: skip
    finally:
        await conn.close()
    [row] = rows
    assert row["role"] == "campaign_manager"
    assert row["is_active"] is True
    assert verify_password(password, row["password_hash"])
    assert not verify_password(password + "x", row["password_hash"])

    again = await marquee(
        env, "user", "create", "--email", email, "--role", "admin", "--password-stdin", stdin="another password\n"
    )
    assert again.returncode != 0
    assert "exists already" in again.stderr
    conn = await asyncpg.connect(database_url)
    try:
        kept = await conn.fetchrow("SELECT role, password_hash FROM admin_users WHERE email = $1", email.lower())
    finally:
        await conn.close()
    assert kept["role"] == "campaign_manager"
    assert kept["password_hash"] == row["password_hash"]


async def test_user_create_refuses_a_short_password(cli_env: dict[str, str], database_url: str) -> None:
    email = f"short-{uuid.uuid4().hex[:10]}@example.com"
    result = await marquee(
        {**cli_env, "MARQUEE_DATABASE_URL": database_url},
        "user", "create", "--email", email, "--role", "analyst", "--password-stdin",
        stdin="123456789\n",
    )  # fmt: skip
    assert result.returncode != 0
    assert "at least 10 characters" in result.stderr

    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM admin_users WHERE email = $1", email) == 0
    finally:
        await conn.close()


async def test_secrets_key_prints_a_key_that_seals_provider_secrets(cli_env: dict[str, str]) -> None:
    from core.secretbox import SecretsUnreadable, seal, unseal

    first, second = [await marquee(cli_env, "secrets-key") for _ in range(2)]
    assert first.returncode == 0, first.stderr
    key = first.stdout.strip().encode()
    assert key != second.stdout.strip().encode()  # a new key each time
    sealed = seal(key, {"password": "hunter2hunter2"})
    assert sealed is not None
    assert "hunter2" not in sealed
    assert unseal(key, sealed) == {"password": "hunter2hunter2"}
    with pytest.raises(SecretsUnreadable):
        unseal(second.stdout.strip().encode(), sealed)
