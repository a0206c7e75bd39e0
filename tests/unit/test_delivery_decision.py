"""The channel decision table (services.delivery.decide), walked row by row without servers.

The same function decides for instant notifications and campaign batches, so these rows
are what both paths record."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from core.config import Settings
from core.contracts import ProviderRoute
from core.queries import SEND_COLUMNS
from core.templating import (
    RECIPIENT_FIELDS,
    Rendered,
    RenderedEmail,
    RenderedPush,
    RenderedSms,
    TemplateContent,
    render_for_recipient,
)
from core.tracking import InstantDelivery
from services.delivery import (
    Choices,
    Content,
    Outcome,
    compose,
    contact_for,
    decide,
    no_provider_reason,
    rendered_content,
)
from services.preferences import Preference

NOON = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
SETTINGS = Settings(jwt_secret="unit-test-secret-0123456789abcdef", public_url="http://127.0.0.1:8000")


@dataclass
class Person:
    """The columns of a recipients row that the decision reads."""

    id: int = 1
    user_id: str = "u-1"
    email: str | None = "ann@example.com"
    phone: str | None = "+15550001111"
    push_tokens: list[str] = field(default_factory=lambda: ["old-token", "new-token"])
    opted_out_channels: list[str] = field(default_factory=list)
    timezone: str = "UTC"
    quiet_hours_start: str | None = None
    quiet_hours_end: str | None = None
    locale: str = "en"


class Providers:
    def __init__(self, routes: dict[str, list[ProviderRoute]] | None = None, down: set[str] | None = None) -> None:
        self._routes = routes or {}
        self._down = down or set()

    def no_provider(self, channel: str) -> bool:
        return channel in self._down

    def routes(self, channel: str) -> list[ProviderRoute]:
        return self._routes.get(channel, [])


NOTHING = Choices(preferences={}, suppressed={})


def _decide(person: Person | None, channel: str = "email", *, category: str = "news", choices: Choices = NOTHING,
            providers: Providers | None = None, urgent: bool = False):  # fmt: skip
    return decide(person, channel, category=category, choices=choices, directory=providers or Providers(),
                  settings=SETTINGS, now=NOON, urgent=urgent)  # fmt: skip


def test_no_recipient_is_unreachable_and_recorded() -> None:
    decision = _decide(None)
    assert (decision.outcome, decision.reason, decision.status, decision.final) == (
        Outcome.unreachable, "recipient not found", "unreachable", True
    )  # fmt: skip


@pytest.mark.parametrize(
    ("channel", "person", "contact"),
    [
        ("email", Person(email=None), "email"),
        ("sms", Person(phone=None), "phone"),
        ("push", Person(push_tokens=[]), "push_tokens"),
    ],
)
def test_a_missing_contact_is_unreachable_not_suppressed(channel: str, person: Person, contact: str) -> None:
    decision = _decide(person, channel)
    assert decision.outcome is Outcome.unreachable
    assert decision.status == "unreachable"
    assert decision.reason == f"recipient has no {contact} for {channel}"


def test_an_opt_out_of_the_category_suppresses() -> None:
    choices = Choices(preferences={1: [Preference("news", "email", False)]}, suppressed={})
    decision = _decide(Person(), choices=choices)
    assert (decision.outcome, decision.status, decision.reason) == (Outcome.opted_out, "suppressed", "opted out")
    # Another category on the same channel still goes out.
    assert _decide(Person(), category="premieres", choices=choices).outcome is Outcome.send


def test_an_opted_out_channel_suppresses_marketing_but_not_transactional_sends() -> None:
    person = Person(opted_out_channels=["email"])
    assert _decide(person).outcome is Outcome.opted_out
    assert _decide(person, category="password_reset").outcome is Outcome.send


def test_the_recipients_own_choice_comes_before_a_missing_contact() -> None:
    decision = _decide(Person(email=None, opted_out_channels=["email"]))
    assert decision.outcome is Outcome.opted_out


def test_a_suppressed_address_is_suppressed_with_its_reason() -> None:
    choices = Choices(preferences={}, suppressed={("email", "ann@example.com"): "hard bounce"})
    decision = _decide(Person(), choices=choices)
    assert (decision.outcome, decision.status, decision.reason) == (
        Outcome.suppressed, "suppressed", "address suppressed: hard bounce"
    )  # fmt: skip


def test_a_channel_without_an_enabled_provider_waits_and_records_nothing() -> None:
    decision = _decide(Person(), "sms", providers=Providers(down={"sms"}))
    assert decision.outcome is Outcome.no_provider
    assert not decision.final
    assert decision.status == "pending"
    assert decision.reason == no_provider_reason("sms")


def test_suppression_is_decided_before_provider_trouble() -> None:
    choices = Choices(preferences={}, suppressed={("sms", "+15550001111"): "complaint"})
    assert _decide(Person(), "sms", choices=choices, providers=Providers(down={"sms"})).outcome is Outcome.suppressed


QUIET = {"quiet_hours_start": "11:00", "quiet_hours_end": "14:00"}


def test_quiet_hours_hold_a_send_until_they_end() -> None:
    routes = [ProviderRoute(provider="smtp-a", task_queue="marquee.provider.smtp-a")]
    decision = _decide(Person(**QUIET), providers=Providers(routes={"email": routes}))  # type: ignore[arg-type]
    assert decision.outcome is Outcome.quiet_hours
    assert decision.until == datetime(2026, 12, 6, 14, 0, tzinfo=UTC)
    assert decision.routes == routes
    assert not decision.final


@pytest.mark.parametrize(("category", "urgent"), [("password_reset", False), ("news", True)])
def test_transactional_or_urgent_sends_ignore_quiet_hours(category: str, urgent: bool) -> None:
    assert _decide(Person(**QUIET), category=category, urgent=urgent).outcome is Outcome.send  # type: ignore[arg-type]


def test_a_send_goes_through_the_channels_routes_in_order() -> None:
    routes = [ProviderRoute(provider=name, task_queue=f"q-{name}") for name in ("first", "second")]
    decision = _decide(Person(), "push", providers=Providers(routes={"push": routes}))
    assert decision.outcome is Outcome.send
    assert decision.routes == routes
    assert decision.address == "new-token"  # the most recently registered token


def test_contact_for_reads_the_channels_field() -> None:
    person = Person()
    assert [contact_for(ch, person) for ch in ("email", "sms", "push", "fax")] == [
        "ann@example.com", "+15550001111", "new-token", None
    ]  # fmt: skip


def test_rendered_content_takes_the_channels_part() -> None:
    rendered = Rendered(
        locale="en",
        email=RenderedEmail(subject="S", html="<p>H</p>", text="T"),
        push=RenderedPush(title="P", body="B", data={"k": "v"}),
        sms=RenderedSms(text="SMS", encoding="GSM-7", segments=1),
    )
    assert rendered_content(rendered, "email") == Content("S", "T", {"html": "<p>H</p>"})
    assert rendered_content(rendered, "push") == Content("P", "B", {"k": "v"})
    assert rendered_content(rendered, "sms") == Content("", "SMS", {})
    with pytest.raises(ValueError, match="no push part"):
        rendered_content(Rendered(locale="en"), "push")


def test_compose_finishes_marketing_email_with_unsubscribe_and_leaves_other_channels_alone() -> None:
    delivery = InstantDelivery(notification_id=uuid.uuid4(), channel="email")
    finished = compose(SETTINGS, Content("S", "Hello", {"html": "<html><body>Hi</body></html>"}), channel="email",
                       user_id="u-1", category="news", delivery=delivery)  # fmt: skip
    assert "Unsubscribe" in finished.body
    assert finished.data["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "/u/" in finished.data["html"]
    transactional = compose(SETTINGS, Content("S", "Code 1234", {}), channel="email", user_id="u-1",
                            category="password_reset", delivery=delivery)  # fmt: skip
    assert transactional.body == "Code 1234"
    assert transactional.data["headers"] == {}
    sms = Content("", "Hi", {})
    assert compose(SETTINGS, sms, channel="sms", user_id="u-1", category="news", delivery=delivery) is sms


def test_a_campaign_batchs_recipient_columns_are_enough_to_decide_and_render() -> None:
    # A campaign batch loads only SEND_COLUMNS: a row of exactly those (reading anything else
    # fails) goes through every branch of the decision and every field a template may use.
    values: dict[str, Any] = {
        "id": 1, "user_id": "u-1", "name": "Ann", "email": "ann@example.com", "phone": "+15550001111",
        "push_tokens": ["t"], "locale": "en", "timezone": "UTC", "country": "FR", "opted_out_channels": [],
        "attributes": {}, "tags": ["vip"], **QUIET,
    }  # fmt: skip
    assert set(values) == set(SEND_COLUMNS)
    row: Any = SimpleNamespace(**values)
    choices = Choices(preferences={1: [Preference("news", "sms", False)]}, suppressed={})
    outcomes = [_decide(row, channel, choices=choices).outcome for channel in ("email", "sms", "push")]
    assert outcomes == [Outcome.quiet_hours, Outcome.opted_out, Outcome.quiet_hours]
    assert {field.name for field in dataclass_fields(Person)} <= set(SEND_COLUMNS)
    html = " ".join(f"{{{{ recipient.{name} }}}}" for name in RECIPIENT_FIELDS)
    template = TemplateContent.model_validate({"locales": {"en": {"email": {"subject": "Hi", "html": html}}}})
    rendered = render_for_recipient(template, values, {}, ["email"])
    assert rendered.email is not None
    assert rendered.email.html == "u-1 Ann ann@example.com +15550001111 en UTC FR [&#39;vip&#39;] {}"
