"""Dead letters through the API, against the real stack: real permanent failures at the SMTP
server, replays that go through the NotificationWorkflow, the audit log they leave.

A replay must send once: counted at the SMTP server, with concurrent and repeated requests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from channels.smtp import message_id_for
from core.auth import Role
from core.config import Settings
from core.queries import dead_letters
from services.audit import audit_log
from tests.stack import SmtpServer, token_for, wait_for_status

# A permanent refusal that says nothing about the address: the address stays usable.
POLICY_REFUSAL = "550 5.7.1 Message rejected by policy"
NO_SUCH_USER = "550 5.1.1 No such user"
OPERATOR = "ops-alice"
REPLAY = {"reason": "mailbox fixed"}  # a replay needs a reason, kept in the audit log


async def _client(api_url: str, settings: Settings, role: Role, subject: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token_for(settings, role, subject)}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30) as client:
        yield client


@pytest.fixture
async def admin(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client(api_url, settings, Role.admin, OPERATOR):
        yield client


@pytest.fixture
async def analyst(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client(api_url, settings, Role.analyst, "analyst-bob"):
        yield client


@pytest.fixture
async def manager(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client(api_url, settings, Role.campaign_manager, "cm-carol"):
        yield client


async def new_recipient(api: httpx.AsyncClient) -> dict[str, Any]:
    user_id = f"dl-{uuid.uuid4().hex[:10]}"
    response = await api.post("/v1/recipients", json={"user_id": user_id, "email": f"{user_id}@example.com"})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def fail_for_good(
    api: httpx.AsyncClient, admin: httpx.AsyncClient, smtp_server: SmtpServer, person: dict[str, Any], refusal: str
) -> dict[str, Any]:
    """An email the SMTP server refuses for good; returns its dead letter as the API lists it."""
    smtp_server.handler.refuse[person["email"]] = refusal
    response = await api.post(
        "/v1/notifications?wait=true",
        json={"user_id": person["user_id"], "type": "account", "channels": ["email"], "title": "Your receipt",
              "body": "Thanks", "idempotency_key": f"receipt-{uuid.uuid4().hex}"},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "failed"
    page = (await admin.get("/v1/dead-letters", params={"user_id": person["user_id"]})).json()
    [letter] = page["items"]
    return dict(letter)


async def replay_finished(temporal_client: Client, workflow_id: str) -> None:
    await asyncio.wait_for(temporal_client.get_workflow_handle(workflow_id).result(), timeout=30)


async def run_exists(temporal_client: Client, workflow_id: str) -> bool:
    try:
        await temporal_client.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


async def audit_rows(engine: AsyncEngine, dead_letter_id: int) -> list[sa.Row[Any]]:
    async with engine.connect() as conn:
        query = (
            sa.select(audit_log)
            .where(audit_log.c.entity == "dead_letter", audit_log.c.entity_id == str(dead_letter_id))
            .order_by(audit_log.c.id)
        )
        return list((await conn.execute(query)).all())


def replay_id(letter: dict[str, Any], number: int) -> str:
    return f"notification-{letter['notification_id']}-replay-{letter['id']}-{number}"


async def test_a_permanent_failure_is_listed_read_and_filtered(
    api: httpx.AsyncClient, admin: httpx.AsyncClient, smtp_server: SmtpServer
) -> None:
    person = await new_recipient(api)
    first = await fail_for_good(api, admin, smtp_server, person, POLICY_REFUSAL)
    assert first["status"] == "open"
    assert first["channel"] == "email"
    assert first["reason"] == "rejected by provider"
    assert "rejected by policy" in first["last_error"]
    assert (first["attempts"], first["replays"], first["resolved_by"]) == (1, 0, None)
    assert "request" not in first  # the list stays light; the detail has it

    detail = (await admin.get(f"/v1/dead-letters/{first['id']}")).json()
    assert detail["request"]["title"] == "Your receipt"
    assert detail["request"]["user_id"] == person["user_id"]
    assert detail["request"]["channels"] == ["email"]
    assert detail["history"] == []

    # Filters: each one narrows, together they all hold.
    async def ids(**params: Any) -> list[int]:
        response = await admin.get("/v1/dead-letters", params={"user_id": person["user_id"], **params})
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert await ids(status="open", channel="email", reason="BY POLICY") == [first["id"]]
    assert await ids(reason="rejected by provider") == [first["id"]]
    assert await ids(reason="no such thing") == []
    assert await ids(channel="sms") == []
    assert await ids(status="replayed") == []
    assert await ids(notification_id=first["notification_id"]) == [first["id"]]
    assert await ids(created_after="2999-01-01T00:00:00Z") == []
    assert await ids(created_before="2999-01-01T00:00:00") == [first["id"]]

    # Bad filters: 422 naming the field, as problem+json.
    for params, field in (({"status": "lost"}, "status"), ({"channel": "fax"}, "channel"),
                          ({"cursor": "not-a-cursor"}, "cursor"), ({"limit": 0}, "limit")):  # fmt: skip
        response = await admin.get("/v1/dead-letters", params=params)
        assert response.status_code == 422, (params, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert [error["field"] for error in response.json()["errors"]] == [field]

    missing = await admin.get("/v1/dead-letters/999999999")
    assert missing.status_code == 404
    assert missing.json()["detail"] == "no dead letter 999999999"


async def test_pages_are_newest_first(
    api: httpx.AsyncClient, admin: httpx.AsyncClient, smtp_server: SmtpServer
) -> None:
    person = await new_recipient(api)
    letters = [await fail_for_good_again(api, admin, smtp_server, person) for _ in range(3)]
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"user_id": person["user_id"], "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await admin.get("/v1/dead-letters", params=params)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(letter["id"] for letter in letters)[::-1]


async def fail_for_good_again(
    api: httpx.AsyncClient, admin: httpx.AsyncClient, smtp_server: SmtpServer, person: dict[str, Any]
) -> dict[str, Any]:
    """One more dead letter for a recipient who has some already: the newest one."""
    before = {
        item["id"]
        for item in (await admin.get("/v1/dead-letters", params={"user_id": person["user_id"]})).json()["items"]
    }
    smtp_server.handler.refuse[person["email"]] = POLICY_REFUSAL
    response = await api.post(
        "/v1/notifications?wait=true",
        json={"user_id": person["user_id"], "type": "account", "channels": ["email"], "title": "Again", "body": "B"},
    )
    assert response.json()["status"] == "failed"
    items = (await admin.get("/v1/dead-letters", params={"user_id": person["user_id"]})).json()["items"]
    [new] = [item for item in items if item["id"] not in before]
    return dict(new)


async def test_replay_sends_once_and_cannot_be_repeated(
    api: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    smtp_server: SmtpServer,
    temporal_client: Client,
    settings: Settings,
    engine: AsyncEngine,
) -> None:
    person = await new_recipient(api)
    letter = await fail_for_good(api, admin, smtp_server, person, POLICY_REFUSAL)
    assert smtp_server.handler.to(person["email"]) == []
    del smtp_server.handler.refuse[person["email"]]  # the provider accepts it again

    response = await admin.post(f"/v1/dead-letters/{letter['id']}/replay", json=REPLAY)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result == {"id": letter["id"], "outcome": "replayed", "status": "replayed",
                      "workflow_id": replay_id(letter, 1)}  # fmt: skip
    await replay_finished(temporal_client, result["workflow_id"])
    notification = await wait_for_status(api, letter["notification_id"], "sent")
    [message] = smtp_server.handler.to(person["email"])
    # The same idempotency key as the first attempt: the same Message-ID.
    detail = (await admin.get(f"/v1/dead-letters/{letter['id']}")).json()
    key = detail["request"]["idempotency_key"]
    assert message["Message-ID"] == message_id_for(f"{key}:email", settings.message_id_domain)
    assert notification["channels"][0]["provider_message_id"] == message["Message-ID"]

    assert (detail["status"], detail["replays"], detail["resolved_by"]) == ("replayed", 1, OPERATOR)
    assert detail["resolved_at"] is not None
    [entry] = detail["history"]
    assert (entry["action"], entry["actor"], entry["role"]) == ("dead_letter.replay", OPERATOR, "admin")

    # Once replayed, it is not open: 409, no new run, no new message.
    again = await admin.post(f"/v1/dead-letters/{letter['id']}/replay", json=REPLAY)
    assert again.status_code == 409, again.text
    assert again.headers["content-type"] == "application/problem+json"
    assert again.json()["detail"] == f"dead letter {letter['id']} is replayed; only open ones can be replayed"
    assert not await run_exists(temporal_client, replay_id(letter, 2))
    assert len(smtp_server.handler.to(person["email"])) == 1
    assert len(await audit_rows(engine, letter["id"])) == 1

    missing = await admin.post("/v1/dead-letters/999999999/replay", json=REPLAY)
    assert missing.status_code == 404


async def test_concurrent_replays_of_one_dead_letter_send_once(
    api: httpx.AsyncClient, admin: httpx.AsyncClient, smtp_server: SmtpServer, temporal_client: Client,
    engine: AsyncEngine,
) -> None:  # fmt: skip
    person = await new_recipient(api)
    letter = await fail_for_good(api, admin, smtp_server, person, POLICY_REFUSAL)
    del smtp_server.handler.refuse[person["email"]]

    responses = await asyncio.gather(
        *(admin.post(f"/v1/dead-letters/{letter['id']}/replay", json=REPLAY) for _ in range(5))
    )
    codes = sorted(response.status_code for response in responses)
    assert codes == [200, 409, 409, 409, 409], [response.text for response in responses]
    [won] = [response.json() for response in responses if response.status_code == 200]
    await replay_finished(temporal_client, won["workflow_id"])
    await wait_for_status(api, letter["notification_id"], "sent")
    assert len(smtp_server.handler.to(person["email"])) == 1
    assert not await run_exists(temporal_client, replay_id(letter, 2))
    assert [row.action for row in await audit_rows(engine, letter["id"])] == ["dead_letter.replay"]


async def test_bulk_replay_by_ids_and_by_filter(
    api: httpx.AsyncClient, admin: httpx.AsyncClient, smtp_server: SmtpServer, temporal_client: Client
) -> None:
    people = [await new_recipient(api) for _ in range(3)]
    letters = [await fail_for_good(api, admin, smtp_server, person, POLICY_REFUSAL) for person in people]
    for person in people:
        del smtp_server.handler.refuse[person["email"]]

    # By ids: unknown ones are reported, not fatal; a repeated id counts once.
    ids = [letters[0]["id"], 999999999, letters[1]["id"], letters[0]["id"]]
    response = await admin.post("/v1/dead-letters/replay", json={**REPLAY, "ids": ids})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(r["id"], r["outcome"]) for r in body["results"]] == [
        (letters[0]["id"], "replayed"), (999999999, "not found"), (letters[1]["id"], "replayed")
    ]  # fmt: skip
    assert body["more"] is False

    # By filter: the open ones that match (here, the third recipient's).
    response = await admin.post("/v1/dead-letters/replay", json={**REPLAY, "filter": {"user_id": people[2]["user_id"]}})
    assert response.status_code == 200, response.text
    [third] = response.json()["results"]
    assert (third["id"], third["outcome"]) == (letters[2]["id"], "replayed")

    started = [*(r["workflow_id"] for r in body["results"] if r["workflow_id"]), third["workflow_id"]]
    await asyncio.gather(*(replay_finished(temporal_client, workflow_id) for workflow_id in started))
    for person, letter in zip(people, letters, strict=True):
        await wait_for_status(api, letter["notification_id"], "sent")
        assert len(smtp_server.handler.to(person["email"])) == 1

    # The same bulk again: nothing is open any more, nothing is sent.
    again = (await admin.post("/v1/dead-letters/replay", json={**REPLAY, "ids": ids[:3]})).json()
    assert [r["outcome"] for r in again["results"]] == ["not open", "not found", "not open"]
    assert (
        await admin.post("/v1/dead-letters/replay", json={**REPLAY, "filter": {"user_id": people[2]["user_id"]}})
    ).json()["results"] == []

    # Bad selections: 422 naming the field.
    for payload, field in (
        ({"ids": []}, "ids"),
        ({"ids": list(range(1, 502))}, "ids"),
        ({}, ""),
        ({"ids": [1], "filter": {}}, ""),
        ({"filter": {"status": "replayed"}}, "filter.status"),
        ({"filter": {"channel": "fax"}}, "filter.channel"),
        ({"filter": {"colour": "red"}}, "filter.colour"),
    ):
        refused = await admin.post("/v1/dead-letters/replay", json={**REPLAY, **payload})
        assert refused.status_code == 422, (payload, refused.text)
        fields = [error["field"] for error in refused.json()["errors"]]
        assert all(f.startswith(field) for f in fields), (payload, fields)
        assert fields, payload


async def test_discard_needs_a_reason_and_is_final(
    api: httpx.AsyncClient, admin: httpx.AsyncClient, smtp_server: SmtpServer, engine: AsyncEngine
) -> None:
    person = await new_recipient(api)
    letter = await fail_for_good(api, admin, smtp_server, person, POLICY_REFUSAL)

    for payload in ({}, {"reason": ""}, {"reason": "  x "}):
        refused = await admin.post(f"/v1/dead-letters/{letter['id']}/discard", json=payload)
        assert refused.status_code == 422, (payload, refused.text)
        assert [error["field"] for error in refused.json()["errors"]] == ["reason"]
    assert (await admin.get(f"/v1/dead-letters/{letter['id']}")).json()["status"] == "open"

    response = await admin.post(
        f"/v1/dead-letters/{letter['id']}/discard", json={"reason": "customer closed the account"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "discarded"
    detail = (await admin.get(f"/v1/dead-letters/{letter['id']}")).json()
    assert (detail["status"], detail["resolved_by"], detail["replays"]) == ("discarded", OPERATOR, 0)
    [entry] = detail["history"]
    assert entry["action"] == "dead_letter.discard"
    assert entry["reason"] == "customer closed the account"

    # Discarded is final: no replay, no second discard.
    assert (await admin.post(f"/v1/dead-letters/{letter['id']}/replay", json=REPLAY)).status_code == 409
    assert (await admin.post(f"/v1/dead-letters/{letter['id']}/discard", json={"reason": "again"})).status_code == 409
    assert len(await audit_rows(engine, letter["id"])) == 1
    assert smtp_server.handler.to(person["email"]) == []

    # In bulk, by ids or by filter.
    others = [await fail_for_good(api, admin, smtp_server, await new_recipient(api), POLICY_REFUSAL) for _ in range(2)]
    missing_reason = await admin.post("/v1/dead-letters/discard", json={"ids": [others[0]["id"]]})
    assert missing_reason.status_code == 422
    assert [error["field"] for error in missing_reason.json()["errors"]] == ["reason"]
    response = await admin.post(
        "/v1/dead-letters/discard", json={"ids": [others[0]["id"], letter["id"]], "reason": "test addresses"}
    )
    assert [(r["id"], r["outcome"]) for r in response.json()["results"]] == [
        (others[0]["id"], "discarded"), (letter["id"], "not open")
    ]  # fmt: skip
    response = await admin.post(
        "/v1/dead-letters/discard",
        json={"filter": {"notification_id": others[1]["notification_id"]}, "reason": "test addresses"},
    )
    assert [(r["id"], r["outcome"]) for r in response.json()["results"]] == [(others[1]["id"], "discarded")]


async def test_roles(
    api: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    analyst: httpx.AsyncClient,
    manager: httpx.AsyncClient,
    smtp_server: SmtpServer,
    engine: AsyncEngine,
) -> None:
    letter = await fail_for_good(api, admin, smtp_server, await new_recipient(api), POLICY_REFUSAL)
    for reader in (analyst, manager):
        assert (await reader.get("/v1/dead-letters", params={"status": "open"})).status_code == 200
        assert (await reader.get(f"/v1/dead-letters/{letter['id']}")).status_code == 200
    assert (await api.get("/v1/dead-letters")).status_code == 403  # a service only sends

    for caller in (analyst, manager, api):
        for path, payload in ((f"/v1/dead-letters/{letter['id']}/replay", REPLAY),
                              ("/v1/dead-letters/replay", {"ids": [letter["id"]], **REPLAY}),
                              (f"/v1/dead-letters/{letter['id']}/discard", {"reason": "not mine to say"}),
                              ("/v1/dead-letters/discard", {"ids": [letter["id"]], "reason": "not mine"})):  # fmt: skip
            refused = await caller.post(path, json=payload)
            assert refused.status_code == 403, (path, refused.text)
            assert refused.headers["content-type"] == "application/problem+json"
    assert (await admin.get(f"/v1/dead-letters/{letter['id']}")).json()["status"] == "open"
    assert await audit_rows(engine, letter["id"]) == []

    assert (await analyst.get("/v1/audit")).status_code == 200
    assert (await manager.get("/v1/audit")).status_code == 403
    assert (await api.get("/v1/audit")).status_code == 403
    async with httpx.AsyncClient(base_url=str(api.base_url), timeout=30) as anonymous:
        assert (await anonymous.get("/v1/dead-letters")).status_code == 401


async def test_audit_log_lists_actions_newest_first(
    api: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    analyst: httpx.AsyncClient,
    smtp_server: SmtpServer,
    temporal_client: Client,
) -> None:
    person = await new_recipient(api)
    replayed = await fail_for_good(api, admin, smtp_server, person, POLICY_REFUSAL)
    discarded = await fail_for_good_again(api, admin, smtp_server, person)
    del smtp_server.handler.refuse[person["email"]]
    result = (await admin.post(f"/v1/dead-letters/{replayed['id']}/replay", json=REPLAY)).json()
    await admin.post(f"/v1/dead-letters/{discarded['id']}/discard", json={"reason": "duplicate of the replayed one"})
    await replay_finished(temporal_client, result["workflow_id"])

    page = (await analyst.get("/v1/audit", params={"entity": "dead_letter", "actor": OPERATOR, "limit": 200})).json()
    mine = [e for e in page["items"] if e["entity_id"] in (str(replayed["id"]), str(discarded["id"]))]
    assert [e["action"] for e in mine] == ["dead_letter.discard", "dead_letter.replay"]  # newest first
    discard_entry, replay_entry = mine
    assert (replay_entry["actor"], replay_entry["role"], replay_entry["entity"]) == (OPERATOR, "admin", "dead_letter")
    assert replay_entry["details"]["workflow_id"] == result["workflow_id"]
    assert replay_entry["details"]["notification_id"] == replayed["notification_id"]
    assert replay_entry["details"]["channel"] == "email"
    assert discard_entry["reason"] == "duplicate of the replayed one"
    assert replay_entry["reason"] == REPLAY["reason"]

    one = (await analyst.get("/v1/audit", params={"entity": "dead_letter", "entity_id": str(replayed["id"])})).json()
    assert [e["action"] for e in one["items"]] == ["dead_letter.replay"]
    assert one["next_cursor"] is None

    # Keyset pages of one row each walk the same rows.
    first = (await analyst.get("/v1/audit", params={"actor": OPERATOR, "limit": 1})).json()
    second = (
        await analyst.get("/v1/audit", params={"actor": OPERATOR, "limit": 1, "cursor": first["next_cursor"]})
    ).json()
    both = (await analyst.get("/v1/audit", params={"actor": OPERATOR, "limit": 2})).json()
    assert [e["id"] for e in first["items"] + second["items"]] == [e["id"] for e in both["items"]]
    assert (await analyst.get("/v1/audit", params={"actor": "nobody-at-all"})).json()["items"] == []
    bad = await analyst.get("/v1/audit", params={"cursor": "???"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "cursor"


async def test_a_replay_that_fails_again_reopens_the_dead_letter(
    api: httpx.AsyncClient, admin: httpx.AsyncClient, smtp_server: SmtpServer, temporal_client: Client
) -> None:
    person = await new_recipient(api)
    letter = await fail_for_good(api, admin, smtp_server, person, POLICY_REFUSAL)
    smtp_server.handler.refuse[person["email"]] = "550 5.7.1 Still rejected by policy"  # the refusal stays

    result = (await admin.post(f"/v1/dead-letters/{letter['id']}/replay", json=REPLAY)).json()
    assert result["outcome"] == "replayed"
    await replay_finished(temporal_client, result["workflow_id"])
    detail = (await admin.get(f"/v1/dead-letters/{letter['id']}")).json()
    assert detail["status"] == "open"
    assert detail["replays"] == 1
    assert "Still rejected" in detail["last_error"]
    assert (await api.get(f"/v1/notifications/{letter['notification_id']}")).json()["status"] == "failed"
    # Its listing shows it among the open ones again; the next replay is a new run.
    listed = (await admin.get("/v1/dead-letters", params={"user_id": person["user_id"], "status": "open"})).json()
    assert [item["id"] for item in listed["items"]] == [letter["id"]]

    del smtp_server.handler.refuse[person["email"]]
    again = (await admin.post(f"/v1/dead-letters/{letter['id']}/replay", json=REPLAY)).json()
    assert again["workflow_id"] == replay_id(letter, 2)
    await replay_finished(temporal_client, again["workflow_id"])
    await wait_for_status(api, letter["notification_id"], "sent")
    assert len(smtp_server.handler.to(person["email"])) == 1


async def test_replay_after_the_recipient_fixed_a_bad_address(
    api: httpx.AsyncClient, admin: httpx.AsyncClient, smtp_server: SmtpServer, temporal_client: Client
) -> None:
    """No such user: the address is suppressed; the recipient gives a new one; the replay
    goes there (the plan reads the recipient's contact afresh), once."""
    person = await new_recipient(api)
    letter = await fail_for_good(api, admin, smtp_server, person, NO_SUCH_USER)
    assert "No such user" in letter["last_error"]
    new_email = f"fixed-{person['user_id']}@example.com"
    response = await api.put(f"/v1/recipients/{person['user_id']}", json={"email": new_email})
    assert response.status_code == 200, response.text

    result = (await admin.post(f"/v1/dead-letters/{letter['id']}/replay", json=REPLAY)).json()
    await replay_finished(temporal_client, result["workflow_id"])
    await wait_for_status(api, letter["notification_id"], "sent")
    assert len(smtp_server.handler.to(new_email)) == 1
    assert smtp_server.handler.to(person["email"]) == []


async def test_a_bad_stored_request_stops_the_whole_bulk_before_any_send(
    api: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    smtp_server: SmtpServer,
    temporal_client: Client,
    engine: AsyncEngine,
) -> None:
    person = await new_recipient(api)
    good = await fail_for_good(api, admin, smtp_server, person, POLICY_REFUSAL)
    del smtp_server.handler.refuse[person["email"]]
    async with engine.begin() as conn:  # a row no workflow could have written
        broken_id = await conn.scalar(
            dead_letters.insert()
            .values(notification_id=good["notification_id"], channel="sms", reason="rejected by provider",
                    last_error="x", attempts=1, request={"not": "a request"})
            .returning(dead_letters.c.id)
        )  # fmt: skip

    response = await admin.post("/v1/dead-letters/replay", json={**REPLAY, "ids": [good["id"], broken_id]})
    assert response.status_code == 409, response.text
    assert f"dead letter {broken_id} cannot be replayed" in response.json()["detail"]
    # Nothing happened to the good one either.
    detail = (await admin.get(f"/v1/dead-letters/{good['id']}")).json()
    assert (detail["status"], detail["replays"], detail["history"]) == ("open", 0, [])
    assert not await run_exists(temporal_client, replay_id(good, 1))
    assert smtp_server.handler.to(person["email"]) == []
