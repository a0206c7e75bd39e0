"""Open pixel, click redirect and unsubscribe links: instrument_html on its own, then the
endpoints over HTTP against real deliveries."""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from core import tracking
from core.config import Settings
from core.tracking import CampaignSend, InstantDelivery
from services.preferences import preferences
from tests.e2e.test_webhooks import campaign_row, delivery, make_campaign_delivery, recipient_id, send

KEY = b"k" * 32
BASE = "https://mail.example.org"
TOKEN = tracking.delivery_token(KEY, InstantDelivery(uuid.UUID(int=7), "email"))


def instrument(
    text: str, *, hosts: tuple[str, ...] = ("shop.example.com",), opens: bool = True, clicks: bool = True
) -> str:
    return tracking.instrument_html(
        text, token=TOKEN, base_url=BASE, allowed_hosts=hosts, opens=opens, clicks=clicks, key=KEY
    )


def hrefs(text: str) -> list[str]:
    return [html.unescape(value) for value in re.findall(r'(?<![\w-])href\s*=\s*"([^"]*)"', text, re.IGNORECASE)]


def target_of(link: str) -> str:
    """The destination a click link redirects to, after checking its signature."""
    parts = urlsplit(link)
    assert f"{parts.scheme}://{parts.netloc}" == BASE
    token = parts.path.removeprefix(tracking.CLICK_PATH)
    query = parse_qs(parts.query)
    [url], [signature] = query["u"], query["s"]
    assert tracking.click_signature_valid(KEY, token, url, signature)
    return url


# --- instrument_html ------------------------------------------------------------------------


def test_links_to_allowed_hosts_go_through_the_click_redirect() -> None:
    out = instrument('<p><a href="https://shop.example.com/sale?x=1&amp;y=2#top">Sale</a></p>')
    [link] = hrefs(out)
    assert link.startswith(f"{BASE}/t/c/{TOKEN}?u=")
    assert target_of(link) == "https://shop.example.com/sale?x=1&y=2#top"  # entities decoded once
    assert "&amp;s=" in out  # the new URL is escaped for HTML


def test_links_elsewhere_are_left_alone() -> None:
    source = (
        '<a href="https://evil.example.net/x">other host</a>'
        '<a href="mailto:help@shop.example.com">mail</a>'
        '<a href="tel:+15551234567">call</a>'
        '<a href="#section">anchor</a>'
        '<a href="ftp://shop.example.com/file">ftp</a>'
        '<a href="https://evil.example.net\\@shop.example.com/">backslash trick</a>'
        '<a name="no-href">no href</a>'
        f'<a href="{BASE}/u/abc">unsubscribe</a>'
        '<!-- <a href="https://shop.example.com/in-comment">x</a> -->'
        "<script>var s = \"<a href='https://shop.example.com/in-script'>\";</script>"
    )
    assert instrument(source, opens=False) == source


def test_quotes_case_and_attribute_order() -> None:
    source = (
        "<A title='a > b' HREF='https://shop.example.com/single'>1</A>"
        '<a data-href="https://shop.example.com/not-this" href=https://shop.example.com/bare>2</a>'
        '<a\n  class="btn"\n  href = "https://SHOP.example.com/spaced" >3</a>'
        f'<a href="{BASE}/landing">own host</a>'
    )
    out = instrument(source, opens=False)
    targets = [target_of(link) for link in hrefs(out)]
    assert targets == [
        "https://shop.example.com/single",
        "https://shop.example.com/bare",
        "https://SHOP.example.com/spaced",
        f"{BASE}/landing",
    ]
    assert "title='a > b'" in out
    assert 'data-href="https://shop.example.com/not-this"' in out
    assert ">1</A>" in out
    assert 'class="btn"' in out


def test_wildcard_hosts_cover_subdomains_only() -> None:
    out = instrument(
        '<a href="https://m.shop.example.com/a">sub</a><a href="https://shop.example.com/b">apex</a>',
        hosts=("*.shop.example.com",),
        opens=False,
    )
    assert [link.startswith(BASE) for link in hrefs(out)] == [True, False]


def test_open_pixel_goes_before_body_end_or_at_the_end() -> None:
    pixel = f'<img src="{BASE}/t/o/{TOKEN}.gif" width="1" height="1" alt="" style="display:none">'
    assert instrument("<html><body><p>Hi</p></BODY></html>") == f"<html><body><p>Hi</p>{pixel}</BODY></html>"
    assert instrument("<p>Hi</p>") == f"<p>Hi</p>{pixel}"
    assert instrument("<p>Hi</p>", opens=False) == "<p>Hi</p>"
    # Instrumenting twice changes nothing more.
    once = instrument('<body><a href="https://shop.example.com/">x</a></body>')
    assert instrument(once) == once


