"""Sentry events carry no address: an exception from a refused send, with the breadcrumbs
and context a send leaves, goes through the client exactly as core.sentry.init_sentry
configures it (scrubber, before_send, before_breadcrumb), into a transport of the test's
own; no global client is installed. And before_send alone on a hand-built event."""

from __future__ import annotations

import json
import smtplib
from typing import Any
from unittest import mock

import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport
from temporalio.exceptions import ApplicationError

from core.config import Settings
from core.contracts import PERMANENT_ERROR
from core.sentry import init_sentry, scrub_event

EMAIL = "ada.lovelace@example.com"
PHONE = "+15550104477"
TOKEN = "fcm:" + "Ab1_" * 40  # the shape of an FCM registration token
SECRETS = (EMAIL, PHONE, TOKEN, "ada.lovelace")
REFUSAL = f"{{'{EMAIL}': (550, b'5.1.1 <{EMAIL}>: unknown user')}}"  # str(SMTPRecipientsRefused)


class Captured(Transport):
    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)


def client_as_configured() -> tuple[sentry_sdk.Client, Captured]:
    """A client with init_sentry's options (init itself is intercepted, not run)."""
    settings = Settings(_env_file=None, sentry_dsn="https://public@sentry.example.invalid/1")
    with mock.patch("core.sentry.sentry_sdk.init") as init:
        assert init_sentry(settings)
    options = dict(init.call_args.kwargs)
    transport = Captured()
    return sentry_sdk.Client(**options, transport=transport), transport


def refused_send() -> ApplicationError:
    """What the email activity raises when the server refuses the recipient (the reply quotes it)."""
    reply = f"5.1.1 <{EMAIL}>: Recipient address rejected".encode()
    try:
        try:
            raise smtplib.SMTPRecipientsRefused({EMAIL: (550, reply)})
        except smtplib.SMTPRecipientsRefused as err:
            raise ApplicationError(f"550 {reply.decode()}", type=PERMANENT_ERROR, non_retryable=True) from err
    except ApplicationError as error:
        return error


def test_an_event_from_a_refused_send_carries_no_address() -> None:
    client, transport = client_as_configured()
    with sentry_sdk.new_scope() as scope:
        scope.set_client(client)
        sentry_sdk.add_breadcrumb(category="log", message=f"smtp refused {EMAIL}, sms to {PHONE} via {TOKEN}")
        sentry_sdk.set_context("delivery", {"address": EMAIL, "phone": PHONE, "channel": "email"})
        sentry_sdk.set_extra("send", {"email": EMAIL, "push_tokens": [TOKEN], "title": "Tickets for Ada"})
        sentry_sdk.capture_exception(refused_send())
        client.flush()
    [envelope] = transport.envelopes
    event = envelope.get_event()
    assert event is not None
    types = [value["type"] for value in event["exception"]["values"]]
    assert types == ["SMTPRecipientsRefused", "ApplicationError"]  # the error is reported, with its cause
    assert "550" in event["exception"]["values"][-1]["value"]
    sent = envelope.serialize().decode()
    for secret in SECRETS:
        assert secret not in sent, f"{secret!r} reached Sentry"
    assert "Tickets for Ada" not in sent


def test_before_send_redacts_addresses_in_every_string() -> None:
    event: dict[str, Any] = {
        "message": f"send to {EMAIL} failed",
        "logentry": {"message": "refused %s", "params": [EMAIL], "formatted": f"refused {EMAIL}"},
        "exception": {"values": [{"type": "SMTPRecipientsRefused", "value": REFUSAL}]},
        "breadcrumbs": {"values": [{"message": f"sms to {PHONE}"}, {"data": {"token": TOKEN}}]},
        "extra": {"provider_error": f"InvalidRegistration for {TOKEN} ({PHONE})"},
    }
    scrubbed = scrub_event(event)  # type: ignore[arg-type]
    text = json.dumps(scrubbed)
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} survived before_send"
    assert scrubbed["exception"]["values"][0]["value"].startswith("{'[email]': (550")
