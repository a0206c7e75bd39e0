"""Shared dependencies of the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncConnection
from temporalio.client import Client

from core.auth import InvalidToken, Principal, Role, decode_token
from core.config import Settings

_bearer = HTTPBearer(auto_error=False)


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_connection(request: Request) -> AsyncIterator[AsyncConnection]:
    async with request.app.state.engine.connect() as conn:
        yield conn


def get_temporal(request: Request) -> Client:
    client: Client = request.app.state.temporal
    return client


def get_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(401, "missing bearer token (Authorization: Bearer <jwt>)", headers=challenge)
    settings: Settings = request.app.state.settings
    try:
        return decode_token(request.app.state.jwt_secret, credentials.credentials, settings.jwt_issuer)
    except InvalidToken as err:
        raise HTTPException(401, f"invalid token: {err}", headers=challenge) from err


def require(*roles: Role) -> Callable[[Principal], Principal]:
    """Allow only these roles (admin is always allowed)."""
    allowed = {Role.admin, *roles}

    def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if principal.role not in allowed:
            names = ", ".join(sorted(role.value for role in allowed))
            raise HTTPException(403, f"role {principal.role.value!r} may not do this (allowed: {names})")
        return principal

    return check


SettingsDep = Annotated[Settings, Depends(get_settings)]
ConnectionDep = Annotated[AsyncConnection, Depends(get_connection)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
AnyRole = Annotated[Principal, Depends(require(Role.service, Role.campaign_manager, Role.analyst))]
Sender = Annotated[Principal, Depends(require(Role.service))]
RecipientWriter = Annotated[Principal, Depends(require(Role.service))]
TemplateEditor = Annotated[Principal, Depends(require(Role.campaign_manager))]
# Scheduled sends sit under /v1/notifications: services may book them as well as managers.
ScheduledSender = Annotated[Principal, Depends(require(Role.service, Role.campaign_manager))]
