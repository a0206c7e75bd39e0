"""Open and click tracking, and unsubscribe links: signed tokens and HTML instrumentation.

Every token is signed (HMAC-SHA256, itsdangerous) with `settings.signing_key("tracking")`
and a salt per purpose, so a token made for one purpose is worthless for another:

- a delivery token names one delivery: ("n", notification id, channel) for an instant
  notification, ("c", run id, recipient id, channel) for a campaign send;
- a click link carries the target URL and a signature of (delivery token, URL), so
  nobody can point a tracking link somewhere else; the redirect also checks the URL's
  host against the allow-list at click time: never an open redirect;
- an unsubscribe token names (user id, category).

Tokens do not expire: links in an email must work for as long as the email is kept.
"""

from __future__ import annotations

import functools
import hashlib
import html
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from itsdangerous import BadData, Signer, URLSafeSerializer

from core.config import Settings

# The classic 43-byte transparent 1x1 GIF.
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
OPEN_PATH = "/t/o/"
CLICK_PATH = "/t/c/"
UNSUBSCRIBE_PATH = "/u/"

_DELIVERY_SALT = "marquee.tracking.delivery"
_CLICK_SALT = "marquee.tracking.click"
_UNSUBSCRIBE_SALT = "marquee.unsubscribe"
_SIGNER_KWARGS: dict[str, Any] = {"digest_method": hashlib.sha256}


@dataclass(frozen=True)
class InstantDelivery:
    notification_id: uuid.UUID
    channel: str


@dataclass(frozen=True)
class CampaignSend:
    run_id: str
    recipient_id: int
    channel: str


TrackedDelivery = InstantDelivery | CampaignSend


def tracking_key(settings: Settings) -> bytes:
    return settings.signing_key("tracking")


@functools.lru_cache(maxsize=16)
def _serializer(key: bytes, salt: str) -> URLSafeSerializer:
    # Built once per key: a campaign signs two tokens for every message it sends.
    return URLSafeSerializer(key, salt=salt, signer_kwargs=_SIGNER_KWARGS)


def delivery_token(key: bytes, delivery: TrackedDelivery) -> str:
    """The token of the open pixel and click links of one delivery."""
    if isinstance(delivery, InstantDelivery):
        payload: list[Any] = ["n", delivery.notification_id.hex, delivery.channel]
    else:
        payload = ["c", delivery.run_id, delivery.recipient_id, delivery.channel]
    return str(_serializer(key, _DELIVERY_SALT).dumps(payload))


def read_delivery_token(key: bytes, token: str) -> TrackedDelivery | None:
    """The delivery a token names, or None if it is not a token we signed."""
    try:
        payload = _serializer(key, _DELIVERY_SALT).loads(token)
    except BadData:
        return None
    match payload:
        case ["n", str(notification_id), str(channel)]:
            try:
                return InstantDelivery(uuid.UUID(hex=notification_id), channel)
            except ValueError:
                return None
        case ["c", str(run_id), int(recipient_id), str(channel)]:
            return CampaignSend(run_id, recipient_id, channel)
    return None


@functools.lru_cache(maxsize=16)
def _click_signer(key: bytes) -> Signer:
    return Signer(key, salt=_CLICK_SALT, **_SIGNER_KWARGS)


def click_signature(key: bytes, token: str, url: str) -> str:
    # Tokens are URL-safe base64 and dots: a newline cannot occur in one, so the pair is unambiguous.
    return _click_signer(key).get_signature(f"{token}\n{url}").decode()


def click_signature_valid(key: bytes, token: str, url: str, signature: str) -> bool:
    return _click_signer(key).verify_signature(f"{token}\n{url}", signature)


def allowed_hosts(settings: Settings) -> list[str]:
    """Hosts click tracking may redirect to: the configured ones and the public URL's own."""
    own = urlsplit(settings.public_url).hostname
    return [*settings.tracking_allowed_hosts, *([own] if own else [])]


def host_allowed(host: str | None, allowed: Collection[str]) -> bool:
    """Exact host names; "*.example.com" allows every subdomain of example.com (not itself)."""
    if not host:
        return False
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.strip().lower().rstrip(".")
        if entry.startswith("*.") and host.endswith(entry[1:]) and len(host) > len(entry) - 1:
            return True
        if host == entry:
            return True
    return False


