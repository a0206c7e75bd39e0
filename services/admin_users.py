"""People who sign in to the admin panel: created, deactivated and reactivated, given another
role, given a new password (from the panel's Users page and `marquee user ...`), and checked
at login and on every request of their session.

Emails are kept lower-case and trimmed, as the login form reads them. Password hashing is
core.auth's. Every change is audited (entity "admin_user") in the caller's transaction; a
role change and a deactivation need a reason. There is always an active admin: the last one
can be neither deactivated nor given another role (Conflict). The caller commits.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from core.auth import Role, hash_password, password_needs_rehash, verify_password
from core.errors import Conflict, Invalid, NotFound
from core.models import AdminUser
from services import audit
from services.audit import Actor

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024  # scrypt reads all of it: no megabyte passwords
ENTITY = "admin_user"
admin_users = AdminUser.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SignedIn:
    """What the admin's session keeps of a user who signed in."""

    id: int
    email: str
    role: str  # a core.auth.Role value
    # Changes with the password: a session holding an older stamp is over (password_stamp).
    stamp: str


@dataclass(frozen=True)
class UserRow:
    id: int
    email: str
    role: str
    is_active: bool
    created_at: datetime


class UserNotFound(NotFound):
    pass


@functools.cache
def _unknown_user_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def _stored_email(email: str) -> str:
    return email.strip().lower()


def password_stamp(password_hash: str) -> str:
    """A short fingerprint of the stored hash for the session cookie (signed, not encrypted:
    it must not carry the hash itself)."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise Invalid.field("password", f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise Invalid.field("password", f"the password must have at most {MAX_PASSWORD_LENGTH} characters")


PERSON_ROLES = tuple(role for role in Role if role is not Role.service)  # service: other backends' tokens


def _role(value: str | Role) -> Role:
    if value not in {role.value for role in PERSON_ROLES}:
        raise Invalid.field("role", f"one of: {', '.join(role.value for role in PERSON_ROLES)}")
    return Role(value)


async def authenticate(conn: AsyncConnection, email: str, password: str) -> SignedIn | None:
    """The active user with this email and password; None for anything else, whichever it was.
    A hash made with older scrypt parameters is replaced by today's (the caller commits)."""
    user = (await conn.execute(sa.select(admin_users).where(admin_users.c.email == _stored_email(email)))).first()
    if user is None:
        verify_password(password, _unknown_user_hash())  # as slow as for a user: no telling who exists
        return None
    if not user.is_active or not verify_password(password, user.password_hash):
        return None
    password_hash = user.password_hash
    if password_needs_rehash(password_hash):
        password_hash = hash_password(password)
        await conn.execute(admin_users.update().where(admin_users.c.id == user.id).values(password_hash=password_hash))
    return SignedIn(id=user.id, email=user.email, role=user.role, stamp=password_stamp(password_hash))


async def session_user(conn: AsyncConnection, user_id: int) -> SignedIn | None:
    """The user a session belongs to as the database has them now; None once deactivated
    (or deleted). The admin checks this on every request."""
    user = (await conn.execute(sa.select(admin_users).where(admin_users.c.id == user_id))).first()
    if user is None or not user.is_active:
        return None
    return SignedIn(id=user.id, email=user.email, role=user.role, stamp=password_stamp(user.password_hash))


async def list_users(conn: AsyncConnection) -> list[UserRow]:
    columns = (admin_users.c.id, admin_users.c.email, admin_users.c.role, admin_users.c.is_active,
               admin_users.c.created_at)  # fmt: skip
    rows = await conn.execute(sa.select(*columns).order_by(admin_users.c.email))
    return [UserRow(*row) for row in rows]


async def get_user(conn: AsyncConnection, user_id: int) -> UserRow:
    columns = (admin_users.c.id, admin_users.c.email, admin_users.c.role, admin_users.c.is_active,
               admin_users.c.created_at)  # fmt: skip
    row = (await conn.execute(sa.select(*columns).where(admin_users.c.id == user_id))).first()
    if row is None:
        raise UserNotFound(f"no admin user {user_id}")
    return UserRow(*row)


async def user_id_for(conn: AsyncConnection, email: str) -> int:
    found = await conn.scalar(sa.select(admin_users.c.id).where(admin_users.c.email == _stored_email(email)))
    if found is None:
        raise UserNotFound(f"no admin user {_stored_email(email)!r}")
    return int(found)


