"""Admin users, login throttling, CSRF and security headers, in a real headless Chromium
against the real stack.

An admin creates a user, changes their role, sets a new password and deactivates them while
the user has the panel open in a browser of their own: each change applies at the user's next
click (a new password or a deactivation ends the session). The last active admin cannot demote
or deactivate themselves. A POST without the session's CSRF token is refused; every page
carries the security headers and its inline scripts run under the policy; guessing a password
ends in 429.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import sqlalchemy as sa
from playwright.async_api import Browser, Page, expect
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from api.app import create_app
from core.auth import Role
from core.config import Settings
from core.models import AdminUser, AuditEntry
from tests import admin_session
from tests.browser import test_admin_browser as admin_browser  # skips this module too without chromium

browser = admin_browser.browser
context = admin_browser.context
page = admin_browser.page
make_user = admin_browser.make_user
sign_in = admin_browser.sign_in

admin_users = AdminUser.__table__  # type: ignore[attr-defined]
audit_log = AuditEntry.__table__  # type: ignore[attr-defined]


def shot(name: str) -> str:
    return f"/tmp/admin-users-{name}.png"


@pytest.fixture
async def created(engine: AsyncEngine) -> AsyncIterator[list[str]]:
    """Emails of users a test creates through the panel; removed afterwards."""
    emails: list[str] = []
    yield emails
    async with engine.begin() as conn:
        await conn.execute(admin_users.delete().where(admin_users.c.email.in_(emails)))


async def signed_in_admin(page: Page, api_url: str, make_user) -> str:
    email, password = await make_user(Role.admin)
    await sign_in(page, api_url, email, password)
    await page.wait_for_url(f"{api_url}/admin/")
    return email


async def user_signs_in(page: Page, api_url: str, email: str, password: str) -> int:
    """The status of the login's answer (302 on success, then the index)."""
    await page.goto(f"{api_url}/admin/login")
    await page.fill("input[name=username]", email)
    await page.fill("input[name=password]", password)
    async with page.expect_response(lambda r: r.url.endswith("/admin/login") and r.request.method == "POST") as info:
        await page.click("button[type=submit]")
    return (await info.value).status


async def audit_trail(engine: AsyncEngine, user_id: int) -> list[tuple[str, str, str | None]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(audit_log.c.action, audit_log.c.actor, audit_log.c.reason)
            .where(audit_log.c.entity == "admin_user", audit_log.c.entity_id == str(user_id))
            .order_by(audit_log.c.id)
        )
        return [tuple(row) for row in rows]


async def test_admin_creates_a_user_changes_role_password_and_access_and_the_session_follows(
    page: Page, browser: Browser, api_url: str, engine: AsyncEngine, make_user, created: list[str]
) -> None:
    admin = await signed_in_admin(page, api_url, make_user)
    await page.locator("a.nav-link", has_text="Admin users").click()
    await page.wait_for_url(f"{api_url}/admin/users")
    await expect(page.locator(f"tr.admin-user[data-email='{admin}']")).to_contain_text("you")

    # A new user: a short password is refused on the form, nothing stored.
    email, first, second = f"ana-{uuid.uuid4().hex[:8]}@example.com", f"pw-{uuid.uuid4().hex}", f"pw-{uuid.uuid4().hex}"
    created.append(email)
    await page.click("#new-user")
    await page.fill("#field-email", email)
    await page.select_option("#field-role", "analyst")
    await page.fill("#field-password", "short")
    await page.click("#create-user")
    await expect(page.locator("#form-problems")).to_contain_text("at least 10 characters")
    await expect(page.locator("#field-password")).to_have_class(re.compile(r"\bis-invalid\b"))
    await page.fill("#field-password", first)
    await page.click("#create-user")
    await expect(page.locator(".flash-message")).to_have_text(f"User {email} created.")
    await expect(page.locator("#user-role")).to_have_text("analyst")
    user_url = page.url
    user_id = int(user_url.rsplit("/", 1)[1])

    # The user, in a browser of their own: an analyst's menu.
    theirs = await (await browser.new_context()).new_page()
    assert await user_signs_in(theirs, api_url, email, first) == 302
    await expect(admin_browser.menu_links(theirs)).not_to_contain_text(["Admin users"])
    assert (await theirs.goto(f"{api_url}/admin/templates/new")).status == 403  # type: ignore[union-attr]

    # A role change needs a reason; with one, it applies at the user's next request.
    await page.select_option("#field-role", "campaign_manager")
    await page.click("#change-role")
    await expect(page.locator("#role-form .problems")).to_contain_text("reason")
    await expect(page.locator("#role-reason")).to_have_class(re.compile(r"\bis-invalid\b"))
    await expect(page.locator("#user-role")).to_have_text("analyst")
    await page.select_option("#field-role", "campaign_manager")
    await page.fill("#role-reason", "runs the autumn campaigns")
    await page.click("#change-role")
    await expect(page.locator(".flash-message")).to_have_text(f"{email} is now campaign_manager.")
    await expect(page.locator("#user-role")).to_have_text("campaign_manager")
    assert (await theirs.goto(f"{api_url}/admin/templates/new")).status == 200  # type: ignore[union-attr]

    # A new password ends the session signed in with the old one; the old one no longer works.
    await page.fill("#field-password", second)
    await page.click("#reset-password")
    await expect(page.locator(".flash-message")).to_contain_text(f"New password set for {email}")
    await theirs.goto(f"{api_url}/admin/templates")
    assert theirs.url == f"{api_url}/admin/login"
    assert await user_signs_in(theirs, api_url, email, first) == 400
    assert await user_signs_in(theirs, api_url, email, second) == 302

    # Deactivated (with a reason): the open session is refused at its next request, and so is a sign-in.
    await page.click("#deactivate-user")
    await expect(page.locator("#status-form .problems")).to_contain_text("reason")
    await page.fill("#status-reason", "left the company")
    await page.click("#deactivate-user")
    await expect(page.locator("#user-status")).to_have_text("deactivated")
    await page.screenshot(path=shot("deactivated"), full_page=True)
    await theirs.goto(f"{api_url}/admin/templates")
    assert theirs.url == f"{api_url}/admin/login"
    assert await user_signs_in(theirs, api_url, email, second) == 400

    # Reactivated: they sign in again.
    await page.click("#activate-user")
    await expect(page.locator("#user-status")).to_have_text("active")
    assert await user_signs_in(theirs, api_url, email, second) == 302
    await theirs.context.close()

    assert await audit_trail(engine, user_id) == [
        ("admin_user.create", admin, None),
        ("admin_user.set_role", admin, "runs the autumn campaigns"),
        ("admin_user.reset_password", admin, None),
        ("admin_user.deactivate", admin, "left the company"),
        ("admin_user.activate", admin, None),
    ]
    await page.goto(f"{api_url}/admin/users")
    row = page.locator(f"tr.admin-user[data-email='{email}']")
    await expect(row.locator(".user-role")).to_have_text("campaign_manager")
    await expect(row.locator(".user-status")).to_have_text("active")


