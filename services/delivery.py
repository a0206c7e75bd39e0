"""Delivery planning: what happens to a recipient on a channel, and what they are sent.

One decision for instant notifications and campaign batches alike (`decide`), made from
facts loaded in bulk (`load_choices`), and one way to turn content into the message a
provider gets (`compose`). The outcomes, in the order they are checked:

| outcome     | when                                                       | recorded as  |
|-------------|------------------------------------------------------------|--------------|
| unreachable | no such recipient                                          | unreachable  |
| opted_out   | the recipient's own preferences refuse the category        | suppressed   |
| unreachable | the recipient has no contact for the channel               | unreachable  |
| suppressed  | the address is on the suppression list                     | suppressed   |
| no_provider | the channel has stored providers and none is enabled       | (see below)  |
| quiet_hours | inside the recipient's quiet hours (not urgent or transactional) | sent when they end |
| send        | otherwise, through `routes` in priority order              | pending, then sent or failed |

A channel with no enabled provider is an outage, not the recipient's fault: nothing is
recorded and the send waits, retried with backoff (an instant send within its retry
budget, then a dead letter to replay; a campaign batch until a provider is enabled or
the campaign is cancelled), the same in both paths.

"Suppressed" means the suppression list or the recipient's own choice, nothing else; a
missing contact is "unreachable", counted on its own.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from core.config import Settings
from core.contracts import ProviderRoute
from core.templating import Rendered
from core.tracking import TrackedDelivery
from services import preferences as prefs
from services.outbound import finish_email

CONTACT_FIELD = {"email": "email", "sms": "phone", "push": "push_tokens"}


class Outcome(enum.StrEnum):
    send = "send"
    quiet_hours = "quiet_hours"
    no_provider = "no_provider"
    opted_out = "opted_out"
    suppressed = "suppressed"
    unreachable = "unreachable"


# The delivery status each final outcome is recorded with.
RECORDED_STATUS = {
    Outcome.unreachable: "unreachable",
    Outcome.opted_out: "suppressed",
    Outcome.suppressed: "suppressed",
}


@dataclass(frozen=True)
class ChannelDecision:
    outcome: Outcome
    address: str | None = None
    reason: str | None = None  # why it is not sent (now)
    routes: list[ProviderRoute] = field(default_factory=list)  # empty: the channel's default provider
    until: datetime | None = None  # quiet hours end

    @property
    def final(self) -> bool:
        """Nothing will be sent: the outcome is recorded as it is."""
        return self.outcome in RECORDED_STATUS

    @property
    def status(self) -> str:
        return RECORDED_STATUS.get(self.outcome, "pending")


class ChannelProviders(Protocol):
    """What the decision asks of the worker's providers (services.routing.ProviderDirectory)."""

    def no_provider(self, channel: str) -> bool: ...

    def routes(self, channel: str) -> list[ProviderRoute]: ...


@dataclass(frozen=True)
class Choices:
    """What the decision reads about a set of recipients, loaded in two queries."""

    preferences: Mapping[int, list[prefs.Preference]]
    suppressed: Mapping[tuple[str, str], str]


def contact_for(channel: str, recipient: Any) -> str | None:
    """Where a channel reaches a recipient (a recipients row). Push uses the most recently
    registered token."""
    if channel == "email":
        return recipient.email  # type: ignore[no-any-return]
    if channel == "sms":
        return recipient.phone  # type: ignore[no-any-return]
    if channel == "push":
        return recipient.push_tokens[-1] if recipient.push_tokens else None
    return None


async def load_choices(conn: AsyncConnection, people: Sequence[Any], channels: Sequence[str]) -> Choices:
    wanted = await prefs.load(conn, [person.id for person in people])
    pairs = [(ch, address) for person in people for ch in channels if (address := contact_for(ch, person))]
    return Choices(wanted, await prefs.suppressed(conn, pairs))


def choices_of(recipient_id: int, wanted: Sequence[Sequence[Any]], blocked: Sequence[Sequence[str]]) -> Choices:
    """load_choices' answer for one recipient from rows read with it (prefs.preferences_of
    and prefs.suppressions_of): what an instant notification reads in its one query."""
    return Choices(
        {recipient_id: [prefs.Preference(category, channel, enabled) for category, channel, enabled in wanted]},
        {(channel, address): reason for channel, address, reason in blocked},
    )


def decide(
    recipient: Any | None,
    channel: str,
    *,
    category: str,
    choices: Choices,
    directory: ChannelProviders,
    settings: Settings,
    now: datetime,
    urgent: bool = False,
) -> ChannelDecision:
    """What happens to `recipient` (a recipients row, or None if there is none) on `channel`."""
    if recipient is None:
        return ChannelDecision(Outcome.unreachable, reason="recipient not found")
    address = contact_for(channel, recipient)
    transactional = category in settings.transactional_categories
    wants = prefs.wants(
        choices.preferences.get(recipient.id, []),
        category=category,
        channel=channel,
        transactional=transactional,
        opted_out_channels=recipient.opted_out_channels,
    )
    if not wants:
        return ChannelDecision(Outcome.opted_out, address, reason="opted out")
    if address is None:
        return ChannelDecision(Outcome.unreachable, reason=f"recipient has no {CONTACT_FIELD[channel]} for {channel}")
    blocked = choices.suppressed.get((channel, address))
    if blocked is not None:
        return ChannelDecision(Outcome.suppressed, address, reason=f"address suppressed: {blocked}")
    if directory.no_provider(channel):
        return ChannelDecision(Outcome.no_provider, address, reason=no_provider_reason(channel))
    routes = directory.routes(channel)
    if not (urgent or transactional):
        quiet = prefs.quiet_until(now, recipient.timezone, recipient.quiet_hours_start, recipient.quiet_hours_end)
        if quiet is not None:
            return ChannelDecision(Outcome.quiet_hours, address, reason="quiet hours", routes=routes, until=quiet)
    return ChannelDecision(Outcome.send, address, routes=routes)


def no_provider_reason(channel: str) -> str:
    return f"no enabled {channel} provider (all are disabled)"


@dataclass(frozen=True)
class Content:
    """A channel's message as the provider gets it (before the address and key)."""

    title: str
    body: str
    data: dict[str, Any]


def rendered_content(rendered: Rendered, channel: str) -> Content:
    """A rendered template's part for one channel."""
    if channel == "email" and rendered.email:
        email = rendered.email
        return Content(email.subject, email.text, {"html": email.html})
    if channel == "push" and rendered.push:
        push = rendered.push
        return Content(push.title, push.body, dict(push.data))
    if channel == "sms" and rendered.sms:
        return Content("", rendered.sms.text, {})
    raise ValueError(f"the template has no {channel} part")


def compose(
    settings: Settings, content: Content, *, channel: str, user_id: str, category: str, delivery: TrackedDelivery
) -> Content:
    """The finished message: for email, the unsubscribe link and headers (not on
    transactional categories) and open and click tracking."""
    if channel != "email":
        return content
    html = content.data.get("html")
    finished = finish_email(
        settings,
        text=content.body,
        html=html if isinstance(html, str) and html else None,
        user_id=user_id,
        category=category,
        delivery=delivery,
    )
    return Content(content.title, finished.text, {**content.data, "html": finished.html, "headers": finished.headers})
