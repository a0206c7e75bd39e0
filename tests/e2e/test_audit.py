"""Admin actions on templates, segments and campaigns are in the audit log, with who did
them, whether through the API or the admin panel."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from core.auth import Role, hash_password
from core.config import Settings
from core.models import AdminUser
from tests import admin_session
from tests.e2e.test_campaigns import TEMPLATE, make_audience, wait_campaign
from tests.stack import token_for

admin_users = AdminUser.__table__  # type: ignore[attr-defined]


async def client(api_url: str, settings: Settings, role: Role, subject: str) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token_for(settings, role, subject)}"}
    return httpx.AsyncClient(base_url=api_url, headers=headers, timeout=60)


@pytest.fixture
async def clients(api_url: str, settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    manager = await client(api_url, settings, Role.campaign_manager, "maria@cinema.example")
    analyst = await client(api_url, settings, Role.analyst, "ann@cinema.example")
    async with manager, analyst:
        yield manager, analyst


async def trail(analyst: httpx.AsyncClient, entity: str, entity_id: str) -> list[tuple[str, str, str]]:
    response = await analyst.get("/v1/audit", params={"entity": entity, "entity_id": entity_id, "limit": 50})
    assert response.status_code == 200, response.text
    return [(item["action"], item["actor"], item["role"]) for item in reversed(response.json()["items"])]


async def test_template_segment_and_campaign_actions_are_audited(
    api: httpx.AsyncClient, clients: tuple[httpx.AsyncClient, httpx.AsyncClient]
) -> None:
    manager, analyst = clients
    who = ("maria@cinema.example", "campaign_manager")
    key = f"audited-{uuid.uuid4().hex[:8]}"
    assert (await manager.post("/v1/templates", json={"key": key, **TEMPLATE})).status_code == 201
    updated = await manager.put(f"/v1/templates/{key}", json={"content": TEMPLATE["content"], "change_note": "typo"})
    assert updated.status_code == 200
    rolled_back = await manager.post(f"/v1/templates/{key}/rollback", json={"version": 1, "reason": "undo"})
    assert rolled_back.status_code == 200

    tag, _ = await make_audience(api, 3)
    by_tag = {"field": "tags", "op": "contains", "value": tag}
    segment = await manager.post("/v1/segments", json={"name": f"s {tag}", "filter": by_tag})
    assert segment.status_code == 201
    body = {"name": f"c {tag}", "template": key, "segment_id": segment.json()["id"], "channels": ["email"],
            "variables": {"film": "Heat"}}  # fmt: skip
    campaign = (await manager.post("/v1/campaigns", json=body)).json()
    assert (await manager.post(f"/v1/campaigns/{campaign['id']}/launch")).status_code == 200
    await wait_campaign(manager, campaign["id"], "completed")
    assert (await manager.delete(f"/v1/templates/{key}", params={"reason": "premiere over"})).status_code == 204

    assert await trail(analyst, "template", key) == [
        ("template.create", *who), ("template.update", *who), ("template.rollback", *who), ("template.archive", *who),
    ]  # fmt: skip
    assert await trail(analyst, "segment", str(segment.json()["id"])) == [("segment.create", *who)]
    assert await trail(analyst, "campaign", campaign["id"]) == [("campaign.create", *who), ("campaign.launch", *who)]
    # A campaign manager acts but does not read the audit log.
    assert (await manager.get("/v1/audit")).status_code == 403


async def test_admin_panel_actions_are_audited_as_the_signed_in_user(
    api: httpx.AsyncClient, api_url: str, engine: AsyncEngine, clients: tuple[httpx.AsyncClient, httpx.AsyncClient]
) -> None:
    manager, analyst = clients
    key = f"panel-{uuid.uuid4().hex[:8]}"
    assert (await manager.post("/v1/templates", json={"key": key, **TEMPLATE})).status_code == 201
    tag, _ = await make_audience(api, 1)
    segment = (await manager.post("/v1/segments", json={"name": f"s {tag}", "filter": {
        "field": "tags", "op": "contains", "value": tag}})).json()  # fmt: skip
    campaign: dict[str, Any] = (await manager.post("/v1/campaigns", json={
        "name": f"c {tag}", "template": key, "segment_id": segment["id"], "channels": ["email"],
        "variables": {"film": "Heat"}, "schedule": {"kind": "at", "at": "2099-01-01T10:00:00Z"}})).json()  # fmt: skip

    email, password = f"ops-{uuid.uuid4().hex[:8]}@cinema.example", f"pw-{uuid.uuid4().hex}"
    async with engine.begin() as conn:
        await conn.execute(admin_users.insert().values(email=email, password_hash=hash_password(password),
                                                       role=Role.campaign_manager.value))  # fmt: skip
    async with httpx.AsyncClient(base_url=api_url, follow_redirects=True) as browser:
        login, token = await admin_session.sign_in(browser, email, password)
        assert login.status_code == 200
        for operation in ("launch", "pause"):
            acted = await browser.post(f"/admin/campaigns/act/{campaign['id']}/{operation}", data={"csrf_token": token})
            assert acted.status_code == 200, acted.text
        cancelled = await browser.post(f"/admin/campaigns/cancel/{campaign['id']}",
                                       data={"reason": "wrong film", "csrf_token": token})  # fmt: skip
        assert cancelled.status_code == 200

    panel = (email, "campaign_manager")
    assert await trail(analyst, "campaign", campaign["id"]) == [
        ("campaign.create", "maria@cinema.example", "campaign_manager"),
        ("campaign.launch", *panel), ("campaign.pause", *panel), ("campaign.cancel", *panel),
    ]  # fmt: skip
    async with engine.begin() as conn:
        await conn.execute(admin_users.delete().where(admin_users.c.email == email))
