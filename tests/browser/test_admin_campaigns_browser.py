"""Campaigns in the admin panel, in a real headless Chromium against the real stack.

The wizard with its live segment count, a launch followed to "completed" on the progress
page (Temporal workflow, SMTP), recurring runs, cancel with a reason, and what an analyst
may not do.
"""

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
from services import campaign_store as store
from tests.browser import test_admin_browser as admin_browser  # skips this module too without chromium
from tests.stack import SmtpServer, token_for

# The browser fixtures and the sign-in of the admin panel's first tests.
browser = admin_browser.browser
context = admin_browser.context
page = admin_browser.page
make_user = admin_browser.make_user
sign_in = admin_browser.sign_in

TEMPLATE: dict[str, Any] = {
    "category": "marketing",
    "content": {
        "variables": [{"name": "film", "example": "Dune"}],
        "locales": {
            "en": {
                "email": {"subject": "{{ film }} for {{ recipient.name }}", "html": "<p>Watch {{ film }}</p>"},
                "sms": {"text": "Watch {{ film }}"},
            }
        },
    },
}


def shot(name: str) -> str:
    return f"/tmp/admin-campaigns-{name}.png"


@pytest.fixture
async def manager(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token_for(settings, Role.campaign_manager, 'cm-admin-tests')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30) as client:
        yield client


@pytest.fixture
async def template_key(manager: httpx.AsyncClient) -> str:
    key = f"adm-promo-{uuid.uuid4().hex[:8]}"
    response = await manager.post("/v1/templates", json={"key": key, **TEMPLATE})
    assert response.status_code == 201, response.text
    return key


async def audience(api: httpx.AsyncClient, manager: httpx.AsyncClient, count: int) -> tuple[int, str, list[str]]:
    """`count` new recipients with a fresh tag, and a filter segment of them: (segment id, name, emails)."""
    tag = f"adm{uuid.uuid4().hex[:10]}"
    people: list[dict[str, Any]] = [
        {"user_id": f"{tag}-{n:02d}", "name": f"Viewer {n}", "email": f"{tag}-{n:02d}@example.com", "tags": [tag]}
        for n in range(count)
    ]
    response = await api.post("/v1/recipients/batch", json={"recipients": people})
    assert response.status_code == 200, response.text
    name = f"admin segment {tag}"
    response = await manager.post("/v1/segments", json={"name": name, "filter": {"field": "tags", "op": "contains",
                                                                                   "value": tag}})  # fmt: skip
    assert response.status_code == 201, response.text
    return int(response.json()["id"]), name, [person["email"] for person in people]


async def draft(manager: httpx.AsyncClient, template_key: str, segment_id: int, **extra: Any) -> dict:
    body = {"name": f"adm-c-{uuid.uuid4().hex[:6]}", "template": template_key, "segment_id": segment_id,
            "channels": ["email"], "variables": {"film": "Arrival"}, **extra}  # fmt: skip
    response = await manager.post("/v1/campaigns", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def campaign_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(store.campaigns)) or 0)


async def signed_in(page: Page, api_url: str, make_user, role: Role) -> None:
    email, password = await make_user(role)
    await sign_in(page, api_url, email, password)
    await page.wait_for_url(f"{api_url}/admin/")


