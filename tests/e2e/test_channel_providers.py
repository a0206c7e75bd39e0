"""FCM, JSON SMS and Twilio providers against the test-owned gateways (real HTTP), and the
registry that builds providers from stored configuration."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy.ext.asyncio import create_async_engine

from channels.base import (
    InvalidAddressError,
    OutboundMessage,
    PermanentSendError,
    ProviderUnavailableError,
    ThrottledError,
    TransientSendError,
    retry_after_seconds,
    trips_breaker,
)
from channels.fcm import FcmProvider
from channels.registry import KINDS, ProviderConfigError, build_provider, validate_config
from channels.sandbox import SandboxProvider
from channels.sms import JsonSmsGatewayProvider, TwilioSmsProvider
from channels.smtp import SmtpProvider
from tests.e2e.gateways import Gateway

TIMEOUT = 0.3  # client timeout: `fail_next(timeout=True)` hangs longer than this


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    with Gateway() as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def _clean_gateway(gateway: Gateway) -> None:
    gateway.reset()


def push(token: str = "device-token-1", **data) -> OutboundMessage:
    return OutboundMessage("push", token, "Your order shipped", "Arrives Tuesday", f"key-{uuid.uuid4().hex}", data)


def sms(number: str = "+15551234567") -> OutboundMessage:
    return OutboundMessage("sms", number, "", "Your code is 123456", f"key-{uuid.uuid4().hex}")


# --- FCM --------------------------------------------------------------------------------------


@pytest.fixture
async def fcm(gateway: Gateway) -> AsyncIterator[FcmProvider]:
    provider = FcmProvider(
        project_id=gateway.fcm_project, service_account=gateway.service_account(), base_url=gateway.url,
        timeout=TIMEOUT, name="fcm-main",
    )  # fmt: skip
    yield provider
    await provider.close()


async def test_fcm_sends_v1_message_with_service_account_token(gateway: Gateway, fcm: FcmProvider) -> None:
    receipt = await fcm.send(push("device-a", deep_link="app://orders/7", count=3, flags={"gift": True}))

    assert receipt.provider == "fcm-main"
    assert receipt.message_id.startswith(f"projects/{gateway.fcm_project}/messages/")
    [token_request] = gateway.requests_to("token")
    assert token_request.form()["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    [sent] = gateway.requests_to("fcm")
    assert sent.path == f"/v1/projects/{gateway.fcm_project}/messages:send"
    assert sent.headers["authorization"].startswith("Bearer ya29.test-")
    assert sent.json() == {
        "message": {
            "token": "device-a",
            "notification": {"title": "Your order shipped", "body": "Arrives Tuesday"},
            # FCM takes only strings: other values go as JSON.
            "data": {"deep_link": "app://orders/7", "count": "3", "flags": '{"gift":true}'},
        }
    }


async def test_fcm_token_is_cached_and_fetched_once_under_concurrency(gateway: Gateway, fcm: FcmProvider) -> None:
    await asyncio.gather(*(fcm.send(push(f"device-{i}")) for i in range(20)))
    await fcm.send(push())

    assert len(gateway.requests_to("token")) == 1
    assert len(gateway.pushes) == 21


async def test_fcm_refreshes_a_revoked_token_once_and_retries(gateway: Gateway, fcm: FcmProvider) -> None:
    await fcm.send(push())
    gateway.revoke_tokens()

    receipt = await fcm.send(push("device-b"))

    assert receipt.message_id
    assert len(gateway.requests_to("token")) == 2
    assert [r.status for r in gateway.requests_to("fcm")] == [200, 401, 200]
    assert gateway.pushes[-1]["token"] == "device-b"


async def test_fcm_401_after_refresh_is_provider_unavailable(gateway: Gateway, fcm: FcmProvider) -> None:
    gateway.fail_next(401, route="fcm", times=2)

    with pytest.raises(ProviderUnavailableError):
        await fcm.send(push())
    assert len(gateway.requests_to("fcm")) == 2  # one refresh, one retry, no more


async def test_fcm_static_token(gateway: Gateway) -> None:
    provider = FcmProvider(project_id=gateway.fcm_project, access_token=gateway.static_token, base_url=gateway.url)
    try:
        await provider.send(push())
        assert gateway.requests_to("fcm")[0].headers["authorization"] == f"Bearer {gateway.static_token}"
        assert gateway.requests_to("token") == []

        gateway.fail_next(401, route="fcm")  # nothing to refresh: fail over
        with pytest.raises(ProviderUnavailableError):
            await provider.send(push())
    finally:
        await provider.close()


async def test_fcm_unregistered_and_invalid_tokens_are_dead_addresses(gateway: Gateway, fcm: FcmProvider) -> None:
    gateway.mark_unregistered("old-device")
    gateway.mark_invalid_token("garbage")

    with pytest.raises(InvalidAddressError) as unregistered:
        await fcm.send(push("old-device"))
    with pytest.raises(InvalidAddressError) as invalid:
        await fcm.send(push("garbage"))

    assert unregistered.value.address == "old-device"
    assert "UNREGISTERED" in str(unregistered.value)
    assert invalid.value.address == "garbage"


async def test_fcm_other_400_is_permanent_not_a_dead_token(gateway: Gateway, fcm: FcmProvider) -> None:
    gateway.fail_next(400, route="fcm")  # INVALID_ARGUMENT about the payload, not the token

    with pytest.raises(PermanentSendError) as caught:
        await fcm.send(push())
    assert not isinstance(caught.value, InvalidAddressError)


async def test_fcm_403_is_provider_unavailable(gateway: Gateway, fcm: FcmProvider) -> None:
    gateway.fail_next(403, route="fcm")
    with pytest.raises(ProviderUnavailableError):
        await fcm.send(push())


async def test_fcm_throttling_carries_retry_after(gateway: Gateway, fcm: FcmProvider) -> None:
    gateway.fail_next(429, retry_after=2, route="fcm")
    with pytest.raises(ThrottledError) as throttled:
        await fcm.send(push())
    assert throttled.value.retry_after == 2.0

    gateway.fail_next(503, retry_after=7, route="fcm")  # 503 with Retry-After: a request to back off
    with pytest.raises(ThrottledError) as unavailable:
        await fcm.send(push())
    assert unavailable.value.retry_after == 7.0


async def test_fcm_server_errors_and_timeouts_are_transient(gateway: Gateway, fcm: FcmProvider) -> None:
    for status in (500, 503):
        gateway.fail_next(status, route="fcm")
        with pytest.raises(TransientSendError) as caught:
            await fcm.send(push())
        assert not isinstance(caught.value, ThrottledError)

    gateway.fail_next(timeout=True, route="fcm")
    started = asyncio.get_running_loop().time()
    with pytest.raises(TransientSendError, match="timed out"):
        await fcm.send(push())
    assert asyncio.get_running_loop().time() - started < 2


async def test_fcm_token_endpoint_failures(gateway: Gateway) -> None:
    stranger = dict(gateway.service_account())
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stranger["private_key"] = other_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    provider = FcmProvider(project_id=gateway.fcm_project, service_account=stranger, base_url=gateway.url)
    try:
        with pytest.raises(ProviderUnavailableError, match="invalid_grant"):  # signature does not verify
            await provider.send(push())
    finally:
        await provider.close()

    provider = FcmProvider(project_id=gateway.fcm_project, service_account=gateway.service_account())
    try:
        gateway.fail_next(503, route="token")
        with pytest.raises(TransientSendError):
            await provider.send(push())
    finally:
        await provider.close()
    assert gateway.requests_to("fcm") == []


# --- JSON SMS gateway -------------------------------------------------------------------------


@pytest.fixture
async def json_sms(gateway: Gateway) -> AsyncIterator[JsonSmsGatewayProvider]:
    provider = JsonSmsGatewayProvider(
        base_url=gateway.url, sender="+15550001111", api_key=gateway.sms_api_key, timeout=TIMEOUT, name="sms-a"
    )
    yield provider
    await provider.close()


async def test_json_sms_sends_with_key_and_idempotency(gateway: Gateway, json_sms: JsonSmsGatewayProvider) -> None:
    message = sms("+15557654321")

    receipt = await json_sms.send(message)
    replay = await json_sms.send(message)  # e.g. a retry after a timeout

    assert receipt.provider == "sms-a"
    assert receipt.message_id.startswith("msg_")
    assert replay.message_id == receipt.message_id
    first = gateway.requests_to("sms")[0]
    assert first.headers["authorization"] == f"Bearer {gateway.sms_api_key}"
    assert first.headers["idempotency-key"] == message.idempotency_key
    assert first.json() == {"to": "+15557654321", "from": "+15550001111", "text": "Your code is 123456"}
    assert len(gateway.sms_messages) == 1  # the gateway texted once


async def test_json_sms_error_taxonomy(gateway: Gateway, json_sms: JsonSmsGatewayProvider) -> None:
    gateway.mark_invalid_number("+15550000000")
    with pytest.raises(InvalidAddressError) as invalid:
        await json_sms.send(sms("+15550000000"))
    assert invalid.value.address == "+15550000000"

    gateway.fail_next(400, code="message_too_long", route="sms")
    with pytest.raises(PermanentSendError) as permanent:
        await json_sms.send(sms())
    assert not isinstance(permanent.value, InvalidAddressError)

    gateway.fail_next(429, retry_after=3, route="sms")
    with pytest.raises(ThrottledError) as throttled:
        await json_sms.send(sms())
    assert throttled.value.retry_after == 3.0

    gateway.fail_next(502, route="sms")
    with pytest.raises(TransientSendError):
        await json_sms.send(sms())

    gateway.fail_next(timeout=True, route="sms")
    with pytest.raises(TransientSendError, match="timed out"):
        await json_sms.send(sms())
    assert gateway.sms_messages == []


async def test_json_sms_wrong_api_key_is_provider_unavailable(gateway: Gateway) -> None:
    provider = JsonSmsGatewayProvider(base_url=gateway.url, sender="Marquee", api_key="wrong")
    try:
        with pytest.raises(ProviderUnavailableError):
            await provider.send(sms())
    finally:
        await provider.close()


# --- Twilio -----------------------------------------------------------------------------------


@pytest.fixture
async def twilio(gateway: Gateway) -> AsyncIterator[TwilioSmsProvider]:
    provider = TwilioSmsProvider(
        account_sid=gateway.twilio_account_sid, auth_token=gateway.twilio_auth_token, sender="+15550002222",
        base_url=gateway.url, status_callback_url="https://marquee.example/v1/webhooks/twilio", timeout=TIMEOUT,
    )  # fmt: skip
    yield provider
    await provider.close()


async def test_twilio_sends_form_with_basic_auth(gateway: Gateway, twilio: TwilioSmsProvider) -> None:
    message = sms("+15557654321")

    receipt = await twilio.send(message)

    assert receipt.provider == "twilio"
    assert receipt.message_id.startswith("SM")
    [sent] = gateway.requests_to("twilio")
    assert sent.path == f"/2010-04-01/Accounts/{gateway.twilio_account_sid}/Messages.json"
    assert sent.basic_auth() == (gateway.twilio_account_sid, gateway.twilio_auth_token)
    assert sent.headers["i-twilio-idempotency-token"] == message.idempotency_key
    assert sent.form() == {
        "To": "+15557654321",
        "From": "+15550002222",
        "Body": "Your code is 123456",
        "StatusCallback": "https://marquee.example/v1/webhooks/twilio",
    }
    assert (await twilio.send(message)).message_id == receipt.message_id  # Twilio dedups the replay


async def test_twilio_messaging_service(gateway: Gateway) -> None:
    service_sid = "MG" + "0" * 32
    provider = TwilioSmsProvider(
        account_sid=gateway.twilio_account_sid, auth_token=gateway.twilio_auth_token,
        messaging_service_sid=service_sid, base_url=gateway.url,
    )  # fmt: skip
    try:
        await provider.send(sms())
    finally:
        await provider.close()
    form = gateway.requests_to("twilio")[0].form()
    assert form["MessagingServiceSid"] == service_sid
    assert "From" not in form


async def test_twilio_error_taxonomy(gateway: Gateway, twilio: TwilioSmsProvider) -> None:
    gateway.mark_invalid_number("+15550000000")
    gateway.mark_unsubscribed("+15550000001")
    for number in ("+15550000000", "+15550000001"):
        with pytest.raises(InvalidAddressError) as dead:
            await twilio.send(sms(number))
        assert dead.value.address == number

    gateway.fail_next(400, code=21614, route="twilio")  # not a mobile number
    with pytest.raises(InvalidAddressError):
        await twilio.send(sms())

    gateway.fail_next(400, code=21408, route="twilio")  # region not enabled: this message only
    with pytest.raises(PermanentSendError) as permanent:
        await twilio.send(sms())
    assert not isinstance(permanent.value, InvalidAddressError)

    gateway.fail_next(429, retry_after=4, route="twilio")
    with pytest.raises(ThrottledError) as throttled:
        await twilio.send(sms())
    assert throttled.value.retry_after == 4.0

    gateway.fail_next(500, route="twilio")
    with pytest.raises(TransientSendError):
        await twilio.send(sms())

    gateway.fail_next(timeout=True, route="twilio")
    with pytest.raises(TransientSendError, match="timed out"):
        await twilio.send(sms())


async def test_twilio_bad_credentials_are_provider_unavailable(gateway: Gateway) -> None:
    provider = TwilioSmsProvider(
        account_sid=gateway.twilio_account_sid, auth_token="wrong", sender="+15550002222", base_url=gateway.url
    )
    try:
        with pytest.raises(ProviderUnavailableError, match="20003"):
            await provider.send(sms())
    finally:
        await provider.close()


async def test_outage_then_recovery(gateway: Gateway, twilio: TwilioSmsProvider) -> None:
    gateway.fail_always(503)
    for _ in range(3):
        with pytest.raises(TransientSendError):
            await twilio.send(sms())
    gateway.recover()
    assert (await twilio.send(sms())).message_id.startswith("SM")


# --- the taxonomy's helpers -------------------------------------------------------------------


def test_retry_after_parses_seconds_and_http_dates() -> None:
    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None
    assert ThrottledError("slow down").retry_after == 5.0  # a default when the provider gives none


async def test_http_date_retry_after_reaches_the_error(gateway: Gateway, json_sms: JsonSmsGatewayProvider) -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    gateway.fail_next(429, retry_after=later, route="sms")
    with pytest.raises(ThrottledError) as throttled:
        await json_sms.send(sms())
    assert 55 <= throttled.value.retry_after <= 60


def test_what_counts_toward_the_breaker() -> None:
    assert trips_breaker(TransientSendError("down"))
    assert trips_breaker(ProviderUnavailableError("bad credentials"))
    assert not trips_breaker(ThrottledError("slow down"))
    assert not trips_breaker(PermanentSendError("rejected"))
    assert not trips_breaker(InvalidAddressError("no such user", "a@b.c"))


# --- registry ---------------------------------------------------------------------------------


def test_registry_names_each_bad_field() -> None:
    problems = validate_config("smtp", "email", {"host": "", "port": "abc", "sender": "nobody", "prot": 25}, {})

    assert "settings.port: Input should be a valid integer, unable to parse string as an integer" in problems
    assert any(p.startswith("settings.host: String should have at least 1 character") for p in problems)
    assert any(p.startswith("settings.sender: Value error, needs an email address") for p in problems)
    assert "settings.prot: Extra inputs are not permitted" in problems


def test_registry_cross_field_and_channel_checks() -> None:
    fcm_settings = {"project_id": "marquee-prod"}
    assert validate_config("fcm", "sms", fcm_settings, {"access_token": "t"}) == [
        "kind 'fcm' cannot send 'sms' (it sends push)"
    ]
    assert validate_config("fcm", "push", fcm_settings, {}) == [
        "secrets: Value error, give exactly one of service_account and access_token"
    ]
    bad_key = {"client_email": "x@y.z", "private_key": "not a key"}
    assert validate_config("fcm", "push", fcm_settings, {"service_account": bad_key}) == [
        "secrets.service_account.private_key: Value error, not an unencrypted PEM private key"
    ]

    both_tls = {"host": "h", "port": 465, "sender": "a@b.c", "use_tls": True, "start_tls": True}
    [tls_problem] = validate_config("smtp", "email", both_tls, {})
    assert tls_problem.startswith("settings: Value error, use_tls (implicit TLS) and start_tls are mutually exclusive")

    [sid_problem] = validate_config(
        "twilio", "sms", {"account_sid": "nope", "sender": "+15550002222"}, {"auth_token": "x"}
    )
    assert sid_problem.startswith("settings.account_sid: String should match pattern")
    assert validate_config("twilio", "sms", {"account_sid": "AC" + "a" * 32}, {}) == [
        "settings: Value error, give a sender number or a messaging_service_sid",
        "secrets.auth_token: Field required",
    ]
    assert validate_config("pigeon", "sms", {}, {})[0].startswith("kind 'pigeon' is unknown")


def test_registry_problems_never_echo_secret_values() -> None:
    settings = {"base_url": "http://x", "sender": "+15550001111"}
    problems = validate_config("sms-json", "sms", settings, {"api_key": 12345678, "extra_secret": "hunter2"})
    assert problems == [
        "secrets.api_key: Input should be a valid string",
        "secrets.extra_secret: Extra inputs are not permitted",
    ]
    assert not any("hunter2" in p or "12345678" in p for p in problems)


def test_every_kind_declares_its_channels() -> None:
    assert {kind: sorted(spec.channels) for kind, spec in KINDS.items()} == {
        "smtp": ["email"], "fcm": ["push"], "sms-json": ["sms"], "twilio": ["sms"], "sandbox": ["push", "sms"],
    }  # fmt: skip


async def test_build_provider_for_every_kind(gateway: Gateway) -> None:
    engine = create_async_engine("postgresql+asyncpg://127.0.0.1/unused")  # never connects here
    webhook = {"webhook_secret": "whsec"}  # allowed for every kind, ignored by the provider
    smtp_settings = {"host": "127.0.0.1", "port": 2525, "sender": "Marquee <n@marquee.test>"}
    twilio_settings = {"account_sid": gateway.twilio_account_sid, "sender": "+15550002222", "base_url": gateway.url}
    rows: list[tuple[str, str, str, dict[str, Any], dict[str, Any], type]] = [
        ("mail", "email", "smtp", smtp_settings, {"password": "pw", **webhook}, SmtpProvider),
        ("push", "push", "fcm", {"project_id": gateway.fcm_project, "base_url": gateway.url},
         {"service_account": gateway.service_account(), **webhook}, FcmProvider),
        ("texts", "sms", "sms-json", {"base_url": gateway.url, "sender": "Marquee"},
         {"api_key": gateway.sms_api_key, **webhook}, JsonSmsGatewayProvider),
        ("twilio-us", "sms", "twilio", twilio_settings, {"auth_token": gateway.twilio_auth_token, **webhook},
         TwilioSmsProvider),
        ("sandbox-sms", "sms", "sandbox", {}, webhook, SandboxProvider),
    ]  # fmt: skip
    try:
        for name, channel, kind, settings, secrets, cls in rows:
            provider = build_provider(
                name=name, channel=channel, kind=kind, settings=settings, secrets=secrets, engine=engine
            )
            assert isinstance(provider, cls)
            assert provider.name == name
            if kind in ("fcm", "sms-json", "twilio"):  # really wired: it sends through the gateway
                message = push() if channel == "push" else sms()
                assert (await provider.send(message)).provider == name
            await provider.close()
    finally:
        await engine.dispose()

    with pytest.raises(ProviderConfigError) as invalid:
        build_provider(name="broken", channel="sms", kind="twilio", settings={}, secrets={}, engine=engine)
    assert "settings.account_sid: Field required" in invalid.value.problems


def test_the_environment_smtp_server_is_checked_like_a_stored_provider() -> None:
    from core.config import Settings
    from worker import build_default_providers

    bad = Settings(_env_file=None, smtp_port=0, mail_from="nobody")
    with pytest.raises(ValueError, match="MARQUEE_SMTP_") as err:
        build_default_providers(bad, engine=None)  # type: ignore[arg-type]
    assert "settings.port" in str(err.value)
    assert "settings.sender" in str(err.value)
    both = Settings(_env_file=None, smtp_use_tls=True, smtp_start_tls=True)
    with pytest.raises(ValueError, match="mutually exclusive"):
        build_default_providers(both, engine=None)  # type: ignore[arg-type]
