"""The permission table (core.permissions), and that the API's routes and the admin's views
allow exactly the roles it names: the app is built, not served, and each route's guard is
called with a principal of every role."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from sqladmin.authorization import ACTIONS, Action
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.requests import Request

from admin import VIEW_ACTIONS, RolePermissions, mount_admin
from admin.campaign_views import SegmentAdmin
from admin.pages import AdminPage
from api.app import create_app
from api.deps import get_principal, permit
from core.auth import Principal, Role
from core.config import Settings
from core.permissions import PERMISSIONS, allowed, roles

S, M, A = Role.service, Role.campaign_manager, Role.analyst
EVERYONE = {S, M, A}

# Who besides admins may do each action: the rules as the API and the admin applied them.
EXPECTED: dict[str, set[Role]] = {
    "notifications.send": {S},
    "notifications.schedule": {S, M},
    "notifications.read": EVERYONE,
    "recipients.read": EVERYONE,
    "recipients.write": {S},
    "recipients.export": set(),
    "recipients.erase": set(),
    "templates.read": EVERYONE,
    "templates.write": {M},
    "segments.read": EVERYONE,
    "segments.write": {M},
    "campaigns.read": EVERYONE,
    "campaigns.write": {M},
    "providers.read": {M, A},
    "providers.manage": set(),
    "suppressions.read": {M, A},
    "suppressions.write": set(),
    "dead_letters.read": {M, A},
    "dead_letters.resolve": set(),
    "audit.read": {A},
    "analytics.read": {M, A},
    "events.publish": {S},
    "events.read": EVERYONE,
    "event_rules.read": EVERYONE,
    "event_rules.write": {M},
    "admin_users.manage": set(),
    "admin_panel.use": {M, A},
}

# Every API route that needs a principal, and the action it is.
ROUTES = """
POST   /v1/notifications                                      notifications.send
GET    /v1/notifications                                      notifications.read
GET    /v1/notifications/{notification_id}                    notifications.read
POST   /v1/notifications/{notification_id}/cancel             notifications.send
POST   /v1/notifications/scheduled                            notifications.schedule
POST   /v1/recipients                                         recipients.write
POST   /v1/recipients/batch                                   recipients.write
GET    /v1/recipients/{user_id}                               recipients.read
PUT    /v1/recipients/{user_id}                               recipients.write
DELETE /v1/recipients/{user_id}                               recipients.write
GET    /v1/recipients/{user_id}/preferences                   recipients.read
PUT    /v1/recipients/{user_id}/preferences                   recipients.write
DELETE /v1/recipients/{user_id}/preferences/{category}/{channel} recipients.write
GET    /v1/recipients/{user_id}/follows                       recipients.read
PUT    /v1/recipients/{user_id}/follows                       recipients.write
GET    /v1/recipients/{user_id}/export                        recipients.export
POST   /v1/recipients/{user_id}/erase                         recipients.erase
POST   /v1/templates                                          templates.write
GET    /v1/templates                                          templates.read
GET    /v1/templates/{key}                                    templates.read
PUT    /v1/templates/{key}                                    templates.write
DELETE /v1/templates/{key}                                    templates.write
GET    /v1/templates/{key}/versions                           templates.read
GET    /v1/templates/{key}/versions/{version}                 templates.read
POST   /v1/templates/{key}/rollback                           templates.write
GET    /v1/templates/{key}/diff                               templates.read
POST   /v1/templates/{key}/preview                            templates.read
POST   /v1/segments                                           segments.write
GET    /v1/segments                                           segments.read
GET    /v1/segments/{segment_id}                              segments.read
POST   /v1/segments/{segment_id}/members                      segments.write
GET    /v1/segments/{segment_id}/count                        segments.read
POST   /v1/segments/count                                     segments.read
POST   /v1/campaigns                                          campaigns.write
GET    /v1/campaigns                                          campaigns.read
GET    /v1/campaigns/{campaign_id}                            campaigns.read
POST   /v1/campaigns/{campaign_id}/launch                     campaigns.write
POST   /v1/campaigns/{campaign_id}/pause                      campaigns.write
POST   /v1/campaigns/{campaign_id}/resume                     campaigns.write
POST   /v1/campaigns/{campaign_id}/cancel                     campaigns.write
POST   /v1/campaigns/{campaign_id}/trigger                    campaigns.write
POST   /admin/bulk                                            campaigns.write
GET    /v1/providers                                          providers.read
GET    /v1/providers/{name}                                   providers.manage
PUT    /v1/providers/{name}                                   providers.manage
DELETE /v1/providers/{name}                                   providers.manage
POST   /v1/providers/{name}/enable                            providers.manage
POST   /v1/providers/{name}/disable                           providers.manage
POST   /v1/providers/{name}/breaker/reset                     providers.manage
POST   /v1/providers/{name}/test                              providers.manage
GET    /v1/dead-letters                                       dead_letters.read
GET    /v1/dead-letters/{dead_letter_id}                      dead_letters.read
POST   /v1/dead-letters/replay                                dead_letters.resolve
POST   /v1/dead-letters/discard                               dead_letters.resolve
POST   /v1/dead-letters/{dead_letter_id}/replay               dead_letters.resolve
POST   /v1/dead-letters/{dead_letter_id}/discard              dead_letters.resolve
GET    /v1/audit                                              audit.read
GET    /v1/suppressions                                       suppressions.read
POST   /v1/suppressions                                       suppressions.write
DELETE /v1/suppressions/{channel}/{address}                   suppressions.write
GET    /v1/analytics/counts                                   analytics.read
GET    /v1/analytics/rates                                    analytics.read
GET    /v1/analytics/latency                                  analytics.read
GET    /v1/analytics/geography                                analytics.read
GET    /v1/analytics/spend                                    analytics.read
GET    /v1/analytics/campaigns/{campaign_id}                  analytics.read
POST   /v1/events                                             events.publish
GET    /v1/events/{event_id}                                  events.read
PUT    /v1/event-types/{name}                                 event_rules.write
GET    /v1/event-types                                        event_rules.read
GET    /v1/event-types/{name}                                 event_rules.read
DELETE /v1/event-types/{name}                                 event_rules.write
POST   /v1/trigger-rules                                      event_rules.write
GET    /v1/trigger-rules                                      event_rules.read
GET    /v1/trigger-rules/{rule_id}                            event_rules.read
PUT    /v1/trigger-rules/{rule_id}                            event_rules.write
DELETE /v1/trigger-rules/{rule_id}                            event_rules.write
"""
ROUTE_ACTIONS = {
    (method, path): action for method, path, action in (line.split() for line in ROUTES.strip().splitlines())
}
# Open to anyone: probes, metrics, tracking links, signed provider webhooks, the dev outbox.
PUBLIC_PREFIXES = (
    "/healthz",
    "/readyz",
    "/metrics",
    "/t/",
    "/u/",
    "/v1/webhooks/",
    "/dev",
    "/openapi",
    "/docs",
    "/redoc",
)


def test_the_table_is_as_the_routes_and_pages_had_it() -> None:
    assert {action: set(PERMISSIONS[action]) for action in PERMISSIONS} == {
        action: others | {Role.admin} for action, others in EXPECTED.items()
    }
    for action, others in EXPECTED.items():
        for role in Role:
            assert allowed(role, action) is (role is Role.admin or role in others), (role, action)


def test_an_admin_may_do_everything() -> None:
    assert all(allowed(Role.admin, action) and allowed("admin", action) for action in PERMISSIONS)


def test_an_unknown_action_is_a_mistake_and_an_unknown_role_may_nothing() -> None:
    with pytest.raises(KeyError, match=r"notifications\.sned"):
        allowed(Role.admin, "notifications.sned")
    with pytest.raises(KeyError):
        permit("templates.delete")
    assert not any(allowed(role, action) for role in ("", "root", "None") for action in PERMISSIONS)
    assert roles("audit.read") == {Role.admin, Role.analyst}


def _roles_let_through(guard: Callable[[Principal], Coroutine[Any, Any, Principal]]) -> set[Role]:
    let_through, refusals = set(), []
    for role in Role:
        try:
            asyncio.run(guard(Principal("someone", role)))
        except HTTPException as err:
            refusals.append(err.status_code)
        else:
            let_through.add(role)
    assert set(refusals) <= {403}
    return let_through


def test_permit_refuses_with_403() -> None:
    assert _roles_let_through(permit("templates.write")) == {Role.admin, M}
    with pytest.raises(HTTPException, match="'analyst' may not do this"):
        asyncio.run(permit("notifications.send")(Principal("a", A)))


@pytest.fixture(scope="module")
def settings() -> Settings:
    # Nothing listens there: the app is only built, never started.
    return Settings(_env_file=None, database_url="postgresql://nobody@127.0.0.1:9/none", jwt_secret="s" * 40)


@pytest.fixture(scope="module")
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


def _guards(dependant: Dependant) -> Iterator[Callable[[Principal], Coroutine[Any, Any, Principal]]]:
    """The dependencies that take the signed-in principal (nested ones included)."""
    for sub in dependant.dependencies:
        if any(inner.call is get_principal for inner in sub.dependencies):
            yield cast(Callable[[Principal], Coroutine[Any, Any, Principal]], sub.call)
        yield from _guards(sub)


def _routes(app: FastAPI) -> Iterator[tuple[str, str, list[Callable[[Principal], Coroutine[Any, Any, Principal]]]]]:
    """Each API route's method and path, with its guards (included routers' routes too)."""
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, APIRoute):
            for method in route.methods or ():
                yield method, str(route.path), list(_guards(route.dependant))


def test_every_guarded_route_allows_the_roles_of_its_action(app: FastAPI) -> None:
    guarded = {(method, path): guards for method, path, guards in _routes(app) if guards}
    assert sorted(guarded) == sorted(ROUTE_ACTIONS)
    for route, guards in guarded.items():
        for guard in guards:
            assert _roles_let_through(guard) == roles(ROUTE_ACTIONS[route]), route


def test_the_routes_without_a_guard_are_the_public_ones(app: FastAPI) -> None:
    open_routes = [(method, path) for method, path, guards in _routes(app) if not guards]
    assert open_routes
    assert [route for route in open_routes if not route[1].startswith(PUBLIC_PREFIXES)] == []


# The admin as it was: every role but service reads every view but the admin users (and the
# audit log, for analysts only); campaign managers also change templates and campaigns. And
# segments now, as in the API: the segment list has no change to offer (its flags are off).
# Event types and trigger rules too; the events themselves nobody changes by hand.
READERS = {identity: {M, A} for identity in VIEW_ACTIONS} | {"admin-user": set(), "audit-log": {A}}
CHANGERS = {identity: set[Role]() for identity in VIEW_ACTIONS} | {
    "templates": {M},
    "campaign": {M},
    "segment": {M},
    "event-types": {M},
    "trigger-rules": {M},
}
READING = {Action.LIST, Action.DETAILS, Action.EXPORT}


def _asks(role: Role | None, identity: str, action: str) -> bool:
    request = cast(Request, SimpleNamespace(session={} if role is None else {"role": role.value}))
    return RolePermissions().has_permission(request, identity, action)


@pytest.mark.parametrize("identity", sorted(VIEW_ACTIONS))
def test_each_admin_view_allows_what_it_did(identity: str) -> None:
    for action in [*ACTIONS, "action:anything"]:
        expected = READERS[identity] if action in READING else CHANGERS[identity]
        assert {role for role in Role if _asks(role, identity, action)} == expected | {Role.admin}, action
        assert not _asks(None, identity, action)


def test_an_admin_view_nobody_mapped_is_for_admins() -> None:
    assert [role for role in Role if _asks(role, "something-new", Action.LIST)] == [Role.admin]


def test_every_view_of_the_admin_has_its_actions(settings: Settings) -> None:
    host = FastAPI()
    host.state.jwt_secret = "s" * 40
    engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:9/none")
    views: list[Any] = mount_admin(host, engine, settings).views
    identities = {view.permission if isinstance(view, AdminPage) else view.identity for view in views}
    assert identities == set(VIEW_ACTIONS)


def test_the_segment_list_offers_no_change() -> None:
    assert [SegmentAdmin.can_create, SegmentAdmin.can_edit, SegmentAdmin.can_delete] == [False, False, False]
