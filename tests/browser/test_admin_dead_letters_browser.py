"""Dead letters and the audit log in the admin panel, in a real headless Chromium against the
real stack: replay from the list (one message reaches the SMTP server), discard with a
reason, what an analyst may not do, and the audit page listing who did what.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect
from sqlalchemy.ext.asyncio import AsyncEngine

from core.auth import Role
from core.config import Settings
from tests.browser import test_admin_browser as admin_browser  # skips this module too without chromium
from tests.e2e.test_dead_letters import POLICY_REFUSAL, _client, audit_rows, fail_for_good, new_recipient
from tests.stack import SmtpServer, wait_for_status

browser = admin_browser.browser
context = admin_browser.context
page = admin_browser.page
make_user = admin_browser.make_user
sign_in = admin_browser.sign_in


def shot(name: str) -> str:
    return f"/tmp/admin-dead-letters-{name}.png"


@pytest.fixture
async def admin(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API as an admin: to find the dead letters the tests make, and check their state."""
    async for client in _client(api_url, settings, Role.admin, "ops-browser-tests"):
        yield client


async def signed_in(page: Page, api_url: str, make_user: Any, role: Role) -> str:
    email, password = await make_user(role)
    await sign_in(page, api_url, email, password)
    await page.wait_for_url(f"{api_url}/admin/")
    return str(email)


async def state(admin: httpx.AsyncClient, dead_letter_id: int) -> dict[str, Any]:
    response = await admin.get(f"/v1/dead-letters/{dead_letter_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_admin_replays_one_from_the_list(
    page: Page,
    api_url: str,
    api: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    smtp_server: SmtpServer,
    engine: AsyncEngine,
    make_user: Any,
) -> None:
    person = await new_recipient(api)
    letter = await fail_for_good(api, admin, smtp_server, person, POLICY_REFUSAL)
    other = await fail_for_good(api, admin, smtp_server, await new_recipient(api), POLICY_REFUSAL)
    del smtp_server.handler.refuse[person["email"]]
    email = await signed_in(page, api_url, make_user, Role.admin)

    await page.locator("a.nav-link", has_text="Dead letters").click()
    await page.wait_for_url(re.compile(r"/admin/dead-letters"))
    # Open ones by default; the reason filter finds text in the error too.
    await expect(page.locator("#filter-status")).to_have_value("open")
    await page.fill("#filter-q", "rejected by policy")
    await page.fill("#filter-user_id", person["user_id"])
    await page.click("#apply-filters")
    rows = page.locator("#dead-letters tr.dead-letter")
    await expect(rows).to_have_count(1)
    row = rows.first
    await expect(row).to_have_attribute("data-id", str(letter["id"]))
    await expect(row).to_contain_text("rejected by provider")
    await expect(row).to_contain_text(person["user_id"])
    await page.screenshot(path=shot("list"), full_page=True)

    # Nothing checked: nothing happens, and the panel says why.
    await page.click("#replay-selected")
    await expect(page.locator(".flash-message.alert-danger")).to_contain_text("Check the dead letters to replay")

    await row.locator("input.select-row").check()
    # A replay needs a reason: without one nothing is replayed.
    await page.click("#replay-selected")
    await expect(page.locator(".flash-message.alert-danger")).to_contain_text("Give the reason for the replay")
    await row.locator("input.select-row").check()
    await page.fill("#replay-reason", "mailbox fixed")
    await page.click("#replay-selected")
    await expect(page.locator(".flash-message")).to_have_text("Replayed 1 dead letter.")
    # Back on the same filtered list, where it is no longer open.
    await expect(page.locator("#filter-user_id")).to_have_value(person["user_id"])
    await expect(page.locator("#no-dead-letters")).to_be_visible()

    await wait_for_status(api, letter["notification_id"], "sent")
    assert len(smtp_server.handler.to(person["email"])) == 1
    assert (await state(admin, letter["id"]))["status"] == "replayed"
    assert (await state(admin, other["id"]))["status"] == "open"  # only the checked one

    # Its page: replayed by this panel user, with the run it started; no buttons any more.
    await page.select_option("#filter-status", "")
    await page.click("#apply-filters")
    await page.locator(f"#dead-letters tr[data-id='{letter['id']}'] a").click()
    await page.wait_for_url(f"{api_url}/admin/dead-letters/view/{letter['id']}")
    await expect(page.locator("#dead-letter-status")).to_have_text("replayed")
    await expect(page.locator("#resolved")).to_contain_text(email)
    entry = page.locator("#history tr.audit-entry")
    await expect(entry).to_have_count(1)
    await expect(entry).to_contain_text("dead_letter.replay")
    await expect(entry).to_contain_text(f"notification-{letter['notification_id']}-replay-{letter['id']}-1")
    await expect(page.locator("#request-json")).to_contain_text('"title": "Your receipt"')
    await expect(page.locator("#replay-dead-letter, #discard-dead-letter")).to_have_count(0)
    await page.screenshot(path=shot("detail"), full_page=True)
    [row_entry] = await audit_rows(engine, letter["id"])
    assert (row_entry.actor, row_entry.role) == (email, "admin")


