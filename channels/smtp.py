"""Email over SMTP with a pool of persistent aiosmtplib connections.

Each message is one MAIL / RCPT / DATA transaction on a pooled connection. The steps are
driven one by one (not through `sendmail`) so that a failure can be told apart by stage:
a connection found dead before DATA is safe to retry on a fresh connection, one that dies
after DATA was sent is not (the server may have queued the message already).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import ssl
from collections.abc import Awaitable
from email.utils import parseaddr
from typing import TypeVar

import aiosmtplib
from aiosmtplib.email import parse_address, quote_address

from channels.base import (
    DEFAULT_THROTTLE_SECONDS,
    InvalidAddressError,
    OutboundMessage,
    PermanentSendError,
    ProviderReceipt,
    ProviderUnavailableError,
    SendError,
    ThrottledError,
    TransientSendError,
)
from channels.mime import build_message

# Replies that mean "slow down" (RFC 5321: 421 service closing, 451 local error in
# processing — greylisting and rate limits use it —, 452 insufficient storage / too many recipients).
THROTTLE_CODES = frozenset({421, 451, 452})
# Authentication required / failed / needs encryption: our credentials or setup, not the message.
AUTH_CODES = frozenset({530, 534, 535, 538})
# RCPT replies that say the mailbox does not exist (unless the enhanced code is a 5.7.x policy refusal).
NO_SUCH_USER_CODES = frozenset({550, 551, 553})


_E = TypeVar("_E", bound=BaseException)


def message_id_for(idempotency_key: str, domain: str) -> str:
    """A deterministic Message-ID: a resend after a crash carries the same id, so
    mailbox providers (and our tests) can collapse duplicates."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"<{digest}@{domain}>"


