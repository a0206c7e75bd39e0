"""Shared dependencies of the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncConnection
from temporalio.client import Client

from core import permissions
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


def _only(roles: frozenset[Role]) -> Callable[[Principal], Principal]:
    """A dependency: the signed-in principal, refused (403) unless its role is one of these."""

    def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if principal.role not in roles:
            names = ", ".join(sorted(role.value for role in roles))
            raise HTTPException(403, f"role {principal.role.value!r} may not do this (allowed: {names})")
        return principal

    return check


def permit(action: str) -> Callable[[Principal], Principal]:
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