async def test_admin_replays_from_the_detail_page(
    page: Page, api_url: str, api: httpx.AsyncClient, admin: httpx.AsyncClient, smtp_server: SmtpServer, make_user: Any
) -> None:
    person = await new_recipient(api)
    letter = await fail_for_good(api, admin, smtp_server, person, POLICY_REFUSAL)
    del smtp_server.handler.refuse[person["email"]]
    await signed_in(page, api_url, make_user, Role.admin)
    await page.goto(f"{api_url}/admin/dead-letters/view/{letter['id']}")
    await expect(page.locator("#dead-letter-status")).to_have_text("open")
    await expect(page.locator("#no-history")).to_be_visible()
    await page.fill("#replay-reason", "mailbox fixed")
    await page.click("#replay-dead-letter")
    await page.wait_for_url(f"{api_url}/admin/dead-letters/view/{letter['id']}")
    await expect(page.locator(".flash-message")).to_have_text("Replayed 1 dead letter.")
    await expect(page.locator("#dead-letter-status")).to_have_text("replayed")
    await wait_for_status(api, letter["notification_id"], "sent")
    assert len(smtp_server.handler.to(person["email"])) == 1


async def test_admin_discards_with_a_reason(
    page: Page,
    api_url: str,
    api: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    smtp_server: SmtpServer,
    engine: AsyncEngine,
    make_user: Any,
) -> None:
    person = await new_recipient(api)
    letter = await fail_for_good(api, admin, smtp_server, person, POLICY_REFUSAL)
    await signed_in(page, api_url, make_user, Role.admin)
    await page.goto(f"{api_url}/admin/dead-letters/view/{letter['id']}")
    await page.click("#discard-dead-letter")
    await page.wait_for_url(re.compile(r"/admin/dead-letters/discard\?"))
    await expect(page.locator("#to-discard tbody tr")).to_have_count(1)

    # Without a reason: the form says so, nothing changes.
    await page.click("#confirm-discard")
    await expect(page.locator("#form-problems tr.problem")).to_have_text([re.compile(r"reason\s+required")])
    await expect(page.locator("#field-reason")).to_have_class(re.compile(r"\bis-invalid\b"))
    await page.fill("#field-reason", " x ")
    await page.click("#confirm-discard")
    await expect(page.locator("#form-problems tr.problem")).to_contain_text(["at least 3 characters"])
    await page.screenshot(path=shot("discard-problems"), full_page=True)
    assert (await state(admin, letter["id"]))["status"] == "open"
    assert await audit_rows(engine, letter["id"]) == []

    await page.fill("#field-reason", "mailbox closed for good")
    await page.click("#confirm-discard")
    await page.wait_for_url(f"{api_url}/admin/dead-letters/view/{letter['id']}")
    await expect(page.locator(".flash-message")).to_have_text("Discarded 1 dead letter.")
    await expect(page.locator("#dead-letter-status")).to_have_text("discarded")
    await expect(page.locator("#history .audit-reason")).to_have_text("mailbox closed for good")
    assert (await state(admin, letter["id"]))["status"] == "discarded"
    assert smtp_server.handler.to(person["email"]) == []

    # Two at once from the list.
    people = [await new_recipient(api) for _ in range(2)]
    letters = [await fail_for_good(api, admin, smtp_server, someone, POLICY_REFUSAL) for someone in people]
    await page.goto(f"{api_url}/admin/dead-letters?q=rejected+by+policy")
    for each in letters:
        await page.locator(f"#dead-letters tr[data-id='{each['id']}'] input.select-row").check()
    await page.click("#discard-selected")
    await expect(page.locator("#to-discard tbody tr")).to_have_count(2)
    await page.fill("#field-reason", "test addresses")
    await page.click("#confirm-discard")
    await expect(page.locator(".flash-message")).to_have_text("Discarded 2 dead letters.")
    await page.wait_for_url(re.compile(r"/admin/dead-letters\?q=rejected"))
    for each in letters:
        assert (await state(admin, each["id"]))["status"] == "discarded"


