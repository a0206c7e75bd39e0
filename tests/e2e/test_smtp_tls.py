"""SmtpProvider against real aiosmtpd servers: STARTTLS and implicit TLS verified against a
test CA, AUTH, the error taxonomy, and pooled connections the server dropped."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from channels.base import (
    InvalidAddressError,
    OutboundMessage,
    PermanentSendError,
    ProviderUnavailableError,
    ThrottledError,
    TransientSendError,
)
from channels.smtp import SmtpProvider, message_id_for
from entrypoints.embedded import free_port
from tests.stack import ScriptedSmtp

USER, PASSWORD = "marquee", "s3cret"


class Handler(ScriptedSmtp):
    """Records how each message arrived; can drop the connection at MAIL or after DATA."""

    def __init__(self) -> None:
        super().__init__()
        self.mail_reply: str | None = None  # e.g. "421 4.4.2 Error: timeout exceeded"
        self.drop_next_mail = 0  # abort the connection on the next N MAIL commands
        self.drop_after_data = False  # keep the message, then abort without the final 250
        self.sessions: list[dict[str, Any]] = []  # per delivered message: peer, TLS, login

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.drop_next_mail:
            self.drop_next_mail -= 1
            _abort(server)  # the client sees the connection vanish, no reply
            return "250 OK"
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.sessions.append(
            {"peer": session.peer, "tls": session.ssl is not None, "login": getattr(session.auth_data, "login", None)}
        )
        status = await super().handle_DATA(server, session, envelope)
        if self.drop_after_data:
            _abort(server)
        return status

    def message_ids(self) -> list[str]:
        return [message_from_bytes(raw, policy=default_policy)["Message-ID"] for _, raw in self.messages]


def _abort(server: SMTP) -> None:
    assert isinstance(server.transport, asyncio.Transport)
    server.transport.abort()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


def _authenticate(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (USER.encode(), PASSWORD.encode())
    # handled=False: aiosmtpd then sends the 535 itself (its default assumes we replied already).
    return AuthResult(success=ok, handled=False, auth_data=data)


@contextmanager
def smtp_server(**options: Any) -> Iterator[tuple[Handler, int]]:
    """An aiosmtpd server on 127.0.0.1; `options` go to aiosmtpd's SMTP (tls_context, ...)."""
    handler = Handler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **options)
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


def provider(port: int, **options: Any) -> SmtpProvider:
    return SmtpProvider(
        host="127.0.0.1", port=port, sender="Marquee <news@marquee.test>", message_id_domain="marquee.test",
        timeout=2, **options,
    )  # fmt: skip


def mail(address: str = "reader@example.com") -> OutboundMessage:
    return OutboundMessage("email", address, "Hello", "Plain body", f"key-{uuid.uuid4().hex}")


# --- TLS and AUTH -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def starttls_server(server_tls: ssl.SSLContext) -> Iterator[tuple[Handler, int]]:
    with smtp_server(
        tls_context=server_tls, require_starttls=True, authenticator=_authenticate, auth_require_tls=True,
        auth_required=True,
    ) as server:  # fmt: skip
        yield server


async def test_starttls_with_private_ca_and_auth(starttls_server: tuple[Handler, int], ca_file: str) -> None:
    handler, port = starttls_server
    sender = provider(port, start_tls=True, cert_bundle=ca_file, username=USER, password=PASSWORD)
    message = mail()
    try:
        receipt = await sender.send(message)
    finally:
        await sender.close()

    assert receipt.message_id == message_id_for(message.idempotency_key, "marquee.test")
    assert handler.sessions[-1]["tls"] is True
    assert handler.sessions[-1]["login"] == USER.encode()
    [delivered] = handler.to("reader@example.com")[-1:]
    assert delivered["Message-ID"] == receipt.message_id
    assert delivered["Date"] is not None


async def test_starttls_certificate_not_trusted_is_provider_unavailable(
    starttls_server: tuple[Handler, int],
) -> None:
    _, port = starttls_server
    sender = provider(port, start_tls=True, username=USER, password=PASSWORD)  # system CAs only
    try:
        with pytest.raises(ProviderUnavailableError, match="certificate"):
            await sender.send(mail())
    finally:
        await sender.close()


async def test_validate_certs_false_accepts_an_unknown_ca(starttls_server: tuple[Handler, int]) -> None:
    handler, port = starttls_server
    sender = provider(port, start_tls=True, validate_certs=False, username=USER, password=PASSWORD)
    try:
        await sender.send(mail("insecure@example.com"))
    finally:
        await sender.close()
    assert len(handler.to("insecure@example.com")) == 1


