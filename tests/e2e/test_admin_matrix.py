"""The permission matrix in the admin panel, over HTTP: every page and form route of the
mounted admin, called by a signed-in user of each role, is refused (403) exactly when the
permission table (core.permissions, through admin.VIEW_ACTIONS) refuses that role, and never
a 5xx otherwise. Routes come from the app itself, so a new page is covered without an entry.

Requests carry placeholders (ids that name nothing, empty forms with a valid CSRF token):
an allowed role gets a page, a form error or a 404; nothing is changed."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.routing import Mount, Route

from admin import VIEW_ACTIONS
from admin.pages import AdminPage
from api.app import create_app
from core.auth import Role
from core.config import Settings
from core.permissions import allowed
from services import admin_users
from tests.admin_session import sign_in

PANEL_ROLES = (Role.admin, Role.campaign_manager, Role.analyst)
PLACEHOLDER = {"int": "987654321", "uuid": "00000000-0000-4000-8000-000000000000"}
CHANGE_PAGES = {"new", "change", "delete", "discard", "rollback", "cancel", "test", "act", "erase", "export"}
_PARAM = re.compile(r"\{([a-z_]+)(?::([a-z]+))?\}")


def _filled(path: str) -> str:
    return _PARAM.sub(lambda match: PLACEHOLDER.get(match.group(2) or "", "matrix-probe"), path)


def _admin_routes(settings: Settings) -> Iterator[tuple[str, str, str, bool]]:
    """(method, path, view permission, whether the route changes something) of every page route."""
    app = create_app(settings)
    [mount] = [route for route in app.routes if isinstance(route, Mount) and route.path == "/admin"]
    for route in mount.routes:
        view = getattr(getattr(route, "endpoint", None), "__self__", None)
        if not isinstance(route, Route) or not isinstance(view, AdminPage):
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            segments = set(route.path.split("/"))
            # A form that changes something is refused as a page too; a preview only reads.
            changes = bool(segments & CHANGE_PAGES) or (method != "GET" and "preview" not in segments)
            yield method, route.path, view.permission, changes


def _may(role: Role, permission: str, changes: bool) -> bool:
    actions = VIEW_ACTIONS[permission]
    action = actions.change if changes else actions.read
    return action is not None and allowed(role, action) and allowed(role, "admin_panel.use")


@pytest.fixture(scope="module")
async def sessions(api_url: str, engine: AsyncEngine) -> Any:
    clients: dict[Role, tuple[httpx.AsyncClient, str]] = {}
    for role in PANEL_ROLES:
        email, password = f"matrix-{role.value}-{uuid.uuid4().hex[:6]}@example.com", "matrix-password-1"
        async with engine.begin() as conn:
            await admin_users.create(conn, email, password, role)
        client = httpx.AsyncClient(base_url=api_url, timeout=30)
        login, token = await sign_in(client, email, password)
        assert login.status_code == 302, login.text
        clients[role] = (client, token)
    yield clients
    for client, _ in clients.values():
        await client.aclose()


async def test_every_admin_route_answers_each_role_as_the_table_says(
    settings: Settings, sessions: dict[Role, tuple[httpx.AsyncClient, str]]
) -> None:
    routes = list(_admin_routes(settings))
    assert {permission for _, _, permission, _ in routes} <= set(VIEW_ACTIONS)
    wrong: list[str] = []
    for method, path, permission, changes in routes:
        for role, (client, token) in sessions.items():
            form = {"csrf_token": token} if method != "GET" else None
            response = await client.request(method, f"/admin{_filled(path)}", data=form, follow_redirects=False)
            refused = response.status_code == 403
            if refused == _may(role, permission, changes) or response.status_code >= 500:
                wrong.append(f"{method} {path} as {role.value}: {response.status_code}")
    assert wrong == [], "\n".join(wrong)


async def test_every_model_list_answers_each_role_as_the_table_says(
    sessions: dict[Role, tuple[httpx.AsyncClient, str]],
) -> None:
    pages = [identity for identity in VIEW_ACTIONS if identity in ("suppression", "segment", "campaign", "event")]
    assert pages
    for identity in pages:
        for role, (client, _) in sessions.items():
            response = await client.get(f"/admin/{identity}/list", follow_redirects=False)
            expected = 200 if _may(role, identity, changes=False) else 403
            assert response.status_code == expected, (identity, role, response.status_code)
