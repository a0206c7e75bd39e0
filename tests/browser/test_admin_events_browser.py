"""Events in the admin panel, in a real headless Chromium against the real stack.

A campaign manager registers an event type (the form names bad JSON and a bad schema),
sees every problem of a bad trigger rule listed, saves a good one, follows an event
through to what the rule made of it, and cannot delete the type while the rule uses it;
an analyst reads every page without a single control and is refused every change.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from playwright.async_api import Page, expect
from sqlalchemy.ext.asyncio import AsyncEngine

from core.auth import Role
from core.config import Settings
from core.models import AuditEntry, TriggerRule
from services import events
from tests.browser import test_admin_browser as admin_browser  # skips this module too without chromium
from tests.stack import token_for

browser = admin_browser.browser
context = admin_browser.context
page = admin_browser.page
make_user = admin_browser.make_user
sign_in = admin_browser.sign_in

audit_log = AuditEntry.__table__  # type: ignore[attr-defined]
trigger_rules = TriggerRule.__table__  # type: ignore[attr-defined]

SCHEMA = {
    "type": "object",
    "required": ["user_id", "link"],
    "properties": {"user_id": {"type": "string"}, "link": {"type": "string"}},
}
TEMPLATE = {
    "category": "security",
    "content": {
        "variables": [{"name": "link", "type": "url", "example": "https://cinema.example/r"}],
        "locales": {"en": {"email": {"subject": "Reset your password", "html": "<p>Open {{ link }}</p>"}}},
    },
}


def shot(name: str) -> str:
    return f"/tmp/admin-events-{name}.png"


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def manager_api(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token_for(settings, Role.campaign_manager, 'cm-events-browser')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30) as client:
        yield client


async def put_template(manager_api: httpx.AsyncClient) -> str:
    key = unique("tpl-ev-")
    response = await manager_api.post("/v1/templates", json={"key": key, **TEMPLATE})
    assert response.status_code == 201, response.text
    return key


async def problems(page: Page) -> list[str]:
    return [" ".join(text.split()) for text in await page.locator("#form-problems tr.problem").all_inner_texts()]


async def wait_sent(engine: AsyncEngine, event_id: str, seconds: float = 30) -> list[sa.Row[Any]]:
    """The event's actions once all are sent (read as the page reads them: its id need not fit a URL path)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        async with engine.connect() as conn:
            _, actions = await events.get(conn, event_id)
        if actions and all(action.status == "sent" for action in actions):
            return actions
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the event's actions stayed {[action.status for action in actions]}")
        await asyncio.sleep(0.1)


