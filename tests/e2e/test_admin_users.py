"""Admin users as services.admin_users and `marquee user ...` manage them, against PostgreSQL;
the login throttle's counts in Redis, shared by two throttles as by two API processes."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from admin.login_throttle import LoginThrottle
from core.auth import Principal, Role, password_needs_rehash, verify_password
from core.errors import Conflict, Invalid
from core.models import AdminUser, AuditEntry
from services import admin_users
from services.audit import ReasonRequired
from tests.e2e import test_cli
from tests.e2e.test_cli import marquee

users = AdminUser.__table__  # type: ignore[attr-defined]
audit_log = AuditEntry.__table__  # type: ignore[attr-defined]
cli_env = test_cli.cli_env
ACTOR = Principal(subject="ops@example.com", role=Role.admin)


def _email(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"


async def test_the_last_active_admin_stays_and_changes_need_reasons(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.begin()  # rolled back at the end: the other tests' admins are only paused here
        await conn.execute(users.update().where(users.c.role == "admin").values(is_active=False))
        first = await admin_users.create(conn, _email("first"), "a long password", Role.admin, ACTOR)
        second = await admin_users.create(conn, _email("second"), "a long password", "admin", ACTOR)

        with pytest.raises(ReasonRequired):
            await admin_users.set_role(conn, ACTOR, second, Role.analyst, "  ")
        with pytest.raises(ReasonRequired):
            await admin_users.set_active(conn, ACTOR, second, False, None)
        with pytest.raises(Invalid, match="role"):
            await admin_users.set_role(conn, ACTOR, second, Role.service, "a backend")
        assert (await admin_users.set_role(conn, ACTOR, second, Role.analyst, "moved to reporting")).role == "analyst"
        with pytest.raises(Conflict, match="last active admin"):
            await admin_users.set_role(conn, ACTOR, first, Role.analyst, "stepping back")
        with pytest.raises(Conflict, match="last active admin"):
            await admin_users.set_active(conn, ACTOR, first, False, "leaving")
        # Another admin again: now the first may go.
        await admin_users.set_role(conn, ACTOR, second, Role.admin, "back to admin")
        assert not (await admin_users.set_active(conn, ACTOR, first, False, "leaving")).is_active
        assert await admin_users.session_user(conn, first) is None

        rows = (
            await conn.execute(
                sa.select(audit_log.c.action, audit_log.c.entity_id, audit_log.c.reason, audit_log.c.changes)
                .where(audit_log.c.entity == "admin_user", audit_log.c.entity_id.in_([str(first), str(second)]))
                .order_by(audit_log.c.id)
            )
        ).all()
        assert [(row.action, int(row.entity_id), row.reason) for row in rows] == [
            ("admin_user.create", first, None),
            ("admin_user.create", second, None),
            ("admin_user.set_role", second, "moved to reporting"),
            ("admin_user.set_role", second, "back to admin"),
            ("admin_user.deactivate", first, "leaving"),
        ]
        assert rows[2].changes == {"role": {"before": "admin", "after": "analyst"}}
        await conn.rollback()


async def test_an_older_scrypt_hash_verifies_and_is_upgraded_at_sign_in(engine: AsyncEngine) -> None:
    email, password = _email("old-hash"), "a long password"
    salt = secrets.token_bytes(16)
    old = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)  # the parameters Marquee used before
    stored = f"scrypt${2**14}$8$1${salt.hex()}${old.hex()}"
    assert password_needs_rehash(stored)
    async with engine.begin() as conn:
        await conn.execute(users.insert().values(email=email, password_hash=stored, role="analyst"))
    try:
        async with engine.begin() as conn:
            assert await admin_users.authenticate(conn, email, "not the password") is None
            signed_in = await admin_users.authenticate(conn, email, password)
        assert signed_in is not None
        async with engine.connect() as conn:
            upgraded = str(await conn.scalar(sa.select(users.c.password_hash).where(users.c.email == email)))
        assert upgraded != stored
        assert not password_needs_rehash(upgraded)
        assert verify_password(password, upgraded)
        assert signed_in.stamp == admin_users.password_stamp(upgraded)
    finally:
        async with engine.begin() as conn:
            await conn.execute(users.delete().where(users.c.email == email))


async def test_marquee_user_subcommands(cli_env: dict[str, str], database_url: str, engine: AsyncEngine) -> None:
    env = {**cli_env, "MARQUEE_DATABASE_URL": database_url}
    email, password = _email("cli"), "first password"
    created = await marquee(env, "user", "create", "--email", email, "--role", "analyst", "--password-stdin",
                            stdin=password + "\n")  # fmt: skip
    assert created.returncode == 0, created.stderr
    try:
        listed = await marquee(env, "user", "list")
        assert f"{email}\tanalyst\tactive" in listed.stdout.splitlines()

        no_reason = await marquee(env, "user", "set-role", email, "campaign_manager")
        assert no_reason.returncode != 0
        assert "--reason" in no_reason.stderr
        role = await marquee(env, "user", "set-role", email, "campaign_manager", "--reason", "runs campaigns now")
        assert role.returncode == 0, role.stderr
        assert role.stdout.strip() == f"{email} is now campaign_manager"

        off = await marquee(env, "user", "deactivate", email, "--reason", "on leave")
        assert off.returncode == 0, off.stderr
        on = await marquee(env, "user", "activate", email)
        assert on.returncode == 0, on.stderr
        new = await marquee(env, "user", "reset-password", email, "--password-stdin", stdin="second password\n")
        assert new.returncode == 0, new.stderr
        short = await marquee(env, "user", "reset-password", email, "--password-stdin", stdin="short\n")
        assert short.returncode != 0
        assert "at least 10 characters" in short.stderr
        missing = await marquee(env, "user", "deactivate", "nobody@example.com", "--reason", "gone")
        assert missing.returncode != 0
        assert "no admin user" in missing.stderr

        async with engine.begin() as conn:
            assert await admin_users.authenticate(conn, email, "second password") is not None
            assert await admin_users.authenticate(conn, email, password) is None
            user_id = await admin_users.user_id_for(conn, email)
            trail = (
                await conn.execute(
                    sa.select(audit_log.c.action, audit_log.c.actor, audit_log.c.reason)
                    .where(audit_log.c.entity == "admin_user", audit_log.c.entity_id == str(user_id))
                    .order_by(audit_log.c.id)
                )
            ).all()
        actor = trail[0].actor
        assert actor.startswith("cli:")
        assert [tuple(row) for row in trail] == [
            ("admin_user.create", actor, None),
            ("admin_user.set_role", actor, "runs campaigns now"),
            ("admin_user.deactivate", actor, "on leave"),
            ("admin_user.activate", actor, None),
            ("admin_user.reset_password", actor, None),
        ]
    finally:
        async with engine.begin() as conn:
            await conn.execute(users.delete().where(users.c.email == email))


@pytest.mark.parametrize("storage", ["memory://", "redis://127.0.0.1:6379/0"])
async def test_the_login_throttle_counts_failures_per_account_and_address(storage: str) -> None:
    # Keys of this test alone (they expire with the window; nothing else in Redis is touched).
    account, address, run = _email("throttle"), f"test-address-{uuid.uuid4().hex}", uuid.uuid4().hex
    throttle = LoginThrottle(storage, per_account="3/15 minutes", per_address="5/15 minutes", failure_delay=0)
    # A second process (Redis shares the count; memory does not).
    other = LoginThrottle(storage, per_account="3/15 minutes", per_address="5/15 minutes", failure_delay=0)
    shared = storage.startswith("redis")
    first_failure = time.time()  # the 15 minutes run from the oldest failure (a moving window)
    for _ in range(2):
        assert await throttle.retry_after(account, address) is None
        await throttle.failed(account, address)
    await (other if shared else throttle).failed(account.upper(), address)  # the same account
    wait = await throttle.retry_after(account, address)
    assert wait is not None
    assert 15 * 60 - (time.time() - first_failure) - 1 <= wait <= 15 * 60
    assert (await other.retry_after(account, address) is not None) is shared
    # The address has failed 3 times of 5: another account from it may still try, twice.
    elsewhere = _email("elsewhere")
    assert await throttle.retry_after(elsewhere, address) is None
    await throttle.failed(elsewhere, address)
    await throttle.failed(_email("third"), address)
    assert await throttle.retry_after(_email("fourth"), address) is not None
    assert await throttle.retry_after(_email("fourth"), f"test-address-{run}") is None
