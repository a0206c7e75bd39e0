"""The notifications and recipients screens in a real headless Chromium against the real
stack: search by user, status and channel; a notification's timeline from PostgreSQL and
ClickHouse, its content and its Temporal link; cancel with a reason (refused without one);
a recipient's page with preferences, suppressions, follows and recent notifications, the
GDPR export and erase with reasons; what an analyst does not get; and every page usable
at 375 px (no horizontal overflow of the page).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from playwright.async_api import Browser, Page, expect
from sqlalchemy.ext.asyncio import AsyncEngine

from core.auth import Role
from core.config import Settings
from core.models import AuditEntry
from tests.browser import test_admin_browser as admin_browser  # skips this module too without chromium
from tests.stack import token_for, wait_for_status

browser = admin_browser.browser
context = admin_browser.context
page = admin_browser.page
make_user = admin_browser.make_user
sign_in = admin_browser.sign_in
audit_log = AuditEntry.__table__  # type: ignore[attr-defined]


def shot(name: str) -> str:
    return f"/tmp/admin-notifications-{name}.png"


@pytest.fixture
async def admin_api(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token_for(settings, Role.admin, 'notifications-browser')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30) as client:
        yield client


async def signed_in(page: Page, api_url: str, make_user: Any, role: Role) -> str:
    email, password = await make_user(role)
    await sign_in(page, api_url, email, password)
    await page.wait_for_url(f"{api_url}/admin/")
    return str(email)


def sms(user_id: str, title: str, **extra: Any) -> dict[str, Any]:
    return {"user_id": user_id, "type": "new_episode", "channels": ["sms"], "title": title,
            "body": "Episode 6 is out.", **extra}  # fmt: skip


async def quiet_person(api: httpx.AsyncClient, recipient: dict[str, Any]) -> None:
    """The recipient in quiet hours for the next two hours (UTC): a normal send waits."""
    now = datetime.now(UTC)
    quiet = {"quiet_hours_start": (now - timedelta(hours=1)).strftime("%H:%M"),
             "quiet_hours_end": (now + timedelta(hours=2)).strftime("%H:%M"), "timezone": "UTC"}  # fmt: skip
    update = {k: v for k, v in recipient.items() if k not in ("user_id", "created_at", "updated_at")}
    response = await api.put(f"/v1/recipients/{recipient['user_id']}", json={**update, **quiet})
    assert response.status_code == 200, response.text


async def audit_rows(engine: AsyncEngine, action: str, entity_id: str) -> list[Any]:
    async with engine.connect() as conn:
        query = sa.select(audit_log).where(audit_log.c.action == action, audit_log.c.entity_id == entity_id)
        return list((await conn.execute(query.order_by(audit_log.c.id))).all())


async def test_search_timeline_cancel_with_a_reason_and_the_recipient(
    page: Page,
    api: httpx.AsyncClient,
    admin_api: httpx.AsyncClient,
    api_url: str,
    recipient: dict[str, Any],
    engine: AsyncEngine,
    make_user: Any,
) -> None:
    user = recipient["user_id"]
    tag = uuid.uuid4().hex[:6]
    await quiet_person(api, recipient)
    held = (await api.post("/v1/notifications", json=sms(user, f"Held {tag}"))).json()
    sent = (await api.post("/v1/notifications?wait=true", json=sms(user, f"Sent {tag}", priority="urgent"))).json()
    assert sent["status"] == "sent", sent
    suppressed = await admin_api.post("/v1/suppressions", json={"channel": "email", "address": recipient["email"],
                                                                "reason": "complaint by phone"})  # fmt: skip
    assert suppressed.status_code in (200, 201), suppressed.text
    follows = await api.put(f"/v1/recipients/{user}/follows", json={"follows": ["series:42"]})
    assert follows.status_code == 200, follows.text
    email = await signed_in(page, api_url, make_user, Role.admin)

    # Search: the user's two, then by status, then by channel.
    await page.locator("a.nav-link", has_text="Notifications").click()
    await page.wait_for_url(re.compile(r"/admin/notifications"))
    await page.fill("#filter-user_id", user)
    await page.click("#apply-filters")
    rows = page.locator("#results tr.notification")
    await expect(rows).to_have_count(2)
    assert await rows.nth(0).get_attribute("data-id") == sent["id"]  # newest first
    await page.select_option("#filter-status", "sent")
    await page.click("#apply-filters")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-id", sent["id"])
    await page.select_option("#filter-status", "")
    await page.select_option("#filter-channel", "email")
    await page.click("#apply-filters")
    await expect(page.locator("#no-results")).to_be_visible()
    # A day with nothing is refused when it is not a day; a period before today finds nothing.
    await page.goto(f"{api_url}/admin/notifications?user_id={user}&until=2001-01-01")
    await expect(page.locator("#no-results")).to_be_visible()
    refused = await page.request.get(f"{api_url}/admin/notifications?since=yesterday")
    assert refused.status == 400

    # The sent one: timeline from both stores, its content and its run.
    await page.goto(f"{api_url}/admin/notifications?user_id={user}")
    await page.locator(f"#results tr[data-id='{sent['id']}'] a.notification-link").click()
    await page.wait_for_url(f"{api_url}/admin/notifications/view/{sent['id']}")
    timeline = page.locator("#timeline tr.moment")
    await expect(timeline.locator("xpath=self::*[@data-source='postgresql'][@data-status='sent']")).to_have_count(1)
    await expect(timeline.locator("xpath=self::*[@data-source='postgresql'][@data-status='accepted']")).to_have_count(1)
    for _ in range(50):  # history is written in batches: reload until ClickHouse has the send
        if await page.locator("#timeline tr.moment[data-source='clickhouse'][data-status='sent']").count():
            break
        await page.wait_for_timeout(200)
        await page.reload()
    await expect(page.locator("#timeline tr.moment[data-source='clickhouse'][data-status='sent']")).to_have_count(1)
    await expect(page.locator("#content-title")).to_have_text(f"Sent {tag}")
    await expect(page.locator("#content-body")).to_have_text("Episode 6 is out.")
    link = await page.locator("#temporal-link").get_attribute("href")
    assert link is not None
    assert f"/workflows/{sent['workflow_id']}/" in link
    assert link.endswith("/history")
    await expect(page.locator("#cancel-form")).to_have_count(0)  # sent: nothing to cancel
    await page.screenshot(path=shot("detail"), full_page=True)

    # The held one: no cancel without a reason, then cancelled with one.
    await page.goto(f"{api_url}/admin/notifications/view/{held['id']}")
    await expect(page.locator("#notification-status")).to_have_text("pending")
    async with page.expect_response(lambda r: "/cancel/" in r.url) as info:
        await page.click("#cancel-notification")
    assert (await info.value).status == 400
    await expect(page.locator("#cancel-reason")).to_have_class(re.compile(r"\bis-invalid\b"))
    await expect(page.locator("#cancel-form .invalid-feedback")).to_contain_text("reason")
    assert await audit_rows(engine, "notification.cancel", held["id"]) == []
    await page.fill("#cancel-reason", "sent to the wrong audience")
    await page.click("#cancel-notification")
    await page.wait_for_url(f"{api_url}/admin/notifications/view/{held['id']}")
    await wait_for_status(api, held["id"], "cancelled")
    await page.reload()
    await expect(page.locator("#notification-status")).to_have_text("cancelled")
    await expect(page.locator("#timeline tr.moment[data-source='audit']")).to_contain_text("sent to the wrong audience")
    [row] = await audit_rows(engine, "notification.cancel", held["id"])
    assert (row.actor, row.role, row.reason) == (email, "admin", "sent to the wrong audience")

    # The recipient's page: preferences, suppressions, follows, recent notifications.
    await page.click("#recipient-link")
    await page.wait_for_url(re.compile(r"/admin/recipients/view/"))
    await expect(page.locator("#profile-user-id")).to_have_text(user)
    await expect(page.locator("#suppressions tr.suppression")).to_contain_text("complaint by phone")
    await expect(page.locator("#follows .follow")).to_have_text(["series:42"])
    await expect(page.locator("#recent-notifications tr.notification")).to_have_count(2)
    await expect(page.locator("#preferences")).to_be_visible()
    await page.screenshot(path=shot("recipient"), full_page=True)

    # GDPR export: refused without a reason, a JSON document with one.
    async with page.expect_response(lambda r: "/recipients/export/" in r.url) as info:
        await page.click("#export-recipient")
    assert (await info.value).status == 400
    await expect(page.locator("#export-reason")).to_have_class(re.compile(r"\bis-invalid\b"))
    await page.fill("#export-reason", "subject access request 17")
    async with page.expect_download() as download_info:
        await page.click("#export-recipient")
    document = json.loads((await (await download_info.value).path()).read_text())
    assert document["user_id"] == user
    assert {n["id"] for n in document["notifications"]} == {held["id"], sent["id"]}
    [exported] = await audit_rows(engine, "recipient.export", user)
    assert exported.reason == "subject access request 17"

    # The recipient list finds them by email.
    await page.goto(f"{api_url}/admin/recipients")
    await page.fill("#filter-q", recipient["email"])
    await page.click("#apply-filters")
    await expect(page.locator("#results tr.recipient")).to_have_count(1)
    await expect(page.locator("#results tr.recipient")).to_have_attribute("data-user-id", user)


async def test_erase_asks_why_and_whom_then_removes_the_person(
    page: Page, api: httpx.AsyncClient, api_url: str, recipient: dict[str, Any], engine: AsyncEngine, make_user: Any
) -> None:
    user = recipient["user_id"]
    sent = (await api.post("/v1/notifications?wait=true", json=sms(user, "To be erased"))).json()
    assert sent["status"] == "sent", sent
    await signed_in(page, api_url, make_user, Role.admin)
    await page.goto(f"{api_url}/admin/recipients/view/{user}")

    # Neither a reason nor the user_id typed: both named, nothing erased.
    async with page.expect_response(lambda r: "/recipients/erase/" in r.url) as info:
        await page.click("#erase-recipient")
    assert (await info.value).status == 400
    await expect(page.locator("#erase-reason")).to_have_class(re.compile(r"\bis-invalid\b"))
    await expect(page.locator("#erase-confirm")).to_have_class(re.compile(r"\bis-invalid\b"))
    assert (await api.get(f"/v1/recipients/{user}")).status_code == 200

    await page.fill("#erase-reason", "erasure request 23")
    await page.fill("#erase-confirm", user)
    await page.click("#erase-recipient")
    await page.wait_for_url(f"{api_url}/admin/recipients")
    await expect(page.locator(".flash-message")).to_contain_text("Erased")
    assert (await api.get(f"/v1/recipients/{user}")).status_code == 404
    assert (await api.get(f"/v1/notifications/{sent['id']}")).status_code == 404
    async with engine.connect() as conn:
        query = sa.select(audit_log).where(audit_log.c.action == "recipient.erase",
                                           audit_log.c.reason == "erasure request 23")  # fmt: skip
        [erased] = (await conn.execute(query)).all()
    # The audit row names a keyed hash, never the person.
    assert erased.entity_id.startswith("erased:")
    assert user not in erased.entity_id


async def test_an_analyst_reads_without_cancel_or_gdpr(
    page: Page, api: httpx.AsyncClient, api_url: str, recipient: dict[str, Any], make_user: Any
) -> None:
    user = recipient["user_id"]
    await quiet_person(api, recipient)
    held = (await api.post("/v1/notifications", json=sms(user, "Held for the analyst"))).json()
    try:
        await signed_in(page, api_url, make_user, Role.analyst)
        await page.goto(f"{api_url}/admin/notifications/view/{held['id']}")
        await expect(page.locator("#cancel-not-allowed")).to_be_visible()
        await expect(page.locator("#cancel-form")).to_have_count(0)
        await page.goto(f"{api_url}/admin/recipients/view/{user}")
        await expect(page.locator("#profile-user-id")).to_have_text(user)
        await expect(page.locator("#gdpr")).to_have_count(0)
        for path in (f"/admin/notifications/cancel/{held['id']}", f"/admin/recipients/erase/{user}",
                     f"/admin/recipients/export/{user}"):  # fmt: skip
            form: dict[str, str | float | bool] = {
                "reason": "not mine to do",
                "csrf_token": await admin_browser.csrf_token(page),
            }
            answer = await page.request.post(f"{api_url}{path}", form=form, max_redirects=0)
            assert answer.status == 403, path
        assert (await api.get(f"/v1/notifications/{held['id']}")).json()["status"] == "pending"
    finally:
        await api.post(f"/v1/notifications/{held['id']}/cancel", json={"reason": "test cleanup"})


async def test_the_screens_fit_a_375_px_phone(
    browser: Browser, api: httpx.AsyncClient, api_url: str, recipient: dict[str, Any], make_user: Any
) -> None:
    user = recipient["user_id"]
    sent = (await api.post("/v1/notifications?wait=true", json=sms(user, "A long title " * 6))).json()
    phone = await browser.new_context(viewport={"width": 375, "height": 812}, device_scale_factor=1)
    phone.set_default_timeout(10_000)
    try:
        page = await phone.new_page()
        await signed_in(page, api_url, make_user, Role.admin)
        pages = {
            "list": f"/admin/notifications?user_id={user}",
            "detail": f"/admin/notifications/view/{sent['id']}",
            "recipients": "/admin/recipients",
            "recipient": f"/admin/recipients/view/{user}",
        }
        widths = {}
        for name, path in pages.items():
            response = await page.goto(f"{api_url}{path}")
            assert response is not None
            assert response.status == 200, path
            await page.screenshot(path=shot(f"375-{name}"), full_page=True)
            widths[name] = await page.evaluate("document.documentElement.scrollWidth")
        assert widths == dict.fromkeys(pages, 375)
    finally:
        await phone.close()
