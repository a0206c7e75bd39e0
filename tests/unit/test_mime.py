"""The lean MIME writer (channels.mime) and the SMTP provider's address check (channels.smtp)."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email import message_from_bytes
from email.header import decode_header, make_header
from email.utils import parsedate_to_datetime

import pytest

from channels.mime import build_message
from channels.smtp import _is_bare_address, _parses_to_itself


def message(sender: str = "Marquee <news@example.com>") -> bytes:
    return build_message(sender=sender, to="alex@example.com", subject="Dune", text="Hi", html="<p>Hi</p>",
                         message_id="<1@example.com>")  # fmt: skip


def test_date_is_now_and_from_keeps_its_display_name() -> None:
    for sender in ("Marquee <news@example.com>", "Kinó Márquee <news@example.com>"):
        for _ in range(2):  # the second message reuses what the first formatted
            parsed = message_from_bytes(message(sender))
            assert str(make_header(decode_header(parsed["From"]))) == sender
            sent_at = parsedate_to_datetime(parsed["Date"])
            assert abs((datetime.now(UTC) - sent_at).total_seconds()) < 2


@pytest.mark.parametrize(
    ("address", "bare"),
    [
        ("alex@example.com", True),
        ("first.last+tag@mail.example.co.uk", True),
        ("a_b%c-d@x-y.example", True),
        ('"quoted local"@example.com', False),  # a space: never verbatim on an RCPT line
        ("Alex <alex@example.com>", False),
        ("<alex@example.com>", False),
        ("alex@example.com, eve@example.com", False),
        ("alex@example.com\r\nRCPT TO:<eve@example.com>", False),
        ("alex@example.com ", False),
        ("alex(comment)@example.com", False),
        ("example.com", False),
    ],
)
def test_bare_addresses(address: str, bare: bool) -> None:
    assert _is_bare_address(address) is bare


def test_the_plain_shape_is_a_shortcut_not_another_rule() -> None:
    pick = random.Random(5)
    for _ in range(2000):
        local = ".".join("".join(pick.choice("aZ09_%+-") for _ in range(pick.randint(1, 5))) for _ in range(2))
        domain = ".".join("".join(pick.choice("bY8-") for _ in range(pick.randint(1, 5))) for _ in range(2))
        assert _parses_to_itself(f"{local}@{domain}"), f"{local}@{domain}"
