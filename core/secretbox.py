"""Provider secrets at rest: a JSON object encrypted with Fernet (AES-128-CBC + HMAC)."""

from __future__ import annotations

import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken


class SecretsUnreadable(Exception):
    """Stored secrets do not decrypt with the configured key (was the key changed?)."""


def seal(key: bytes, secrets: dict[str, Any]) -> str | None:
    if not secrets:
        return None
    return Fernet(key).encrypt(json.dumps(secrets, sort_keys=True).encode()).decode()


def unseal(key: bytes, token: str | None) -> dict[str, Any]:
    if not token:
        return {}
    try:
        value: dict[str, Any] = json.loads(Fernet(key).decrypt(token.encode()))
    except InvalidToken as err:
        raise SecretsUnreadable("provider secrets do not decrypt with MARQUEE_SECRETS_KEY") from err
    return value
