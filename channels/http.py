"""What the HTTP providers (FCM, SMS gateways) share: a request whose transport failures
are transient send errors, and a tolerant read of a JSON object body."""

from __future__ import annotations

from typing import Any

import httpx

from channels.base import TransientSendError


async def post(client: httpx.AsyncClient, url: str, *, what: str, **kwargs: Any) -> httpx.Response:
    try:
        return await client.post(url, **kwargs)
    except httpx.TimeoutException as err:
        raise TransientSendError(f"{what} timed out: {type(err).__name__}") from err
    except httpx.TransportError as err:
        raise TransientSendError(f"{what} unreachable: {type(err).__name__}: {err}") from err


def json_object(response: httpx.Response) -> dict[str, Any]:
    """The body as a JSON object; {} for anything else (an HTML error page, a list)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
