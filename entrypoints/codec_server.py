"""`marquee codec-server`: the Temporal codec server protocol over Marquee's payload codec,
so that the Temporal Web UI (and `temporal workflow show --codec-endpoint`) can show a run's
inputs and results in clear to an admin, while Temporal itself holds ciphertext.

POST /decode and /encode take and return {"payloads": [...]} (Temporal's Payloads message in
protobuf JSON). Every call needs `Authorization: Bearer <token>` of the admin role, checked as
the API checks tokens (MARQUEE_JWT_*: Marquee's HS256 tokens, or an auth service's by JWKS):
the Web UI forwards its signed-in user's access token when "Pass the user access token" is
on. CORS admits the Web UI's origin. docs/data-protection.md.
"""

from __future__ import annotations

import structlog
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.api.common.v1 import Payloads

from api.deps import token_verifier
from core.auth import InvalidToken, KeysUnavailable, Principal, Role, TokenVerifier
from core.codec import CodecKeyError, EncryptionCodec
from core.config import Settings

logger = structlog.get_logger("marquee.codec_server")

# A Web UI batch is one history page's payloads; Temporal's own limit per payload is 2 MiB.
MAX_BODY_BYTES = 32 * 1024 * 1024
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _refusal(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status, headers=headers)


async def _admin(request: Request, verifier: TokenVerifier) -> Principal | JSONResponse:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _refusal(401, "missing bearer token (Authorization: Bearer <jwt>)", _CHALLENGE)
    try:
        principal = await verifier.verify(token.strip())
    except KeysUnavailable as err:
        return _refusal(503, f"cannot check the token now: {err}", {"Retry-After": "10"})
    except InvalidToken as err:
        return _refusal(401, f"invalid token: {err}", _CHALLENGE)
    # Decoding shows recipients' addresses and messages: the admin role only.
    if principal.role is not Role.admin:
        return _refusal(403, f"role {principal.role.value!r} may not decode Temporal payloads (admin only)")
    return principal


def create_codec_app(settings: Settings) -> Starlette:
    """The codec server's ASGI app. Raises CodecKeyError (bad keys) or RuntimeError (no keys,
    no JWT secret) before serving anything."""
    keys = settings.temporal_codec_keyring()
    if not keys:
        raise RuntimeError("MARQUEE_TEMPORAL_CODEC_KEYS is not set: payloads are not encrypted, nothing to decode")
    codec = EncryptionCodec(keys)
    verifier = token_verifier(settings, settings.resolved_jwt_secret())

    async def handle(request: Request, decode: bool) -> Response:
        allowed = await _admin(request, verifier)
        if isinstance(allowed, Response):
            return allowed
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return _refusal(413, f"at most {MAX_BODY_BYTES} bytes a request")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _refusal(413, f"at most {MAX_BODY_BYTES} bytes a request")
        payloads = Payloads()
        try:
            json_format.Parse(body or b"{}", payloads)
            result = await (codec.decode if decode else codec.encode)(payloads.payloads)
        except json_format.ParseError as err:
            return _refusal(400, f'the body must be {{"payloads": [...]}}: {err}')
        except CodecKeyError as err:
            return _refusal(400, str(err))
        # Who looked, at how much, never what.
        logger.info(
            "temporal payloads decoded" if decode else "temporal payloads encoded",
            subject=allowed.subject,
            payloads=len(result),
            namespace=request.headers.get("x-namespace"),
        )
        return Response(json_format.MessageToJson(Payloads(payloads=result)), media_type="application/json")

    async def decode(request: Request) -> Response:
        return await handle(request, decode=True)

    async def encode(request: Request) -> Response:
        return await handle(request, decode=False)

    return Starlette(
        routes=[Route("/decode", decode, methods=["POST"]), Route("/encode", encode, methods=["POST"])],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=settings.codec_server_cors_origins(),
                allow_methods=["POST"],
                # X-Namespace: the Web UI names the run's namespace on every call.
                allow_headers=["Authorization", "Content-Type", "X-Namespace"],
                allow_credentials=True,  # the Web UI's "include cross-origin credentials"
                max_age=600,
            )
        ],
    )
