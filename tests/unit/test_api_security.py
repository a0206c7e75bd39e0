"""Bearer tokens and rate limits through the app as built by create_app, in process, with no
database: a probe route echoes the principal the app's own dependency resolved. The JWKS URL
is a small HTTP server of the test's own serving keys generated here; it rotates them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import Depends, FastAPI
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from api.app import create_app
from api.deps import get_principal
from api.ratelimit import route_class
from core.auth import Principal, Role, create_token
from core.config import Settings

ISSUER = "https://auth.cinema.test"
AUDIENCE = "marquee-api"
ROLE_CLAIM = "https://cinema.test/roles"
SECRET = "unit-test-shared-secret-0123456789abcdef"
PROBE = "/v1/probe/whoami"


class JwksServer:
    """GET / answers the current key set; `fetches` counts the requests."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.down = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.fetches += 1
                if server.down:
                    self.send_response(500)
                    self.end_headers()
                    return
                body = json.dumps({"keys": server.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/.well-known/jwks.json"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(private, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
        return jwk | {"kid": kid, "alg": "RS256", "use": "sig"}
    return ECAlgorithm.to_jwk(private.public_key(), as_dict=True) | {"kid": kid, "alg": "ES256", "use": "sig"}


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "svc-billing", ROLE_CLAIM: ["viewer", "service"], "iss": ISSUER, "aud": AUDIENCE,
              "iat": now, "nbf": now, "exp": now + 300}  # fmt: skip
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _handmade(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token PyJWT would refuse to sign: alg none, or HS256 keyed with a public key."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = b"" if hmac_key is None else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"rsa-1": _rsa(), "rsa-2": _rsa(), "ec-1": ec.generate_private_key(ec.SECP256R1()), "stranger": _rsa()}


@pytest.fixture
def jwks(keys: dict[str, Any]) -> Iterator[JwksServer]:
    server = JwksServer()
    server.keys = [_jwk(keys["rsa-1"], "rsa-1"), _jwk(keys["ec-1"], "ec-1")]
    yield server
    server.close()


def _settings(**values: Any) -> Settings:
    base: dict[str, Any] = {"database_url": "postgresql://nobody@127.0.0.1:9/none", "jwt_secret": SECRET}
    return Settings(_env_file=None, **(base | values))


def _app(settings: Settings) -> FastAPI:
    app = create_app(settings)

    async def whoami(principal: Annotated[Principal, Depends(get_principal)]) -> dict[str, str]:
        return {"subject": principal.subject, "role": principal.role.value}

    app.add_api_route(PROBE, whoami, methods=["GET", "POST"])
    return app


@pytest.fixture
async def client(jwks: JwksServer) -> AsyncIterator[httpx.AsyncClient]:
    """Shared secret and JWKS both allowed, audience required, roles in a namespaced claim."""
    settings = _settings(jwt_jwks_url=jwks.url, jwt_algorithms="HS256,RS256,ES256", jwt_issuer=ISSUER,
                         jwt_audience=AUDIENCE, jwt_role_claim=ROLE_CLAIM, jwt_jwks_min_refresh_seconds=0)  # fmt: skip
    transport = httpx.ASGITransport(app=_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://marquee.test") as http:
        yield http


async def _whoami(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.get(PROBE, headers={"Authorization": f"Bearer {token}"})


def _refused(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"
    detail = response.json()["detail"]
    for word in words:
        assert word.lower() in detail.lower(), detail


def _sign(keys: dict[str, Any], kid: str, claims: dict[str, Any], key: str | None = None) -> str:
    algorithm = "ES256" if kid.startswith("ec") else "RS256"
    return jwt.encode(claims, keys[key or kid], algorithm=algorithm, headers={"kid": kid})


async def test_rs256_es256_and_hs256_tokens_carry_their_role(
    client: httpx.AsyncClient, keys: dict[str, Any], jwks: JwksServer
) -> None:
    answer = await _whoami(client, _sign(keys, "rsa-1", _claims()))
    assert answer.json() == {"subject": "svc-billing", "role": "service"}
    answer = await _whoami(client, _sign(keys, "ec-1", _claims(sub="ops", **{ROLE_CLAIM: "admin"})))
    assert answer.json() == {"subject": "ops", "role": "admin"}
    shared = create_token(SECRET, "cli", Role.analyst, 60, ISSUER, audience=AUDIENCE, role_claim=ROLE_CLAIM)
    assert (await _whoami(client, shared)).json() == {"subject": "cli", "role": "analyst"}
    assert jwks.fetches == 1  # the set is cached


async def test_bad_claims_are_refused(client: httpx.AsyncClient, keys: dict[str, Any]) -> None:
    now = int(time.time())
    _refused(await _whoami(client, _sign(keys, "rsa-1", _claims(exp=now - 5))), "expired")
    _refused(await _whoami(client, _sign(keys, "rsa-1", _claims(nbf=now + 600))), "not yet valid")
    _refused(await _whoami(client, _sign(keys, "rsa-1", _claims(iss="https://evil.test"))), "issuer")
    _refused(await _whoami(client, _sign(keys, "rsa-1", _claims(aud="another-api"))), "audience")
    _refused(await _whoami(client, _sign(keys, "rsa-1", _claims(aud=None))), "aud")
    _refused(await _whoami(client, _sign(keys, "rsa-1", _claims(exp=None))), "exp")
    _refused(await _whoami(client, _sign(keys, "rsa-1", _claims(**{ROLE_CLAIM: ["viewer"]}))), ROLE_CLAIM)
    _refused(await _whoami(client, _sign(keys, "rsa-1", _claims(**{ROLE_CLAIM: ["admin", "analyst"]}))), "exactly one")
    _refused(await _whoami(client, "not.a.jwt"))


async def test_forged_signatures_and_algorithms_are_refused(client: httpx.AsyncClient, keys: dict[str, Any]) -> None:
    # Signed by a key nobody published, under a published kid.
    _refused(await _whoami(client, _sign(keys, "rsa-1", _claims(), key="stranger")), "Signature")
    # alg none, with and without a kid.
    _refused(await _whoami(client, _handmade({"alg": "none", "typ": "JWT"}, _claims(), None)), "'none' is not allowed")
    _refused(await _whoami(client, _handmade({"alg": "none", "kid": "rsa-1"}, _claims(), None)), "not allowed")
    # Algorithm confusion: HS256 keyed with the RSA public key (PEM, and the JWK's DER) is
    # checked against the shared secret only, so it never verifies.
    public = keys["rsa-1"].public_key()
    for encoding, form in [(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
                           (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)]:  # fmt: skip
        confused = _handmade(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, _claims(), public.public_bytes(encoding, form)
        )
        _refused(await _whoami(client, confused), "Signature")
    # An ES256 header on the RSA key's kid: the key's own algorithm decides.
    es_on_rsa = jwt.encode(_claims(), keys["ec-1"], algorithm="ES256", headers={"kid": "rsa-1"})
    _refused(await _whoami(client, es_on_rsa), "does not match")
    # RS512 is not in the allowed list.
    rs512 = jwt.encode(_claims(), keys["rsa-1"], algorithm="RS512", headers={"kid": "rsa-1"})
    _refused(await _whoami(client, rs512), "'RS512' is not allowed")


async def test_jwks_only_refuses_every_hs256_token(jwks: JwksServer, keys: dict[str, Any]) -> None:
    settings = _settings(jwt_jwks_url=jwks.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    assert settings.jwt_allowed_algorithms() == {"HS256", "RS256", "ES256"}
    settings = _settings(jwt_jwks_url=jwks.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwt_algorithms="RS256,ES256")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(settings)), base_url="http://m.test") as http:
        shared = create_token(SECRET, "cli", Role.admin, 60, ISSUER, audience=AUDIENCE)
        _refused(await _whoami(http, shared), "'HS256' is not allowed")
        pem = (
            keys["rsa-1"]
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        confused = _handmade({"alg": "HS256", "kid": "rsa-1"}, _claims(role="admin"), pem)
        _refused(await _whoami(http, confused), "'HS256' is not allowed")
        assert (await _whoami(http, _sign(keys, "rsa-1", _claims(role="admin")))).json()["role"] == "admin"


async def test_rotation_fetches_the_new_key_and_drops_the_removed_one(
    client: httpx.AsyncClient, keys: dict[str, Any], jwks: JwksServer
) -> None:
    old = _sign(keys, "rsa-1", _claims())
    assert (await _whoami(client, old)).status_code == 200
    # The auth service rotates: rsa-2 appears, rsa-1 goes.
    jwks.keys = [_jwk(keys["rsa-2"], "rsa-2"), _jwk(keys["ec-1"], "ec-1")]
    assert (await _whoami(client, old)).status_code == 200  # the cached set still has it
    fetched = jwks.fetches
    assert (await _whoami(client, _sign(keys, "rsa-2", _claims()))).json()["role"] == "service"
    assert jwks.fetches == fetched + 1  # the unknown kid made one fetch
    _refused(await _whoami(client, old), "no signing key with kid 'rsa-1'")


async def test_unknown_kids_fetch_at_most_once_per_interval(jwks: JwksServer, keys: dict[str, Any]) -> None:
    settings = _settings(jwt_jwks_url=jwks.url, jwt_issuer=ISSUER, jwt_role_claim=ROLE_CLAIM,
                         jwt_jwks_min_refresh_seconds=60)  # fmt: skip
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(settings)), base_url="http://m.test") as http:
        for _ in range(5):
            made_up = jwt.encode(
                _claims(aud=None), keys["stranger"], algorithm="RS256", headers={"kid": uuid.uuid4().hex}
            )
            _refused(await _whoami(http, made_up), "no signing key")
        assert jwks.fetches == 1


async def test_jwks_down_with_nothing_cached_is_a_503(jwks: JwksServer, keys: dict[str, Any]) -> None:
    jwks.down = True
    settings = _settings(jwt_jwks_url=jwks.url, jwt_issuer=ISSUER, jwt_role_claim=ROLE_CLAIM)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(settings)), base_url="http://m.test") as http:
        response = await _whoami(http, _sign(keys, "rsa-1", _claims(aud=None)))
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["retry-after"] == "10"


def test_route_classes() -> None:
    assert route_class("POST", "/v1/notifications") == "sending"
    assert route_class("POST", "/v1/notifications/scheduled") == "sending"
    assert route_class("POST", "/v1/events") == "sending"
    assert route_class("GET", "/v1/notifications") == "reading"
    assert route_class("PUT", "/v1/templates/welcome") == "admin"
    assert route_class("POST", "/admin/bulk") == "admin"
    for method, path in [("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/t/o/x.gif"), ("POST", "/u/x"),
                         ("POST", "/v1/webhooks/twilio"), ("POST", "/admin/login")]:  # fmt: skip
        assert route_class(method, path) is None


async def test_rate_limit_per_subject_and_class_in_memory() -> None:
    settings = _settings(rate_limit_reading="3/minute", rate_limit_sending="2/minute", rate_limit_admin="100/minute")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(settings)), base_url="http://m.test") as http:
        alice = {"Authorization": f"Bearer {create_token(SECRET, 'alice', Role.service, 60)}"}
        bob = {"Authorization": f"Bearer {create_token(SECRET, 'bob', Role.service, 60)}"}
        first_hit = time.time()  # the window opens at the first request it counts
        assert [(await http.get(PROBE, headers=alice)).status_code for _ in range(3)] == [200, 200, 200]
        refused = await http.get(PROBE, headers=alice)
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        # The seconds left of the minute that opened at the first request.
        assert 60 - (time.time() - first_hit) - 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.json()["title"] == "Too many requests"
        assert (await http.get(PROBE, headers=bob)).status_code == 200  # a subject of its own
        assert (await http.post(PROBE, headers=alice)).status_code == 200  # another class: admin
        assert (await http.get("/healthz", headers=alice)).status_code == 200  # never limited
        # Sending: one count for every path of the class (404s here: only the count matters).
        codes = [(await http.post(f"/v1/notifications/nowhere/{n}", headers=alice, json={})).status_code
                 for n in range(3)]  # fmt: skip
        assert codes == [404, 404, 429]
        # No token (or a bad one): counted by the client address, and refused with 401 while allowed.
        anonymous = [(await http.get(PROBE)).status_code for _ in range(4)]
        assert anonymous == [401, 401, 401, 429]