# Backslashes, spaces and control characters (up to U+0020, and U+007F).
_AMBIGUOUS_IN_URL = re.compile(r"[\x00-\x20\x7f\\]")


def redirect_target_host(url: str) -> str | None:
    """The host a browser would go to for `url`, or None unless it is a plain http(s) URL.

    URLs with backslashes, spaces or control characters are refused: browsers and
    urllib disagree about where those lead ("https://evil.example\\@good.example/")."""
    if _AMBIGUOUS_IN_URL.search(url):
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not host:
        return None
    return host


def click_url(key: bytes, base_url: str, token: str, url: str) -> str:
    return f"{base_url}{CLICK_PATH}{token}?u={_quoted(url)}&s={click_signature(key, token, url)}"


@functools.lru_cache(maxsize=4096)
def _quoted(url: str) -> str:
    # A campaign's messages carry the same few links: each is quoted once.
    return quote(url, safe="")


def open_pixel_url(base_url: str, token: str) -> str:
    return f"{base_url}{OPEN_PATH}{token}.gif"


# Where the <a> start tags of a document are, as the HTML tokenizer (WHATWG HTML,
# "Tokenization") reads it, reduced to what that needs: text, comments, bogus comments and
# declarations, end tags, elements whose content is text (script, style, title, textarea...)
# and other start tags, whose quoted attribute values may hold "<" and ">". A construct left
# open runs to the end of the document, as in the tokenizer. One match skips everything up to
# the next <a> start tag inside the regex engine: html.parser makes Python calls for every
# tag and text run, which cost more CPU than anything else in a campaign message.
# Possessive repeats: the text is read one way only, nothing backtracks. (No capturing group
# inside them: Python 3.11's re raises SystemError on those.)
_NAME_END = r"[\t\n\f\r />]"
_TAG_REST = r"""
    [^\t\n\f\r />]*+
    (?: [\t\n\f\r /]++
      | =?[^\t\n\f\r />=]*+
        (?: [\t\n\f\r ]*+ = [\t\n\f\r ]*+ (?: "[^"]*+"? | '[^']*+'? | [^\t\n\f\r >]*+ ) )?+
    )*+
"""
_TEXT_ELEMENTS = ("script", "style", "xmp", "iframe", "noembed", "noframes", "title", "textarea")
_NOT_AN_ANCHOR = "|".join(
    [
        r"[^<]++",
        r"<!-- (?: -?> | (?:[^-]++|-(?!-!?>))*+ (?:--!?>)? )",
        r"<[!?][^>]*+>?",
        rf"</[a-z]{_TAG_REST}>?",
        r"</[^>]*+>?",
        *(rf"<{name}(?={_NAME_END}){_TAG_REST}>? (?:[^<]++|<(?!/{name}{_NAME_END}))*+" for name in _TEXT_ELEMENTS),
        rf"<plaintext(?={_NAME_END}) .*",
        rf"<(?!a{_NAME_END})[a-z]{_TAG_REST}>?",
        rf"<a(?={_NAME_END}){_TAG_REST}\Z",  # never closed: not a tag
        r"<(?![a-z!/?])",  # a "<" that starts nothing is text
    ]
)
_NEXT_ANCHOR = re.compile(
    rf"(?:{_NOT_AN_ANCHOR})*+ (?P<anchor><a(?={_NAME_END}){_TAG_REST}>)",
    re.ASCII | re.IGNORECASE | re.DOTALL | re.VERBOSE,
)


def _anchor_tags(html_text: str) -> list[tuple[int, str]]:
    """(offset, source text) of every <a> start tag."""
    found = []
    position = 0
    while (match := _NEXT_ANCHOR.match(html_text, position)) is not None:
        found.append((match.start("anchor"), match.group("anchor")))
        position = match.end()
    return found


# One attribute of a start tag, as HTML tokenises it: name, then optionally = and a value
# (double-quoted, single-quoted or bare).
_ATTRIBUTE = re.compile(r"""[\s/]*(?P<name>[^\s/>"'=][^\s/>"'=]*)(?:\s*=\s*(?P<value>"[^"]*"|'[^']*'|[^\s>]*))?""")


@functools.lru_cache(maxsize=4096)  # the same <a> tags come back in every message of a template
def _href_span(tag: str) -> tuple[int, int, str] | None:
    """(start, end, unescaped value) of the first href attribute of a start tag."""
    position = 2  # after "<a"
    while True:
        match = _ATTRIBUTE.match(tag, position)
        if match is None or match.end() == position:
            return None
        value = match.group("value")
        if match.group("name").lower() == "href" and value is not None:
            raw = value[1:-1] if value[:1] in ("'", '"') else value
            return match.start("value"), match.end("value"), html.unescape(raw).strip()
        position = match.end()


