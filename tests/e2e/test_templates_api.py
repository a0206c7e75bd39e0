"""Templates through the API: versions, rollback, diff, preview, and templated sends."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from core.auth import Role
from core.config import Settings
from services.templates import templates, versions
from tests.stack import SmtpServer, token_for, wait_for_status

PROBLEM = "application/problem+json"


def episode_template(key: str, subject: str = "New episode of {{ show }}") -> dict[str, Any]:
    return {
        "key": key,
        "category": "new_episode",
        "description": "A new episode is out",
        "change_note": "first draft",
        "content": {
            "variables": [
                {"name": "show", "example": "The Long Night"},
                {"name": "episode", "type": "integer", "example": 5},
                {"name": "link", "type": "url", "required": False, "example": "https://cinema.example/e/5"},
            ],
            "fallback_locale": "en",
            "locales": {
                "en": {
                    "email": {
                        "subject": subject,
                        "html": "<p>Hi {{ recipient.name }}, episode {{ episode }} of <b>{{ show }}</b> is out.</p>",
                    },
                    "sms": {"text": "{{ show }} ep. {{ episode }} is out"},
                },
                "ru": {
                    "email": {
                        "subject": "Новая серия: {{ show }}",
                        "html": "<p>{{ recipient.name }}, серия {{ episode }}</p>",
                    }
                },
            },
        },
    }  # fmt: skip


@pytest.fixture
async def editor(api_url: str, settings: Settings) -> Any:
    headers = {"Authorization": f"Bearer {token_for(settings, Role.campaign_manager, 'maria')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers) as client:
        yield client


@pytest.fixture
def key() -> str:
    return f"episode-{uuid.uuid4().hex[:8]}"


async def _count(engine: AsyncEngine, table: sa.Table) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


async def test_create_read_update_and_list_versions(editor: httpx.AsyncClient, key: str) -> None:
    created = await editor.post("/v1/templates", json=episode_template(key))
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1
    assert created.json()["author"] == "maria"
    assert created.json()["channels"] == ["email", "sms"]

    update = {
        "content": episode_template(key, "Episode {{ episode }}: {{ show }}")["content"],
        "change_note": "shorter",
    }
    updated = await editor.put(f"/v1/templates/{key}", json=update)
    assert updated.json()["version"] == 2
    assert updated.json()["active_version"] == 2

    listed = (await editor.get(f"/v1/templates/{key}/versions")).json()
    assert [(v["version"], v["active"], v["change_note"]) for v in listed] == [
        (2, True, "shorter"),
        (1, False, "first draft"),
    ]
    old = (await editor.get(f"/v1/templates/{key}/versions/1")).json()
    assert old["content"]["locales"]["en"]["email"]["subject"] == "New episode of {{ show }}"
    assert old["active_version"] == 2

    found = (await editor.get("/v1/templates", params={"q": key})).json()
    assert [t["key"] for t in found] == [key]


async def test_rollback_makes_a_new_version_and_diff_compares(editor: httpx.AsyncClient, key: str) -> None:
    await editor.post("/v1/templates", json=episode_template(key))
    update = {"content": episode_template(key, "Episode {{ episode }}: {{ show }}")["content"], "change_note": "v2"}
    await editor.put(f"/v1/templates/{key}", json=update)

    rolled = await editor.post(f"/v1/templates/{key}/rollback", json={"version": 1, "reason": "v2 tested badly"})
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["version"] == 3
    assert rolled.json()["change_note"] == "rollback to v1: v2 tested badly"
    assert rolled.json()["content"] == (await editor.get(f"/v1/templates/{key}/versions/1")).json()["content"]

    diff = (await editor.get(f"/v1/templates/{key}/diff", params={"from": 1, "to": 2})).json()
    assert list(diff["parts"]) == ["en.email.subject"]
    patch = diff["parts"]["en.email.subject"]
    assert "-New episode of {{ show }}" in patch
    assert "+Episode {{ episode }}: {{ show }}" in patch
    assert patch.startswith("--- v1/en.email.subject\n+++ v2/en.email.subject\n")
    same = (await editor.get(f"/v1/templates/{key}/diff", params={"from": 1, "to": 3})).json()
    assert same["parts"] == {}

    missing = await editor.post(f"/v1/templates/{key}/rollback", json={"version": 9, "reason": "nope"})
    assert missing.status_code == 404


async def test_invalid_template_lists_every_problem_and_stores_nothing(
    editor: httpx.AsyncClient, engine: AsyncEngine, key: str
) -> None:
    body = episode_template(key, "{{ show }} {{ unknown }}")
    body["content"]["locales"]["en"]["sms"]["text"] = "{{ show.__class__ }} {% if %}"
    body["content"]["locales"]["ru"]["email"]["html"] = "{{ show"
    before = (await _count(engine, templates), await _count(engine, versions))
    response = await editor.post("/v1/templates", json=body)
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["title"] == "Template is invalid"
    by_part = {(e["part"], e["line"]) for e in problem["errors"]}
    assert by_part == {("en.email.subject", 1), ("en.sms.text", 1), ("ru.email.html", 1)}
    assert all(e["field"] == f"content.{e['part']}" for e in problem["errors"])
    assert (await _count(engine, templates), await _count(engine, versions)) == before

    await editor.post("/v1/templates", json=episode_template(key))
    bad_update = {"content": body["content"], "change_note": "broken"}
    assert (await editor.put(f"/v1/templates/{key}", json=bad_update)).status_code == 422
    assert [v["version"] for v in (await editor.get(f"/v1/templates/{key}/versions")).json()] == [1]


async def test_duplicate_key_and_roles(editor: httpx.AsyncClient, api: httpx.AsyncClient, key: str) -> None:
    assert (await editor.post("/v1/templates", json=episode_template(key))).status_code == 201
    again = await editor.post("/v1/templates", json=episode_template(key))
    assert again.status_code == 409
    # A service may read and use templates, not edit them; analysts likewise.
    forbidden = await api.put(
        f"/v1/templates/{key}", json={"content": episode_template(key)["content"], "change_note": "x"}
    )
    assert forbidden.status_code == 403
    assert (await api.get(f"/v1/templates/{key}")).status_code == 200


async def test_archive_hides_the_template(editor: httpx.AsyncClient, key: str) -> None:
    await editor.post("/v1/templates", json=episode_template(key))
    assert (await editor.delete(f"/v1/templates/{key}", params={"reason": "retired"})).status_code == 204
    assert (await editor.get(f"/v1/templates/{key}")).status_code == 404
    assert (await editor.post("/v1/templates", json=episode_template(key))).status_code == 409


async def test_preview_with_variables_and_with_a_real_recipient(
    editor: httpx.AsyncClient, api: httpx.AsyncClient, key: str, user_id: str
) -> None:
    await editor.post("/v1/templates", json=episode_template(key))
    preview = (await editor.post(f"/v1/templates/{key}/preview", json={"variables": {"show": "Dark <3>"}})).json()
    assert preview["email"]["subject"] == "New episode of Dark <3>"
    assert preview["email"]["html"] == "<p>Hi Alex Example, episode 5 of <b>Dark &lt;3&gt;</b> is out.</p>"
    assert preview["sms"] == {"text": "Dark <3> ep. 5 is out", "encoding": "GSM-7", "segments": 1, "characters": 21}

    await api.post(
        "/v1/recipients", json={"user_id": user_id, "name": "Olga", "locale": "ru", "email": "o@example.com"}
    )
    mine = (await editor.post(f"/v1/templates/{key}/preview", json={"user_id": user_id})).json()
    assert mine["locale"] == "ru"
    assert mine["email"]["html"] == "<p>Olga, серия 5</p>"

    bad = await editor.post(f"/v1/templates/{key}/preview", json={"variables": {"episode": "five"}})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "variables.episode"


async def test_templated_notification_arrives_rendered_for_the_recipient(
    editor: httpx.AsyncClient, api: httpx.AsyncClient, key: str, user_id: str, smtp_server: SmtpServer
) -> None:
    await editor.post("/v1/templates", json=episode_template(key))
    address = f"{user_id}@example.com"
    await api.post("/v1/recipients", json={"user_id": user_id, "name": "Олег", "locale": "ru-RU", "email": address})
    response = await api.post(
        "/v1/notifications?wait=true",
        json={"user_id": user_id, "type": "new_episode", "channels": ["email"], "template": key,
              "variables": {"show": "Тьма", "episode": 3}},
    )  # fmt: skip
    body = response.json()
    assert body["status"] == "sent", body
    assert (body["template"], body["template_version"]) == (key, 1)
    [message] = smtp_server.handler.to(address)
    assert message["Subject"] == "Новая серия: Тьма"
    html = message.get_body(("html",)).get_content()
    text = message.get_body(("plain",)).get_content()
    assert "<p>Олег, серия 3</p>" in html
    assert text.replace("\r\n", "\n").split("\n--\n")[0].strip() == "Олег, серия 3"


async def test_templated_notification_input_is_checked_up_front(
    editor: httpx.AsyncClient, api: httpx.AsyncClient, key: str, recipient: dict
) -> None:
    await editor.post("/v1/templates", json=episode_template(key))
    base = {"user_id": recipient["user_id"], "type": "new_episode", "channels": ["email"], "template": key}
    cases = [
        ({**base, "template": "no-such-template", "variables": {"show": "x", "episode": 1}}, "template"),
        ({**base, "template_version": 7, "variables": {"show": "x", "episode": 1}}, "template_version"),
        ({**base, "channels": ["push"], "variables": {"show": "x", "episode": 1}}, "channels.0"),
        ({**base, "variables": {"show": "x"}}, "variables.episode"),
        ({**base, "variables": {"show": "x", "episode": 1, "typo": 2}}, "variables.typo"),
        # A whole-body rule (template or title/body, not both) is reported on the body itself.
        ({**base, "variables": {"show": "x", "episode": 1}, "title": "T"}, "body"),
    ]
    for request, field in cases:
        response = await api.post("/v1/notifications", json=request)
        assert response.status_code == 422, (field, response.text)
        assert field in [e["field"] for e in response.json()["errors"]], response.json()


async def test_editing_a_template_mid_send_does_not_change_that_send(
    editor: httpx.AsyncClient, api: httpx.AsyncClient, key: str, user_id: str, smtp_server: SmtpServer
) -> None:
    await editor.post("/v1/templates", json=episode_template(key))
    address = f"{user_id}@example.com"
    await api.post("/v1/recipients", json={"user_id": user_id, "name": "Ann", "email": address})
    smtp_server.handler.refuse[address] = "451 4.3.0 Try later"  # keeps the send retrying
    accepted = (
        await api.post(
            "/v1/notifications",
            json={
                "user_id": user_id,
                "type": "new_episode",
                "channels": ["email"],
                "template": key,
                "variables": {"show": "Dark", "episode": 1},
            },
        )
    ).json()
    await asyncio.sleep(0.3)
    edited = {"content": episode_template(key, "EDITED {{ show }}")["content"], "change_note": "mid-send edit"}
    assert (await editor.put(f"/v1/templates/{key}", json=edited)).json()["version"] == 2
    del smtp_server.handler.refuse[address]

    done = await wait_for_status(api, accepted["id"], "sent")
    assert done["template_version"] == 1
    [message] = smtp_server.handler.to(address)
    assert message["Subject"] == "New episode of Dark"
