"""Development outbox: the mail the capture SMTP server received and the sandbox push/SMS.

Mounted only with MARQUEE_DEV_TOOLS=true (which `marquee dev` sets).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from html import escape
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse

from api.deps import ConnectionDep, SettingsDep
from api.problems import Problem
from services import sandbox

router = APIRouter(prefix="/dev", tags=["development"])


def _summary(path: Path) -> dict[str, Any]:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    return {
        "id": path.stem,
        "from": message["From"],
        "to": message["To"],
        "subject": message["Subject"],
        "date": message["Date"],
        "message_id": message["Message-ID"],
    }


def _mail_files(mail_dir: Path, limit: int) -> list[Path]:
    if not mail_dir.exists():
        return []
    return sorted(mail_dir.glob("*.eml"), reverse=True)[:limit]


# Plain `def`: FastAPI runs these in its thread pool, so file reads do not block the loop.
@router.get("/mail")
def list_mail(settings: SettingsDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    """Messages received by the capture SMTP server, newest first."""
    return [_summary(path) for path in _mail_files(settings.mail_capture_dir, limit)]


@router.get("/mail/{message_id}", response_class=PlainTextResponse)
def raw_mail(message_id: str, settings: SettingsDep) -> str:
    path = settings.mail_capture_dir / f"{message_id}.eml"
    if "/" in message_id or not path.exists():
        raise Problem(404, "Not found", f"no captured message {message_id!r}")
    return path.read_text(errors="replace")


@router.get("/outbox")
async def list_sandbox(
    conn: ConnectionDep, channel: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[dict[str, Any]]:
    """Push and SMS messages the sandbox providers would have sent, newest first."""
    return [dict(row) for row in await sandbox.recent_messages(conn, channel=channel, limit=limit)]


@router.get("", response_class=HTMLResponse, include_in_schema=False)
async def outbox_page(request: Request, settings: SettingsDep, conn: ConnectionDep) -> str:
    """One page to see everything the dev stack 'sent'."""
    mail = await asyncio.to_thread(list_mail, settings, 50)
    mail_rows = "".join(
        f"<tr><td>{escape(str(m['date']))}</td><td>{escape(str(m['to']))}</td>"
        f"<td><a href='/dev/mail/{escape(m['id'])}'>{escape(str(m['subject']))}</a></td></tr>"
        for m in mail
    )
    sandbox_rows = "".join(
        f"<tr><td>{escape(str(r['created_at']))}</td><td>{escape(r['channel'])}</td><td>{escape(r['address'])}</td>"
        f"<td>{escape(str(r['payload'].get('title', '')))}: {escape(str(r['payload'].get('body', '')))}</td></tr>"
        for r in await sandbox.recent_messages(conn, limit=50)
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Marquee dev outbox</title>
<meta http-equiv="refresh" content="5"><style>body{{font-family:sans-serif;margin:2em}}
table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ddd;padding:4px;text-align:left}}</style>
</head><body><h1>Dev outbox</h1>
<h2>Email (capture SMTP server)</h2><table><tr><th>Date</th><th>To</th><th>Subject</th></tr>{mail_rows}</table>
<h2>Push and SMS (sandbox providers)</h2>
<table><tr><th>At</th><th>Channel</th><th>To</th><th>Message</th></tr>{sandbox_rows}</table>
</body></html>"""