async def test_wrong_password_is_provider_unavailable(starttls_server: tuple[Handler, int], ca_file: str) -> None:
    _, port = starttls_server
    sender = provider(port, start_tls=True, cert_bundle=ca_file, username=USER, password="wrong")
    try:
        with pytest.raises(ProviderUnavailableError, match="535"):
            await sender.send(mail())
    finally:
        await sender.close()


async def test_server_requiring_starttls_refuses_a_plain_session(starttls_server: tuple[Handler, int]) -> None:
    _, port = starttls_server
    sender = provider(port)  # no TLS, no AUTH: the server answers 530 to MAIL
    try:
        with pytest.raises(ProviderUnavailableError, match="530"):
            await sender.send(mail())
    finally:
        await sender.close()


async def test_start_tls_is_required_not_opportunistic(ca_file: str) -> None:
    with smtp_server() as (handler, port):  # offers no STARTTLS
        sender = provider(port, start_tls=True, cert_bundle=ca_file)
        try:
            with pytest.raises(ProviderUnavailableError, match="STARTTLS"):
                await sender.send(mail())
        finally:
            await sender.close()
        assert handler.messages == []  # nothing went in clear text


async def test_implicit_tls(server_tls: ssl.SSLContext, ca_file: str) -> None:
    with smtp_server(ssl_context=server_tls) as (handler, port):
        trusted = provider(port, use_tls=True, cert_bundle=ca_file)
        untrusted = provider(port, use_tls=True)
        try:
            await trusted.send(mail("tls@example.com"))
            with pytest.raises(ProviderUnavailableError, match="certificate"):
                await untrusted.send(mail("never@example.com"))
        finally:
            await trusted.close()
            await untrusted.close()
        assert len(handler.to("tls@example.com")) == 1
        assert handler.to("never@example.com") == []


async def test_implicit_tls_to_a_plain_port_is_provider_unavailable(ca_file: str) -> None:
    with smtp_server() as (_, port):
        sender = provider(port, use_tls=True, cert_bundle=ca_file)
        try:
            with pytest.raises(ProviderUnavailableError, match="TLS handshake"):
                await sender.send(mail())
        finally:
            await sender.close()


