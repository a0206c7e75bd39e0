"""History rows built without the dataclass __init__ are the rows the dataclass builds."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from services.history import HistoryRow, HistorySubject, campaign_send_id

AT = datetime(2026, 12, 6, 21, 30, 5, 123456, tzinfo=UTC)


def _subject() -> HistorySubject:
    return HistorySubject(
        "0b7e6a2c-1111-4a8e-9c3d-5f0e2a4b6c8d", "user-7", "marketing", "camp-1", run_id="run-1",
        template_key="welcome", template_version=3, country="DE", timezone="Europe/Berlin",
    )  # fmt: skip


def test_an_event_equals_the_dataclass_row_of_the_same_fields() -> None:
    subject = _subject()
    details: dict[str, Any] = {
        "provider": "smtp", "attempt": 2, "error_class": "rejected by provider", "cost": Decimal("0.0012"),
        "currency": "USD", "latency_ms": 1500, "event_time": AT,
    }  # fmt: skip
    event = subject.event("email", "sent", error=None, **details)
    expected = HistoryRow(channel="email", status="sent", error="", **asdict(subject), **details)
    assert event == expected
    assert event.__dict__ == expected.__dict__  # every field, nothing more
    assert list(event.__dict__) == list(expected.__dict__)  # in declaration order, as the writer reads them
    assert event.event_id == expected.event_id
    assert event.values() == expected.values()
    assert HistoryRow.from_json(event.as_json()) == expected


def test_an_event_takes_the_defaults_and_cuts_a_long_error() -> None:
    event = HistorySubject("n-1", "u", "c").event("sms", "failed", error="x" * 1500)
    assert event == HistoryRow("n-1", "sms", "failed", "u", "c", error="x" * 1000)


def test_events_of_one_subject_do_not_share_their_fields() -> None:
    subject = _subject()
    sent = subject.event("email", "sent", provider="smtp")
    failed = subject.event("email", "failed", error="550")
    assert (sent.status, sent.provider, sent.error) == ("sent", "smtp", "")
    assert (failed.status, failed.provider, failed.error) == ("failed", "", "550")


def test_event_of_is_the_event_of_the_subject_with_those_fields() -> None:
    batch = HistorySubject("", "", "marketing", "camp-1", run_id="run-1", template_key="welcome", template_version=3)
    recipient = {"notification_id": "n-9", "user_id": "user-9", "country": "FR", "timezone": "Europe/Paris"}
    own = HistorySubject(category="marketing", campaign_id="camp-1", run_id="run-1", template_key="welcome",
                         template_version=3, **recipient)  # fmt: skip
    assert batch.event_of(recipient, "email", "sent", provider="smtp", event_time=AT) == own.event(
        "email", "sent", provider="smtp", event_time=AT
    )
    shared: dict[str, Any] = {"campaign_id": "camp-1", "run_id": "run-1", "template_key": "welcome"}
    shared["template_version"] = 3
    assert batch.event("email", "sent") == HistoryRow("", "email", "sent", "", "marketing", **shared)


def test_an_unknown_detail_or_subject_field_is_refused_as_the_dataclass_refuses_it() -> None:
    subject = _subject()
    with pytest.raises(TypeError, match="colour"):
        subject.event("email", "sent", colour="red")
    with pytest.raises(TypeError, match="user_id"):
        subject.event("email", "sent", user_id="someone else")  # the subject's, not a detail
    with pytest.raises(TypeError, match="provider"):
        subject.event_of({"provider": "smtp"}, "email", "sent")


@pytest.mark.parametrize("run_id", ["campaign-5d0c", "run:with:colons", "ünïcode"])
@pytest.mark.parametrize("channel", ["email", "sms"])
def test_a_campaign_send_id_is_the_uuid5_of_the_send(run_id: str, channel: str) -> None:
    for campaign_id in (uuid.uuid4(), uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)):
        for recipient_id in (0, 1, 123_456_789_012):
            assert campaign_send_id(campaign_id, run_id, recipient_id, channel) == str(
                uuid.uuid5(campaign_id, f"{run_id}:{recipient_id}:{channel}")
            )