async def test_wizard_creates_a_draft_with_a_live_count_and_the_launch_completes(
    page: Page,
    api_url: str,
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,
    template_key: str,
    engine: AsyncEngine,
    smtp_server: SmtpServer,
    make_user,
) -> None:
    segment_id, _, emails = await audience(api, manager, 20)
    await signed_in(page, api_url, make_user, Role.campaign_manager)
    await page.locator("a.nav-link", has_text="Campaigns").click()
    await page.wait_for_url(re.compile(r"/admin/campaign/list"))
    await page.click("#new-campaign")
    await page.wait_for_url(f"{api_url}/admin/campaigns/new")

    # Nothing filled in: every missing field is named, nothing is stored.
    before = await campaign_count(engine)
    await page.uncheck("input[name=channels][value=email]")
    await page.click("#create-draft")
    problems = page.locator("#form-problems tr.problem")
    await expect(problems).to_have_count(4)
    texts = " | ".join(await problems.all_inner_texts())
    for field in ("name", "template", "segment_id", "channels"):
        assert field in texts, texts
    await expect(page.locator("#field-name")).to_have_class(re.compile(r"\bis-invalid\b"))
    await page.screenshot(path=shot("wizard-problems"), full_page=True)
    assert await campaign_count(engine) == before

    # The segment's live count follows the segment and the channels.
    name = f"Autumn promo {uuid.uuid4().hex[:6]}"
    await page.fill("#field-name", name)
    await page.select_option("#field-template", template_key)
    await expect(page.locator("#template-hint")).to_contain_text("channels: email, sms")
    await page.select_option("#field-segment_id", str(segment_id))
    await expect(page.locator("#segment-count")).to_have_text("matches 20 recipients")
    await page.check("input[name=channels][value=email]")
    await expect(page.locator("#segment-count")).to_have_text("matches 20 recipients, 20 reachable by email")
    await page.check("input[name=channels][value=sms]")
    await expect(page.locator("#segment-count")).to_have_text(
        "matches 20 recipients, 20 reachable by email, 0 reachable by sms"
    )
    await page.uncheck("input[name=channels][value=sms]")
    await page.click("#use-examples")
    await expect(page.locator("#field-variables")).to_have_value('{\n  "film": "Dune"\n}')

    # A schedule field missing for its kind is shown on that field.
    await page.select_option("#field-schedule_kind", "weekly")
    await page.fill("#field-time", "09:30")
    await page.click("#create-draft")
    await expect(page.locator("#form-problems tr.problem")).to_have_text(
        [re.compile(r"schedule\.weekday.*needs", re.S)]
    )
    await expect(page.locator("#field-weekday")).to_have_class(re.compile(r"\bis-invalid\b"))
    # The form kept everything, and the count is shown again.
    await expect(page.locator("#field-name")).to_have_value(name)
    await expect(page.locator("#segment-count")).to_have_text("matches 20 recipients, 20 reachable by email")
    assert await campaign_count(engine) == before

    await page.select_option("#field-schedule_kind", "now")
    await page.fill("#field-variables", '{"film": "Arrival"}')
    await page.screenshot(path=shot("wizard"), full_page=True)
    await page.click("#create-draft")
    await page.wait_for_url(re.compile(r"/admin/campaigns/view/"))
    await expect(page.locator(".flash-message")).to_contain_text("Draft campaign")
    await expect(page.locator("#campaign-status")).to_have_text("draft")
    await expect(page.locator("#no-runs")).to_be_visible()
    campaign_id = page.url.rsplit("/", 1)[1]
    assert await campaign_count(engine) == before + 1

    # Preview for the segment's first recipient, with the campaign's variables.
    await page.click("#preview-campaign")
    await expect(page.locator("#sample-recipient")).to_have_text(emails[0].split("@")[0])
    await expect(page.locator("#email-subject")).to_have_text("Arrival for Viewer 0")
    await expect(page.frame_locator("iframe.email-preview").locator("p")).to_have_text("Watch Arrival")
    await page.screenshot(path=shot("preview"), full_page=True)
    await page.go_back()

    await page.click("#launch-campaign")
    await expect(page.locator(".flash-message")).to_have_text("Launched.")
    link = await page.locator("#temporal-link").get_attribute("href")
    assert link is not None
    assert link.endswith(f"/namespaces/default/workflows/campaign-{campaign_id}"), link
    # The page refreshes itself while the campaign runs.
    await expect(page.locator("#campaign-status")).to_have_text("completed", timeout=30_000)
    await expect(page.locator("#auto-refresh")).to_have_count(0)
    run = page.locator("#runs tr.run")
    await expect(run).to_have_count(1)
    for counter, value in (("targeted", 20), ("sent", 20), ("failed", 0), ("suppressed", 0)):
        await expect(run.locator(f"[data-counter={counter}]")).to_have_text(str(value))
    await expect(page.locator("#launch-campaign, #cancel-campaign, #pause-campaign")).to_have_count(0)
    await page.screenshot(path=shot("completed"), full_page=True)
    assert {rcpt for rcpt, _ in smtp_server.handler.delivered_to(set(emails))} == set(emails)

    # And the list shows it with its template version.
    await page.goto(f"{api_url}/admin/campaign/list?search={name.replace(' ', '+')}")
    row = page.locator("tbody tr", has_text=name)
    await expect(row).to_contain_text(f"{template_key}@v1")
    await expect(row).to_contain_text("completed")
    await page.screenshot(path=shot("list"), full_page=True)


