"""JWT bearer tokens (HS256) and the roles they carry."""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import jwt


class Role(enum.StrEnum):
    service = "service"  # another backend asking for notifications
    admin = "admin"
    campaign_manager = "campaign_manager"
    analyst = "analyst"


@dataclass(frozen=True)
class Principal:
    subject: str
    role: Role


class InvalidToken(Exception):
    pass


def create_token(secret: str, subject: str, role: Role, ttl_seconds: int, issuer: str = "marquee") -> str:
    now = int(time.time())
    claims = {"sub": subject, "role": role.value, "iss": issuer, "iat": now, "exp": now + ttl_seconds}
    return jwt.encode(claims, secret, algorithm="HS256")


def decode_token(secret: str, token: str, issuer: str = "marquee") -> Principal:
    try:
        claims = jwt.decode(
            token, secret, algorithms=["HS256"], issuer=issuer, options={"require": ["sub", "exp", "role"]}
        )
    except jwt.PyJWTError as err:
        raise InvalidToken(str(err)) from err
    try:
        role = Role(claims["role"])
    except ValueError as err:
        raise InvalidToken(f"unknown role {claims['role']!r}") from err
    return Principal(subject=str(claims["sub"]), role=role)


# Passwords for the admin panel: scrypt from the standard library, parameters stored alongside.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p))
    return hmac.compare_digest(candidate.hex(), digest)
