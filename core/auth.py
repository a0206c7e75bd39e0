"""JWT bearer tokens and the roles they carry: HS256 with the shared secret (Marquee's own
tokens, the dev default) and RS256/ES256 (or another asymmetric algorithm) checked against
the keys an auth service publishes at a JWKS URL."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
import structlog
from jwt import PyJWK, PyJWKClient

logger = structlog.get_logger("marquee.auth")

# What MARQUEE_JWT_ALGORITHMS may list; "none" never.
SYMMETRIC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


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


class KeysUnavailable(Exception):
    """The JWKS URL could not be read and no key set is cached: the fault is ours, not the token's."""


def create_token(
    secret: str,
    subject: str,
    role: Role,
    ttl_seconds: int,
    issuer: str = "marquee",
    *,
    audience: str | None = None,
    role_claim: str = "role",
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, role_claim: role.value, "iss": issuer, "iat": now}
    claims["exp"] = now + ttl_seconds
    if audience is not None:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")


def decode_token(secret: str, token: str, issuer: str = "marquee") -> Principal:
    """An HS256 token of Marquee's own (the CLI and tests); the API uses TokenVerifier."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=["HS256"], issuer=issuer, options={"require": ["sub", "exp", "role"]}
        )
    except jwt.PyJWTError as err:
        raise InvalidToken(str(err)) from err
    return Principal(subject=str(claims["sub"]), role=_role(claims, "role"))


_ROLE_NAMES = frozenset(role.value for role in Role)


def _role(claims: dict[str, Any], claim: str) -> Role:
    """The claim holds one role, or a list (as many auth services issue) with exactly one of ours."""
    value = claims.get(claim)
    if value is None:
        raise InvalidToken(f"the token has no {claim!r} claim")
    given = value if isinstance(value, list) else [value]
    ours = {Role(item) for item in given if isinstance(item, str) and item in _ROLE_NAMES}
    if len(ours) != 1:
        known = ", ".join(role.value for role in Role)
        raise InvalidToken(f"claim {claim!r} must hold exactly one of: {known} (got {value!r})")
    return ours.pop()


class JwksKeys:
    """The public keys at a JWKS URL, cached in memory. PyJWKClient fetches and parses the set;
    the fetch is blocking, so it runs in a worker thread (asyncio.to_thread), one at a time,
    and only when the cached set is older than `cache_seconds` or a token names a kid the set
    lacks (a key rotated in) -- at most once per `min_refresh_seconds`, so tokens with made-up
    kids cannot make Marquee hammer the auth service. A failed fetch keeps the cached set."""

    def __init__(self, url: str, *, cache_seconds: float, min_refresh_seconds: float, timeout: float = 10) -> None:
        self.url = url
        self._client = PyJWKClient(url, cache_jwk_set=False, cache_keys=False, timeout=timeout)
        self._cache_seconds = cache_seconds
        self._min_refresh_seconds = min_refresh_seconds
        self._keys: dict[str | None, PyJWK] | None = None
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()
        self.fetches = 0

    def _usable(self, kid: str | None) -> bool:
        fresh = time.monotonic() - self._fetched_at < self._cache_seconds
        return fresh and self._keys is not None and self._find(kid) is not None

    def _find(self, kid: str | None) -> PyJWK | None:
        if self._keys is None:
            return None
        if kid is None and len(self._keys) == 1:  # a token without kid, and one key to choose
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def key(self, kid: str | None) -> PyJWK:
        if not self._usable(kid):
            async with self._lock:
                # Another request may have fetched while this one waited.
                if not self._usable(kid) and time.monotonic() - self._attempted_at >= self._min_refresh_seconds:
                    await self._fetch()
        if self._keys is None:
            raise KeysUnavailable(f"no signing keys from {self.url}")
        found = self._find(kid)
        if found is None:
            raise InvalidToken(f"no signing key with kid {kid!r} at the JWKS URL")
        return found

    async def _fetch(self) -> None:
        self._attempted_at = time.monotonic()
        try:
            jwk_set = await asyncio.to_thread(self._client.get_jwk_set, True)
        except jwt.PyJWTError as err:
            logger.warning("jwks fetch failed", url=self.url, error=str(err), cached=self._keys is not None)
            return
        finally:
            self.fetches += 1
        # Symmetric keys have no place in a public key set: never use one.
        self._keys = {key.key_id: key for key in jwk_set.keys if key.key_type != "oct" and key.public_key_use != "enc"}
        self._fetched_at = time.monotonic()


@dataclass
class TokenVerifier:
    """Checks a bearer token: its algorithm against the allowed list, its signature (HS* with the
    shared secret only, the others with a JWKS key only and that key's own algorithm, so an
    HS256 token signed with a public key never verifies), exp, nbf, iss and aud (when set)."""

    secret: str | None
    algorithms: frozenset[str]
    issuer: str
    audience: str | None = None
    role_claim: str = "role"
    leeway_seconds: float = 0
    jwks: JwksKeys | None = None

    def __post_init__(self) -> None:
        unknown = self.algorithms - SYMMETRIC_ALGORITHMS - ASYMMETRIC_ALGORITHMS
        if unknown or not self.algorithms:
            raise ValueError(f"unsupported JWT algorithms: {sorted(unknown) or 'none given'}")
        if self.algorithms & ASYMMETRIC_ALGORITHMS and self.jwks is None:
            raise ValueError("asymmetric JWT algorithms need a JWKS URL")

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            raise InvalidToken(str(err)) from err
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise InvalidToken(f"algorithm {alg!r} is not allowed (allowed: {', '.join(sorted(self.algorithms))})")
        key: str | PyJWK
        if alg in SYMMETRIC_ALGORITHMS:
            if self.secret is None:
                raise InvalidToken(f"algorithm {alg!r} is not allowed: no shared secret")
            key, allowed = self.secret, [alg]
        else:
            assert self.jwks is not None  # __post_init__
            key, allowed = await self.jwks.key(header.get("kid")), sorted(self.algorithms & ASYMMETRIC_ALGORITHMS)
        return self._principal(token, key, allowed)

    def _principal(self, token: str, key: str | PyJWK, algorithms: Iterable[str]) -> Principal:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(algorithms),
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway_seconds,
                options={"require": ["sub", "exp", "iss", *(["aud"] if self.audience else [])]},
            )
        except jwt.PyJWTError as err:
            raise InvalidToken(str(err)) from err
        if not isinstance(claims["sub"], str) or not claims["sub"]:
            raise InvalidToken("claim 'sub' must be a non-empty string")
        return Principal(subject=claims["sub"], role=_role(claims, self.role_claim))


# Passwords for the admin panel: scrypt from the standard library (OpenSSL's), kept rather than
# argon2-cffi or pwdlib because it is memory-hard, on OWASP's list of acceptable password hashes,
# and needs no native extension of its own; its parameters are stored in each hash, so they can be
# raised without a migration (authenticate rehashes an older hash at the next sign-in).
# N=2**14, r=8, p=5 is OWASP's scrypt setting for 16 MiB of memory per hash.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 5


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # OpenSSL refuses above `maxmem` (32 MiB by default): allow what these parameters need.
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=128 * r * (n + p + 2) + 2**20)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        candidate = _scrypt(password, bytes.fromhex(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(candidate.hex(), digest)


def password_needs_rehash(stored: str) -> bool:
    """Was this hash made with other parameters than hash_password's today?"""
    return not stored.startswith(f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}$")