async def test_manager_registers_a_type_sees_a_bad_rules_problems_and_saves_a_good_one(
    page: Page,
    api: httpx.AsyncClient,
    manager_api: httpx.AsyncClient,
    api_url: str,
    engine: AsyncEngine,
    recipient: dict,
    make_user,
) -> None:
    template = await put_template(manager_api)
    email, password = await make_user(Role.campaign_manager)
    await sign_in(page, api_url, email, password)
    await page.wait_for_url(f"{api_url}/admin/")
    await page.locator("a.nav-link", has_text="Event types").click()
    await page.wait_for_url(f"{api_url}/admin/event-types")
    await page.click("#new-event-type")

    # A bad name and JSON that does not parse: both named, nothing stored.
    name = unique("account.reset_requested_")
    await page.fill("#field-name", "Reset Requested")
    await page.fill("#field-schema", '{"type": "object",')
    await page.click("#save-event-type")
    listed = await problems(page)
    assert len(listed) == 2, listed
    assert listed[0].startswith("name"), listed
    assert "episode.released" in listed[0], listed
    assert listed[1].startswith("schema"), listed
    assert "not valid JSON" in listed[1], listed
    await expect(page.locator("#field-schema")).to_have_class(re.compile(r"\bis-invalid\b"))

    # JSON, but not a schema: the problem names where in the schema.
    await page.fill("#field-name", name)
    await page.fill("#field-schema", json.dumps({"type": "object", "properties": {"link": {"type": "strin"}}}))
    await page.click("#save-event-type")
    listed = await problems(page)
    assert len(listed) == 1, listed
    assert listed[0].startswith("schema.properties.link.type"), listed

    await page.fill("#field-description", "A user asked for a password reset link")
    await page.fill("#field-schema", json.dumps(SCHEMA, indent=2))
    await page.click("#save-event-type")
    await page.wait_for_url(f"{api_url}/admin/event-types/view/{name}")
    await expect(page.locator("#event-type-description")).to_have_text("A user asked for a password reset link")

    # A rule with problems in its name, its definition's shape and against the type and
    # template: all listed at once, nothing stored.
    await page.click("#new-rule-for-type")
    await expect(page.locator("#field-event_type")).to_have_value(name)
    await expect(page.locator(f".type-schema[data-type='{name}']")).to_be_visible()
    bad = {"template": template, "channels": ["email", "sms"], "category": "security", "priority": "now",
           "audience": {"kind": "user", "field": "account"}, "variables": {"link": "reset_url"}}  # fmt: skip
    await page.fill("#field-definition", json.dumps(bad, indent=2))
    await page.click("#save-rule")
    listed = await problems(page)
    assert sorted(text.split()[0] for text in listed) == ["name", "priority"], listed
    await page.screenshot(path=shot("rule-shape-problems"), full_page=True)
    rule_name = unique("reset-link-")
    await page.fill("#field-name", rule_name)
    await page.fill("#field-definition", json.dumps({**bad, "priority": "urgent"}, indent=2))
    await page.click("#save-rule")
    listed = await problems(page)
    where = sorted(text.split()[0] for text in listed)
    assert where == ["audience.field", "channels.1", "variables", "variables.link"], listed
    assert any("no sms part" in text for text in listed), listed
    await expect(page.locator("#field-definition")).to_have_class(re.compile(r"\bis-invalid\b"))
    await page.screenshot(path=shot("rule-problems"), full_page=True)
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(trigger_rules.c.id).where(trigger_rules.c.name == rule_name)) is None

    good = {"template": template, "channels": ["email"], "category": "security", "priority": "urgent"}
    await page.fill("#field-definition", json.dumps(good, indent=2))
    await page.click("#save-rule")
    await page.wait_for_url(re.compile(r".*/admin/trigger-rules/view/\d+$"))
    rule_id = int(page.url.rsplit("/", 1)[1])
    await expect(page.locator("#rule-summary")).to_contain_text("user in payload.user_id")
    await page.locator("a.nav-link", has_text="Trigger rules").click()
    row = page.locator(f"tr.rule[data-rule='{rule_name}']")
    await expect(row.locator(".rule-audience")).to_have_attribute("data-kind", "user")
    await expect(row.locator(".rule-template")).to_have_text(f"{template} (active version)")
    await expect(row.locator(".rule-when")).to_contain_text("at once")
    await page.screenshot(path=shot("rules"), full_page=True)

    # A schema change that would break the rule is refused, naming the rule.
    await page.goto(f"{api_url}/admin/event-types/change/{name}")
    narrower = {**SCHEMA, "required": ["user_id"], "properties": {"user_id": {"type": "string"}}}
    await page.fill("#field-schema", json.dumps(narrower))
    await page.click("#save-event-type")
    listed = await problems(page)
    assert len(listed) == 1, listed
    assert listed[0].startswith("schema"), listed
    assert rule_name in listed[0], listed

    # An event of the type, followed from the list (filtered by type) to what the rule made of it.
    event_id = unique("ev:admin@")  # punctuation a publisher may use: the page is found by ?id=
    link = f"https://cinema.example/reset/{uuid.uuid4().hex}"
    body = {"id": event_id, "type": name, "occurred_at": datetime.now(UTC).isoformat(),
            "payload": {"user_id": recipient["user_id"], "link": link}}  # fmt: skip
    response = await api.post("/v1/events", json=body)
    assert response.status_code == 202, response.text
    [action] = await wait_sent(engine, event_id)
    await page.locator("a.nav-link", has_text=re.compile(r"^\s*Events\s*$")).click()
    await page.wait_for_url(f"{api_url}/admin/event/list")
    await page.goto(f"{api_url}/admin/event/list?type={name}")
    await expect(page.locator("a.event-link")).to_have_count(1)
    await page.locator("a.event-link", has_text=event_id).click()
    await expect(page.locator("#event-id")).to_have_text(event_id)
    assert json.loads(await page.locator("#payload-json").inner_text()) == body["payload"]
    made = page.locator(f"tr.event-action[data-rule='{rule_name}']")
    await expect(made).to_have_attribute("data-status", "sent")
    await expect(made.locator(".action-notification")).to_contain_text(str(action.notification_id))
    await page.screenshot(path=shot("event"), full_page=True)

    # The type cannot go while the rule uses it: the page says which rule, a POST is refused.
    await page.goto(f"{api_url}/admin/event-types/delete/{name}")
    await expect(page.locator("#rules-in-the-way")).to_contain_text(rule_name)
    await expect(page.locator("#confirm-delete")).to_have_count(0)
    refused = await page.request.post(
        f"{api_url}/admin/event-types/delete/{name}",
        form={"csrf_token": await admin_browser.csrf_token(page)},
        max_redirects=0,
    )
    assert refused.status == 409
    assert rule_name in await refused.text()

    # Delete the rule (after its confirmation), then the type.
    await page.goto(f"{api_url}/admin/trigger-rules/view/{rule_id}")
    await page.click("#delete-rule")
    await page.fill("#field-reason", "rule retired")
    await page.click("#confirm-delete")
    await page.wait_for_url(f"{api_url}/admin/trigger-rules")
    await expect(page.locator(f"tr.rule[data-rule='{rule_name}']")).to_have_count(0)
    await page.goto(f"{api_url}/admin/event-types/delete/{name}")
    await page.click("#confirm-delete")  # without a reason: refused, named on the form
    await expect(page.locator("#field-reason")).to_have_class(re.compile(r"\bis-invalid\b"))
    await page.fill("#field-reason", "type retired")
    await page.click("#confirm-delete")
    await page.wait_for_url(f"{api_url}/admin/event-types")
    await expect(page.locator(f"tr.event-type[data-name='{name}']")).to_have_count(0)

    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(audit_log)
                .where(sa.or_(sa.and_(audit_log.c.entity == "event_type", audit_log.c.entity_id == name),
                              sa.and_(audit_log.c.entity == "trigger_rule", audit_log.c.entity_id == str(rule_id))))
                .order_by(audit_log.c.id)
            )
        ).all()  # fmt: skip
    assert [r.action for r in rows] == ["event_type.create", "trigger_rule.create", "trigger_rule.delete",
                                        "event_type.delete"]  # fmt: skip
    assert {(r.actor, r.role) for r in rows} == {(email, "campaign_manager")}


