"""Build channel providers from stored configuration (the `providers` table).

A provider row names its `kind`; the kind decides which channels it can serve and
validates the row's non-secret `settings` and its (decrypted) `secrets` with one pydantic
model each, so the admin can show every problem, field by field, before anything runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Annotated, Any, Self

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from channels.base import DEFAULT_THROTTLE_SECONDS, Provider
from channels.fcm import GOOGLE_TOKEN_URI, FcmProvider
from channels.sandbox import SandboxProvider
from channels.sms import JsonSmsGatewayProvider, TwilioSmsProvider
from channels.smtp import SmtpProvider

CHANNELS = ("email", "push", "sms")


class _Strict(BaseModel):
    # Unknown fields are typos ("prot" for "port"): report them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class _Secrets(_Strict):
    # Read by the delivery-webhook endpoint, not by the provider.
    webhook_secret: SecretStr | None = None


def _url(value: HttpUrl) -> str:
    return str(value).rstrip("/")


# --- smtp ---------------------------------------------------------------------------------


class SmtpSettings(_Strict):
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    sender: str = Field(min_length=3, description='From header, e.g. "Marquee <news@example.com>"')
    message_id_domain: str = "marquee.localhost"
    username: str | None = None
    use_tls: bool = False  # implicit TLS (port 465)
    start_tls: bool = False  # STARTTLS, required when set
    validate_certs: bool = True
    cert_bundle: str | None = None  # path to a CA PEM file, for servers with a private CA
    timeout: float = Field(default=10.0, gt=0)
    pool_size: int = Field(default=10, ge=1, le=500)
    throttle_seconds: float = Field(default=DEFAULT_THROTTLE_SECONDS, ge=0)  # back-off after 421/451/452

    @field_validator("sender")
    @classmethod
    def _sender_has_address(cls, value: str) -> str:
        if "@" not in parseaddr(value)[1]:
            raise ValueError("needs an email address, e.g. 'Marquee <news@example.com>'")
        return value

    @model_validator(mode="after")
    def _one_tls_mode(self) -> Self:
        if self.use_tls and self.start_tls:
            raise ValueError("use_tls (implicit TLS) and start_tls are mutually exclusive")
        return self


class SmtpSecrets(_Secrets):
    password: SecretStr | None = None


def _build_smtp(name: str, channel: str, settings: SmtpSettings, secrets: SmtpSecrets, engine: AsyncEngine) -> Provider:
    return SmtpProvider(
        name=name,
        host=settings.host,
        port=settings.port,
        sender=settings.sender,
        message_id_domain=settings.message_id_domain,
        username=settings.username,
        password=secrets.password.get_secret_value() if secrets.password else None,
        use_tls=settings.use_tls,
        start_tls=settings.start_tls,
        validate_certs=settings.validate_certs,
        cert_bundle=settings.cert_bundle,
        timeout=settings.timeout,
        pool_size=settings.pool_size,
        throttle_seconds=settings.throttle_seconds,
    )


# --- fcm ----------------------------------------------------------------------------------


class ServiceAccount(BaseModel):
    """The parts of a Google service-account JSON key FCM needs; the rest is ignored."""

    model_config = ConfigDict(extra="ignore")

    client_email: str = Field(min_length=3)
    private_key: SecretStr
    private_key_id: str | None = None
    token_uri: HttpUrl = HttpUrl(GOOGLE_TOKEN_URI)

    @field_validator("private_key")
    @classmethod
    def _rsa_pem(cls, value: SecretStr) -> SecretStr:
        try:
            key = load_pem_private_key(value.get_secret_value().encode(), password=None)
        except (ValueError, TypeError) as err:
            raise ValueError("not an unencrypted PEM private key") from err
        if not isinstance(key, RSAPrivateKey):
            raise ValueError("not an RSA key")
        return value

    def as_dict(self) -> dict[str, Any]:
        return {"client_email": self.client_email, "private_key": self.private_key.get_secret_value(),
                "private_key_id": self.private_key_id, "token_uri": str(self.token_uri)}  # fmt: skip


class FcmSettings(_Strict):
    project_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{2,62}$")
    base_url: HttpUrl = HttpUrl("https://fcm.googleapis.com")
    timeout: float = Field(default=10.0, gt=0)


class FcmSecrets(_Secrets):
    service_account: ServiceAccount | None = None
    access_token: SecretStr | None = None

    @model_validator(mode="after")
    def _exactly_one_credential(self) -> Self:
        if (self.service_account is None) == (self.access_token is None):
            raise ValueError("give exactly one of service_account and access_token")
        return self


def _build_fcm(name: str, channel: str, settings: FcmSettings, secrets: FcmSecrets, engine: AsyncEngine) -> Provider:
    return FcmProvider(
        name=name,
        project_id=settings.project_id,
        service_account=secrets.service_account.as_dict() if secrets.service_account else None,
        access_token=secrets.access_token.get_secret_value() if secrets.access_token else None,
        base_url=_url(settings.base_url),
        timeout=settings.timeout,
    )


# --- sms ----------------------------------------------------------------------------------

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
# Alphanumeric sender ids (where carriers allow them): up to 11 characters.
_ALPHANUMERIC_SENDER = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")


def _check_sender(value: str) -> str:
    if not (_E164.match(value) or _ALPHANUMERIC_SENDER.match(value)):
        raise ValueError("needs an E.164 number (+15551234567) or an alphanumeric sender id of up to 11 characters")
    return value


SmsSender = Annotated[str, AfterValidator(_check_sender)]


class JsonSmsSettings(_Strict):
    base_url: HttpUrl
    sender: SmsSender
    timeout: float = Field(default=10.0, gt=0)


class JsonSmsSecrets(_Secrets):
    api_key: SecretStr = Field(min_length=1)


def _build_json_sms(
    name: str, channel: str, settings: JsonSmsSettings, secrets: JsonSmsSecrets, engine: AsyncEngine
) -> Provider:
    return JsonSmsGatewayProvider(
        name=name,
        base_url=_url(settings.base_url),
        sender=settings.sender,
        api_key=secrets.api_key.get_secret_value(),
        timeout=settings.timeout,
    )


class TwilioSettings(_Strict):
    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$")
    sender: SmsSender | None = None
    messaging_service_sid: str | None = Field(default=None, pattern=r"^MG[0-9a-fA-F]{32}$")
    base_url: HttpUrl = HttpUrl("https://api.twilio.com")
    status_callback_url: HttpUrl | None = None
    timeout: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _has_origin(self) -> Self:
        if not self.sender and not self.messaging_service_sid:
            raise ValueError("give a sender number or a messaging_service_sid")
        return self


class TwilioSecrets(_Secrets):
    auth_token: SecretStr = Field(min_length=1)


def _build_twilio(
    name: str, channel: str, settings: TwilioSettings, secrets: TwilioSecrets, engine: AsyncEngine
) -> Provider:
    return TwilioSmsProvider(
        name=name,
        account_sid=settings.account_sid,
        auth_token=secrets.auth_token.get_secret_value(),
        sender=settings.sender,
        messaging_service_sid=settings.messaging_service_sid,
        base_url=_url(settings.base_url),
        status_callback_url=str(settings.status_callback_url) if settings.status_callback_url else None,
        timeout=settings.timeout,
    )


# --- sandbox ------------------------------------------------------------------------------


class SandboxSettings(_Strict):
    pass


class SandboxSecrets(_Secrets):
    pass


def _build_sandbox(
    name: str, channel: str, settings: SandboxSettings, secrets: SandboxSecrets, engine: AsyncEngine
) -> Provider:
    provider = SandboxProvider(engine, channel)
    provider.name = name
    return provider


# --- registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KindSpec:
    channels: frozenset[str]
    settings: type[BaseModel]
    secrets: type[BaseModel]
    # (name, channel, settings, secrets, engine) -> provider; models already validated.
    build: Callable[[str, str, Any, Any, AsyncEngine], Provider]
    description: str = ""


KINDS: dict[str, KindSpec] = {
    "smtp": KindSpec(frozenset({"email"}), SmtpSettings, SmtpSecrets, _build_smtp, "Any SMTP server or relay"),
    "fcm": KindSpec(frozenset({"push"}), FcmSettings, FcmSecrets, _build_fcm, "Firebase Cloud Messaging (HTTP v1)"),
    "sms-json": KindSpec(
        frozenset({"sms"}), JsonSmsSettings, JsonSmsSecrets, _build_json_sms, "Generic JSON SMS gateway"
    ),
    "twilio": KindSpec(frozenset({"sms"}), TwilioSettings, TwilioSecrets, _build_twilio, "Twilio Messages API"),
    "sandbox": KindSpec(
        frozenset({"push", "sms"}), SandboxSettings, SandboxSecrets, _build_sandbox, "Records messages in PostgreSQL"
    ),
}


class ProviderConfigError(ValueError):
    """A provider's stored configuration does not validate; `problems` names each field."""

    def __init__(self, name: str, problems: list[str]) -> None:
        super().__init__(f"provider {name!r}: " + "; ".join(problems))
        self.problems = problems


