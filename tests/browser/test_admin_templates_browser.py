"""Templates in the admin panel, in a real headless Chromium against the real app.

Create and edit through the forms, every validation problem shown with nothing stored,
versions, side-by-side diff, rollback with a reason, preview, and what an analyst may not do.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from playwright.async_api import Page, expect
from sqlalchemy.ext.asyncio import AsyncEngine

from core.auth import Role
from core.config import Settings
from core.models import Template, TemplateVersion
from tests.browser import test_admin_browser as admin_browser  # skips this module too without chromium
from tests.stack import token_for

# The browser fixtures and the sign-in of the admin panel's first tests.
browser = admin_browser.browser
context = admin_browser.context
page = admin_browser.page
make_user = admin_browser.make_user
sign_in = admin_browser.sign_in

templates = Template.__table__  # type: ignore[attr-defined]
versions = TemplateVersion.__table__  # type: ignore[attr-defined]

CONTENT: dict[str, Any] = {
    "variables": [{"name": "film", "type": "string", "example": "Dune"}],
    "locales": {
        "en": {
            "email": {"subject": "New: {{ film }}", "html": "<h1>{{ film }}</h1>\n<p>Tonight at 9.</p>"},
            "sms": {"text": "{{ film }} is out.\nWatch it tonight."},
        }
    },
}


def shot(name: str) -> str:
    return str(Path("/tmp") / f"admin-templates-{name}.png")


@pytest.fixture
async def manager(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token_for(settings, Role.campaign_manager, 'cm-admin-tests')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30) as client:
        yield client


async def api_template(manager: httpx.AsyncClient, content: dict[str, Any] = CONTENT) -> str:
    key = f"adm-{uuid.uuid4().hex[:8]}"
    response = await manager.post("/v1/templates", json={"key": key, "category": "marketing", "content": content})
    assert response.status_code == 201, response.text
    return key


async def stored_versions(engine: AsyncEngine, key: str) -> list[tuple[int, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(versions.c.version, versions.c.change_note)
            .join(templates, templates.c.id == versions.c.template_id)
            .where(templates.c.key == key)
            .order_by(versions.c.version)
        )
        return [(row.version, row.change_note) for row in rows]


async def signed_in(page: Page, api_url: str, make_user, role: Role) -> None:
    email, password = await make_user(role)
    await sign_in(page, api_url, email, password)
    await page.wait_for_url(f"{api_url}/admin/")


async def test_manager_creates_a_template_through_the_form(
    page: Page, api_url: str, engine: AsyncEngine, make_user
) -> None:
    await signed_in(page, api_url, make_user, Role.campaign_manager)
    await page.locator("a.nav-link", has_text="Templates").click()
    await page.wait_for_url(f"{api_url}/admin/templates")
    await page.click("#new-template")
    await page.wait_for_url(f"{api_url}/admin/templates/new")
    # The form starts from a working example.
    starter = json.loads(await page.input_value("#field-content"))
    assert starter["locales"]["en"]["sms"]["text"]

    key = f"adm-new-{uuid.uuid4().hex[:8]}"
    await page.fill("#field-key", key)
    await page.fill("#field-category", "new_episode")
    await page.fill("#field-description", "Made in the browser")
    await page.fill("#field-content", json.dumps(CONTENT, indent=2))
    await page.click("#save")

    await page.wait_for_url(f"{api_url}/admin/templates/versions/{key}")
    await expect(page.locator(".flash-message")).to_contain_text(f"Template {key} created as version 1.")
    row = page.locator("#versions tbody tr")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("v1")
    await expect(row).to_contain_text("active")
    await expect(row).to_contain_text("created")
    assert await stored_versions(engine, key) == [(1, "created")]

    # The list finds it by its description, with links to edit, versions and preview.
    await page.goto(f"{api_url}/admin/templates?q=made+in+the+browser")
    listed = page.locator(f"#templates tbody tr[data-key='{key}']")
    await expect(listed).to_contain_text("new_episode")
    await expect(listed).to_contain_text("v1")
    for label in ("Edit", "Versions", "Preview"):
        await expect(listed.get_by_role("link", name=label)).to_be_visible()
    await page.screenshot(path=shot("list"), full_page=True)


async def test_invalid_template_shows_every_problem_and_stores_nothing(
    page: Page, api_url: str, engine: AsyncEngine, make_user
) -> None:
    await signed_in(page, api_url, make_user, Role.campaign_manager)
    await page.goto(f"{api_url}/admin/templates/new")
    key = f"adm-bad-{uuid.uuid4().hex[:8]}"

    # JSON that does not parse: said so, with its line.
    broken = '{\n  "locales": {\n    "en": {"sms": {"text": "hi"}},\n  }\n}'
    await page.fill("#field-key", key)
    await page.fill("#field-category", "marketing")
    await page.fill("#field-content", broken)
    await page.click("#save")
    problems = page.locator("#form-problems tr.problem")
    await expect(problems).to_have_count(1)
    await expect(problems).to_contain_text(re.compile(r"content.*not valid JSON.*line 4", re.S))
    await expect(page.locator("#field-content")).to_have_class(re.compile(r"\bis-invalid\b"))
    assert await page.input_value("#field-content") == broken

    # Well-formed JSON with several problems: every one listed, with part and line.
    bad: dict[str, Any] = {
        "variables": [{"name": "film"}],
        "locales": {
            "en": {
                "email": {"subject": "Hi", "html": "<p>line one</p>\n<p>{{ film }</p>"},
                "sms": {"text": "Episode {{ episode }}"},
            }
        },
    }
    await page.fill("#field-category", "Not A Category")
    await page.fill("#field-content", json.dumps(bad, indent=2))
    await page.click("#save")
    await expect(page.locator("#form-problems")).to_contain_text("Nothing was saved")
    rows = page.locator("#form-problems tr.problem")
    await expect(rows).to_have_count(4)
    texts = await rows.all_inner_texts()
    assert any("category" in text and "lowercase" in text for text in texts), texts
    assert any("variables.film" in text and "needs an example" in text for text in texts), texts
    assert any(re.search(r"en\.email\.html\s+2\s+syntax error", text) for text in texts), texts
    assert any(re.search(r"en\.sms\.text\s+1\s+variable 'episode' is used but not declared", t) for t in texts), texts
    await expect(page.locator("#field-category")).to_have_class(re.compile(r"\bis-invalid\b"))
    # The user's input stays in the form.
    assert await page.input_value("#field-key") == key
    assert await page.input_value("#field-category") == "Not A Category"
    assert json.loads(await page.input_value("#field-content")) == bad
    await page.screenshot(path=shot("problems"), full_page=True)

    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).where(templates.c.key == key)) == 0


async def test_editing_stores_version_2_and_the_diff_shows_the_changed_line(
    page: Page, api_url: str, engine: AsyncEngine, manager: httpx.AsyncClient, make_user
) -> None:
    key = await api_template(manager)
    await signed_in(page, api_url, make_user, Role.campaign_manager)
    await page.goto(f"{api_url}/admin/templates")
    await page.locator(f"#templates tr[data-key='{key}']").get_by_role("link", name="Edit").click()
    await page.wait_for_url(f"{api_url}/admin/templates/change/{key}")

    content = json.loads(await page.input_value("#field-content"))
    assert content["locales"]["en"]["sms"]["text"] == "{{ film }} is out.\nWatch it tonight."
    content["locales"]["en"]["sms"]["text"] = "{{ film }} is out.\nWatch it this weekend."
    await page.fill("#field-content", json.dumps(content, indent=2))
    # A change note is required for a new version.
    await page.click("#save")
    await expect(page.locator("#form-problems tr.problem")).to_contain_text(["change_note"])
    assert await stored_versions(engine, key) == [(1, "created")]

    await page.screenshot(path=shot("edit"), full_page=True)
    await page.fill("#field-change_note", "weekend wording")
    await page.click("#save")
    await page.wait_for_url(f"{api_url}/admin/templates/versions/{key}")
    await expect(page.locator(".flash-message")).to_contain_text("version 2")
    await expect(page.locator("#versions tbody tr[data-version='2']")).to_contain_text("active")
    await expect(page.locator("#versions tbody tr[data-version='2']")).to_contain_text("weekend wording")
    assert await stored_versions(engine, key) == [(1, "created"), (2, "weekend wording")]

    # The compare form starts at v1 -> v2.
    await expect(page.locator("#compare-from")).to_have_value("1")
    await expect(page.locator("#compare-to")).to_have_value("2")
    await page.click("#compare")
    await page.wait_for_url(re.compile(r"/admin/templates/diff/.*from=1&to=2"))
    parts = page.locator(".diff-part")
    await expect(parts).to_have_count(1)
    part = parts.first
    await expect(part.locator(".card-title")).to_have_text("en.sms.text")
    await expect(part.locator("table.diff")).to_contain_text("Watch it tonight.")
    await expect(part.locator("table.diff")).to_contain_text("Watch it this weekend.")
    # Side by side: the second line changed (old on the left, new on the right), the first did not.
    marked = part.locator("table.diff tbody tr", has=page.locator(".diff_add, .diff_sub, .diff_chg"))
    await expect(marked).to_have_count(1)
    await expect(marked.locator(".diff_sub")).to_have_text("Watch it tonight.")
    await expect(marked.locator(".diff_add")).to_have_text("Watch it this weekend.")
    await expect(part.locator("table.diff tbody tr").first).to_contain_text("{{ film }} is out.")
    await page.screenshot(path=shot("diff"), full_page=True)

    # A version that does not exist: a form error on the versions page.
    await page.goto(f"{api_url}/admin/templates/diff/{key}?from=1&to=9")
    await expect(page.locator("#form-problems")).to_contain_text(f"{key} has no version 9")


async def test_rollback_asks_for_a_reason_and_creates_version_3(
    page: Page, api_url: str, engine: AsyncEngine, manager: httpx.AsyncClient, make_user
) -> None:
    key = await api_template(manager)
    changed = json.loads(json.dumps(CONTENT))
    changed["locales"]["en"]["email"]["subject"] = "Now streaming: {{ film }}"
    response = await manager.put(f"/v1/templates/{key}", json={"content": changed, "change_note": "new subject"})
    assert response.status_code == 200, response.text

    await signed_in(page, api_url, make_user, Role.admin)
    await page.goto(f"{api_url}/admin/templates/versions/{key}")
    # Each version can be looked at.
    await page.locator("#versions tr[data-version='1']").get_by_role("link", name="View", exact=True).click()
    await page.wait_for_url(f"{api_url}/admin/templates/version/{key}/1")
    await expect(page.locator("#version-content")).to_contain_text('"subject": "New: {{ film }}"')
    await page.screenshot(path=shot("version"), full_page=True)
    await page.go_back()
    # Only the old version can be rolled back to.
    await expect(page.locator("#versions tr[data-version='2'] .rollback")).to_have_count(0)
    await page.locator("#versions tr[data-version='1'] .rollback").click()
    await page.wait_for_url(f"{api_url}/admin/templates/rollback/{key}/1")

    await page.click("#confirm-rollback")
    await expect(page.locator("#form-problems tr.problem")).to_have_text([re.compile(r"reason\s+required")])
    await page.fill("#field-reason", "no")
    await page.click("#confirm-rollback")
    await expect(page.locator("#form-problems tr.problem")).to_contain_text(["at least 3 characters"])
    await expect(page.locator("#field-reason")).to_have_value("no")
    assert len(await stored_versions(engine, key)) == 2
    await page.screenshot(path=shot("rollback-form"), full_page=True)

    await page.fill("#field-reason", "subject tested badly")
    await page.click("#confirm-rollback")
    await page.wait_for_url(f"{api_url}/admin/templates/versions/{key}")
    await expect(page.locator(".flash-message")).to_contain_text("now version 3")
    newest = page.locator("#versions tbody tr[data-version='3']")
    await expect(newest).to_contain_text("active")
    await expect(newest).to_contain_text("rollback to v1: subject tested badly")
    assert await stored_versions(engine, key) == [
        (1, "created"),
        (2, "new subject"),
        (3, "rollback to v1: subject tested badly"),
    ]
    active = (await manager.get(f"/v1/templates/{key}")).json()
    assert active["version"] == 3
    assert active["content"]["locales"]["en"]["email"]["subject"] == "New: {{ film }}"


async def test_preview_shows_the_email_in_a_sandboxed_iframe_and_the_sms_segments(
    page: Page, api_url: str, manager: httpx.AsyncClient, make_user
) -> None:
    content: dict[str, Any] = {
        "variables": [{"name": "film", "example": "Dune"}, {"name": "price", "type": "number", "example": 9.5}],
        "locales": {
            "en": {
                "email": {
                    "subject": "{{ film }} for {{ recipient.name }}",
                    "html": "<h1 title=\"it's\">{{ film }} & co</h1><script>document.title='x'</script>",
                },
                "push": {"title": "{{ film }}", "body": "Only {{ price }}", "data": {"film": "{{ film }}"}},
                # Cyrillic: UCS-2, 70 characters a segment; this renders to 2 segments.
                "sms": {"text": "Смотрите {{ film }} сегодня вечером. " * 3 + "{{ price }}"},
            }
        },
    }
    key = await api_template(manager, content)
    await signed_in(page, api_url, make_user, Role.analyst)
    await page.goto(f"{api_url}/admin/templates")
    await page.locator(f"#templates tr[data-key='{key}']").get_by_role("link", name="Preview").click()
    await page.wait_for_url(f"{api_url}/admin/templates/preview/{key}")

    # Rendered at once with the examples.
    assert json.loads(await page.input_value("#field-variables")) == {"film": "Dune", "price": 9.5}
    await expect(page.locator("#email-subject")).to_have_text("Dune for Alex Example")
    frame = page.locator("iframe.email-preview")
    await expect(frame).to_have_attribute("sandbox", "")
    srcdoc = await frame.get_attribute("srcdoc")
    assert srcdoc == "<h1 title=\"it's\">Dune & co</h1><script>document.title='x'</script>"
    await expect(page.frame_locator("iframe.email-preview").locator("h1")).to_have_text("Dune & co")
    await expect(page.locator("#email-text")).to_contain_text("Dune & co")
    await expect(page.locator("#push-title")).to_have_text("Dune")
    await expect(page.locator("#push-body")).to_have_text("Only 9.5")
    await expect(page.locator("#push-data")).to_contain_text("Dune")
    await expect(page.locator("#sms-encoding")).to_have_text("UCS-2")
    await expect(page.locator("#sms-segments")).to_have_text("2 segments")

    # Other values, given in the form.
    await page.fill("#field-variables", json.dumps({"film": "Up", "price": 1}))
    await page.click("#render")
    await expect(page.locator("#email-subject")).to_have_text("Up for Alex Example")
    await expect(page.locator("#sms-text")).to_contain_text("Смотрите Up сегодня")
    await page.screenshot(path=shot("preview"), full_page=True)

    # Bad input: every problem shown, nothing rendered.
    await page.fill("#field-variables", json.dumps({"film": 3, "extra": "x"}))
    await page.fill("#field-user_id", "")
    await page.click("#render")
    rows = page.locator("#form-problems tr.problem")
    await expect(rows).to_have_count(2)
    await expect(rows).to_contain_text(["variables.extra", "variables.film"], ignore_case=True)
    await expect(page.locator("#rendered")).to_have_count(0)
    await page.fill("#field-variables", "{}")
    await page.fill("#field-user_id", f"nobody-{uuid.uuid4().hex[:6]}")
    await page.click("#render")
    await expect(page.locator("#form-problems")).to_contain_text("no recipient with user_id")
    await page.fill("#field-variables", "[1, 2")
    await page.click("#render")
    await expect(page.locator("#form-problems")).to_contain_text("not valid JSON")


async def test_analyst_reads_templates_but_cannot_change_them(
    page: Page, api_url: str, engine: AsyncEngine, manager: httpx.AsyncClient, make_user
) -> None:
    key = await api_template(manager)
    response = await manager.put(f"/v1/templates/{key}", json={"content": CONTENT, "change_note": "same again"})
    assert response.status_code == 200, response.text

    await signed_in(page, api_url, make_user, Role.analyst)
    await page.locator("a.nav-link", has_text="Templates").click()
    await page.wait_for_url(f"{api_url}/admin/templates")
    row = page.locator(f"#templates tr[data-key='{key}']")
    await expect(row.get_by_role("link", name="Versions")).to_be_visible()
    await expect(row.get_by_role("link", name="Preview")).to_be_visible()
    await expect(row.get_by_role("link", name="Edit")).to_have_count(0)
    await expect(page.locator("#new-template")).to_have_count(0)

    await row.get_by_role("link", name="Versions").click()
    await page.wait_for_url(f"{api_url}/admin/templates/versions/{key}")
    await expect(page.locator("#versions tbody tr")).to_have_count(2)
    await expect(page.locator(".rollback")).to_have_count(0)
    await expect(page.get_by_role("link", name="Edit")).to_have_count(0)
    await page.screenshot(path=shot("analyst-versions"), full_page=True)

    # The forms are refused, and so are direct POSTs with the analyst's session.
    for path in ("/admin/templates/new", f"/admin/templates/change/{key}", f"/admin/templates/rollback/{key}/1"):
        answer = await page.goto(f"{api_url}{path}")
        assert answer is not None
        assert answer.status == 403, path
        await expect(page.locator("body")).to_contain_text("may look at this page but not change anything")
    posts: list[tuple[str, dict[str, str | float | bool]]] = [
        (f"/admin/templates/change/{key}", {"category": "x", "change_note": "sneaky", "content": json.dumps(CONTENT)}),
        (f"/admin/templates/rollback/{key}/1", {"reason": "sneaky rollback"}),
        ("/admin/templates/new", {"key": f"{key}-x", "category": "x", "content": json.dumps(CONTENT)}),
    ]
    for path, form in posts:
        refused = await page.request.post(
            f"{api_url}{path}", form={**form, "csrf_token": await admin_browser.csrf_token(page)}, max_redirects=0
        )
        assert refused.status == 403, (path, refused.status)
    assert await stored_versions(engine, key) == [(1, "created"), (2, "same again")]
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).where(templates.c.key == f"{key}-x")) == 0