async def test_analyst_reads_the_event_pages_without_controls_and_cannot_change_anything(
    page: Page, manager_api: httpx.AsyncClient, api_url: str, engine: AsyncEngine, make_user
) -> None:
    name = unique("account.closed_")
    response = await manager_api.put(f"/v1/event-types/{name}", json={"schema": SCHEMA, "description": "closed"})
    assert response.status_code == 200, response.text
    rule: dict[str, Any] = {"name": unique("closed-"), "event_type": name, "template": await put_template(manager_api),
            "channels": ["email"], "category": "security"}  # fmt: skip
    response = await manager_api.post("/v1/trigger-rules", json=rule)
    assert response.status_code == 201, response.text
    rule_id = response.json()["id"]
    try:
        email, password = await make_user(Role.analyst)
        await sign_in(page, api_url, email, password)
        await page.wait_for_url(f"{api_url}/admin/")
        pages = {
            "/admin/event-types": "tr.event-type",
            f"/admin/event-types/view/{name}": "#schema-json",
            "/admin/trigger-rules": "tr.rule",
            f"/admin/trigger-rules/view/{rule_id}": "#definition-json",
            "/admin/event/list": "table",
        }
        for path, shown in pages.items():
            answer = await page.goto(f"{api_url}{path}")
            assert answer is not None, path
            assert answer.status == 200, path
            await expect(page.locator(shown).first).to_be_visible()
            for control in ("#new-event-type", ".event-type-edit", ".event-type-delete", "#edit-event-type",
                            "#delete-event-type", "#new-rule-for-type", "#new-rule", ".rule-edit", ".rule-delete",
                            "#edit-rule", "#delete-rule", "form[method=post]"):  # fmt: skip
                await expect(page.locator(control)).to_have_count(0)
        await page.screenshot(path=shot("analyst"), full_page=True)

        for path in ("/admin/event-types/new", f"/admin/event-types/change/{name}",
                     f"/admin/event-types/delete/{name}", "/admin/trigger-rules/new",
                     f"/admin/trigger-rules/change/{rule_id}", f"/admin/trigger-rules/delete/{rule_id}"):  # fmt: skip
            answer = await page.goto(f"{api_url}{path}")
            assert answer is not None, path
            assert answer.status == 403, path
        definition = json.dumps({"template": rule["template"], "channels": ["email"], "category": "security"})
        posts: list[tuple[str, dict[str, str | float | bool]]] = [
            ("/admin/event-types/new", {"name": f"{name}_x", "schema": json.dumps(SCHEMA)}),
            (f"/admin/event-types/change/{name}", {"description": "changed", "schema": json.dumps(SCHEMA)}),
            (f"/admin/event-types/delete/{name}", {}),
            ("/admin/trigger-rules/new", {"name": f"{rule['name']}-x", "event_type": name, "definition": definition}),
            (f"/admin/trigger-rules/change/{rule_id}", {"name": rule["name"], "event_type": name,
                                                       "definition": definition}),
            (f"/admin/trigger-rules/delete/{rule_id}", {}),
        ]  # fmt: skip
        for path, form in posts:
            refused = await page.request.post(
                f"{api_url}{path}", form={**form, "csrf_token": await admin_browser.csrf_token(page)}, max_redirects=0
            )
            assert refused.status == 403, (path, refused.status)
        async with engine.connect() as conn:
            stored = (await conn.execute(sa.select(trigger_rules).where(trigger_rules.c.event_type == name))).all()
        assert [(row.id, row.enabled) for row in stored] == [(rule_id, True)]  # the change would have disabled it
        assert (await manager_api.get(f"/v1/event-types/{name}")).json()["description"] == "closed"
        assert (await manager_api.get(f"/v1/event-types/{name}_x")).status_code == 404
    finally:
        await manager_api.delete(f"/v1/trigger-rules/{rule_id}", params={"reason": "test cleanup"})
        await manager_api.delete(f"/v1/event-types/{name}", params={"reason": "test cleanup"})
