"""Suppressed addresses through the API and the admin: listed, added by hand, lifted, audited;
a lifted address gets mail again."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from playwright.async_api import Page, expect
from sqlalchemy.ext.asyncio import AsyncEngine

from core.auth import Role
from core.config import Settings
from services.audit import audit_log
from services.preferences import suppressions
from tests.browser import test_admin_browser as admin_browser
from tests.stack import SmtpServer, token_for

browser = admin_browser.browser
context = admin_browser.context
page = admin_browser.page
make_user = admin_browser.make_user


@pytest.fixture
async def admin(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token_for(settings, Role.admin, 'ops@example.com')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30) as client:
        yield client


async def _audit(engine: AsyncEngine, entity_id: str) -> list[tuple[str, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(audit_log.c.action, audit_log.c.actor)
            .where(audit_log.c.entity == "suppression", audit_log.c.entity_id == entity_id)
            .order_by(audit_log.c.id)
        )
        return [(row.action, row.actor) for row in rows]


async def test_add_list_and_lift_a_suppression(
    api: httpx.AsyncClient, admin: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer,
    engine: AsyncEngine, settings: Settings, api_url: str,
) -> None:  # fmt: skip
    address = recipient["email"]
    added = await admin.post("/v1/suppressions", json={"channel": "email", "address": address.upper(),
                                                       "reason": "asked by phone to stop"})  # fmt: skip
    assert added.status_code == 201, added.text
    assert added.json()["address"] == address  # emails are kept lower-case, as recipients are
    again = await admin.post("/v1/suppressions", json={"channel": "email", "address": address, "reason": "again"})
    assert again.status_code == 409

    email = {"user_id": recipient["user_id"], "type": "premiere", "channels": ["email"], "title": "T", "body": "B"}
    held = (await api.post("/v1/notifications?wait=true", json=email)).json()
    assert held["channels"][0]["status"] == "suppressed"

    listed = (await admin.get("/v1/suppressions", params={"channel": "email", "address": address[:12]})).json()
    assert [(row["address"], row["reason"]) for row in listed] == [(address, "asked by phone to stop")]

    analyst = {"Authorization": f"Bearer {token_for(settings, Role.analyst, 'a')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=analyst) as reader:
        assert (await reader.get("/v1/suppressions")).status_code == 200
        assert (
            await reader.delete(f"/v1/suppressions/email/{address}", params={"reason": "mailbox fixed"})
        ).status_code == 403

    assert (
        await admin.delete(f"/v1/suppressions/email/{address.upper()}", params={"reason": "mailbox fixed"})
    ).status_code == 204  # any case
    assert (
        await admin.delete(f"/v1/suppressions/email/{address}", params={"reason": "mailbox fixed"})
    ).status_code == 404
    sent = (await api.post("/v1/notifications?wait=true", json=email)).json()
    assert sent["status"] == "sent"
    assert len(smtp_server.handler.to(address)) == 1
    assert await _audit(engine, f"email:{address}") == [
        ("suppression.add", "ops@example.com"),
        ("suppression.lift", "ops@example.com"),
    ]

    bad = await admin.post("/v1/suppressions", json={"channel": "fax", "address": "x", "reason": "no"})
    assert bad.status_code == 422
    assert {error["field"] for error in bad.json()["errors"]} == {"channel", "reason"}


async def test_an_admin_lifts_a_suppression_in_the_panel(
    page: Page, api_url: str, make_user: Any, engine: AsyncEngine
) -> None:
    address = f"bounced-{uuid.uuid4().hex[:8]}@example.com"
    async with engine.begin() as conn:
        await conn.execute(sa.insert(suppressions).values(channel="email", address=address,
                                                          reason="bounce: 5.1.1", source="hooks"))  # fmt: skip
    email, password = await make_user(Role.admin)
    await admin_browser.sign_in(page, api_url, email, password)
    await page.wait_for_url(f"{api_url}/admin/")
    await page.locator("a.nav-link", has_text="Suppressions").click()
    row = page.locator("tbody tr", has_text=address)
    await expect(row).to_contain_text("bounce: 5.1.1")
    await row.locator("a[data-bs-target='#modal-delete']").click()  # the row's trash icon
    await page.locator("#modal-delete-button").click()  # no reason: the dialog asks for one
    await expect(page.locator("#modal-delete-reason")).to_have_class(re.compile(r"\bis-invalid\b"))
    await page.fill("#modal-delete-reason", "mailbox fixed")
    await page.locator("#modal-delete-button").click()
    await expect(page.locator("tbody tr", has_text=address)).to_have_count(0)

    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).where(suppressions.c.address == address)) == 0
    assert await _audit(engine, f"email:{address}") == [("suppression.lift", email)]
