"""Providers in the admin panel, in a real headless Chromium against the real stack.

An admin creates an SMTP provider through the form (its problems shown first, nothing
saved), edits it without retyping the secret, sends a test message that reaches the test
SMTP server, sees an open breaker and resets it, then deletes it; an analyst sees the
list without a single button and is refused every change.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import sqlalchemy as sa
from playwright.async_api import Page, expect
from sqlalchemy.ext.asyncio import AsyncEngine

from core.auth import Role
from core.config import Settings
from core.models import AuditEntry
from core.secretbox import unseal
from services import breaker
from services.providers import providers
from tests.browser import test_admin_browser as admin_browser  # skips this module too without chromium
from tests.stack import SmtpServer, token_for

browser = admin_browser.browser
context = admin_browser.context
page = admin_browser.page
make_user = admin_browser.make_user
sign_in = admin_browser.sign_in

audit_log = AuditEntry.__table__  # type: ignore[attr-defined]


def shot(name: str) -> str:
    return f"/tmp/admin-providers-{name}.png"


@pytest.fixture
async def admin_api(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token_for(settings, Role.admin, 'admin@provider-browser-tests')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30) as client:
        yield client


def smtp_settings(port: int) -> str:
    return json.dumps({"host": "127.0.0.1", "port": port, "sender": "Marquee Admin <admin-tests@example.com>",
                       "timeout": 2}, indent=2)  # fmt: skip


async def stored(engine: AsyncEngine, name: str) -> sa.Row | None:
    async with engine.connect() as conn:
        return (await conn.execute(sa.select(providers).where(providers.c.name == name))).first()


async def provider_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(providers)) or 0)


async def signed_in(page: Page, api_url: str, make_user, role: Role) -> str:
    email, password = await make_user(role)
    await sign_in(page, api_url, email, password)
    await page.wait_for_url(f"{api_url}/admin/")
    await page.locator("a.nav-link", has_text="Providers").click()
    await page.wait_for_url(f"{api_url}/admin/providers")
    return email


async def test_admin_creates_edits_tests_resets_and_deletes_a_provider(
    page: Page, api_url: str, engine: AsyncEngine, settings: Settings, smtp_server: SmtpServer, make_user
) -> None:
    email = await signed_in(page, api_url, make_user, Role.admin)
    name = f"adm-smtp-{uuid.uuid4().hex[:8]}"
    password = f"pw-{uuid.uuid4().hex}"
    await page.click("#new-provider")
    await page.wait_for_url(f"{api_url}/admin/providers/new")

    # A bad name and a port out of range: both named on the form, nothing stored.
    before = await provider_count(engine)
    await page.fill("#field-name", "Bad Name")
    await page.select_option("#field-kind", "smtp")
    await page.fill("#field-settings", smtp_settings(70000))
    await page.fill("#field-secret-smtp-password", password)
    await page.uncheck("#field-enabled")  # no send of another test goes through it
    await page.click("#save-provider")  # nor a reason: named too
    problems = page.locator("#form-problems tr.problem")
    await expect(problems).to_have_count(3)
    texts = " | ".join(await problems.all_inner_texts())
    assert "reason" in texts, texts
    assert "name" in texts, texts
    assert "settings.port" in texts, texts
    await expect(page.locator("#field-name")).to_have_class(re.compile(r"\bis-invalid\b"))
    await expect(page.locator("#field-settings")).to_have_class(re.compile(r"\bis-invalid\b"))
    await expect(page.locator("#field-secret-smtp-password")).to_have_value("")  # never sent back
    assert password not in await page.content()
    await page.screenshot(path=shot("form-problems"), full_page=True)
    assert await provider_count(engine) == before

    await page.fill("#field-name", name)
    await page.fill("#field-settings", smtp_settings(smtp_server.port))
    await page.fill("#field-secret-smtp-password", password)
    await page.fill("#field-priority", "20")
    await page.fill("#field-rate_limit_per_second", "15")
    await page.fill("#field-reason", "new relay")
    await page.click("#save-provider")
    await page.wait_for_url(f"{api_url}/admin/providers")
    row = page.locator(f"tr.provider[data-provider='{name}']")
    await expect(row).to_be_visible()
    await expect(
        page.locator(".provider-channel[data-channel=email]").locator(f"[data-provider='{name}']")
    ).to_have_count(1)
    await expect(row.locator(".breaker-state")).to_have_text("closed")
    await expect(row.locator(".provider-enabled")).to_have_text("disabled")
    await expect(row).to_contain_text("15/s")
    created = await stored(engine, name)
    assert created is not None
    assert (created.priority, created.rate_limit_per_second, created.enabled) == (20, 15.0, False)
    assert password not in (created.secrets or "")
    assert unseal(settings.fernet_key(), created.secrets)["password"] == password

    # Edit: the password field is empty with a placeholder; left empty, the secret stays.
    await row.locator(".provider-edit").click()
    await page.wait_for_url(f"{api_url}/admin/providers/change/{name}")
    secret_input = page.locator("#field-secret-smtp-password")
    await expect(secret_input).to_have_value("")
    await expect(secret_input).to_have_attribute("placeholder", "stored — leave empty to keep")
    assert password not in await page.content()
    await page.fill("#field-priority", "5")
    await page.fill("#field-reason", "try it first")
    await page.click("#save-provider")
    await page.wait_for_url(f"{api_url}/admin/providers")
    edited = await stored(engine, name)
    assert edited is not None
    assert edited.priority == 5
    assert unseal(settings.fernet_key(), edited.secrets)["password"] == password

    # Send a test message: it reaches the SMTP server with the id the page shows.
    address = f"admin-probe-{uuid.uuid4().hex[:8]}@example.com"
    await row.locator(".provider-test").click()
    await page.wait_for_url(f"{api_url}/admin/providers/test/{name}")
    await page.fill("#field-to", address)
    await page.fill("#field-title", "Admin provider check")
    await page.click("#send-test")
    await expect(page.locator("#test-result")).to_have_attribute("data-ok", "true")
    message_id = await page.locator("#provider-message-id").inner_text()
    [message] = smtp_server.handler.to(address)
    assert message["Subject"] == "Admin provider check"
    assert message["Message-ID"] == message_id
    await page.screenshot(path=shot("test-sent"), full_page=True)

    # An open breaker shows with its last error, and resets from the list.
    await breaker.record_failure(engine, name, "SMTP 421 on MAIL: too busy", threshold=1)
    await page.goto(f"{api_url}/admin/providers")
    await expect(row.locator(".breaker-state")).to_have_text("open")
    await expect(row.locator(".breaker-error")).to_have_text("SMTP 421 on MAIL: too busy")
    await page.screenshot(path=shot("breaker-open"), full_page=True)
    await row.locator(".provider-reset").click()
    await page.wait_for_url(f"{api_url}/admin/providers/act/{name}/reset-breaker")
    await page.click("#confirm-act")  # without a reason: refused, named on the form
    await expect(page.locator("#field-reason")).to_have_class(re.compile(r"\bis-invalid\b"))
    await page.fill("#field-reason", "relay recovered")
    await page.click("#confirm-act")
    await page.wait_for_url(f"{api_url}/admin/providers")
    await expect(row.locator(".breaker-state")).to_have_text("closed")
    await expect(row.locator(".provider-reset")).to_have_count(0)

    # Delete, after a confirmation page.
    await row.locator(".provider-delete").click()
    await page.wait_for_url(f"{api_url}/admin/providers/delete/{name}")
    await page.fill("#field-reason", "replaced by another relay")
    await page.click("#confirm-delete")
    await page.wait_for_url(f"{api_url}/admin/providers")
    await expect(row).to_have_count(0)
    assert await stored(engine, name) is None

    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(audit_log).where(audit_log.c.entity == "provider",
                                                              audit_log.c.entity_id == name)
                                   .order_by(audit_log.c.id))).all()  # fmt: skip
    assert [r.action for r in rows] == ["provider.create", "provider.update", "provider.test",
                                        "provider.breaker_reset", "provider.delete"]  # fmt: skip
    assert {(r.actor, r.role) for r in rows} == {(email, "admin")}
    assert rows[1].details["changed"] == ["priority"]
    assert password not in json.dumps([r.details for r in rows])


async def test_analyst_sees_the_list_without_buttons_and_cannot_change_anything(
    page: Page, api_url: str, admin_api: httpx.AsyncClient, engine: AsyncEngine, make_user
) -> None:
    name = f"adm-sms-{uuid.uuid4().hex[:8]}"
    body = {"channel": "sms", "kind": "sandbox", "priority": 900, "enabled": False}
    response = await admin_api.put(f"/v1/providers/{name}", params={"reason": "test setup"}, json=body)
    assert response.status_code == 201, response.text
    try:
        await signed_in(page, api_url, make_user, Role.analyst)
        row = page.locator(f"tr.provider[data-provider='{name}']")
        await expect(row).to_be_visible()
        await expect(row.locator(".breaker-state")).to_have_text("closed")
        await expect(page.locator("#read-only")).to_be_visible()
        for selector in ("#new-provider", ".provider-edit", ".provider-test", ".provider-toggle", ".provider-reset",
                         ".provider-delete", "form[method=post]"):  # fmt: skip
            await expect(page.locator(selector)).to_have_count(0)
        await page.screenshot(path=shot("analyst"), full_page=True)

        for path in ("/admin/providers/new", f"/admin/providers/change/{name}", f"/admin/providers/test/{name}",
                     f"/admin/providers/delete/{name}", f"/admin/providers/act/{name}/disable"):  # fmt: skip
            answer = await page.goto(f"{api_url}{path}")
            assert answer is not None
            assert answer.status == 403, path
        posts: list[tuple[str, dict[str, str | float | bool]]] = [
            (f"/admin/providers/act/{name}/enable", {}),
            (f"/admin/providers/act/{name}/reset-breaker", {}),
            (f"/admin/providers/delete/{name}", {}),
            (f"/admin/providers/test/{name}", {"to": "+15550000000"}),
            (f"/admin/providers/change/{name}", {"channel": "sms", "kind": "sandbox", "priority": "1",
                                               "enabled": "on"}),
            ("/admin/providers/new", {"name": f"sneaky-{name}", "channel": "sms", "kind": "sandbox"}),
        ]  # fmt: skip
        for path, form in posts:
            refused = await page.request.post(
                f"{api_url}{path}", form={**form, "csrf_token": await admin_browser.csrf_token(page)}, max_redirects=0
            )
            assert refused.status == 403, (path, refused.status)
        row_after = await stored(engine, name)
        assert row_after is not None
        assert (row_after.priority, row_after.enabled) == (900, False)
        assert await stored(engine, f"sneaky-{name}") is None
    finally:
        await admin_api.delete(f"/v1/providers/{name}", params={"reason": "test cleanup"})
