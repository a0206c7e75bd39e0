"""The last touches on an email before it is sent: unsubscribe link and headers on
anything not transactional, then open and click tracking on the HTML part."""

from __future__ import annotations

import html as html_lib
from dataclasses import dataclass, field

from core.config import Settings
from core.tracking import TrackedDelivery, instrument_email, unsubscribe_headers, unsubscribe_url


@dataclass(frozen=True)
class FinishedEmail:
    text: str
    html: str | None
    headers: dict[str, str] = field(default_factory=dict)


def finish_email(
    settings: Settings, *, text: str, html: str | None, user_id: str, category: str, delivery: TrackedDelivery
) -> FinishedEmail:
    headers: dict[str, str] = {}
    if category not in settings.transactional_categories:
        url = unsubscribe_url(settings, user_id, category)
        # RFC 8058: mail clients show their own one-click button from these headers (the
        # link's URL: one signed token per message).
        headers = unsubscribe_headers(url)
        text = f"{text.rstrip()}\n\n--\nUnsubscribe from these emails: {url}\n"
        if html:
            link = (
                '<p style="font-size:12px;color:#888">'
                f'<a href="{html_lib.escape(url)}">Unsubscribe from these emails</a></p>'
            )
            html = _before_body_end(html, link)
    if html:
        html = instrument_email(settings, html, delivery)
    return FinishedEmail(text=text, html=html, headers=headers)


def _before_body_end(html: str, fragment: str) -> str:
    at = html.lower().rfind("</body>")
    return html + fragment if at < 0 else html[:at] + fragment + html[at:]