async def create(conn: AsyncConnection, email: str, password: str, role: Role | str, actor: Actor | None = None) -> int:
    """A new active user, its id; Invalid for a bad email, role or password, Conflict if the
    email has a user already. Audited when an actor is given."""
    stored = _stored_email(email)
    problems: list[tuple[str, str]] = []
    local, _, domain = stored.partition("@")
    if not local or "." not in domain or any(char.isspace() for char in stored) or len(stored) > 254:
        problems.append(("email", "an email address such as name@example.com"))
    try:
        role = _role(role)
    except Invalid as err:
        problems.extend(err.problems)
    try:
        _check_password(password)
    except Invalid as err:
        problems.extend(err.problems)
    if problems:
        raise Invalid(problems)
    assert isinstance(role, Role)
    inserted = await conn.scalar(
        insert(admin_users)
        .values(email=stored, password_hash=hash_password(password), role=role.value)
        .on_conflict_do_nothing(index_elements=["email"])
        .returning(admin_users.c.id)
    )
    if inserted is None:
        raise Conflict(f"a user {stored!r} exists already")
    created = {"email": stored, "role": role.value, "is_active": True}
    await audit.record_action(conn, actor, "admin_user.create", ENTITY, inserted, {"email": stored},
                              changes=audit.diff(None, created))  # fmt: skip
    return int(inserted)


async def _locked(conn: AsyncConnection, user_id: int) -> sa.Row[tuple[int, str, str, bool]]:
    row = (
        await conn.execute(
            sa.select(admin_users.c.id, admin_users.c.email, admin_users.c.role, admin_users.c.is_active)
            .where(admin_users.c.id == user_id)
            .with_for_update()
        )
    ).first()
    if row is None:
        raise UserNotFound(f"no admin user {user_id}")
    return row


async def _keep_an_admin(conn: AsyncConnection, user_id: int, what: str) -> None:
    """Conflict if `user_id` is the only active admin. The active admins' rows are locked, so
    two admins demoting each other at once cannot both succeed (the second re-reads)."""
    admins = (
        await conn.execute(
            sa.select(admin_users.c.id)
            .where(admin_users.c.role == Role.admin.value, admin_users.c.is_active)
            .with_for_update()
        )
    ).scalars()
    ids = set(admins)
    if ids == {user_id}:
        raise Conflict(f"{what}: this is the last active admin; make another user an admin first")


async def set_active(
    conn: AsyncConnection, actor: Actor | None, user_id: int, active: bool, reason: str | None = None
) -> UserRow:
    """Deactivate (a reason required; the user's sessions end at their next request) or
    reactivate a user. Doing what is already done changes and audits nothing."""
    why = audit.required_reason(reason) if not active else (reason or "").strip() or None
    user = await _locked(conn, user_id)
    if user.is_active != active:
        if not active and user.role == Role.admin.value:
            await _keep_an_admin(conn, user_id, "cannot deactivate")
        await conn.execute(admin_users.update().where(admin_users.c.id == user_id).values(is_active=active))
        await audit.record_action(conn, actor, "admin_user.activate" if active else "admin_user.deactivate", ENTITY,
                                  user_id, {"email": user.email}, reason=why,
                                  changes=audit.diff({"is_active": user.is_active}, {"is_active": active}))  # fmt: skip
    return await get_user(conn, user_id)


async def set_role(
    conn: AsyncConnection, actor: Actor | None, user_id: int, role: Role | str, reason: str | None
) -> UserRow:
    """Give a user another role (a reason required); it applies from their next request."""
    new_role = _role(role)
    why = audit.required_reason(reason)
    user = await _locked(conn, user_id)
    if user.role != new_role.value:
        if user.role == Role.admin.value and user.is_active:
            await _keep_an_admin(conn, user_id, "cannot change the role")
        await conn.execute(admin_users.update().where(admin_users.c.id == user_id).values(role=new_role.value))
        changes = audit.diff({"role": user.role}, {"role": new_role.value})
        await audit.record_action(conn, actor, "admin_user.set_role", ENTITY, user_id, {"email": user.email},
                                  reason=why, changes=changes)  # fmt: skip
    return await get_user(conn, user_id)


async def reset_password(conn: AsyncConnection, actor: Actor | None, user_id: int, password: str) -> UserRow:
    """A new password; the user's sessions signed in with the old one end at their next request.
    The audit row says that it changed, never what to."""
    _check_password(password)
    user = await _locked(conn, user_id)
    await conn.execute(
        admin_users.update().where(admin_users.c.id == user_id).values(password_hash=hash_password(password))
    )
    await audit.record_action(conn, actor, "admin_user.reset_password", ENTITY, user_id, {"email": user.email})
    return await get_user(conn, user_id)
