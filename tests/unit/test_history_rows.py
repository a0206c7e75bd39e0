"""History rows built without the dataclass __init__ are the rows the dataclass builds, and a
batch of columns holds what the rows of the same events hold."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from services.history import HistoryBatch, HistoryRow, HistorySubject, campaign_send_id, epoch_ms

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


def test_a_subjects_batch_holds_the_events_event_of_gives() -> None:
    subject = HistorySubject("", "", "marketing", "camp-1", run_id="run-1", template_key="welcome", template_version=3)
    recipients = [{"notification_id": f"n-{n}", "user_id": f"user-{n}", "country": "FR", "timezone": "Europe/Paris"}
                  for n in range(3)]  # fmt: skip
    outcomes: list[dict[str, Any]] = [
        {"status": "sent", "provider": "smtp", "error": None, "cost": Decimal("0.0012"), "currency": "USD"},
        {"status": "failed", "provider": "smtp", "error": "x" * 1500, "cost": Decimal(0), "currency": ""},
        {"status": "suppressed", "provider": "", "error": "", "cost": Decimal(0), "currency": ""},
    ]
    columns = {name: [row[name] for row in recipients] for name in recipients[0]}
    columns |= {name: [outcome[name] for outcome in outcomes] for name in outcomes[0]}
    batch = subject.batch_of(columns, channel="email", event_time=AT)
    events = [subject.event_of(recipient, "email", outcome.pop("status"), event_time=AT, **outcome)
              for recipient, outcome in zip(recipients, outcomes, strict=True)]  # fmt: skip
    assert batch.columns == HistoryBatch.of(events).columns
    assert batch.columns["error"] == ["", "x" * 1000, ""]
    assert batch.columns["event_time"] == [epoch_ms(AT)] * 3
    with pytest.raises(TypeError, match="colour"):
        subject.batch_of({"colour": ["red"]}, channel="email")


def test_a_batch_has_every_column_and_one_length() -> None:
    rows = [HistorySubject("n-1", "u", "c").event("sms", status) for status in ("pending", "sent")]
    columns = HistoryBatch.of(rows).columns
    assert list(columns) == list(rows[0].__dict__)  # HistoryRow's fields, in order
    assert columns["event_time"] == [None, None]  # stamped by the insert
    with pytest.raises(TypeError, match="column per HistoryRow field"):
        HistoryBatch({name: values for name, values in columns.items() if name != "cost"})
    with pytest.raises(ValueError, match="differ in length"):
        HistoryBatch({**columns, "cost": [Decimal(0)]})
    batch = HistoryBatch(columns)
    batch.extend(HistoryBatch.of(rows))
    assert len(batch) == 4
    assert len(columns["status"]) == 2  # the batch's own lists, not the caller's


def test_an_event_time_is_stored_in_utc_milliseconds() -> None:
    assert epoch_ms(datetime(1970, 1, 1, tzinfo=UTC)) == 0
    assert epoch_ms(AT) == int(datetime(2026, 12, 6, 21, 30, 5, tzinfo=UTC).timestamp()) * 1000 + 123
    assert epoch_ms(AT.replace(tzinfo=None)) == epoch_ms(AT)  # naive: read as UTC
    assert epoch_ms(AT.astimezone(timezone(timedelta(hours=-5)))) == epoch_ms(AT)
