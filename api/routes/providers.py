"""Channel providers over HTTP: configuration, circuit breakers and test sends (admin
only to change). The operations live in services.provider_operations, which the admin
panel's provider pages call too; here each route authorises and calls one. Not found and
conflict answer through the API's domain error handler; the provider's own problems here.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, status
from sqlalchemy.ext.asyncio import AsyncConnection

from api.deps import ConnectionDep, SettingsDep, permit
from api.problems import Problem
from api.routes.audit import ReasonQuery
from core.auth import Principal, Role
from core.config import Settings
from core.schemas import BreakerOut, ProviderOut, ProviderTestRequest, ProviderTestResult, ProviderWrite
from core.secretbox import SecretsUnreadable
from services.provider_operations import (
    problem_fields,
    read_breaker,
    read_provider,
    read_providers,
    remove,
    reset_breaker,
    save_audited,
    send_test,
    set_enabled,
)
from services.providers import ProviderInvalid

router = APIRouter(prefix="/v1/providers", tags=["providers"])

ProviderAdmin = Annotated[Principal, Depends(permit("providers.manage"))]
ProviderReader = Annotated[Principal, Depends(permit("providers.read"))]


def _invalid(err: ProviderInvalid) -> Problem:
    detail = f"{len(err.problems)} problem(s): {err}"
    return Problem(422, "Provider is invalid", detail, problem_fields(err.problems))


def _unreadable(name: str) -> Problem:
    detail = (f"the stored secrets of {name!r} do not decrypt with MARQUEE_SECRETS_KEY (was it changed?): "
              "restore the key, or delete and recreate the provider")  # fmt: skip
    return Problem(409, "Secrets unreadable", detail)


@router.get("", response_model=list[ProviderOut], response_model_exclude_none=False)
async def list_all(conn: ConnectionDep, settings: SettingsDep, reader: ProviderReader) -> Any:
    """Every provider with its breaker; admins also see settings and which secrets are set."""
    return await read_providers(conn, settings, full=reader.role == Role.admin)


@router.get("/{name}", response_model=ProviderOut)
async def get_one(name: str, conn: ConnectionDep, settings: SettingsDep, _: ProviderAdmin) -> Any:
    return await read_provider(conn, settings, name)


@router.put("/{name}", response_model=ProviderOut, responses={201: {"model": ProviderOut}})
async def put_provider(
    name: str,
    body: ProviderWrite,
    reason: ReasonQuery,
    response: Response,
    conn: ConnectionDep,
    settings: SettingsDep,
    admin: ProviderAdmin,
) -> Any:
    """Create (201) or replace (200) a provider. Every problem comes back at once (422)."""
    try:
        _, created = await save_audited(conn, settings.fernet_key(), name, body.model_dump(), admin, reason)
    except ProviderInvalid as err:
        raise _invalid(err) from None
    except SecretsUnreadable as err:
        raise _unreadable(name) from err
    await conn.commit()
    if created:
        response.status_code = status.HTTP_201_CREATED
    return await read_provider(conn, settings, name)


async def _toggle(
    name: str, enabled: bool, reason: str, conn: AsyncConnection, settings: Settings, admin: Principal
) -> Any:
    await set_enabled(conn, name, enabled, admin, reason)
    await conn.commit()
    return await read_provider(conn, settings, name)


@router.post("/{name}/enable", response_model=ProviderOut)
async def enable(
    name: str, reason: ReasonQuery, conn: ConnectionDep, settings: SettingsDep, admin: ProviderAdmin
) -> Any:
    return await _toggle(name, True, reason, conn, settings, admin)


@router.post("/{name}/disable", response_model=ProviderOut)
async def disable(
    name: str, reason: ReasonQuery, conn: ConnectionDep, settings: SettingsDep, admin: ProviderAdmin
) -> Any:
    """Senders skip a disabled provider (the next by priority, or the channel's fallback)."""
    return await _toggle(name, False, reason, conn, settings, admin)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete(name: str, reason: ReasonQuery, conn: ConnectionDep, admin: ProviderAdmin) -> Response:
    await remove(conn, name, admin, reason)
    await conn.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{name}/breaker/reset", response_model=BreakerOut)
async def breaker_reset(name: str, reason: ReasonQuery, conn: ConnectionDep, admin: ProviderAdmin) -> Any:
    """Close the circuit now (e.g. after fixing the provider's credentials)."""
    await reset_breaker(conn, name, admin, reason)
    await conn.commit()
    return await read_breaker(conn, name)


@router.post("/{name}/test", response_model=ProviderTestResult)
async def test_send(
    name: str,
    body: ProviderTestRequest,
    request: Request,
    conn: ConnectionDep,
    settings: SettingsDep,
    admin: ProviderAdmin,
) -> Any:
    """Send one real message through the stored provider (enabled or not); 502 names its error."""
    try:
        outcome = await send_test(conn, request.app.state.engine, settings, name, body, admin)
    except SecretsUnreadable as err:
        raise _unreadable(name) from err
    if not outcome.ok:
        raise Problem(502, "Provider error", f"provider {name!r} failed: {outcome.error}",
                      errors=[{"field": "provider", "message": outcome.error or "failed"}])  # fmt: skip
    return ProviderTestResult(ok=True, provider=name, provider_message_id=outcome.provider_message_id or "")