def instrument_html(
    html_text: str,
    *,
    token: str,
    base_url: str,
    allowed_hosts: Collection[str],
    opens: bool,
    clicks: bool,
    key: bytes,
) -> str:
    """Route links to allowed hosts through the click redirect and add the open pixel.

    Only http(s) links whose host is allowed (`allowed_hosts` plus base_url's own host)
    are rewritten; mailto:, tel:, #anchors, other hosts and links already pointing at the
    unsubscribe or tracking paths stay as they are. `key` is `tracking_key(settings)`."""
    base_url = base_url.rstrip("/")
    hosts = (*allowed_hosts, *filter(None, [urlsplit(base_url).hostname]))
    result = html_text
    if clicks:
        result = _rewrite_links(result, token=token, base_url=base_url, hosts=hosts, key=key)
    if opens:
        pixel_src = open_pixel_url(base_url, token)
        if pixel_src not in result:
            pixel = f'<img src="{html.escape(pixel_src)}" width="1" height="1" alt="" style="display:none">'
            end = result.lower().rfind("</body>")
            result = result + pixel if end < 0 else result[:end] + pixel + result[end:]
    return result


def _rewrite_links(html_text: str, *, token: str, base_url: str, hosts: tuple[str, ...], key: bytes) -> str:
    untouched = tuple(f"{base_url}{path}" for path in (UNSUBSCRIBE_PATH, OPEN_PATH, CLICK_PATH))
    pieces: list[str] = []
    done = 0
    for start, tag in _anchor_tags(html_text):
        span = _href_span(tag)
        if span is None:
            continue
        value_start, value_end, url = span
        if not _tracked(url, untouched, hosts):
            continue
        tracked = html.escape(click_url(key, base_url, token, url), quote=True)
        pieces += [html_text[done : start + value_start], f'"{tracked}"']
        done = start + value_end
    pieces.append(html_text[done:])
    return "".join(pieces)


@functools.lru_cache(maxsize=4096)
def _tracked(url: str, untouched: tuple[str, ...], hosts: tuple[str, ...]) -> bool:
    """Whether a link goes through the click redirect: decided once per link, not per message."""
    return not url.startswith(untouched) and host_allowed(redirect_target_host(url), hosts)


def instrument_email(settings: Settings, html_text: str, delivery: TrackedDelivery) -> str:
    """instrument_html with everything taken from settings (open_tracking, click_tracking,
    tracking_allowed_hosts, public_url): what the send path calls for an email's HTML part."""
    if not (settings.open_tracking or settings.click_tracking):
        return html_text
    key = tracking_key(settings)
    return instrument_html(
        html_text,
        token=delivery_token(key, delivery),
        base_url=settings.public_url,
        allowed_hosts=settings.tracking_allowed_hosts,
        opens=settings.open_tracking,
        clicks=settings.click_tracking,
        key=key,
    )


# --- unsubscribe ----------------------------------------------------------------------------


def unsubscribe_token(settings: Settings, user_id: str, category: str) -> str:
    return str(_serializer(tracking_key(settings), _UNSUBSCRIBE_SALT).dumps([user_id, category]))


def read_unsubscribe_token(settings: Settings, token: str) -> tuple[str, str] | None:
    """(user id, category), or None if it is not an unsubscribe token we signed."""
    try:
        payload = _serializer(tracking_key(settings), _UNSUBSCRIBE_SALT).loads(token)
    except BadData:
        return None
    match payload:
        case [str(user_id), str(category)]:
            return user_id, category
    return None


def unsubscribe_url(settings: Settings, user_id: str, category: str) -> str:
    return f"{settings.public_url.rstrip('/')}{UNSUBSCRIBE_PATH}{unsubscribe_token(settings, user_id, category)}"


def list_unsubscribe_headers(settings: Settings, user_id: str, category: str) -> dict[str, str]:
    return unsubscribe_headers(unsubscribe_url(settings, user_id, category))


def unsubscribe_headers(url: str) -> dict[str, str]:
    """RFC 2369 List-Unsubscribe with RFC 8058 one-click: mail clients POST to the URL."""
    return {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
