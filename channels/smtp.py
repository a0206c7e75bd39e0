"""Email over SMTP with a pool of persistent aiosmtplib connections."""

from __future__ import annotations

import asyncio
import hashlib
from email.utils import parseaddr

import aiosmtplib

from channels.base import OutboundMessage, PermanentSendError, ProviderReceipt, TransientSendError
from channels.mime import build_message


def message_id_for(idempotency_key: str, domain: str) -> str:
    """A deterministic Message-ID: a resend after a crash carries the same id, so
    mailbox providers (and our tests) can collapse duplicates."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"<{digest}@{domain}>"


class SmtpProvider:
    """Sends email through one SMTP server, reusing up to `pool_size` connections."""

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
        timeout: float = 10.0,
        pool_size: int = 10,
        name: str = "smtp",
    ) -> None:
        self.name = name
        self._options = dict(
            hostname=host,
            port=port,
            username=username,
            password=password,
            use_tls=use_tls,
            start_tls=start_tls,
            timeout=timeout,
        )
        self._sender = sender
        self._envelope_from = parseaddr(sender)[1]
        self._domain = message_id_domain
        self._idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        self._slots = asyncio.Semaphore(pool_size)

    async def _acquire(self) -> aiosmtplib.SMTP:
        while not self._idle.empty():
            conn = self._idle.get_nowait()
            if conn.is_connected:
                return conn
        conn = aiosmtplib.SMTP(**self._options)  # type: ignore[arg-type]
        await conn.connect()
        return conn

    async def send(self, message: OutboundMessage) -> ProviderReceipt:
        message_id = message_id_for(message.idempotency_key, self._domain)
        html = message.data.get("html")
        raw = build_message(
            sender=self._sender,
            to=message.address,
            subject=message.title,
            text=message.body,
            html=html if isinstance(html, str) and html else None,
            message_id=message_id,
        )
        async with self._slots:
            conn: aiosmtplib.SMTP | None = None
            try:
                conn = await self._acquire()
                await conn.sendmail(self._envelope_from, [message.address], raw)
            except aiosmtplib.SMTPRecipientsRefused as err:
                _discard(conn)
                code, text = next(iter(err.recipients)).code, str(next(iter(err.recipients)).message)
                raise _classify(code, text) from err
            except aiosmtplib.SMTPResponseException as err:
                _discard(conn)
                raise _classify(err.code, err.message) from err
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as err:
                _discard(conn)
                raise TransientSendError(f"SMTP connection failed: {err}") from err
            self._idle.put_nowait(conn)
        return ProviderReceipt(provider=self.name, message_id=message_id)

    async def close(self) -> None:
        while not self._idle.empty():
            conn = self._idle.get_nowait()
            try:
                await conn.quit()
            except (aiosmtplib.SMTPException, OSError):
                conn.close()


def _discard(conn: aiosmtplib.SMTP | None) -> None:
    # After an error the session state is unknown: never return it to the pool.
    if conn is not None and conn.is_connected:
        conn.close()


def _classify(code: int, text: str) -> TransientSendError | PermanentSendError:
    detail = f"SMTP {code}: {text}"
    if 500 <= code < 600:
        return PermanentSendError(detail)
    return TransientSendError(detail)
