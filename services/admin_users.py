"""People who sign in to the admin panel: created by `marquee user create`, checked at login.

Emails are kept lower-case and trimmed, as the login form reads them. Password hashing is
core.auth's. The caller commits.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from core.auth import Role, hash_password, verify_password
from core.errors import Conflict, Invalid
from core.models import AdminUser

MIN_PASSWORD_LENGTH = 10
admin_users = AdminUser.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SignedIn:
    """What the admin's session keeps of a user who signed in."""

    id: int
    email: str
    role: str  # a core.auth.Role value


def _stored_email(email: str) -> str:
    return email.strip().lower()


async def authenticate(conn: AsyncConnection, email: str, password: str) -> SignedIn | None:
    """The active user with this email and password; None for anything else, whichever it was."""
    user = (await conn.execute(sa.select(admin_users).where(admin_users.c.email == _stored_email(email)))).first()
    if user is None or not user.is_active or not verify_password(password, user.password_hash):
        return None
    return SignedIn(id=user.id, email=user.email, role=user.role)


async def create(conn: AsyncConnection, email: str, password: str, role: Role) -> None:
    """A new active user; Invalid for a short password, Conflict if the email has a user already."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise Invalid.field("password", f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    inserted = await conn.scalar(
        insert(admin_users)
        .values(email=_stored_email(email), password_hash=hash_password(password), role=role.value)
        .on_conflict_do_nothing(index_elements=["email"])
        .returning(admin_users.c.id)
    )
    if inserted is None:
        raise Conflict(f"a user {email!r} exists already")