@pytest.fixture
async def only_admin(engine: AsyncEngine, make_user) -> AsyncIterator[tuple[str, str]]:
    """An admin who is, for the test, the only active one (the others are put back after)."""
    email, password = await make_user(Role.admin)
    async with engine.begin() as conn:
        others = (
            await conn.execute(
                admin_users.update()
                .where(admin_users.c.role == "admin", admin_users.c.is_active, admin_users.c.email != email)
                .values(is_active=False)
                .returning(admin_users.c.id)
            )
        ).scalars()
        paused = list(others)
    try:
        yield email, password
    finally:
        async with engine.begin() as conn:
            await conn.execute(admin_users.update().where(admin_users.c.id.in_(paused)).values(is_active=True))


async def test_the_last_active_admin_can_neither_demote_nor_deactivate_themselves(
    page: Page, api_url: str, engine: AsyncEngine, only_admin: tuple[str, str]
) -> None:
    email, password = only_admin
    await sign_in(page, api_url, email, password)
    await page.wait_for_url(f"{api_url}/admin/")
    await page.goto(f"{api_url}/admin/users")
    await page.locator(f"tr.admin-user[data-email='{email}'] a").click()

    await page.select_option("#field-role", "analyst")
    await page.fill("#role-reason", "stepping back")
    async with page.expect_response(lambda r: r.request.method == "POST") as info:
        await page.click("#change-role")
    assert (await info.value).status == 409
    await expect(page.locator("#role-form .problems")).to_contain_text("last active admin")
    await page.fill("#status-reason", "leaving")
    async with page.expect_response(lambda r: r.request.method == "POST") as info:
        await page.click("#deactivate-user")
    assert (await info.value).status == 409
    await expect(page.locator("#status-form .problems")).to_contain_text("last active admin")
    await page.screenshot(path=shot("last-admin"), full_page=True)
    await expect(page.locator("#user-role")).to_have_text("admin")
    await expect(page.locator("#user-status")).to_have_text("active")


