"""Shared dependencies of the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.ext.asyncio import AsyncConnection
from temporalio.client import Client

from core import permissions
from core.auth import InvalidToken, JwksKeys, KeysUnavailable, Principal, Role, TokenVerifier
from core.config import Settings

_bearer = HTTPBearer(auto_error=False)


# Dependencies are coroutines even where nothing is awaited: FastAPI runs a plain `def`
# dependency on its thread pool, a thread hop per request that cost the API ~7 % of its CPU
# and tail latency under load (bench.instant --profile).
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_connection(request: Request) -> AsyncIterator[AsyncConnection]:
    async with request.app.state.engine.connect() as conn:
        yield conn


async def get_temporal(request: Request) -> Client:
    client: Client = request.app.state.temporal
    return client


async def authenticate(request: Request) -> Principal | InvalidToken | KeysUnavailable | None:
    """The request's bearer token checked once (the rate limiter asks first, then the route's
    guard): its principal, why it was refused, or None without a token."""
    state = request.state
    if hasattr(state, "marquee_auth"):
        result: Principal | InvalidToken | KeysUnavailable | None = state.marquee_auth
        return result
    scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
    result = None
    if scheme.lower() == "bearer" and token:
        verifier: TokenVerifier = request.app.state.tokens
        try:
            result = await verifier.verify(token)
        except (InvalidToken, KeysUnavailable) as err:
            result = err
    state.marquee_auth = result
    return result


async def get_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(401, "missing bearer token (Authorization: Bearer <jwt>)", headers=challenge)
    result = await authenticate(request)
    if isinstance(result, KeysUnavailable):
        raise HTTPException(503, f"cannot check the token now: {result}", headers={"Retry-After": "10"})
    if not isinstance(result, Principal):
        raise HTTPException(401, f"invalid token: {result}", headers=challenge)
    return result


def token_verifier(settings: Settings, secret: str) -> TokenVerifier:
    """The app's token checker, from the JWT settings (docs/security.md)."""
    jwks = None
    if settings.jwt_jwks_url:
        jwks = JwksKeys(
            settings.jwt_jwks_url,
            cache_seconds=settings.jwt_jwks_cache_seconds,
            min_refresh_seconds=settings.jwt_jwks_min_refresh_seconds,
        )
    return TokenVerifier(
        secret=secret,
        algorithms=settings.jwt_allowed_algorithms(),
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        role_claim=settings.jwt_role_claim,
        leeway_seconds=settings.jwt_leeway_seconds,
        jwks=jwks,
    )


def _only(roles: frozenset[Role]) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    """A dependency: the signed-in principal, refused (403) unless its role is one of these."""

    async def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if principal.role not in roles:
            names = ", ".join(sorted(role.value for role in roles))
            raise HTTPException(403, f"role {principal.role.value!r} may not do this (allowed: {names})")
        return principal

    return check


def permit(action: str) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    """Allow the roles the permission table (core.permissions) allows `action`."""
    return _only(permissions.roles(action))


SettingsDep = Annotated[Settings, Depends(get_settings)]
ConnectionDep = Annotated[AsyncConnection, Depends(get_connection)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
# The aliases the routes use; each is one action of the table. Reading notifications,
# recipients, templates, segments and campaigns is open to every role alike.
AnyRole = Annotated[Principal, Depends(permit("notifications.read"))]
Sender = Annotated[Principal, Depends(permit("notifications.send"))]
RecipientWriter = Annotated[Principal, Depends(permit("recipients.write"))]
# Templates, segments and campaigns are changed by the same roles.
TemplateEditor = Annotated[Principal, Depends(permit("templates.write"))]
ScheduledSender = Annotated[Principal, Depends(permit("notifications.schedule"))]
EventPublisher = Annotated[Principal, Depends(permit("events.publish"))]
EventReader = Annotated[Principal, Depends(permit("events.read"))]
RuleReader = Annotated[Principal, Depends(permit("event_rules.read"))]
RuleEditor = Annotated[Principal, Depends(permit("event_rules.write"))]