def test_clicks_off_leaves_links() -> None:
    source = '<a href="https://shop.example.com/">x</a>'
    assert instrument(source, clicks=False, opens=False) == source


def test_tokens_and_signatures() -> None:
    instant = InstantDelivery(uuid.uuid4(), "email")
    campaign = CampaignSend("campaign-abc-run-1", 42, "email")
    assert tracking.read_delivery_token(KEY, tracking.delivery_token(KEY, instant)) == instant
    assert tracking.read_delivery_token(KEY, tracking.delivery_token(KEY, campaign)) == campaign
    token = tracking.delivery_token(KEY, instant)
    assert tracking.read_delivery_token(b"x" * 32, token) is None
    assert tracking.read_delivery_token(KEY, token[:-2] + ("AA" if not token.endswith("AA") else "BB")) is None
    signature = tracking.click_signature(KEY, token, "https://a.example/")
    assert tracking.click_signature_valid(KEY, token, "https://a.example/", signature)
    assert not tracking.click_signature_valid(KEY, token, "https://b.example/", signature)


def test_unsubscribe_tokens_are_not_delivery_tokens(settings: Settings) -> None:
    token = tracking.unsubscribe_token(settings, "user-1", "promo")
    assert tracking.read_unsubscribe_token(settings, token) == ("user-1", "promo")
    assert tracking.read_delivery_token(tracking.tracking_key(settings), token) is None
    headers = tracking.list_unsubscribe_headers(settings, "user-1", "promo")
    assert headers == {
        "List-Unsubscribe": f"<{settings.public_url}/u/{token}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


# --- endpoints ------------------------------------------------------------------------------


@pytest.fixture
async def public(api_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client without a bearer token, as mail clients and browsers call."""
    async with httpx.AsyncClient(base_url=api_url, timeout=30, follow_redirects=False) as client:
        yield client


@pytest.fixture
def key(settings: Settings) -> bytes:
    return tracking.tracking_key(settings)


async def test_open_pixel_marks_the_delivery_opened(
    api: httpx.AsyncClient, public: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, key: bytes
) -> None:
    sent = await send(api, recipient, "email")
    token = tracking.delivery_token(key, InstantDelivery(uuid.UUID(sent["notification_id"]), "email"))
    response = await public.get(f"/t/o/{token}.gif")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/gif"
    assert "no-store" in response.headers["cache-control"]
    assert response.content == tracking.PIXEL_GIF
    assert len(response.content) == 43
    assert response.content.startswith(b"GIF89a")

    row = await delivery(engine, sent["notification_id"], "email")
    assert (row.status, row.opened_at is not None) == ("opened", True)
    assert (await api.get(f"/v1/notifications/{sent['notification_id']}")).json()["status"] == "opened"


async def test_bad_pixel_token_gets_the_gif_and_changes_nothing(
    api: httpx.AsyncClient, public: httpx.AsyncClient, recipient: dict, engine: AsyncEngine
) -> None:
    sent = await send(api, recipient, "email")
    forged = tracking.delivery_token(b"not-our-key" * 3, InstantDelivery(uuid.UUID(sent["notification_id"]), "email"))
    for token in (forged, "garbage"):
        response = await public.get(f"/t/o/{token}.gif")
        assert (response.status_code, response.content) == (200, tracking.PIXEL_GIF)
    assert (await delivery(engine, sent["notification_id"], "email")).status == "sent"


async def test_click_redirects_and_marks_clicked(
    api: httpx.AsyncClient,
    public: httpx.AsyncClient,
    api_url: str,
    recipient: dict,
    engine: AsyncEngine,
    key: bytes,
) -> None:
    sent = await send(api, recipient, "email")
    token = tracking.delivery_token(key, InstantDelivery(uuid.UUID(sent["notification_id"]), "email"))
    target = f"{api_url}/healthz?from=mail&x=a%20b"
    # The link as the instrumented email carries it (the app's public URL is api_url).
    [link] = hrefs(
        tracking.instrument_html(
            f'<a href="{html.escape(target)}">go</a>',
            token=token,
            base_url=api_url,
            allowed_hosts=[],
            opens=False,
            clicks=True,
            key=key,
        )
    )
    response = await public.get(link)
    assert response.status_code == 302, response.text
    assert response.headers["location"] == target

    row = await delivery(engine, sent["notification_id"], "email")
    assert row.status == "clicked"
    assert row.clicked_at is not None
    assert row.opened_at is not None  # a click implies an open
    assert (await api.get(f"/v1/notifications/{sent['notification_id']}")).json()["status"] == "clicked"


async def test_tampered_or_disallowed_click_links_are_400(
    api: httpx.AsyncClient,
    public: httpx.AsyncClient,
    api_url: str,
    recipient: dict,
    engine: AsyncEngine,
    key: bytes,
) -> None:
    sent = await send(api, recipient, "email")
    token = tracking.delivery_token(key, InstantDelivery(uuid.UUID(sent["notification_id"]), "email"))
    target = f"{api_url}/healthz"
    signature = tracking.click_signature(key, token, target)
    evil = "https://evil.example.net/phish"
    attempts: dict[str, dict[str, Any]] = {
        "other url, same signature": {"u": evil, "s": signature},
        "other signature": {"u": target, "s": signature[:-3] + "abc"},
        "no signature": {"u": target},
        "no url": {"s": signature},
        # Correctly signed, but the host is not (or no longer) on the allow-list.
        "host not allowed": {"u": evil, "s": tracking.click_signature(key, token, evil)},
    }
    for label, params in attempts.items():
        response = await public.get(f"/t/c/{token}?{urlencode(params)}")
        assert response.status_code == 400, label
        assert response.headers["content-type"] == "application/problem+json", label
        assert "location" not in response.headers, label
    bad_token = await public.get(f"/t/c/garbage?{urlencode({'u': target, 's': signature})}")
    assert bad_token.status_code == 400
    assert (await delivery(engine, sent["notification_id"], "email")).status == "sent"


async def test_campaign_send_opened_through_the_pixel(
    public: httpx.AsyncClient, recipient: dict, engine: AsyncEngine, key: bytes
) -> None:
    run_id, row_id = await make_campaign_delivery(engine, await recipient_id(engine, recipient["user_id"]))
    rid = await recipient_id(engine, recipient["user_id"])
    token = tracking.delivery_token(key, CampaignSend(run_id, rid, "email"))
    assert (await public.get(f"/t/o/{token}.gif")).status_code == 200
    row = await campaign_row(engine, row_id)
    assert (row.status, row.opened_at is not None) == ("opened", True)


async def preference(engine: AsyncEngine, rid: int, category: str) -> Any:
    async with engine.connect() as conn:
        query = sa.select(preferences).where(
            preferences.c.recipient_id == rid, preferences.c.category == category, preferences.c.channel == "email"
        )
        return (await conn.execute(query)).first()


async def test_unsubscribe_page_then_button(
    public: httpx.AsyncClient, api_url: str, recipient: dict, engine: AsyncEngine, settings: Settings
) -> None:
    app_settings = settings.model_copy(update={"public_url": api_url})
    url = tracking.unsubscribe_url(app_settings, recipient["user_id"], "newsletter")
    assert url.startswith(f"{api_url}/u/")

    page = await public.get(url)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "Unsubscribe from newsletter emails?" in page.text
    assert '<form method="post">' in page.text
    rid = await recipient_id(engine, recipient["user_id"])
    assert await preference(engine, rid, "newsletter") is None  # a GET (link scanners) changes nothing

    done = await public.post(url)
    assert done.status_code == 200
    assert "You are unsubscribed" in done.text
    row = await preference(engine, rid, "newsletter")
    assert (row.enabled, row.source) == (False, "unsubscribe")


async def test_one_click_unsubscribe(
    public: httpx.AsyncClient, api_url: str, recipient: dict, engine: AsyncEngine, settings: Settings
) -> None:
    app_settings = settings.model_copy(update={"public_url": api_url})
    headers = tracking.list_unsubscribe_headers(app_settings, recipient["user_id"], "promo")
    url = headers["List-Unsubscribe"].strip("<>")
    # What a mail client does (RFC 8058): POST the List-Unsubscribe-Post value, form-encoded.
    response = await public.post(
        url,
        content=headers["List-Unsubscribe-Post"],
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    row = await preference(engine, await recipient_id(engine, recipient["user_id"]), "promo")
    assert (row.enabled, row.source) == (False, "unsubscribe")
    # Again (a client retrying): still fine.
    assert (await public.post(url, content=headers["List-Unsubscribe-Post"])).status_code == 200


async def test_bad_unsubscribe_token_is_400(public: httpx.AsyncClient, settings: Settings) -> None:
    delivery_token = tracking.delivery_token(tracking.tracking_key(settings), InstantDelivery(uuid.uuid4(), "email"))
    for token in ("garbage", delivery_token):
        assert (await public.get(f"/u/{token}")).status_code == 400
        assert (await public.post(f"/u/{token}", content="List-Unsubscribe=One-Click")).status_code == 400
