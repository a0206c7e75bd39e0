"""The recipient directory: contacts, locale, time zone and opt-outs per user."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response, status
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from api.deps import AnyRole, ConnectionDep, RecipientWriter
from api.problems import InvalidInput, Problem
from core.queries import recipients
from core.schemas import (
    BatchResult,
    PreferenceOut,
    PreferencesPut,
    RecipientBatch,
    RecipientFields,
    RecipientOut,
    RecipientUpsert,
    UserId,
)
from services.preferences import preferences

router = APIRouter(prefix="/v1/recipients", tags=["recipients"])

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


def _upsert(rows: list[dict[str, Any]]) -> sa.Insert:
    statement = insert(recipients).values(rows)
    return statement.on_conflict_do_update(
        index_elements=["user_id"],
        set_={**{name: statement.excluded[name] for name in _UPDATABLE}, "updated_at": sa.func.now()},
    ).returning(*recipients.c)


@router.post("", status_code=status.HTTP_200_OK, response_model=RecipientOut)
async def upsert_recipient(body: RecipientUpsert, conn: ConnectionDep, _: RecipientWriter) -> Any:
    """Create a recipient, or replace the one with this user_id."""
    row = (await conn.execute(_upsert([_row_values(body)]))).one()
    await conn.commit()
    return row._mapping


@router.put("/{user_id}", response_model=RecipientOut)
async def put_recipient(user_id: UserId, body: RecipientFields, conn: ConnectionDep, _: RecipientWriter) -> Any:
    values = _row_values(RecipientUpsert(user_id=user_id, **body.model_dump()))
    row = (await conn.execute(_upsert([values]))).one()
    await conn.commit()
    return row._mapping


@router.post("/batch", response_model=BatchResult)
async def upsert_recipients(body: RecipientBatch, conn: ConnectionDep, _: RecipientWriter) -> BatchResult:
    """Upsert up to 1,000 recipients in one statement: all of them or, on error, none."""
    by_user = {recipient.user_id: _row_values(recipient) for recipient in body.recipients}
    if len(by_user) != len(body.recipients):
        raise InvalidInput(["recipients"], "a user_id appears more than once in the batch")
    result = await conn.execute(_upsert(list(by_user.values())))
    await conn.commit()
    return BatchResult(upserted=len(result.all()))


@router.get("/{user_id}", response_model=RecipientOut)
async def get_recipient(user_id: str, conn: ConnectionDep, _: AnyRole) -> Any:
    row = (await conn.execute(sa.select(recipients).where(recipients.c.user_id == user_id))).first()
    if row is None:
        raise Problem(404, "Not found", f"no recipient with user_id {user_id!r}")
    return row._mapping


@router.get("/{user_id}/preferences", response_model=list[PreferenceOut])
async def get_preferences(user_id: str, conn: ConnectionDep, _: AnyRole) -> Any:
    """The recipient's opt-ins and opt-outs by category and channel ("*" = all)."""
    recipient_id = await _recipient_id(conn, user_id)
    rows = await conn.execute(
        sa.select(preferences)
        .where(preferences.c.recipient_id == recipient_id)
        .order_by(preferences.c.category, preferences.c.channel)
    )
    return [row._mapping for row in rows]


@router.put("/{user_id}/preferences", response_model=list[PreferenceOut])
async def put_preferences(user_id: str, body: PreferencesPut, conn: ConnectionDep, _: RecipientWriter) -> Any:
    """Set preferences (others stay as they are). The most specific one wins when sending."""
    recipient_id = await _recipient_id(conn, user_id)
    if body.preferences:
        statement = insert(preferences).values(
            [{"recipient_id": recipient_id, "source": "api", **item.model_dump()} for item in body.preferences]
        )
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=["recipient_id", "category", "channel"],
                set_={"enabled": statement.excluded.enabled, "source": "api", "updated_at": sa.func.now()},
            )
        )
    await conn.commit()
    return await get_preferences(user_id, conn, _)


@router.delete("/{user_id}/preferences/{category}/{channel}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_preference(
    user_id: str, category: str, channel: str, conn: ConnectionDep, _: RecipientWriter
) -> Response:
    recipient_id = await _recipient_id(conn, user_id)
    result = await conn.execute(
        sa.delete(preferences).where(
            preferences.c.recipient_id == recipient_id,
            preferences.c.category == category,
            preferences.c.channel == channel,
        )
    )
    await conn.commit()
    if result.rowcount == 0:
        raise Problem(404, "Not found", f"no preference for category {category!r} on channel {channel!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def _recipient_id(conn: AsyncConnection, user_id: str) -> int:
    found = await conn.scalar(sa.select(recipients.c.id).where(recipients.c.user_id == user_id))
    if found is None:
        raise Problem(404, "Not found", f"no recipient with user_id {user_id!r}")
    return int(found)


@router.delete("/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_recipient(user_id: str, conn: ConnectionDep, _: RecipientWriter) -> Response:
    result = await conn.execute(sa.delete(recipients).where(recipients.c.user_id == user_id))
    await conn.commit()
    if result.rowcount == 0:
        raise Problem(404, "Not found", f"no recipient with user_id {user_id!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
