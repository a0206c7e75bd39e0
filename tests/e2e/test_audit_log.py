"""The audit log (FR-008) through the real stack: every mutating route leaves exactly one
audit row (or is listed as exempt, with why); destructive and risky ones refuse to run
without a reason; rows carry the reason, the client address and what changed; PostgreSQL
refuses to change or remove a row, even for the table's owner; search and CSV export."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from api.app import create_app
from core.auth import Role
from core.config import Settings
from services.audit import audit_log
from tests.e2e.test_campaigns import TEMPLATE, make_audience
from tests.e2e.test_dead_letters import POLICY_REFUSAL, fail_for_good, new_recipient
from tests.e2e.test_events import PASSWORD_SCHEMA as SCHEMA
from tests.e2e.test_events import RESET_TEMPLATE
from tests.stack import SmtpServer, token_for

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
FAR_AWAY = {"kind": "at", "at": "2099-01-01T10:00:00Z"}  # launched, nothing sent
SETUP = "audit-setup"  # the subject that prepares; its rows are not the ones counted

# Mutating routes that are not a person's action, each with why it writes no audit row.
EXEMPT: dict[tuple[str, str], str] = {
    ("POST", "/v1/notifications"): "a backend's send, thousands a minute: the notification, its deliveries and "
    "their history are its record (who asked: the idempotency key and the request)",
    ("POST", "/v1/recipients"): "the directory kept in sync by backends (data plane, updated_at on the row)",
    ("PUT", "/v1/recipients/{user_id}"): "the directory kept in sync by backends (data plane)",
    ("POST", "/v1/recipients/batch"): "the directory kept in sync by backends, 1,000 at a time (data plane)",
    ("PUT", "/v1/recipients/{user_id}/preferences"): "a user's own settings, relayed by a backend (data plane)",
    ("DELETE", "/v1/recipients/{user_id}/preferences/{category}/{channel}"): "resets one preference to its "
    "default: the same user-driven write as PUT preferences, not an operator's deletion",
    ("PUT", "/v1/recipients/{user_id}/follows"): "what a user follows, relayed by a backend (data plane)",
    ("POST", "/v1/events"): "facts published by backends; the events table and each rule's action are the record",
    ("POST", "/v1/templates/{key}/preview"): "a read that takes a body: nothing is written",
    ("POST", "/v1/segments/count"): "a read that takes a body: nothing is written",
}
# Open routes: no person signed in, so nobody to audit (signed provider callbacks, links in
# messages, the dev outbox).
PUBLIC_PREFIXES = ("/v1/webhooks/", "/t/", "/u/", "/dev")

# Every audited route and the action its row names.
AUDITED: dict[tuple[str, str], str] = {
    ("POST", "/v1/notifications/{notification_id}/cancel"): "notification.cancel",
    ("POST", "/v1/notifications/scheduled"): "campaign.create_and_launch",
    ("DELETE", "/v1/recipients/{user_id}"): "recipient.delete",
    ("POST", "/v1/recipients/{user_id}/erase"): "recipient.erase",
    ("POST", "/v1/templates"): "template.create",
    ("PUT", "/v1/templates/{key}"): "template.update",
    ("DELETE", "/v1/templates/{key}"): "template.archive",
    ("POST", "/v1/templates/{key}/rollback"): "template.rollback",
    ("POST", "/v1/segments"): "segment.create",
    ("POST", "/v1/segments/{segment_id}/members"): "segment.add_members",
    ("POST", "/v1/campaigns"): "campaign.create",
    ("POST", "/v1/campaigns/{campaign_id}/launch"): "campaign.launch",
    ("POST", "/v1/campaigns/{campaign_id}/pause"): "campaign.pause",
    ("POST", "/v1/campaigns/{campaign_id}/resume"): "campaign.resume",
    ("POST", "/v1/campaigns/{campaign_id}/cancel"): "campaign.cancel",
    ("POST", "/v1/campaigns/{campaign_id}/trigger"): "campaign.trigger",
    ("POST", "/admin/bulk"): "campaign.create_and_launch",
    ("PUT", "/v1/providers/{name}"): "provider.create",
    ("DELETE", "/v1/providers/{name}"): "provider.delete",
    ("POST", "/v1/providers/{name}/enable"): "provider.enable",
    ("POST", "/v1/providers/{name}/disable"): "provider.disable",
    ("POST", "/v1/providers/{name}/breaker/reset"): "provider.breaker_reset",
    ("POST", "/v1/providers/{name}/test"): "provider.test",
    ("POST", "/v1/dead-letters/replay"): "dead_letter.replay",
    ("POST", "/v1/dead-letters/discard"): "dead_letter.discard",
    ("POST", "/v1/dead-letters/{dead_letter_id}/replay"): "dead_letter.replay",
    ("POST", "/v1/dead-letters/{dead_letter_id}/discard"): "dead_letter.discard",
    ("POST", "/v1/suppressions"): "suppression.add",
    ("DELETE", "/v1/suppressions/{channel}/{address}"): "suppression.lift",
    ("PUT", "/v1/event-types/{name}"): "event_type.create",
    ("DELETE", "/v1/event-types/{name}"): "event_type.delete",
    ("POST", "/v1/trigger-rules"): "trigger_rule.create",
    ("PUT", "/v1/trigger-rules/{rule_id}"): "trigger_rule.update",
    ("DELETE", "/v1/trigger-rules/{rule_id}"): "trigger_rule.delete",
}


@dataclass
class Call:
    """One request; `reason_in` says where its (required) reason goes, if it needs one."""

    method: str
    url: str
    json: dict[str, Any] | None = None
    params: dict[str, str] = field(default_factory=dict)
    reason_in: str | None = None  # "json" or "params"

    def without_reason(self) -> Call:
        json = {k: v for k, v in self.json.items() if k != "reason"} if self.json is not None else None
        params = {k: v for k, v in self.params.items() if k != "reason"}
        return Call(self.method, self.url, json, params, None)

    def reason(self) -> str | None:
        source = self.json if self.reason_in == "json" else self.params if self.reason_in == "params" else None
        return None if source is None else str(source["reason"])


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def reasoned(reason: str = "checked with the team") -> dict[str, str]:
    return {"reason": reason}


class World:
    """Makes what a route acts on, as SETUP (an admin) or a service."""

    def __init__(self, setup: httpx.AsyncClient, api: httpx.AsyncClient, smtp_server: SmtpServer) -> None:
        self.setup, self.api, self.smtp_server = setup, api, smtp_server
        self.cleanups: list[Callable[[], Awaitable[Any]]] = []

    async def ok(self, response: Awaitable[httpx.Response]) -> Any:
        answered = await response
        assert answered.status_code < 300, answered.text
        return answered.json() if answered.content else None

    async def template(self) -> str:
        key = unique("audit-")
        await self.ok(self.setup.post("/v1/templates", json={"key": key, **TEMPLATE}))
        return key

    async def segment(self) -> int:
        tag, _ = await make_audience(self.api, 1)
        body = {"name": unique("audit segment "), "filter": {"field": "tags", "op": "contains", "value": tag}}
        return int((await self.ok(self.setup.post("/v1/segments", json=body)))["id"])

    async def campaign(self, schedule: dict[str, Any] = FAR_AWAY, launched: bool = False) -> str:
        body = {
            "name": unique("audit campaign "),
            "template": await self.template(),
            "segment_id": await self.segment(),
            "channels": ["email"],
            "variables": {"film": "Heat"},
            "schedule": schedule,
        }
        campaign_id = str((await self.ok(self.setup.post("/v1/campaigns", json=body)))["id"])
        if launched:
            await self.ok(self.setup.post(f"/v1/campaigns/{campaign_id}/launch"))
        self.cleanups.append(lambda: self.setup.post(f"/v1/campaigns/{campaign_id}/cancel", json=reasoned()))
        return campaign_id

    async def provider(self) -> str:
        name = unique("audit-sms-")
        body = {"channel": "sms", "kind": "sandbox", "priority": 900, "enabled": False}
        await self.ok(self.setup.put(f"/v1/providers/{name}", params=reasoned(), json=body))
        self.cleanups.append(lambda: self.setup.delete(f"/v1/providers/{name}", params=reasoned()))
        return name

    async def dead_letter(self) -> int:
        letter = await fail_for_good(
            self.api, self.setup, self.smtp_server, await new_recipient(self.api), POLICY_REFUSAL
        )
        return int(letter["id"])

    async def event_type(self) -> str:
        name = f"audit.t{uuid.uuid4().hex[:8]}"
        await self.ok(self.setup.put(f"/v1/event-types/{name}", json={"schema": SCHEMA}))
        return name

    async def rule_body(self) -> dict[str, Any]:
        key = unique("audit-reset-")
        await self.ok(self.setup.post("/v1/templates", json={"key": key, **RESET_TEMPLATE}))
        return {
            "name": unique("audit-rule-"),
            "event_type": await self.event_type(),
            "template": key,
            "channels": ["email"],
            "category": "security",
        }

    async def rule(self) -> int:
        return int((await self.ok(self.setup.post("/v1/trigger-rules", json=await self.rule_body())))["id"])

    async def pending_notification(self) -> str:
        """A notification whose email the server keeps deferring: pending while it retries."""
        person = await new_recipient(self.api)
        self.smtp_server.handler.refuse[person["email"]] = "421 4.3.2 Service shutting down"
        body = {"user_id": person["user_id"], "type": "account", "channels": ["email"], "title": "T", "body": "B"}
        return str((await self.ok(self.api.post("/v1/notifications", json=body)))["id"])


async def _templates(w: World) -> dict[tuple[str, str], Call]:
    key, archived, rolled = await w.template(), await w.template(), await w.template()
    change = {"content": TEMPLATE["content"], "change_note": "typo"}
    await w.ok(w.setup.put(f"/v1/templates/{rolled}", json=change))
    return {
        ("POST", "/v1/templates"): Call("POST", "/v1/templates", {"key": unique("audit-"), **TEMPLATE}),
        ("PUT", "/v1/templates/{key}"): Call("PUT", f"/v1/templates/{key}", change),
        ("DELETE", "/v1/templates/{key}"): Call(
            "DELETE", f"/v1/templates/{archived}", params=reasoned(), reason_in="params"
        ),
        ("POST", "/v1/templates/{key}/rollback"): Call(
            "POST",
            f"/v1/templates/{rolled}/rollback",
            {"version": 1, **reasoned("undo the typo fix")},
            reason_in="json",
        ),
    }


async def _segments(w: World) -> dict[tuple[str, str], Call]:
    tag, _ = await make_audience(w.api, 2)
    listed = await w.ok(w.setup.post("/v1/segments", json={"name": unique("audit list "), "user_ids": [f"{tag}-0"]}))
    by_tag = {"field": "tags", "op": "contains", "value": tag}
    return {
        ("POST", "/v1/segments"): Call("POST", "/v1/segments", {"name": unique("audit segment "), "filter": by_tag}),
        ("POST", "/v1/segments/{segment_id}/members"): Call(
            "POST", f"/v1/segments/{listed['id']}/members", {"user_ids": [f"{tag}-1"]}
        ),
    }


async def _campaigns(w: World) -> dict[tuple[str, str], Call]:
    to_launch, to_cancel = await w.campaign(), await w.campaign()
    to_pause, to_resume = await w.campaign(launched=True), await w.campaign(launched=True)
    await w.ok(w.setup.post(f"/v1/campaigns/{to_resume}/pause"))
    recurring = await w.campaign({"kind": "cron", "cron": "0 10 1 1 *", "timezone": "UTC"}, launched=True)
    bulk = {
        "name": unique("audit bulk "),
        "template": await w.template(),
        "segment_id": await w.segment(),
        "channels": ["email"],
        "variables": {"film": "Heat"},
        "schedule": FAR_AWAY,
    }
    tag, _ = await make_audience(w.api, 1)
    scheduled = {
        "template": await w.template(),
        "channels": ["email"],
        "variables": {"film": "Heat"},
        "user_ids": [f"{tag}-0"],
        "schedule": FAR_AWAY,
    }
    body = {
        "name": unique("audit campaign "),
        "template": await w.template(),
        "segment_id": await w.segment(),
        "channels": ["email"],
        "variables": {"film": "Heat"},
        "schedule": FAR_AWAY,
    }
    return {
        ("POST", "/v1/campaigns"): Call("POST", "/v1/campaigns", body),
        ("POST", "/v1/campaigns/{campaign_id}/launch"): Call("POST", f"/v1/campaigns/{to_launch}/launch"),
        ("POST", "/v1/campaigns/{campaign_id}/pause"): Call("POST", f"/v1/campaigns/{to_pause}/pause"),
        ("POST", "/v1/campaigns/{campaign_id}/resume"): Call("POST", f"/v1/campaigns/{to_resume}/resume"),
        ("POST", "/v1/campaigns/{campaign_id}/cancel"): Call(
            "POST", f"/v1/campaigns/{to_cancel}/cancel", reasoned("wrong audience"), reason_in="json"
        ),
        ("POST", "/v1/campaigns/{campaign_id}/trigger"): Call("POST", f"/v1/campaigns/{recurring}/trigger"),
        ("POST", "/admin/bulk"): Call("POST", "/admin/bulk", bulk),
        ("POST", "/v1/notifications/scheduled"): Call("POST", "/v1/notifications/scheduled", scheduled),
    }


async def _providers(w: World) -> dict[tuple[str, str], Call]:
    sms = {"channel": "sms", "kind": "sandbox", "priority": 900, "enabled": False}
    new = unique("audit-sms-")
    w.cleanups.append(lambda: w.setup.delete(f"/v1/providers/{new}", params=reasoned()))
    deleted = unique("audit-sms-")
    await w.ok(w.setup.put(f"/v1/providers/{deleted}", params=reasoned(), json=sms))
    calls = {
        ("PUT", "/v1/providers/{name}"): Call("PUT", f"/v1/providers/{new}", sms, reasoned("new route"), "params"),
        ("DELETE", "/v1/providers/{name}"): Call(
            "DELETE", f"/v1/providers/{deleted}", params=reasoned(), reason_in="params"
        ),
        ("POST", "/v1/providers/{name}/test"): Call(
            "POST", f"/v1/providers/{await w.provider()}/test", {"to": "+15550100"}
        ),
    }
    for operation in ("enable", "disable", "breaker/reset"):
        calls[("POST", f"/v1/providers/{{name}}/{operation}")] = Call(
            "POST", f"/v1/providers/{await w.provider()}/{operation}", params=reasoned(), reason_in="params"
        )
    return calls


async def _dead_letters(w: World) -> dict[tuple[str, str], Call]:
    one, many, gone, gone_many = [await w.dead_letter() for _ in range(4)]
    return {
        ("POST", "/v1/dead-letters/replay"): Call(
            "POST", "/v1/dead-letters/replay", {"ids": [many], **reasoned()}, reason_in="json"
        ),
        ("POST", "/v1/dead-letters/discard"): Call(
            "POST", "/v1/dead-letters/discard", {"ids": [gone_many], **reasoned()}, reason_in="json"
        ),
        ("POST", "/v1/dead-letters/{dead_letter_id}/replay"): Call(
            "POST", f"/v1/dead-letters/{one}/replay", reasoned(), reason_in="json"
        ),
        ("POST", "/v1/dead-letters/{dead_letter_id}/discard"): Call(
            "POST", f"/v1/dead-letters/{gone}/discard", reasoned(), reason_in="json"
        ),
    }


async def _suppressions(w: World) -> dict[tuple[str, str], Call]:
    added, lifted = f"{unique('added-')}@example.com", f"{unique('lifted-')}@example.com"
    await w.ok(w.setup.post("/v1/suppressions", json={"channel": "email", "address": lifted, "reason": "bounced"}))
    return {
        ("POST", "/v1/suppressions"): Call(
            "POST",
            "/v1/suppressions",
            {"channel": "email", "address": added, "reason": "asked us to stop"},
            reason_in="json",
        ),
        ("DELETE", "/v1/suppressions/{channel}/{address}"): Call(
            "DELETE", f"/v1/suppressions/email/{lifted}", params=reasoned("mailbox fixed"), reason_in="params"
        ),
    }


async def _events(w: World) -> dict[tuple[str, str], Call]:
    unused, replaced, removed = await w.event_type(), await w.rule(), await w.rule()
    replacement = await w.rule_body()
    return {
        ("PUT", "/v1/event-types/{name}"): Call(
            "PUT", f"/v1/event-types/audit.t{uuid.uuid4().hex[:8]}", {"schema": SCHEMA}
        ),
        ("DELETE", "/v1/event-types/{name}"): Call(
            "DELETE", f"/v1/event-types/{unused}", params=reasoned(), reason_in="params"
        ),
        ("POST", "/v1/trigger-rules"): Call("POST", "/v1/trigger-rules", await w.rule_body()),
        ("PUT", "/v1/trigger-rules/{rule_id}"): Call("PUT", f"/v1/trigger-rules/{replaced}", replacement),
        ("DELETE", "/v1/trigger-rules/{rule_id}"): Call(
            "DELETE", f"/v1/trigger-rules/{removed}", params=reasoned(), reason_in="params"
        ),
    }


async def _people(w: World) -> dict[tuple[str, str], Call]:
    person, erased = await new_recipient(w.api), await new_recipient(w.api)
    return {
        ("POST", "/v1/notifications/{notification_id}/cancel"): Call(
            "POST",
            f"/v1/notifications/{await w.pending_notification()}/cancel",
            reasoned("sent by mistake"),
            reason_in="json",
        ),
        ("DELETE", "/v1/recipients/{user_id}"): Call(
            "DELETE", f"/v1/recipients/{person['user_id']}", params=reasoned("account closed"), reason_in="params"
        ),
        ("POST", "/v1/recipients/{user_id}/erase"): Call(
            "POST", f"/v1/recipients/{erased['user_id']}/erase", reasoned("GDPR request"), reason_in="json"
        ),
    }


GROUPS = (_templates, _segments, _campaigns, _providers, _dead_letters, _suppressions, _events, _people)


def mutating_routes(app: FastAPI) -> set[tuple[str, str]]:
    return {
        (method, str(route.path))
        for route in iter_route_contexts(app.routes)
        if isinstance(route.original_route, APIRoute)
        for method in route.methods or ()
        if method in MUTATING
    }


@pytest.fixture
def app(settings: Settings, engine: AsyncEngine, temporal_client: Client) -> FastAPI:
    """The app as served, only to list its routes."""
    return create_app(settings, engine=engine, temporal=temporal_client)


def test_every_mutating_route_is_audited_or_exempt_with_a_reason(app: FastAPI) -> None:
    routes = mutating_routes(app)
    accounted = {route for route in routes if route[1].startswith(PUBLIC_PREFIXES)} | set(EXEMPT) | set(AUDITED)
    assert sorted(routes - accounted) == [], "a new mutating route: audit it, or list it in EXEMPT with why"
    assert sorted(accounted - routes - {r for r in accounted if r[1].startswith(PUBLIC_PREFIXES)}) == []
    assert not set(EXEMPT) & set(AUDITED)
    assert all(len(why) > 20 for why in EXEMPT.values())


async def client_as(api_url: str, settings: Settings, subject: str) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token_for(settings, Role.admin, subject)}"}
    return httpx.AsyncClient(base_url=api_url, headers=headers, timeout=60)


async def rows_by(engine: AsyncEngine, actor: str) -> list[sa.Row[Any]]:
    async with engine.connect() as conn:
        query = sa.select(audit_log).where(audit_log.c.actor == actor).order_by(audit_log.c.id)
        return list((await conn.execute(query)).all())


@pytest.fixture
async def world(
    api_url: str, settings: Settings, api: httpx.AsyncClient, smtp_server: SmtpServer
) -> AsyncIterator[World]:
    async with await client_as(api_url, settings, SETUP) as setup:
        made = World(setup, api, smtp_server)
        yield made
        for cleanup in made.cleanups:
            await cleanup()


async def test_each_mutating_route_leaves_exactly_one_audit_row(
    world: World, api_url: str, settings: Settings, engine: AsyncEngine
) -> None:
    calls: dict[tuple[str, str], Call] = {}
    for group in GROUPS:
        calls |= await group(world)
    assert sorted(calls) == sorted(AUDITED)
    needs_reason = []
    for route, call in calls.items():
        subject = f"audited-{uuid.uuid4().hex[:10]}"
        async with await client_as(api_url, settings, subject) as person:
            if call.reason_in is not None:
                # The reason is required: without it, a 422 naming it and nothing done.
                bare = call.without_reason()
                refused = await person.request(bare.method, bare.url, json=bare.json, params=bare.params)
                assert refused.status_code == 422, (route, refused.text)
                assert "reason" in [error["field"] for error in refused.json()["errors"]], (route, refused.text)
                assert await rows_by(engine, subject) == [], route
                needs_reason.append(route)
            response = await person.request(call.method, call.url, json=call.json, params=call.params)
            assert response.status_code < 300, (route, response.text)
        rows = await rows_by(engine, subject)
        assert [row.action for row in rows] == [AUDITED[route]], route
        [row] = rows
        assert (row.role, row.client_address) == ("admin", "127.0.0.1"), route
        assert row.reason == call.reason(), route
    # The destructive and risky ones: cancel, rollback, delete, replay, discard, provider changes.
    assert {route for route in needs_reason if route[0] == "DELETE"} == {r for r in AUDITED if r[0] == "DELETE"}
    assert ("POST", "/v1/notifications/{notification_id}/cancel") in needs_reason
    assert ("POST", "/v1/templates/{key}/rollback") in needs_reason
    assert ("PUT", "/v1/providers/{name}") in needs_reason


async def test_rows_carry_the_before_and_after(
    world: World, api_url: str, settings: Settings, engine: AsyncEngine
) -> None:
    subject = f"changer-{uuid.uuid4().hex[:8]}"
    name = await world.provider()
    campaign = await world.campaign(launched=True)
    async with await client_as(api_url, settings, subject) as person:
        body = {"channel": "sms", "kind": "sandbox", "priority": 800, "enabled": False}
        assert (await person.put(f"/v1/providers/{name}", params=reasoned("cheaper"), json=body)).status_code == 200
        assert (await person.post(f"/v1/campaigns/{campaign}/pause", json=reasoned("hold on"))).status_code == 200
    update, pause = await rows_by(engine, subject)
    assert (update.action, update.changes) == ("provider.update", {"priority": {"before": 900, "after": 800}})
    assert update.reason == "cheaper"
    assert (pause.action, pause.changes) == ("campaign.pause", {"status": {"before": "scheduled", "after": "paused"}})
    assert pause.reason == "hold on"


async def test_the_log_is_append_only_even_for_its_owner(engine: AsyncEngine, world: World) -> None:
    await world.template()  # a row to try it on
    async with engine.connect() as conn:
        owner = await conn.scalar(sa.text("SELECT tableowner FROM pg_tables WHERE tablename = 'audit_log'"))
        assert owner == await conn.scalar(sa.text("SELECT current_user"))  # the tests connect as the owner
        last = await conn.scalar(sa.select(sa.func.max(audit_log.c.id)))
    attempts = [
        audit_log.update().where(audit_log.c.id == last).values(actor="someone else"),
        audit_log.delete().where(audit_log.c.id == last),
        sa.text("TRUNCATE audit_log"),
    ]
    for statement in attempts:
        async with engine.connect() as conn:
            with pytest.raises(sa.exc.DBAPIError, match="audit_log is append-only"):
                await conn.execute(statement)
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(audit_log).where(audit_log.c.id == last))).one()
    assert row.actor == SETUP


async def test_search_by_actor_action_object_and_period_in_keyset_pages_and_as_csv(
    world: World, api_url: str, settings: Settings
) -> None:
    subject = f"searcher-{uuid.uuid4().hex[:8]}"
    started = datetime.now(UTC) - timedelta(seconds=1)
    async with await client_as(api_url, settings, subject) as person:
        keys = [unique("audit-") for _ in range(3)]
        for key in keys:
            assert (await person.post("/v1/templates", json={"key": key, **TEMPLATE})).status_code == 201
        archived = await person.delete(f"/v1/templates/{keys[0]}", params=reasoned('=HYPERLINK("x")'))
        assert archived.status_code == 204
    analyst_headers = {"Authorization": f"Bearer {token_for(settings, Role.analyst, 'auditor')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=analyst_headers, timeout=30) as analyst:
        mine = {"actor": subject, "since": started.isoformat()}
        walked, cursor = [], None
        while True:
            page = (
                await analyst.get("/v1/audit", params={**mine, "limit": 2, **({"cursor": cursor} if cursor else {})})
            ).json()
            walked += [(item["action"], item["entity_id"]) for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert walked == [("template.archive", keys[0]), *[("template.create", key) for key in reversed(keys)]]
        created = (await analyst.get("/v1/audit", params={**mine, "action": "template.create"})).json()["items"]
        assert [item["entity_id"] for item in created] == list(reversed(keys))
        one = (await analyst.get("/v1/audit", params={**mine, "entity": "template", "entity_id": keys[1]})).json()
        assert [item["action"] for item in one["items"]] == ["template.create"]
        before = (await analyst.get("/v1/audit", params={"actor": subject, "until": started.isoformat()})).json()
        assert before["items"] == []
        backwards = await analyst.get(
            "/v1/audit", params={"since": started.isoformat(), "until": "2000-01-01T00:00:00Z"}
        )
        assert backwards.status_code == 422
        assert [error["field"] for error in backwards.json()["errors"]] == ["until"]

        exported = await analyst.get("/v1/audit", params={**mine, "format": "csv"})
        assert exported.status_code == 200
        assert exported.headers["content-type"].startswith("text/csv")
        assert "attachment" in exported.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert [(row["action"], row["entity_id"]) for row in rows] == walked
        assert rows[0]["reason"] == '\'=HYPERLINK("x")'  # a formula stays text in a spreadsheet
        assert rows[0]["client_address"] == "127.0.0.1"
        assert rows[0]["actor"] == subject
    manager_headers = {"Authorization": f"Bearer {token_for(settings, Role.campaign_manager, 'cm')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=manager_headers, timeout=30) as manager:
        assert (await manager.get("/v1/audit", params={"format": "csv"})).status_code == 403