class _DroppedBeforeData(Exception):
    """The connection died before the message content was sent: nothing was delivered."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Reply(Exception):
    """A clean SMTP error reply at one stage of the transaction."""

    def __init__(self, stage: str, code: int, text: str) -> None:
        super().__init__(f"SMTP {code} on {stage}: {text}")
        self.stage, self.code, self.text = stage, code, text


class SmtpProvider:
    """Sends email through one SMTP server, reusing up to `pool_size` connections.

    `start_tls=True` makes STARTTLS mandatory (a server that does not offer it is refused),
    `use_tls=True` is implicit TLS (port 465). Certificates are verified unless
    `validate_certs=False`; `cert_bundle` is a CA PEM file for servers with a private CA."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sender: str,
        message_id_domain: str,
        username: str | None = None,
        password: str | None = None,
        use_tls: bool = False,
        start_tls: bool = False,
        validate_certs: bool = True,
        cert_bundle: str | None = None,
        timeout: float = 10.0,
        pool_size: int = 10,
        throttle_seconds: float = DEFAULT_THROTTLE_SECONDS,
        name: str = "smtp",
    ) -> None:
        if use_tls and start_tls:
            raise ValueError("use_tls (implicit TLS) and start_tls are mutually exclusive")
        self.name = name
        # Built once: a bad cert_bundle path fails here, at configuration, not on every send.
        tls_context = _tls_context(validate_certs, cert_bundle) if use_tls or start_tls else None
        self._options = dict(
            hostname=host,
            port=port,
            username=username,
            password=password,
            use_tls=use_tls,
            # False, never None: None would make aiosmtplib upgrade only when offered (opportunistic).
            start_tls=start_tls,
            validate_certs=validate_certs,
            tls_context=tls_context,
            timeout=timeout,
        )
        # SMTP never says how long to back off after 421/451/452: this is the retry_after given.
        self._throttle = throttle_seconds
        self._sender = sender
        self._envelope_from = parseaddr(sender)[1]
        self._domain = message_id_domain
        self._idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        self._slots = asyncio.Semaphore(pool_size)

    async def send(self, message: OutboundMessage) -> ProviderReceipt:
        message_id = message_id_for(message.idempotency_key, self._domain)
        if not _is_bare_address(message.address):
            # It would go into the To header and the RCPT command verbatim: no display names,
            # no line breaks, nothing aiosmtplib would quietly parse into another address.
            raise InvalidAddressError(f"not a bare email address: {message.address!r}", message.address)
        html = message.data.get("html")
        raw = build_message(
            sender=self._sender,
            to=message.address,
            subject=message.title,
            text=message.body,
            html=html if isinstance(html, str) and html else None,
            message_id=message_id,
            extra_headers=_extra_headers(message.data.get("headers")),
        )
        async with self._slots:
            fresh = False
            while True:
                conn, reused = await self._checkout(fresh=fresh)
                try:
                    await self._transaction(conn, message.address, raw)
                except _DroppedBeforeData as dropped:
                    _discard(conn)
                    if reused:
                        # Most likely closed by the server while idle in the pool. Nothing was
                        # sent, so one more try on a new connection cannot duplicate the message.
                        fresh = True
                        continue
                    raise _classify_transaction(dropped.cause, message.address, self._throttle) from dropped.cause
                except asyncio.CancelledError:
                    _discard(conn)
                    raise
                except Exception as err:
                    await self._release_after_error(conn, err)
                    classified = _classify_transaction(err, message.address, self._throttle)
                    if classified is err:
                        raise
                    raise classified from err
                break
            self._idle.put_nowait(conn)
        return ProviderReceipt(provider=self.name, message_id=message_id)

    async def close(self) -> None:
        while not self._idle.empty():
            conn = self._idle.get_nowait()
            try:
                await conn.quit()
            except (aiosmtplib.SMTPException, OSError):
                conn.close()

    async def _checkout(self, *, fresh: bool) -> tuple[aiosmtplib.SMTP, bool]:
        """A connected session and whether it was reused from the pool."""
        while not fresh and not self._idle.empty():
            conn = self._idle.get_nowait()
            if conn.is_connected:
                return conn, True
        conn = aiosmtplib.SMTP(**self._options)  # type: ignore[arg-type]
        try:
            await conn.connect()
            if conn.is_ehlo_or_helo_needed:  # the extensions (SIZE, SMTPUTF8) are read from EHLO
                await conn.ehlo()
        except asyncio.CancelledError:
            _discard(conn)
            raise
        except (aiosmtplib.SMTPException, OSError) as err:
            _discard(conn)
            raise _classify_connect(err, self._throttle) from err
        return conn, False

    async def _transaction(self, conn: aiosmtplib.SMTP, address: str, raw: bytes) -> None:
        utf8 = not (self._envelope_from.isascii() and address.isascii())
        options = ["SMTPUTF8"] if utf8 else []
        encoding = "utf-8" if utf8 else "ascii"
        try:
            if utf8 and not conn.supports_extension("smtputf8"):
                raise PermanentSendError("non-ASCII address and the SMTP server does not offer SMTPUTF8")
            if conn.supports_extension("size"):
                options.append(f"SIZE={len(raw)}")
            # MAIL and RCPT as aiosmtplib's mail() and rcpt() send them, without parsing both
            # addresses again for every message: the sender is quoted once, and a bare
            # address (checked in send()) is its own parse.
            arguments = [option.encode("ascii") for option in options]
            await _command(conn, "MAIL", b"FROM:" + self._mail_from.encode(encoding), *arguments)
            await _command(conn, "RCPT", b"TO:<" + address.encode(encoding) + b">", accepted=(250, 251))
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as err:
            raise _DroppedBeforeData(err) from err
        except _Reply as reply:
            if reply.stage == "MAIL" and reply.code == 421:
                # The reply a server leaves behind when it closes an idle session (Postfix:
                # "421 4.4.2 Error: timeout exceeded"); on a fresh connection it is throttling.
                raise _DroppedBeforeData(reply) from reply
            raise
        # From here on a lost connection may follow an accepted message: never retried.
        await _step("DATA", conn.data(raw))

    @functools.cached_property
    def _mail_from(self) -> str:
        return quote_address(self._envelope_from)  # a sender it refuses fails every send, as before

    async def _release_after_error(self, conn: aiosmtplib.SMTP, error: Exception) -> None:
        """Keep a healthy session after a clean refusal (bulk mail meets many dead addresses);
        drop it after anything else, since its state is then unknown."""
        if isinstance(error, _Reply) and conn.is_connected:
            try:
                await conn.rset()
            except (aiosmtplib.SMTPException, OSError):
                _discard(conn)
            else:
                self._idle.put_nowait(conn)
                return
        _discard(conn)


async def _command(conn: aiosmtplib.SMTP, stage: str, *arguments: bytes, accepted: tuple[int, ...] = (250,)) -> None:
    response = await conn.execute_command(stage.encode(), *arguments)
    if response.code not in accepted:
        raise _Reply(stage, response.code, response.message)


