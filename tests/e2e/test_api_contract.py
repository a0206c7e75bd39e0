"""The API contract as an outside client probes it: Schemathesis generates requests from the
served OpenAPI for every operation and every role's token, and each answer must be no server
error and exactly what the OpenAPI says (a documented status, content type, headers and a body
that fits its schema; problem answers included). A short run here; `make fuzz` runs longer,
with every check, against a dev stack of its own (docs/api.md, "API contract").

The server runs on this test's event loop, and Schemathesis' calls block: they run in a thread.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from core.auth import Role
from core.config import Settings
from tests.stack import settle_providers, token_for

EXAMPLES_PER_OPERATION = 3
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _probe(api_url: str, token: str) -> tuple[int, list[str]]:
    """(requests made, one line per operation that failed a check)."""
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    calls = 0
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an invalid schema raises here, failing the test

        @hypothesis.settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,  # the same requests every run: a failure here reproduces
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.given(operation.as_strategy())
        def call(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(base_url=api_url, session=session, checks=CHECKS)

        try:
            call()
        except Exception as err:  # every failure is collected, then reported at once
            failures.append(f"{operation.label}: {err}")
    return calls, failures


async def _providers(client: httpx.AsyncClient) -> set[str]:
    response = await client.get("/v1/providers")
    assert response.status_code == 200, response.text
    return {provider["name"] for provider in response.json()}


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
async def test_every_operation_answers_as_the_openapi_says(api_url: str, settings: Settings, role: Role) -> None:
    admin = {"Authorization": f"Bearer {token_for(settings, Role.admin, 'contract-cleanup')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=admin, timeout=30) as client:
        before = await _providers(client)
        try:
            calls, failures = await asyncio.to_thread(
                _probe, api_url, token_for(settings, role, f"contract-{role.value}")
            )
        finally:
            # A generated provider would change how other tests' sends are routed.
            for name in await _providers(client) - before:
                await client.delete(f"/v1/providers/{name}", params={"reason": "contract test cleanup"})
            await settle_providers()
    assert calls > 0
    assert failures == [], "\n\n".join(failures)


def _operations(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{method.upper()} {path}", op) for path, ops in spec["paths"].items() for method, op in ops.items()]


async def test_every_guarded_operation_documents_its_problem_answers(api_url: str) -> None:
    async with httpx.AsyncClient(base_url=api_url) as client:
        spec = (await client.get("/openapi.json")).json()
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for label, operation in _operations(spec):
        responses = operation["responses"]
        if operation.get("security"):
            for status in ("401", "403", "503"):
                assert responses.get(status, {}).get("content") == problem, (label, status)
        if "422" in responses:
            assert responses["422"]["content"] == problem, label
    assert "HTTPValidationError" not in spec["components"]["schemas"]


async def test_date_times_are_iso_text_in_bounded_years(api_url: str, settings: Settings) -> None:
    """A number is not a date-time (pydantic alone would read it as Unix time), and a year the
    period arithmetic or ClickHouse would overflow on is a 422 naming the parameter, not a 500."""
    admin = {"Authorization": f"Bearer {token_for(settings, Role.admin, 'contract-dates')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=admin, timeout=30) as client:
        refused = [
            ("/v1/analytics/counts", {"end": "0165-08-11T00:00:00Z", "granularity": "hour"}, "end"),
            ("/v1/analytics/counts", {"start": "2101-01-01T00:00:00Z"}, "start"),
            ("/v1/analytics/counts", {"start": "0"}, "start"),
            ("/v1/audit", {"since": "1700000000"}, "since"),
            ("/v1/dead-letters", {"created_after": "0001-01-01T00:00:00+05:00"}, "created_after"),
        ]
        for path, params, field in refused:
            response = await client.get(path, params=params)
            assert response.status_code == 422, (path, params, response.text)
            assert [error["field"] for error in response.json()["errors"]] == [field], response.text
        recipient = {"user_id": "contract-dates", "last_active_at": 0}
        response = await client.post("/v1/recipients", json=recipient)
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["field"] == "last_active_at"
        response = await client.get("/v1/analytics/counts", params={"start": "2026-12-01T00:00:00+01:00",
                                                                    "end": "2026-12-02T00:00:00Z"})  # fmt: skip
        assert response.status_code == 200, response.text


async def test_a_method_a_path_does_not_take_is_a_405_allowing_all_it_takes(api_url: str) -> None:
    """A path's methods are often split across routes (GET and PUT /v1/templates/{key} in two
    handlers): `Allow` names all of them, as the OpenAPI does, not only the first route's."""
    async with httpx.AsyncClient(base_url=api_url) as client:
        spec = (await client.get("/openapi.json")).json()
        for path, operations in spec["paths"].items():
            if path.startswith("/admin/"):
                continue  # the admin panel's mount answers other methods there (schemathesis.toml)
            url = re.sub(r"\{[^}]+\}", "1", path)
            response = await client.request("TRACE", url)
            assert response.status_code == 405, (path, response.text)
            allowed = {method.strip() for method in response.headers["allow"].split(",")}
            assert allowed == {method.upper() for method in operations}, path
            if "{" not in path and "get" not in operations:
                # e.g. GET /v1/segments/count, which GET /v1/segments/{segment_id} would catch
                response = await client.get(url)
                assert response.status_code == 405, (path, response.text)


async def test_a_query_parameter_taking_one_value_given_twice_is_a_422(api_url: str, settings: Settings) -> None:
    admin = {"Authorization": f"Bearer {token_for(settings, Role.admin, 'contract-repeated')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=admin, timeout=30) as client:
        response = await client.get("/v1/analytics/rates", params=[("provider", "a"), ("provider", "b")])
        assert response.status_code == 422, response.text
        assert [error["field"] for error in response.json()["errors"]] == ["provider"]
        response = await client.get("/v1/analytics/rates", params=[("by", "channel"), ("by", "provider")])
        assert response.status_code == 200, response.text


async def test_a_channel_given_twice_is_counted_once(api_url: str, settings: Settings) -> None:
    admin = {"Authorization": f"Bearer {token_for(settings, Role.admin, 'contract-channels')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=admin, timeout=30) as client:
        created = await client.post("/v1/segments", json={"name": "contract channels twice", "user_ids": ["nobody"]})
        assert created.status_code == 201, created.text
        url = f"/v1/segments/{created.json()['id']}/count"
        twice = await client.get(url, params=[("channels", "sms"), ("channels", "sms"), ("channels", "email")])
        once = await client.get(url, params=[("channels", "sms"), ("channels", "email")])
        assert twice.status_code == 200, twice.text
        assert twice.json() == once.json()


async def test_a_boolean_is_true_or_false_not_a_number(api_url: str, settings: Settings) -> None:
    admin = {"Authorization": f"Bearer {token_for(settings, Role.admin, 'contract-bool')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=admin, timeout=30) as client:
        created = await client.post("/v1/recipients", json={"user_id": "contract-bool"})
        assert created.status_code in (200, 201), created.text
        url = "/v1/recipients/contract-bool/preferences"
        response = await client.put(url, json={"preferences": [{"category": "*", "channel": "*", "enabled": 0}]})
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["field"] == "preferences.0.enabled"
        response = await client.put(url, json={"preferences": [{"category": "*", "channel": "*", "enabled": False}]})
        assert response.status_code == 200, response.text
