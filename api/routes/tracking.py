"""Open pixel, click redirect and unsubscribe pages: public, authenticated by signed tokens.

GET /t/o/{token}.gif  the open pixel (always the GIF, even for a bad token)
GET /t/c/{token}      the click redirect (302 only to a signed URL on an allowed host)
GET /u/{token}        "Unsubscribe from <category> emails?" with a button
POST /u/{token}       unsubscribe (the button, and RFC 8058 one-click from mail clients)
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy.ext.asyncio import AsyncConnection

from api.deps import ConnectionDep, SettingsDep
from api.problems import Problem
from core import tracking
from core.errors import NotFound
from core.tracking import InstantDelivery, TrackedDelivery
from services import delivery_events, preferences, recipients

router = APIRouter(tags=["tracking"])

NO_STORE = {"Cache-Control": "no-store, no-cache, must-revalidate, max-age=0", "Pragma": "no-cache"}


async def _advance(conn: AsyncConnection, delivery: TrackedDelivery, status: str) -> None:
    if isinstance(delivery, InstantDelivery):
        target = await delivery_events.find_instant(conn, delivery.notification_id, delivery.channel)
    else:
        target = await delivery_events.find_campaign(conn, delivery.run_id, delivery.recipient_id, delivery.channel)
    if target is not None:
        await delivery_events.advance(conn, target=target, status=status, at=datetime.now(UTC))
    await conn.commit()


@router.get(tracking.OPEN_PATH + "{token}.gif", response_class=Response, summary="Open pixel")
async def open_pixel(token: str, conn: ConnectionDep, settings: SettingsDep) -> Response:
    """A 1x1 transparent GIF; a valid token marks its delivery opened. A bad token gets
    the same GIF (the answer says nothing about a token's validity) and changes nothing."""
    delivery = tracking.read_delivery_token(tracking.tracking_key(settings), token)
    if delivery is not None:
        await _advance(conn, delivery, "opened")
    return Response(tracking.PIXEL_GIF, media_type="image/gif", headers=NO_STORE)


@router.get(
    tracking.CLICK_PATH + "{token}",
    status_code=302,
    response_class=RedirectResponse,
    summary="Click redirect",
    responses={400: {"description": "Tampered link, or a target host that is not allowed"}},
)
async def click(
    token: str, conn: ConnectionDep, settings: SettingsDep, u: str | None = None, s: str | None = None
) -> Any:
    """Record the click (a click implies an open) and redirect to `u`, only if `s` signs
    (token, u) and u's host is on the allow-list now: never an open redirect."""
    key = tracking.tracking_key(settings)
    delivery = tracking.read_delivery_token(key, token)
    if delivery is None or not u or not s or not tracking.click_signature_valid(key, token, u, s):
        raise Problem(400, "Invalid link", "this tracking link is damaged or was not made by us")
    if not tracking.host_allowed(tracking.redirect_target_host(u), tracking.allowed_hosts(settings)):
        raise Problem(400, "Invalid link", "the link's destination is not on the tracking allow-list")
    await _advance(conn, delivery, "clicked")
    return RedirectResponse(u, status_code=302, headers=NO_STORE)


def _page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#222}}
button{{font-size:1rem;padding:.6rem 1.2rem;border:1px solid #888;border-radius:.3rem;cursor:pointer}}</style>
</head><body><h1>{html.escape(title)}</h1>{body}</body></html>"""
    return HTMLResponse(document, status_code=status_code, headers=NO_STORE)


def _what(category: str) -> str:
    return "all" if category == "*" else category


# A person follows these links in a browser: a bad one is a page, not a problem document.
BAD_LINK_PAGE: dict[int | str, dict[str, Any]] = {
    400: {"description": "Damaged link, or not made by us", "content": {"text/html": {}}}
}


def _bad_unsubscribe_link() -> HTMLResponse:
    return _page("Invalid link", "<p>This unsubscribe link is damaged or was not made by us.</p>", 400)


@router.get(
    tracking.UNSUBSCRIBE_PATH + "{token}",
    response_class=HTMLResponse,
    summary="Unsubscribe page",
    responses=BAD_LINK_PAGE,
)
async def unsubscribe_page(token: str, settings: SettingsDep) -> HTMLResponse:
    """Asks first: link scanners fetch every URL of a mail, and a GET must not unsubscribe."""
    found = tracking.read_unsubscribe_token(settings, token)
    if found is None:
        return _bad_unsubscribe_link()
    _, category = found
    what = html.escape(_what(category))
    form = (
        f'<p>You will no longer receive {what} emails from us.</p><form method="post">'
        f'<button type="submit">Unsubscribe from {what} emails</button></form>'
    )
    return _page(f"Unsubscribe from {_what(category)} emails?", form)


@router.post(
    tracking.UNSUBSCRIBE_PATH + "{token}", response_class=HTMLResponse, summary="Unsubscribe", responses=BAD_LINK_PAGE
)
async def unsubscribe(token: str, conn: ConnectionDep, settings: SettingsDep) -> HTMLResponse:
    """The page's button and RFC 8058 one-click (a mail client POSTing
    `List-Unsubscribe=One-Click`) both land here; either way the recipient is opted out."""
    found = tracking.read_unsubscribe_token(settings, token)
    if found is None:
        return _bad_unsubscribe_link()
    user_id, category = found
    try:
        recipient_id = await recipients.recipient_id(conn, user_id)
    except NotFound:
        pass  # a recipient deleted since the mail was sent gets nothing anyway: confirm all the same
    else:
        await preferences.opt_out(
            conn, recipient_id=recipient_id, category=category, channel="email", source="unsubscribe"
        )
    await conn.commit()
    what = html.escape(_what(category))
    return _page("You are unsubscribed", f"<p>You will no longer receive {what} emails from us.</p>")