async def _step(stage: str, command: Awaitable[object]) -> None:
    try:
        await command
    except aiosmtplib.SMTPResponseException as err:
        raise _Reply(stage, err.code, err.message) from err


# The shape of nearly every address: dot-separated runs of letters, digits and "_%+-".
# email.utils parses these to themselves: recognising them here saves parsing (8 us) per message.
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


def _is_bare_address(address: str) -> bool:
    return _PLAIN_ADDRESS.fullmatch(address) is not None or _parses_to_itself(address)


def _parses_to_itself(address: str) -> bool:
    try:
        return "@" in address and parse_address(address) == address and not any(c.isspace() for c in address)
    except ValueError:
        return False


def _discard(conn: aiosmtplib.SMTP | None) -> None:
    # After an error the session state is unknown: never return it to the pool.
    if conn is not None and conn.is_connected:
        conn.close()


def _tls_context(validate_certs: bool, cert_bundle: str | None) -> ssl.SSLContext:
    # The system CAs plus the bundle, as aiosmtplib's own `cert_bundle` does.
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if cert_bundle is not None:
        context.load_verify_locations(cafile=cert_bundle)
    if not validate_certs:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _in_chain(error: BaseException, kind: type[_E]) -> _E | None:
    """`error` or the first of its causes that is a `kind` (aiosmtplib wraps TLS errors)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _classify_connect(error: BaseException, throttle: float) -> SendError:
    """Errors while connecting, upgrading to TLS or logging in."""
    if (cert := _in_chain(error, ssl.SSLCertVerificationError)) is not None:
        return ProviderUnavailableError(f"SMTP server certificate rejected: {cert.verify_message or cert}")
    if isinstance(error, aiosmtplib.SMTPResponseException):
        code, text = error.code, error.message
        if code in THROTTLE_CODES:
            return ThrottledError(f"SMTP {code} on connect: {text}", throttle)
        if code < 500:  # e.g. 454 temporary authentication failure
            return TransientSendError(f"SMTP {code} on connect: {text}")
        # Bad credentials (535), or a server that does not serve us at all (554 greeting).
        return ProviderUnavailableError(f"SMTP {code} on connect: {text}")
    if isinstance(error, aiosmtplib.SMTPNotSupported) or (
        type(error) is aiosmtplib.SMTPException and "not supported" in str(error).lower()
    ):
        # STARTTLS required but not offered, AUTH requested but unavailable: configuration.
        return ProviderUnavailableError(f"SMTP server cannot serve our configuration: {error}")
    if (tls_error := _in_chain(error, ssl.SSLError)) is not None:
        # No protocol or cipher in common, or TLS spoken to a plain port: configuration.
        return ProviderUnavailableError(f"SMTP TLS handshake failed: {tls_error}")
    return TransientSendError(f"SMTP connection failed: {error}")


def _classify_transaction(error: Exception, address: str, throttle: float) -> Exception:
    """Errors during MAIL / RCPT / DATA."""
    if isinstance(error, SendError):  # already classified (a reconnect's failure)
        return error
    if isinstance(error, _Reply):
        return _classify_reply(error, address, throttle)
    if isinstance(error, TimeoutError | aiosmtplib.SMTPException | OSError):
        return TransientSendError(f"SMTP connection failed: {error}")
    return error


def _classify_reply(reply: _Reply, address: str, throttle: float) -> SendError:
    code, detail = reply.code, str(reply)
    if code in THROTTLE_CODES:
        return ThrottledError(detail, throttle)
    if code in AUTH_CODES:
        return ProviderUnavailableError(detail)
    if reply.stage == "MAIL" and code in (550, 553):
        # Our envelope sender is refused: every message would be, so fail over.
        return ProviderUnavailableError(detail)
    if reply.stage == "RCPT" and code in NO_SUCH_USER_CODES and not reply.text.lstrip().startswith("5.7."):
        return InvalidAddressError(detail, address)
    if 500 <= code < 600:
        return PermanentSendError(detail)
    return TransientSendError(detail)


def _extra_headers(value: object) -> dict[str, str] | None:
    """Headers the send path adds (List-Unsubscribe); never ones that define the message."""
    if not isinstance(value, dict):
        return None
    reserved = {"from", "to", "subject", "date", "message-id", "mime-version", "content-type"}
    return {str(name): str(text) for name, text in value.items() if str(name).lower() not in reserved}