async def test_a_post_without_the_sessions_csrf_token_is_refused(
    page: Page, api_url: str, engine: AsyncEngine, make_user
) -> None:
    await signed_in_admin(page, api_url, make_user)
    await page.goto(f"{api_url}/admin/users/new")
    # Every POST form of the page carries the token (SQLAdmin's and ours alike).
    posting = page.locator("form[method=post]")
    await expect(posting).to_have_count(1)
    await expect(posting.locator("input[type=hidden][name=csrf_token]")).to_have_count(1)

    email = f"forged-{uuid.uuid4().hex[:8]}@example.com"
    form: dict[str, str | float | bool] = {"email": email, "role": "admin", "password": f"pw-{uuid.uuid4().hex}"}
    for token in (None, "not-the-token"):
        sent = form if token is None else {**form, "csrf_token": token}
        refused = await page.request.post(f"{api_url}/admin/users/new", form=sent, max_redirects=0)
        assert refused.status == 403, token
        assert "CSRF token" in await refused.text()
    # The token may come in the header instead (SQLAdmin's scripted requests): wrong, refused; right, saved.
    token = await admin_browser.csrf_token(page)
    refused = await page.request.post(f"{api_url}/admin/users/new", form=form, max_redirects=0,
                                      headers={"X-CSRF-Token": "not-the-token"})  # fmt: skip
    assert refused.status == 403
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).where(admin_users.c.email == email)) == 0
    try:
        accepted = await page.request.post(f"{api_url}/admin/users/new", form=form, max_redirects=0,
                                           headers={"X-CSRF-Token": token})  # fmt: skip
        assert accepted.status == 303
    finally:
        async with engine.begin() as conn:
            await conn.execute(admin_users.delete().where(admin_users.c.email == email))

    # The login form too: a POST with no session token behind it is refused before any password check.
    async with httpx.AsyncClient(base_url=api_url) as stranger:
        login = await stranger.post("/admin/login", data={"username": "x@example.com", "password": "x" * 12})
        assert login.status_code == 403


async def test_pages_carry_the_security_headers_and_run_under_the_policy(page: Page, api_url: str, make_user) -> None:
    violations: list[str] = []
    page.on("console", lambda message: violations.append(message.text) if "Content Security Policy" in message.text
            else None)  # fmt: skip
    page.on("pageerror", lambda error: violations.append(str(error)))
    await signed_in_admin(page, api_url, make_user)
    nonces = set()
    # Pages with inline scripts and styles (the provider form, the analytics charts), SQLAdmin's list.
    for path in ("/admin/users", "/admin/providers/new", "/admin/analytics", "/admin/suppression/list"):
        answer = await page.goto(f"{api_url}{path}")
        assert answer is not None
        assert answer.status == 200, path
        headers = await answer.all_headers()
        policy = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy
        assert "script-src 'self' 'nonce-" in policy
        assert "unsafe-inline" not in policy.split("style-src-attr")[0], policy
        nonces.add(re.search(r"'nonce-([^']+)'", policy)[1])  # type: ignore[index]
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "strict-origin-when-cross-origin"
        await page.wait_for_load_state("load")
    assert len(nonces) == 4  # one per response
    # The provider form's inline script ran (it fills the settings for the chosen kind).
    await page.goto(f"{api_url}/admin/providers/new")
    await page.select_option("#field-kind", "sandbox")
    await expect(page.locator("#field-settings")).to_have_value(re.compile(r"\{\s*\}"))
    assert violations == []

    async with httpx.AsyncClient(base_url=api_url) as client:
        for path in ("/healthz", "/v1/notifications/none", "/admin/login"):
            response = await client.get(path)
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"], path
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["set-cookie"].lower().count("httponly") == 1
        assert "samesite=strict" in response.headers["set-cookie"].lower()


async def test_guessing_a_password_gets_429_and_a_wait(
    page: Page, api_url: str, settings: Settings, engine: AsyncEngine, temporal_client: Client, make_user
) -> None:
    email, password = await make_user(Role.analyst)
    first_failure = time.time()  # the 15 minutes run from the oldest failure (a moving window)
    for _ in range(5):
        assert await user_signs_in(page, api_url, email, "not-the-password") == 400
    await page.goto(f"{api_url}/admin/login")
    await page.fill("input[name=username]", email)
    await page.fill("input[name=password]", password)  # even the right one, while the lock holds
    async with page.expect_response(lambda r: r.url.endswith("/admin/login") and r.request.method == "POST") as info:
        await page.click("button[type=submit]")
    answer = await info.value
    assert answer.status == 429
    wait = int((await answer.all_headers())["retry-after"])
    assert 15 * 60 - (time.time() - first_failure) - 1 <= wait <= 15 * 60
    await expect(page.locator(".invalid-feedback").first).to_contain_text("Too many failed sign-ins")
    await page.screenshot(path=shot("throttled"), full_page=True)

    # Per address: 20 failures over as many accounts, then any account is refused from there. An
    # app of its own, so the session's shared app keeps no count for 127.0.0.1.
    app = create_app(settings, engine=engine, temporal=temporal_client)
    transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin.test") as client:
        token = await admin_session.csrf_token(client)
        for attempt in range(20):
            guess = {"username": f"nobody-{attempt}@example.com", "password": "x" * 12, "csrf_token": token}
            assert (await client.post("/admin/login", data=guess)).status_code == 400
        login = await client.post("/admin/login", data={"username": email, "password": password, "csrf_token": token})
        assert login.status_code == 429
        assert int(login.headers["retry-after"]) >= 1
    other = httpx.ASGITransport(app=app, client=("198.51.100.8", 40000))
    async with httpx.AsyncClient(transport=other, base_url="http://admin.test") as client:
        # Another address, and an account with no failures: signed in (the successes count nothing).
        other_email, other_password = await make_user(Role.analyst)
        for _ in range(3):
            login, _token = await admin_session.sign_in(client, other_email, other_password)
            assert login.status_code == 302
            await client.get("/admin/logout")