async def test_recurring_campaign_runs_now_pauses_and_resumes(
    page: Page, api_url: str, api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, make_user
) -> None:
    segment_id, _, _ = await audience(api, manager, 3)
    await signed_in(page, api_url, make_user, Role.campaign_manager)
    # From the template's versions page, with the template chosen.
    await page.goto(f"{api_url}/admin/templates/versions/{template_key}")
    await page.click("#new-campaign-with-template")
    await expect(page.locator("#field-template")).to_have_value(template_key)
    await page.fill("#field-name", f"Monday digest {uuid.uuid4().hex[:6]}")
    await page.select_option("#field-segment_id", str(segment_id))
    await page.fill("#field-variables", '{"film": "Heat"}')
    await page.select_option("#field-schedule_kind", "weekly")
    await page.select_option("#field-weekday", "1")
    await page.fill("#field-time", "09:30")
    await page.fill("#field-timezone", "Europe/Berlin")
    await page.click("#create-draft")
    await page.wait_for_url(re.compile(r"/admin/campaigns/view/"))
    await expect(page.locator("#schedule")).to_contain_text('"cron": "30 9 * * 1"')

    await page.click("#launch-campaign")
    await expect(page.locator("#campaign-status")).to_have_text("scheduled")
    # Five upcoming Mondays at 09:30 Berlin time.
    await expect(page.locator("#next-runs")).to_contain_text(re.compile(r"\d{4}-\d\d-\d\d \d\d:30:00"))
    await page.click("#trigger-campaign")
    await expect(page.locator(".flash-message")).to_have_text("Triggered a run.")
    # The run shows up and completes; the campaign stays scheduled for the next Monday.
    run = page.locator("#runs tr.run")
    for _ in range(60):
        if await run.count() and await run.locator("[data-counter=sent]").inner_text() == "3":
            break
        await page.wait_for_timeout(500)
        await page.reload()
    await expect(run.locator("[data-counter=sent]")).to_have_text("3")
    await expect(page.locator("#campaign-status")).to_have_text("scheduled")

    await page.click("#pause-campaign")
    await expect(page.locator(".flash-message")).to_have_text("Paused.")
    await expect(page.locator("#campaign-status")).to_have_text("paused")
    await expect(page.locator("#trigger-campaign")).to_be_visible()
    await page.click("#resume-campaign")
    await expect(page.locator(".flash-message")).to_have_text("Resumed.")
    await expect(page.locator("#campaign-status")).to_have_text("scheduled")
    await page.screenshot(path=shot("recurring"), full_page=True)

    # A launch its state does not allow (say, from a stale tab): a flash error, nothing changes.
    answer = await page.request.post(
        page.url.replace("/view/", "/act/") + "/launch",
        form={"csrf_token": await admin_browser.csrf_token(page)},
        max_redirects=0,
    )
    assert answer.status == 303
    await page.reload()
    await expect(page.locator(".flash-message.alert-danger")).to_contain_text(
        "cannot launch a campaign that is scheduled"
    )
    await expect(page.locator("#campaign-status")).to_have_text("scheduled")

    await page.click("#cancel-campaign")
    await page.fill("#field-reason", "digest retired")
    await page.click("#confirm-cancel")
    await expect(page.locator("#campaign-status")).to_have_text("cancelled")