def validate_config(kind: str, channel: str, settings: dict[str, Any], secrets: dict[str, Any]) -> list[str]:
    """Human-readable problems, each naming its field (`settings.port: ...`); empty if fine."""
    spec = KINDS.get(kind)
    if spec is None:
        return [f"kind {kind!r} is unknown; known kinds: {', '.join(sorted(KINDS))}"]
    problems = []
    if channel not in spec.channels:
        problems.append(f"kind {kind!r} cannot send {channel!r} (it sends {', '.join(sorted(spec.channels))})")
    problems += _problems("settings", spec.settings, settings)
    problems += _problems("secrets", spec.secrets, secrets)
    return problems


def build_provider(
    *, name: str, channel: str, kind: str, settings: dict[str, Any], secrets: dict[str, Any], engine: AsyncEngine
) -> Provider:
    """A provider named `name` from a stored row; raises ProviderConfigError if it is invalid."""
    problems = validate_config(kind, channel, settings, secrets)
    if problems:
        raise ProviderConfigError(name, problems)
    spec = KINDS[kind]
    return spec.build(
        name, channel, spec.settings.model_validate(settings), spec.secrets.model_validate(secrets), engine
    )


def _problems(section: str, model: type[BaseModel], values: dict[str, Any]) -> list[str]:
    if not isinstance(values, dict):
        return [f"{section}: should be an object"]
    try:
        model.model_validate(values)
    except ValidationError as err:
        # Never the input value itself: secrets must not reach logs or the admin page.
        errors = err.errors(include_input=False, include_url=False)
        return [_place(section, error["loc"]) + f": {error['msg']}" for error in errors]
    return []


def _place(section: str, loc: tuple[int | str, ...]) -> str:
    return ".".join([section, *(str(part) for part in loc)])
