"""The SQLAdmin panel at /admin, driven in a real headless Chromium through Playwright.

Users sign in with rows of admin_users; the app is the real one served by uvicorn.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from core.auth import Role, hash_password
from core.models import AdminUser

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (make browser)", allow_module_level=True)

from playwright.async_api import Browser, BrowserContext, Locator, Page, async_playwright, expect  # noqa: E402

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path("/tmp/admin.png")
admin_users = AdminUser.__table__  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        await browser.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile per test: no cookies carried from one test to the next."""
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(10_000)
    yield context
    await context.close()


@pytest.fixture
async def page(context: BrowserContext) -> Page:
    return await context.new_page()


@pytest.fixture
async def make_user(engine: AsyncEngine) -> AsyncIterator:
    """Insert admin panel users directly; remove them afterwards."""
    emails: list[str] = []

    async def make(role: Role) -> tuple[str, str]:
        email = f"{role.value}-{uuid.uuid4().hex[:10]}@example.com"
        password = f"pw-{uuid.uuid4().hex}"
        async with engine.begin() as conn:
            await conn.execute(
                admin_users.insert().values(email=email, password_hash=hash_password(password), role=role.value)
            )
        emails.append(email)
        return email, password

    yield make
    async with engine.begin() as conn:
        await conn.execute(admin_users.delete().where(admin_users.c.email.in_(emails)))


async def sign_in(page: Page, api_url: str, email: str, password: str) -> None:
    await page.goto(f"{api_url}/admin/login")
    await page.fill("input[name=username]", email)
    await page.fill("input[name=password]", password)
    await page.click("button[type=submit]")


async def send_sms(api: httpx.AsyncClient, recipient: dict, title: str) -> dict:
    """A notification through the real API and workflow; the sandbox SMS provider sends it."""
    response = await api.post(
        "/v1/notifications?wait=true",
        json={
            "user_id": recipient["user_id"],
            "type": "new_episode",
            "channels": ["sms"],
            "title": title,
            "body": "Episode 6 is out.",
        },
    )
    assert response.status_code == 200, response.text
    notification: dict = response.json()
    assert notification["status"] == "sent"
    return notification


async def csrf_token(page: Page) -> str:
    """The session's CSRF token, as the page in the browser holds it (admin.csrf): what a
    POST made outside the page's forms must carry."""
    token = await page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert token
    return token


def menu_links(page: Page) -> Locator:
    return page.locator("a.nav-link .nav-link-title")


async def test_wrong_password_shows_the_form_again_without_a_session(
    page: Page, context: BrowserContext, api_url: str, make_user
) -> None:
    email, _ = await make_user(Role.admin)

    await page.goto(f"{api_url}/admin/login")
    await page.fill("input[name=username]", email)
    await page.fill("input[name=password]", "not-the-password")
    async with page.expect_response(lambda r: r.url.endswith("/admin/login") and r.request.method == "POST") as info:
        await page.click("button[type=submit]")
    response = await info.value
    assert response.status == 400

    assert page.url == f"{api_url}/admin/login"
    await expect(page.locator("input[name=username]")).to_have_class(re.compile(r"\bis-invalid\b"))
    await expect(page.locator("input[name=password]")).to_have_class(re.compile(r"\bis-invalid\b"))
    await expect(page.locator(".invalid-feedback").first).to_have_text("Invalid credentials.")
    # The session holds the login form's CSRF token (admin.csrf), and no user.
    for cookie in await context.cookies():
        if cookie["name"] == "session":
            assert "user_id" not in json.loads(base64.b64decode(cookie["value"].split(".")[0]))

    # Still signed out: the panel sends us back to the login form.
    await page.goto(f"{api_url}/admin/notifications")
    assert page.url == f"{api_url}/admin/login"
    await expect(page.locator("input[name=password]")).to_be_visible()


async def test_admin_sees_a_notification_in_the_list_and_its_details(
    page: Page, context: BrowserContext, api: httpx.AsyncClient, api_url: str, recipient: dict, make_user
) -> None:
    title = f"Admin panel check {uuid.uuid4().hex[:8]}"
    notification = await send_sms(api, recipient, title)

    email, password = await make_user(Role.admin)
    await sign_in(page, api_url, email, password)
    assert page.url == f"{api_url}/admin/"
    assert [cookie for cookie in await context.cookies() if cookie["name"] == "session"]
    await expect(menu_links(page)).to_contain_text(["Notifications", "Dead letters", "Recipients", "Admin users"])

    await page.locator("a.nav-link", has_text="Notifications").click()
    await page.wait_for_url(f"{api_url}/admin/notifications")
    row = page.locator(f"#results tr[data-id='{notification['id']}']")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text(title)
    await expect(row).to_contain_text(recipient["user_id"])
    await expect(row).to_contain_text("sent")
    await page.screenshot(path=str(SCREENSHOT), full_page=False)

    details_url = f"{api_url}/admin/notifications/view/{notification['id']}"
    await row.locator("a.notification-link").click()
    await page.wait_for_url(details_url)
    await expect(page.locator(".page-title")).to_contain_text(notification["id"])
    await expect(page.locator("#content-title")).to_have_text(title)
    await expect(page.locator("#content-body")).to_have_text("Episode 6 is out.")
    await expect(page.locator("#recipient-link")).to_have_text(recipient["user_id"])
    # The request hash is not shown.
    await expect(page.locator("body")).not_to_contain_text("request_hash")


async def test_analyst_reads_notifications_but_not_admin_users(
    page: Page, api: httpx.AsyncClient, api_url: str, recipient: dict, make_user
) -> None:
    notification = await send_sms(api, recipient, f"Analyst check {uuid.uuid4().hex[:8]}")
    email, password = await make_user(Role.analyst)
    await sign_in(page, api_url, email, password)
    assert page.url == f"{api_url}/admin/"

    titles = await menu_links(page).all_inner_texts()
    # Everything an analyst may read; "Admin users" is not among it.
    assert [t.strip() for t in titles] == [
        "Notifications", "Dead letters", "Recipients", "Suppressions", "Templates", "Campaigns",
        "Segments", "Event types", "Trigger rules", "Events", "Providers", "Audit log", "Analytics",
    ]  # fmt: skip

    await page.locator("a.nav-link", has_text="Notifications").click()
    await page.wait_for_url(f"{api_url}/admin/notifications")
    # Read-only: rows are listed, with no way to create, edit or delete.
    await expect(page.locator(f"#results tr[data-id='{notification['id']}']")).to_have_count(1)
    await expect(page.locator("a[href$='/admin/notification/create']")).to_have_count(0)
    await expect(page.locator("a[href*='/admin/notification/edit/']")).to_have_count(0)

    # sqladmin answers a view the backend refuses with 403 and its error page; no redirect.
    for path in ("/admin/users", "/admin/users/view/1", "/admin/users/new"):
        response = await page.goto(f"{api_url}{path}")
        assert response is not None
        assert response.status == 403, path
        assert page.url == f"{api_url}{path}"
        await expect(page.locator(".empty-header")).to_have_text("403")
        await expect(page.locator("body")).not_to_contain_text(email)