async def test_wizard_schedules_a_send_at_a_local_time(
    page: Page, api_url: str, api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, make_user
) -> None:
    segment_id, _, _ = await audience(api, manager, 1)
    await signed_in(page, api_url, make_user, Role.campaign_manager)
    await page.goto(f"{api_url}/admin/campaigns/new?template={template_key}")
    await page.fill("#field-name", f"New year {uuid.uuid4().hex[:6]}")
    await page.select_option("#field-segment_id", str(segment_id))
    await page.fill("#field-variables", '{"film": "Fireworks"}')
    await page.select_option("#field-schedule_kind", "at")
    await expect(page.locator("#field-time")).to_be_hidden()
    # Bad input first: an unknown time zone and a window without its end.
    await page.fill("#field-at", "2099-01-01T00:05")
    await page.fill("#field-timezone", "Mars/Olympus")
    await page.fill("#field-window_start", "09:00")
    await page.click("#create-draft")
    rows = page.locator("#form-problems tr.problem")
    await expect(rows).to_contain_text(["schedule.timezone", "schedule.window.end"])
    await expect(page.locator("#field-timezone")).to_have_class(re.compile(r"\bis-invalid\b"))

    await page.fill("#field-timezone", "Europe/Berlin")
    await page.fill("#field-window_start", "")
    await page.click("#create-draft")
    await page.wait_for_url(re.compile(r"/admin/campaigns/view/"))
    # The wall-clock time in the chosen zone, with its offset.
    await expect(page.locator("#schedule")).to_contain_text('"at": "2099-01-01T00:05:00+01:00"')
    await page.click("#launch-campaign")
    await expect(page.locator("#campaign-status")).to_have_text("scheduled")
    await page.click("#cancel-campaign")
    await page.fill("#field-reason", "too early to tell")
    await page.click("#confirm-cancel")
    await expect(page.locator("#campaign-status")).to_have_text("cancelled")


async def test_a_launch_refused_in_its_state_shows_a_flash_error(
    page: Page, api_url: str, manager: httpx.AsyncClient, template_key: str, make_user
) -> None:
    segment = await manager.post("/v1/segments", json={"name": f"empty {uuid.uuid4().hex[:8]}",
                                                      "user_ids": ["nobody-at-all"]})  # fmt: skip
    assert segment.status_code == 201, segment.text
    campaign = await draft(manager, template_key, segment.json()["id"])
    await signed_in(page, api_url, make_user, Role.campaign_manager)
    await page.goto(f"{api_url}/admin/campaigns/view/{campaign['id']}")
    # Another tab cancels it meanwhile.
    response = await manager.post(f"/v1/campaigns/{campaign['id']}/cancel", json={"reason": "elsewhere"})
    assert response.status_code == 200, response.text
    await page.click("#launch-campaign")
    await expect(page.locator(".flash-message.alert-danger")).to_contain_text(
        "Cannot launch: cannot launch a campaign that is cancelled"
    )
    await expect(page.locator("#campaign-status")).to_have_text("cancelled")
    # Its preview says why there is nothing to render.
    await page.click("#preview-campaign")
    await expect(page.locator("#form-problems")).to_contain_text("matches no recipient yet")