async def test_analyst_sees_dead_letters_without_buttons(
    page: Page, api_url: str, api: httpx.AsyncClient, admin: httpx.AsyncClient, smtp_server: SmtpServer, make_user: Any
) -> None:
    person = await new_recipient(api)
    letter = await fail_for_good(api, admin, smtp_server, person, POLICY_REFUSAL)
    await signed_in(page, api_url, make_user, Role.analyst)
    await page.locator("a.nav-link", has_text="Dead letters").click()
    await page.fill("#filter-user_id", person["user_id"])
    await page.click("#apply-filters")
    await expect(page.locator("#dead-letters tr.dead-letter")).to_have_count(1)
    await expect(page.locator("#replay-selected, #discard-selected, input.select-row")).to_have_count(0)
    await page.locator(f"#dead-letters tr[data-id='{letter['id']}'] a").click()
    await expect(page.locator("#dead-letter-status")).to_have_text("open")
    await expect(page.locator("#request-json")).to_contain_text(person["user_id"])
    await expect(page.locator("#replay-dead-letter, #discard-dead-letter")).to_have_count(0)

    # The forms behind the buttons refuse the role too.
    answer = await page.goto(f"{api_url}/admin/dead-letters/discard?ids={letter['id']}")
    assert answer is not None
    assert answer.status == 403
    posts: list[tuple[str, dict[str, str | float | bool]]] = [
        ("/admin/dead-letters/replay", {"ids": str(letter["id"])}),
        ("/admin/dead-letters/discard", {"ids": str(letter["id"]), "reason": "not allowed"}),
    ]
    for path, form in posts:
        refused = await page.request.post(
            f"{api_url}{path}", form={**form, "csrf_token": await admin_browser.csrf_token(page)}, max_redirects=0
        )
        assert refused.status == 403, (path, refused.status)
    assert (await state(admin, letter["id"]))["status"] == "open"

    # Analysts read the audit log; campaign managers do not see it.
    await page.goto(f"{api_url}/admin/audit")
    await expect(page.locator("#audit")).to_be_visible()


async def test_campaign_manager_has_no_audit_log(page: Page, api_url: str, make_user: Any) -> None:
    await signed_in(page, api_url, make_user, Role.campaign_manager)
    await expect(page.locator("a.nav-link", has_text="Dead letters")).to_have_count(1)
    await expect(page.locator("a.nav-link", has_text="Audit log")).to_have_count(0)
    answer = await page.goto(f"{api_url}/admin/audit")
    assert answer is not None
    assert answer.status == 403


async def test_audit_page_lists_the_actions(
    page: Page, api_url: str, api: httpx.AsyncClient, admin: httpx.AsyncClient, smtp_server: SmtpServer, make_user: Any
) -> None:
    person = await new_recipient(api)
    replayed = await fail_for_good(api, admin, smtp_server, person, POLICY_REFUSAL)
    discarded = await fail_for_good(api, admin, smtp_server, await new_recipient(api), POLICY_REFUSAL)
    del smtp_server.handler.refuse[person["email"]]
    email = await signed_in(page, api_url, make_user, Role.admin)
    await page.goto(f"{api_url}/admin/dead-letters/view/{replayed['id']}")
    await page.fill("#replay-reason", "mailbox fixed")
    await page.click("#replay-dead-letter")
    await expect(page.locator("#dead-letter-status")).to_have_text("replayed")
    await page.goto(f"{api_url}/admin/dead-letters/view/{discarded['id']}")
    await page.click("#discard-dead-letter")
    await page.fill("#field-reason", "sent by other means")
    await page.click("#confirm-discard")
    await expect(page.locator("#dead-letter-status")).to_have_text("discarded")

    await page.locator("a.nav-link", has_text="Audit log").click()
    await page.wait_for_url(re.compile(r"/admin/audit"))
    await page.fill("#filter-actor", email)
    await page.fill("#filter-entity", "dead_letter")
    await page.click("#apply-filters")
    entries = page.locator("#audit tr.audit-entry")
    # Newest first: the discard, then the replay.
    await expect(entries).to_have_count(2)
    await expect(entries.nth(0)).to_have_attribute("data-action", "dead_letter.discard")
    await expect(entries.nth(0)).to_contain_text("sent by other means")
    await expect(entries.nth(1)).to_have_attribute("data-action", "dead_letter.replay")
    await expect(entries.nth(1)).to_contain_text(f"-replay-{replayed['id']}-1")
    await expect(entries.nth(1).locator(".audit-reason")).to_have_text("mailbox fixed")
    await expect(entries.locator(".audit-address")).to_have_text(["127.0.0.1", "127.0.0.1"])
    await expect(entries.locator(".audit-actor")).to_have_text([email, email])
    await page.screenshot(path=shot("audit"), full_page=True)
    # Each entry leads to its dead letter.
    await entries.nth(1).get_by_role("link", name=f"dead_letter #{replayed['id']}").click()
    await page.wait_for_url(f"{api_url}/admin/dead-letters/view/{replayed['id']}")
    await wait_for_status(api, replayed["notification_id"], "sent")
