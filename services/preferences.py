"""Whether a recipient wants a category on a channel, and when quiet hours end.

Preferences are rows (category or "*", channel or "*", enabled). The most specific row
wins: (category, channel) over (category, *) over (*, channel) over (*, *); no row means
yes. A recipient's `opted_out_channels` count as (*, channel, no). Transactional
categories (password resets, security) ignore the "*" rows, the marketing-wide opt-outs,
but still honour an opt-out of that very category.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from core.clock import window_state
from core.models import RecipientPreference, Suppression

ALL = "*"
preferences = RecipientPreference.__table__  # type: ignore[attr-defined]
suppressions = Suppression.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Preference:
    category: str
    channel: str
    enabled: bool


def wants(
    rows: Iterable[Preference],
    *,
    category: str,
    channel: str,
    transactional: bool,
    opted_out_channels: Collection[str] = (),
) -> bool:
    candidates = [*rows, *(Preference(ALL, ch, False) for ch in opted_out_channels)]
    best: tuple[int, bool] | None = None
    for row in candidates:
        if row.category not in (category, ALL) or row.channel not in (channel, ALL):
            continue
        if transactional and row.category == ALL:
            continue
        rank = (2 if row.category != ALL else 0) + (1 if row.channel != ALL else 0)
        if best is None or rank > best[0]:
            best = (rank, row.enabled)
    return True if best is None else best[1]


async def load(conn: AsyncConnection, recipient_ids: Collection[int]) -> dict[int, list[Preference]]:
    """Every preference row of these recipients, in one query."""
    found: dict[int, list[Preference]] = defaultdict(list)
    if recipient_ids:
        ids = sa.cast(list(recipient_ids), pg.ARRAY(sa.BigInteger))
        rows = await conn.execute(sa.select(preferences).where(preferences.c.recipient_id == sa.any_(ids)))
        for row in rows:
            found[row.recipient_id].append(Preference(row.category, row.channel, row.enabled))
    return found


async def suppressed(conn: AsyncConnection, pairs: Collection[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(channel, address) -> reason, for the pairs that are suppressed."""
    by_channel: dict[str, list[str]] = defaultdict(list)
    for channel, address in pairs:
        by_channel[channel].append(address)
    if not by_channel:
        return {}
    # One array parameter per channel: a batch's thousands of addresses in a statement
    # that compiles the same every time.
    rows = await conn.execute(
        sa.select(suppressions.c.channel, suppressions.c.address, suppressions.c.reason).where(
            sa.or_(
                *(
                    sa.and_(
                        suppressions.c.channel == channel,
                        suppressions.c.address == sa.any_(sa.cast(addresses, pg.ARRAY(sa.Text))),
                    )
                    for channel, addresses in by_channel.items()
                )
            )
        )
    )
    return {(row.channel, row.address): row.reason for row in rows}


def preferences_of(recipient_id: sa.ColumnElement[Any]) -> sa.ScalarSelect[Any]:
    """A recipient's preference rows as a JSON array of [category, channel, enabled], as a
    column of a query that reads the recipient (an instant notification's one read)."""
    rows = sa.func.json_agg(sa.func.json_build_array(preferences.c.category, preferences.c.channel,
                                                     preferences.c.enabled))  # fmt: skip
    found = sa.func.coalesce(rows, sa.literal_column("'[]'::json"), type_=sa.JSON)
    return sa.select(found).where(preferences.c.recipient_id == recipient_id).scalar_subquery()


def suppressions_of(
    email: sa.ColumnElement[Any], phone: sa.ColumnElement[Any], push_tokens: sa.ColumnElement[Any]
) -> sa.ScalarSelect[Any]:
    """The suppressed ones of a recipient's contacts as a JSON array of [channel, address,
    reason]: `suppressed` for every address the recipient has (a superset of what the
    channels asked for, keyed the same way)."""
    rows = sa.func.json_agg(sa.func.json_build_array(suppressions.c.channel, suppressions.c.address,
                                                     suppressions.c.reason))  # fmt: skip
    found = sa.func.coalesce(rows, sa.literal_column("'[]'::json"), type_=sa.JSON)
    contact = sa.or_(
        sa.and_(suppressions.c.channel == "email", suppressions.c.address == email),
        sa.and_(suppressions.c.channel == "sms", suppressions.c.address == phone),
        sa.and_(suppressions.c.channel == "push", suppressions.c.address == sa.any_(push_tokens)),
    )
    return sa.select(found).where(contact).scalar_subquery()


def quiet_until(now: datetime, zone: str, start: str | None, end: str | None) -> datetime | None:
    """The end of the recipient's quiet hours if `now` falls inside them, else None."""
    if not start or not end or start == end:
        return None
    state = window_state(now, start, end, zone)
    return state.until if state.open else None


def stored_address(channel: str, address: str) -> str:
    """An address as suppressions keep it: emails lower-case, as recipients' emails are."""
    return address.lower() if channel == "email" else address


async def suppress(conn: AsyncConnection, channel: str, address: str, reason: str, source: str) -> bool:
    """Never send to this address on this channel again; True if it was not suppressed yet."""
    inserted = await conn.scalar(
        insert(suppressions)
        .values(channel=channel, address=stored_address(channel, address), reason=reason[:1000], source=source)
        .on_conflict_do_nothing(index_elements=["channel", "address"])
        .returning(suppressions.c.address)
    )
    return inserted is not None


async def opt_out(conn: AsyncConnection, *, recipient_id: int, category: str, channel: str, source: str) -> None:
    """The recipient no longer wants `category` on `channel` (an unsubscribe, a complaint)."""
    statement = insert(preferences).values(
        recipient_id=recipient_id, category=category, channel=channel, enabled=False, source=source
    )
    await conn.execute(
        statement.on_conflict_do_update(
            index_elements=["recipient_id", "category", "channel"],
            set_={"enabled": False, "source": source, "updated_at": sa.func.now()},
        )
    )