async def test_cancel_asks_for_a_reason(
    page: Page,
    api_url: str,
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,
    template_key: str,
    engine: AsyncEngine,
    make_user,
) -> None:
    segment_id, _, _ = await audience(api, manager, 2)
    campaign = await draft(manager, template_key, segment_id)
    await signed_in(page, api_url, make_user, Role.admin)
    await page.goto(f"{api_url}/admin/campaign/list?search={campaign['name']}")
    await page.get_by_role("link", name=campaign["name"]).click()
    await page.wait_for_url(f"{api_url}/admin/campaigns/view/{campaign['id']}")
    await page.click("#cancel-campaign")
    await page.wait_for_url(f"{api_url}/admin/campaigns/cancel/{campaign['id']}")

    async def status() -> tuple[str, str | None]:
        async with engine.connect() as conn:
            row = (await conn.execute(sa.select(store.campaigns).where(store.campaigns.c.id == campaign["id"]))).one()
            return row.status, row.status_reason

    await page.click("#confirm-cancel")
    await expect(page.locator("#form-problems tr.problem")).to_have_text([re.compile(r"reason\s+required")])
    await page.fill("#field-reason", "  x ")
    await page.click("#confirm-cancel")
    await expect(page.locator("#form-problems tr.problem")).to_contain_text(["at least 3 characters"])
    await page.screenshot(path=shot("cancel"), full_page=True)
    assert await status() == ("draft", None)

    await page.fill("#field-reason", "wrong audience")
    await page.click("#confirm-cancel")
    await page.wait_for_url(f"{api_url}/admin/campaigns/view/{campaign['id']}")
    await expect(page.locator(".flash-message")).to_contain_text("Cancelled.")
    await expect(page.locator("#campaign-status")).to_have_text("cancelled")
    await expect(page.locator("#status-reason")).to_have_text("wrong audience")
    await expect(page.locator("#launch-campaign, #cancel-campaign")).to_have_count(0)
    assert await status() == ("cancelled", "wrong audience")


async def test_analyst_follows_campaigns_but_cannot_act(
    page: Page,
    api_url: str,
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,
    template_key: str,
    engine: AsyncEngine,
    make_user,
) -> None:
    segment_id, segment_name, _ = await audience(api, manager, 2)
    campaign = await draft(manager, template_key, segment_id)
    await signed_in(page, api_url, make_user, Role.analyst)
    await page.locator("a.nav-link", has_text="Campaigns").click()
    await expect(page.locator("#new-campaign")).to_have_count(0)
    # SQLAdmin's details page of the row links to the progress page too.
    await page.goto(f"{api_url}/admin/campaign/details/{campaign['id']}")
    await page.get_by_role("link", name=campaign["name"]).click()
    await page.wait_for_url(f"{api_url}/admin/campaigns/view/{campaign['id']}")
    await expect(page.locator("#campaign-status")).to_have_text("draft")
    await expect(page.locator("#preview-campaign")).to_be_visible()
    await expect(page.locator("#launch-campaign, #cancel-campaign")).to_have_count(0)

    # The segments are listed for analysts too.
    await page.locator("a.nav-link", has_text="Segments").click()
    await expect(page.locator("tbody tr", has_text=segment_name)).to_have_count(1)

    for path in ("/admin/campaigns/new", f"/admin/campaigns/cancel/{campaign['id']}"):
        answer = await page.goto(f"{api_url}{path}")
        assert answer is not None
        assert answer.status == 403, path
    posts: list[tuple[str, dict[str, str | float | bool]]] = [
        (f"/admin/campaigns/act/{campaign['id']}/launch", {}),
        (f"/admin/campaigns/cancel/{campaign['id']}", {"reason": "not allowed"}),
        ("/admin/campaigns/new", {"name": "sneaky", "template": template_key, "segment_id": str(segment_id),
                                  "channels": "email", "variables": '{"film": "x"}'}),
    ]  # fmt: skip
    for path, form in posts:
        refused = await page.request.post(
            f"{api_url}{path}", form={**form, "csrf_token": await admin_browser.csrf_token(page)}, max_redirects=0
        )
        assert refused.status == 403, (path, refused.status)
    async with engine.connect() as conn:
        status = await conn.scalar(sa.select(store.campaigns.c.status).where(store.campaigns.c.id == campaign["id"]))
        sneaky = await conn.scalar(sa.select(sa.func.count()).where(store.campaigns.c.name == "sneaky"))
    assert (status, sneaky) == ("draft", 0)