def test_missing_cert_bundle_fails_at_configuration(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        provider(25, start_tls=True, cert_bundle=str(tmp_path / "missing.pem"))


# --- replies ----------------------------------------------------------------------------------


@pytest.fixture
def plain() -> Iterator[tuple[Handler, int]]:
    with smtp_server() as server:
        yield server


@pytest.mark.parametrize(
    ("reply", "error", "not_error"),
    [
        ("421 4.7.0 Too many connections, slow down", ThrottledError, None),
        ("451 4.7.1 Greylisted, try again later", ThrottledError, None),
        ("452 4.5.3 Too many recipients", ThrottledError, None),
        ("450 4.2.1 Mailbox busy", TransientSendError, ThrottledError),
        ("550 5.1.1 No such user", InvalidAddressError, None),
        ("553 5.1.3 Bad destination mailbox address syntax", InvalidAddressError, None),
        ("550 5.7.1 Relaying denied", PermanentSendError, InvalidAddressError),
        ("552 5.2.2 Mailbox full", PermanentSendError, InvalidAddressError),
    ],
)
async def test_rcpt_replies(
    plain: tuple[Handler, int], reply: str, error: type[Exception], not_error: type[Exception] | None
) -> None:
    handler, port = plain
    handler.refuse["target@example.com"] = reply
    sender = provider(port)
    try:
        with pytest.raises(error) as caught:
            await sender.send(mail("target@example.com"))
    finally:
        await sender.close()
    assert reply.split()[0] in str(caught.value)
    if not_error is not None:
        assert not isinstance(caught.value, not_error)
    if isinstance(caught.value, InvalidAddressError):
        assert caught.value.address == "target@example.com"
    if isinstance(caught.value, ThrottledError):
        assert caught.value.retry_after == 5.0  # SMTP says not how long: the default


async def test_throttle_seconds_is_configurable(plain: tuple[Handler, int]) -> None:
    handler, port = plain
    handler.refuse["busy@example.com"] = "451 4.3.0 Try later"
    sender = provider(port, throttle_seconds=0.5)
    try:
        with pytest.raises(ThrottledError) as caught:
            await sender.send(mail("busy@example.com"))
    finally:
        await sender.close()
    assert caught.value.retry_after == 0.5


async def test_the_envelope_carries_the_bare_sender_and_recipient(plain: tuple[Handler, int]) -> None:
    handler, port = plain
    sender = provider(port)
    try:
        await sender.send(mail("envelope+tag@example.com"))
    finally:
        await sender.close()
    [envelope] = [envelope for envelope, _ in handler.messages if envelope.rcpt_tos == ["envelope+tag@example.com"]]
    assert envelope.mail_from == "news@marquee.test"
    assert [option.split("=")[0] for option in envelope.mail_options] == ["SIZE"]


async def test_a_refused_recipient_keeps_the_pooled_connection(plain: tuple[Handler, int]) -> None:
    handler, port = plain
    handler.refuse["gone@example.com"] = "550 5.1.1 No such user"
    sender = provider(port, pool_size=1)
    try:
        await sender.send(mail("a@example.com"))
        with pytest.raises(InvalidAddressError):
            await sender.send(mail("gone@example.com"))
        await sender.send(mail("b@example.com"))
    finally:
        await sender.close()
    assert len({s["peer"] for s in handler.sessions}) == 1  # RSET, not a reconnect


async def test_no_server_is_transient() -> None:
    sender = provider(free_port())
    with pytest.raises(TransientSendError) as caught:
        await sender.send(mail())
    assert not isinstance(caught.value, ThrottledError)


async def test_unsendable_address_is_invalid() -> None:
    sender = provider(free_port())
    with pytest.raises(InvalidAddressError):
        await sender.send(mail("victim@example.com>\r\nRCPT TO:<other@example.com"))


# --- dropped connections ----------------------------------------------------------------------


async def test_connection_closed_while_idle_is_replaced() -> None:
    with smtp_server(timeout=0.2) as (handler, port):  # the server drops sessions idle for 0.2 s
        sender = provider(port)
        try:
            await sender.send(mail("first@example.com"))
            await asyncio.sleep(0.5)
            await sender.send(mail("second@example.com"))
        finally:
            await sender.close()
    assert len(handler.messages) == 2
    assert len({s["peer"] for s in handler.sessions}) == 2


async def test_pooled_connection_dropped_at_mail_is_retried_once_on_a_new_one(plain: tuple[Handler, int]) -> None:
    handler, port = plain
    sender = provider(port, pool_size=1)
    message = mail("again@example.com")
    try:
        await sender.send(mail("first@example.com"))
        handler.drop_next_mail = 1  # the pooled session dies under us, unnoticed until used
        await sender.send(message)
    finally:
        await sender.close()
    assert handler.message_ids().count(message_id_for(message.idempotency_key, "marquee.test")) == 1
    assert len({s["peer"] for s in handler.sessions}) == 2


async def test_stale_421_on_a_pooled_connection_is_retried(plain: tuple[Handler, int]) -> None:
    handler, port = plain
    sender = provider(port, pool_size=1)
    try:
        await sender.send(mail("first@example.com"))
        handler.mail_reply = "421 4.4.2 Error: timeout exceeded"
        with pytest.raises(ThrottledError):  # the fresh connection is refused too: real throttling
            await sender.send(mail("second@example.com"))
        handler.mail_reply = None
        await sender.send(mail("third@example.com"))
    finally:
        await sender.close()
    assert [rcpt for envelope, _ in handler.messages for rcpt in envelope.rcpt_tos] == [
        "first@example.com",
        "third@example.com",
    ]


async def test_a_fresh_connection_dropped_is_not_retried(plain: tuple[Handler, int]) -> None:
    handler, port = plain
    handler.drop_next_mail = 2
    sender = provider(port)
    try:
        with pytest.raises(TransientSendError, match=r"EOF|lost|disconnect"):
            await sender.send(mail())
    finally:
        await sender.close()
    assert handler.drop_next_mail == 1  # one attempt only


async def test_drop_after_data_is_never_retried(plain: tuple[Handler, int]) -> None:
    handler, port = plain
    sender = provider(port, pool_size=1)
    try:
        await sender.send(mail("first@example.com"))
        handler.drop_after_data = True
        with pytest.raises(TransientSendError):
            await sender.send(mail("maybe@example.com"))  # the server may have it: caller decides
    finally:
        await sender.close()
    assert len(handler.to("maybe@example.com")) == 1  # not sent a second time
