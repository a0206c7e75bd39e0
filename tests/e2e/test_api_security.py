"""API security over real HTTP: two `marquee api` processes holding one rate limit in Redis
(127.0.0.1:6379), with RS256 tokens from a JWKS endpoint of the test's own; the body limit
on the session's API (uvicorn), with and without Content-Length."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from temporalio.client import Client

from core.auth import Role
from core.config import Settings
from entrypoints.embedded import free_port
from tests.e2e.processes import marquee_env, marquee_processes
from tests.stack import token_for
from tests.unit.test_api_security import JwksServer, _jwk

REDIS_URL = "redis://127.0.0.1:6379/0"
ISSUER = "https://auth.cinema.test"


def _problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()


async def test_two_api_processes_share_one_limit_in_redis(
    settings: Settings, temporal_client: Client, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = JwksServer()
    jwks.keys = [_jwk(key, "cinema-1")]
    env = marquee_env(settings, temporal_client, tmp_path, MARQUEE_JWT_JWKS_URL=jwks.url, MARQUEE_JWT_ISSUER=ISSUER,
                      MARQUEE_JWT_AUDIENCE="marquee", MARQUEE_RATE_LIMIT_STORAGE=REDIS_URL,
                      MARQUEE_RATE_LIMIT_READING="6/hour")  # fmt: skip
    second = dict(env)
    (tmp_path / "second").mkdir()
    second.update(MARQUEE_API_PORT=str(free_port()), MARQUEE_DATA_DIR=str(tmp_path / "second"))
    now = int(time.time())
    # A subject of this run only: the Redis count outlives the test.
    claims = {"sub": f"limit-{uuid.uuid4().hex[:8]}", "role": "analyst", "iss": ISSUER, "aud": "marquee",
              "iat": now, "exp": now + 600}  # fmt: skip
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "cinema-1"})
    try:
        async with (
            marquee_processes(env, tmp_path, "api") as (one,),
            marquee_processes(second, tmp_path / "second", "api") as (two,),
        ):
            await one.wait_for_api()
            await two.wait_for_api()
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(headers=headers, timeout=10, trust_env=False) as http:
                first_hit = time.time()  # the hour opens at the first request it counts
                codes = [(await http.get(f"{url}/v1/templates")).status_code for url in [one.url, two.url] * 3]
                assert codes == [200] * 6, (codes, one.diagnostics(), two.diagnostics())
                for url in (one.url, two.url):
                    refused = _problem(await http.get(f"{url}/v1/templates"), 429)
                    assert "reading" in refused["detail"]
                last = await http.get(f"{two.url}/v1/templates")
                # What is left of the hour that opened at the first request, whichever process answers.
                assert 3600 - (time.time() - first_hit) - 1 <= int(last.headers["retry-after"]) <= 3600
                # Another class is counted apart, and health is never limited.
                assert (await http.get(f"{one.url}/healthz")).status_code == 200
                assert (await http.post(f"{one.url}/v1/templates/nothing-here/preview", json={})).status_code != 429
    finally:
        jwks.close()


@pytest.fixture
async def admin_api(api_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token_for(settings, Role.admin)}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=60) as client:
        yield client


async def test_bodies_over_the_limit_are_refused_while_read(admin_api: httpx.AsyncClient, settings: Settings) -> None:
    too_big = b'{"user_id": "' + b"x" * (settings.max_body_bytes + 10) + b'"}'
    json_type = {"Content-Type": "application/json"}
    declared = await admin_api.post("/v1/notifications", content=too_big, headers=json_type)
    assert "larger than 1,048,576 bytes" in _problem(declared, 413)["detail"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        for start in range(0, len(too_big), 64 * 1024):
            yield too_big[start : start + 64 * 1024]

    streamed = await admin_api.post("/v1/notifications", content=chunks(), headers=json_type)
    assert _problem(streamed, 413)["title"] == "Content too large"
    # Just under the limit it is read and judged on its content.
    fits = b'{"user_id": "' + b"x" * (settings.max_body_bytes - 100) + b'"}'
    assert (await admin_api.post("/v1/notifications", content=fits, headers=json_type)).status_code == 422


async def test_member_uploads_have_their_larger_limit(admin_api: httpx.AsyncClient, settings: Settings) -> None:
    created = await admin_api.post("/v1/segments", json={"name": f"upload-{uuid.uuid4().hex[:8]}", "user_ids": ["a"]})
    assert created.status_code == 201, created.text
    members = f"/v1/segments/{created.json()['id']}/members"
    # 25,000 ids of 71 characters: ~1.8 MB (more ids in one upload than PostgreSQL's 32,767 bind
    # parameters fail in services.segments today: a separate bug).
    csv = "user_id\n" + "".join(f"upload-{uuid.uuid4().hex}-{uuid.uuid4().hex}\n" for _ in range(25_000))
    assert len(csv) > settings.max_body_bytes
    response = await admin_api.post(members, content=csv.encode(), headers={"Content-Type": "text/csv"})
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["unknown_user_ids"]) == 25_000
    huge = b"user_id\n" + b"y" * settings.max_upload_bytes
    _problem(await admin_api.post(members, content=huge, headers={"Content-Type": "text/csv"}), 413)
