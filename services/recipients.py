"""The recipient directory: contacts, locale, time zone, quiet hours and preferences per
user, written by the cinema's services (role service) and read by everyone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import Invalid, NotFound
from core.queries import recipients
from core.schemas import PreferenceIn, RecipientUpsert
from services.audit import Actor, diff, record_action
from services.preferences import preferences

_UPDATABLE = (
    "name",
    "email",
    "phone",
    "push_tokens",
    "locale",
    "timezone",
    "country",
    "opted_out_channels",
    "quiet_hours_start",
    "quiet_hours_end",
    "attributes",
)


def _row_values(recipient: RecipientUpsert) -> dict[str, Any]:
    values = recipient.model_dump()
    values["opted_out_channels"] = [channel.value for channel in recipient.opted_out_channels]
    values["email"] = values["email"].lower() if values["email"] else None
    return values


async def upsert(conn: AsyncConnection, people: Sequence[RecipientUpsert]) -> list[sa.Row[Any]]:
    """Create or replace recipients by user_id in one statement: all of them or, on error,
    none. Commits."""
    by_user = {person.user_id: _row_values(person) for person in people}
    if len(by_user) != len(people):
        raise Invalid.field("recipients", "a user_id appears more than once in the batch")
    statement = insert(recipients).values(list(by_user.values()))
    rows = (
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=["user_id"],
                set_={**{name: statement.excluded[name] for name in _UPDATABLE}, "updated_at": sa.func.now()},
            ).returning(*recipients.c)
        )
    ).all()
    await conn.commit()
    return list(rows)


async def get(conn: AsyncConnection, user_id: str) -> sa.Row[Any]:
    row = (await conn.execute(sa.select(recipients).where(recipients.c.user_id == user_id))).first()
    if row is None:
        raise NotFound(f"no recipient with user_id {user_id!r}")
    return row


async def recipient_id(conn: AsyncConnection, user_id: str) -> int:
    found = await conn.scalar(sa.select(recipients.c.id).where(recipients.c.user_id == user_id))
    if found is None:
        raise NotFound(f"no recipient with user_id {user_id!r}")
    return int(found)


async def set_follows(conn: AsyncConnection, user_id: str, follows: Sequence[str]) -> list[str]:
    """Replace what the recipient follows (event rules address followers). Commits."""
    stored = await conn.scalar(
        sa.update(recipients)
        .where(recipients.c.user_id == user_id)
        .values(follows=sorted(set(follows)), updated_at=sa.func.now())
        .returning(recipients.c.follows)
    )
    if stored is None:
        raise NotFound(f"no recipient with user_id {user_id!r}")
    await conn.commit()
    return list(stored)


async def delete(conn: AsyncConnection, user_id: str, actor: Actor | None = None, reason: str | None = None) -> None:
    """Commits, with its audit row. The row names the user_id only: the append-only log keeps
    no contact details."""
    result = await conn.execute(sa.delete(recipients).where(recipients.c.user_id == user_id))
    if result.rowcount == 0:
        await conn.rollback()
        raise NotFound(f"no recipient with user_id {user_id!r}")
    await record_action(conn, actor, "recipient.delete", "recipient", user_id, reason=reason,
                        changes=diff({"exists": True}, {"exists": False}))  # fmt: skip
    await conn.commit()


async def preferences_of(conn: AsyncConnection, user_id: str) -> list[sa.Row[Any]]:
    """The recipient's opt-ins and opt-outs by category and channel ("*" = all)."""
    owner = await recipient_id(conn, user_id)
    rows = await conn.execute(
        sa.select(preferences)
        .where(preferences.c.recipient_id == owner)
        .order_by(preferences.c.category, preferences.c.channel)
    )
    return list(rows)


async def set_preferences(conn: AsyncConnection, user_id: str, items: Sequence[PreferenceIn]) -> None:
    """Set these preferences (others stay as they are). Commits."""
    owner = await recipient_id(conn, user_id)
    if items:
        statement = insert(preferences).values(
            [{"recipient_id": owner, "source": "api", **item.model_dump()} for item in items]
        )
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=["recipient_id", "category", "channel"],
                set_={"enabled": statement.excluded.enabled, "source": "api", "updated_at": sa.func.now()},
            )
        )
    await conn.commit()


async def delete_preference(conn: AsyncConnection, user_id: str, category: str, channel: str) -> None:
    """Commits."""
    owner = await recipient_id(conn, user_id)
    result = await conn.execute(
        sa.delete(preferences).where(
            preferences.c.recipient_id == owner, preferences.c.category == category, preferences.c.channel == channel
        )
    )
    await conn.commit()
    if result.rowcount == 0:
        raise NotFound(f"no preference for category {category!r} on channel {channel!r}")
