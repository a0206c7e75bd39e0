"""The permission matrix as an outside client meets it: every operation of the served OpenAPI,
called over HTTP by a token of every role, answers 403 exactly for the roles the permission
table (core.permissions) refuses, and never 401 or 5xx for the others. An operation the route
table (tests/unit/test_permissions.py) does not know fails here: a new route needs an entry.

The requests carry placeholders (ids that do not exist, empty bodies, no reason), so an allowed
role gets a 2xx, 404 or 422 and nothing is changed; a refused role is stopped before any of it.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from core.auth import Role
from core.config import Settings
from core.permissions import roles
from tests.stack import token_for
from tests.unit.test_permissions import PUBLIC_PREFIXES, ROUTE_ACTIONS

PLACEHOLDERS = {"integer": "987654321", "string": "matrix-probe"}
UUID_PLACEHOLDER = "00000000-0000-4000-8000-000000000000"


def _path(path: str, operation: dict[str, Any]) -> str:
    """The path with each parameter set to a value of its type that names nothing."""
    for parameter in operation.get("parameters", []):
        if parameter["in"] != "path":
            continue
        schema = parameter.get("schema", {})
        value = UUID_PLACEHOLDER if schema.get("format") == "uuid" else PLACEHOLDERS.get(schema.get("type"), "x")
        if schema.get("pattern") and not re.match(schema["pattern"], value):
            value = "matrix.probe"  # e.g. an event type name
        path = path.replace("{" + parameter["name"] + "}", value)
    return path


@pytest.fixture(scope="module")
async def spec(api_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=api_url) as client:
        return dict((await client.get("/openapi.json")).json())


async def test_every_operation_answers_every_role_as_the_table_says(
    api_url: str, settings: Settings, spec: dict[str, Any]
) -> None:
    tokens = {role: token_for(settings, role, f"matrix-{role.value}") for role in Role}
    unknown: list[tuple[str, str]] = []
    wrong: list[str] = []
    probed: set[tuple[str, str]] = set()
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as client:
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                route = (method.upper(), path)
                if path.startswith(PUBLIC_PREFIXES):
                    continue
                if route not in ROUTE_ACTIONS:
                    unknown.append(route)
                    continue
                allowed = roles(ROUTE_ACTIONS[route])
                body: dict[str, Any] | None = {} if "requestBody" in operation else None
                for role, token in tokens.items():
                    response = await client.request(
                        route[0], _path(path, operation), json=body, headers={"Authorization": f"Bearer {token}"}
                    )
                    probed.add(route)
                    refused = response.status_code == 403
                    if (
                        refused == (role in allowed)
                        or response.status_code in (401, 429)
                        or response.status_code >= 500
                    ):
                        wrong.append(f"{route} as {role.value}: {response.status_code} {response.text[:200]}")
    assert unknown == [], "operations with no entry in the permission table"
    assert wrong == []
    assert set(ROUTE_ACTIONS) - probed == set(), "guarded routes the OpenAPI does not show"


async def test_without_a_token_every_guarded_operation_is_401(api_url: str, spec: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as client:
        for path, operations in spec["paths"].items():
            if path.startswith(PUBLIC_PREFIXES):
                continue
            for method, operation in operations.items():
                response = await client.request(
                    method.upper(), _path(path, operation), json={} if "requestBody" in operation else None
                )
                assert response.status_code == 401, (method, path, response.status_code)
                assert response.headers["content-type"].startswith("application/problem+json")
