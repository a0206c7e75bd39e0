"""A lean MIME writer for outgoing email.

Python's `email` package costs over a millisecond of CPU per message to build and
flatten, which caps a worker at a few hundred messages a second. Campaign mail has a
fixed shape (text, optionally with an HTML alternative), so it is written directly as
bytes here: same standards (RFC 5322 headers, RFC 2047 encoded words, quoted-printable
UTF-8 bodies), a fraction of the cost.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import time
from email.header import Header
from email.utils import formataddr, formatdate, parseaddr


def _header_value(value: str) -> str:
    if value.isascii():
        return value.replace("\r", " ").replace("\n", " ")
    return Header(value, "utf-8").encode()


@functools.lru_cache(maxsize=64)  # a provider's sender: the same in every message it sends
def _address(value: str) -> str:
    name, address = parseaddr(value)
    if name and not name.isascii():
        return formataddr((Header(name, "utf-8").encode(), address))
    return value


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    # Formatted once a second, not per message: the header has no finer resolution.
    return formatdate(second, usegmt=True)


def _qp(text: str) -> bytes:
    body = text.replace("\r\n", "\n").replace("\n", "\r\n").encode()
    return binascii.b2a_qp(body, istext=True).replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")


def build_message(
    *,
    sender: str,
    to: str,
    subject: str,
    text: str,
    html: str | None,
    message_id: str,
    extra_headers: dict[str, str] | None = None,
) -> bytes:
    headers = [
        f"From: {_address(sender)}",
        f"To: {to}",
        f"Subject: {_header_value(subject)}",
        f"Date: {_date(int(time.time()))}",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
    ]
    headers += [f"{name}: {_header_value(value)}" for name, value in (extra_headers or {}).items()]
    text_part = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    if html is None:
        head = "\r\n".join(headers).encode()
        return head + b"\r\n" + text_part + _qp(text) + b"\r\n"
    boundary = "=_m" + hashlib.sha1(message_id.encode()).hexdigest()[:24]
    headers.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
    mark = f"--{boundary}".encode()
    return b"".join(
        [
            "\r\n".join(headers).encode(),
            b"\r\n\r\n",
            mark + b"\r\n" + text_part + _qp(text) + b"\r\n",
            mark + b"\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n",
            _qp(html) + b"\r\n",
            mark + b"--\r\n",
        ]
    )
