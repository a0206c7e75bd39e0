"""The one place configuration is read: environment variables prefixed MARQUEE_."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from cryptography.fernet import Fernet
from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.auth import ASYMMETRIC_ALGORITHMS, SYMMETRIC_ALGORITHMS
from core.codec import parse_keys as parse_codec_keys
from core.templating import TemplateLimits

DEV_SECRET_FILE = "jwt-secret"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MARQUEE_", env_file=".env", extra="ignore")

    # Where the embedded defaults keep their state (PostgreSQL, Temporal, chDB, captured mail).
    data_dir: Path = Path(".data")

    # PostgreSQL. Unset: `marquee dev` starts an embedded server under data_dir.
    database_url: str | None = None
    database_pool_size: int = 10

    # Temporal. Unset: `marquee dev` starts the CLI's dev server (SQLite under data_dir).
    temporal_address: str | None = None
    temporal_namespace: str = "default"
    temporal_task_queue: str = "marquee"
    temporal_port: int = 7233
    temporal_ui_port: int = 8233
    temporal_ui_url: str | None = None  # links to runs from the API and admin; default: the dev UI port

    # Data protection (docs/data-protection.md). TLS: with both PEM files set (or `marquee api
    # --tls-cert --tls-key`) the API, admin and codec server serve HTTPS, TLS 1.3 and nothing
    # older. Temporal payloads are encrypted (AES-GCM) when codec keys are set, written
    # "id:base64key,..." (`marquee codec-key` prints one): the first encrypts, all decrypt.
    # Unset: payloads go to Temporal in clear. The codec server (`marquee codec-server`) lets
    # the Temporal Web UI decode for an admin; CORS origins default to the Web UI's.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    temporal_codec_keys: SecretStr | None = None
    codec_server_host: str = "127.0.0.1"
    codec_server_port: int = Field(default=8234, ge=1, le=65535)
    codec_server_origins: list[str] = Field(default_factory=list)

    # ClickHouse. Unset: chDB (in-process ClickHouse) under data_dir/chdb.
    clickhouse_url: str | None = None
    # An insert costs chDB ~100 ms of CPU whatever its size (five tables' parts): under load, large
    # batches; small sends flush by time. 1 s, not 0.2: a campaign's worker spends ~5-10 % less CPU a message.
    history_flush_seconds: float = 1.0
    history_flush_rows: int = 100_000
    history_outbox_seconds: float = Field(default=1.0, gt=0)  # how often workers ship the API's status changes
    history_retention_days: int = Field(default=400, ge=1)  # raw events and their hourly stats (a TTL)
    analytics_max_days: int = Field(default=400, ge=1)  # the longest period an analytics query may ask for

    # API
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    public_url: str = "http://127.0.0.1:8000"
    wait_timeout_seconds: float = 30.0
    # Intake (notifications, events) answers 503 + Retry-After while the oldest new task on the
    # main task queue waits longer than this (services/admission.py); 0 turns it off.
    admission_max_backlog_seconds: float = Field(default=2.0, ge=0)
    admission_check_seconds: float = Field(default=0.25, gt=0)
    jwt_secret: SecretStr | None = None
    jwt_issuer: str = "marquee"
    jwt_ttl_seconds: int = 3600

    # API security (docs/security.md). Bearer tokens: HS256 with jwt_secret by default; with a
    # JWKS URL, RS256/ES256 tokens of an auth service too, checked against its published keys
    # (cached; fetched again when stale or a token names an unknown kid). Algorithms: a comma-
    # separated list, empty meaning HS256 (plus RS256,ES256 when a JWKS URL is set). The role
    # is read from jwt_role_claim (a string, or a list holding one Marquee role); aud is
    # required and checked when jwt_audience is set.
    jwt_jwks_url: str | None = None
    jwt_algorithms: Annotated[list[str], NoDecode] = Field(default_factory=list)
    jwt_audience: str | None = None
    jwt_role_claim: str = Field(default="role", min_length=1)
    jwt_leeway_seconds: float = Field(default=0, ge=0, le=300)  # clock skew allowed on exp, nbf and iat
    jwt_jwks_cache_seconds: float = Field(default=300, gt=0)
    jwt_jwks_min_refresh_seconds: float = Field(default=10, ge=0)  # unknown kids fetch the set at most this often
    # Requests per principal (the token's subject, else the client address) and route class:
    # sending (POST /v1/notifications*, POST /v1/events), reading (GET), admin (other
    # changes). Rates in the `limits` notation ("1000/second", "50/minute;1000/hour").
    # Storage: memory:// (per process) or redis://host:port/db (shared by every API process).
    rate_limit_enabled: bool = True
    rate_limit_storage: str = "memory://"
    rate_limit_strategy: Literal["fixed-window", "sliding-window-counter", "moving-window"] = "fixed-window"
    rate_limit_sending: str = "1000/second"
    rate_limit_reading: str = "1000/second"
    rate_limit_admin: str = "100/second"
    # Request bodies above this are refused with 413 while being read (Content-Length or not);
    # segment member uploads (CSV of up to 100,000 user_ids) have their own larger limit.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_upload_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)

    # Email over SMTP. The dev stack points these at its capture server.
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_use_tls: bool = False
    smtp_start_tls: bool = False
    smtp_timeout_seconds: float = 10.0
    smtp_pool_size: int = 10
    mail_from: str = "Marquee <no-reply@marquee.localhost>"
    message_id_domain: str = "marquee.localhost"

    # Push and SMS when no provider is configured in the admin for the channel:
    # "sandbox" records what would be sent (shown at /dev/outbox).
    push_provider: str = "sandbox"
    sms_provider: str = "sandbox"

    # Providers stored in PostgreSQL (edited in the admin). Their secrets are encrypted
    # with this Fernet key (`marquee secrets-key` prints a new one); unset, a key derived
    # from the JWT secret is used, so rotating that secret needs the providers re-saved.
    secrets_key: SecretStr | None = None
    provider_refresh_seconds: float = Field(default=5.0, gt=0)  # how soon workers see provider edits
    # A provider's circuit opens after this many failures in a row and lets a probe
    # through after the cool-down; shared by every worker through PostgreSQL.
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_cooldown_seconds: float = Field(default=30.0, gt=0)
    throttle_default_retry_seconds: float = 5.0  # a 429 or SMTP 421 without Retry-After

    # Tracking and preferences. Click tracking redirects only to these hosts (and to the
    # public URL's own); opt-outs of all categories do not stop transactional ones.
    open_tracking: bool = True
    click_tracking: bool = True
    tracking_allowed_hosts: list[str] = Field(default_factory=list)
    transactional_categories: list[str] = Field(
        default_factory=lambda: ["transactional", "security", "password_reset", "account"]
    )
    webhook_tolerance_seconds: int = 300  # signed webhook timestamps older than this are refused

    # Template validation limits (checked with each template's example values before save).
    sms_max_segments: int = 3
    push_max_bytes: int = 4096
    email_subject_max_chars: int = 255

    # Delivery retries (passed to each workflow as input, so a change never breaks replay).
    send_retry_initial_seconds: float = 1.0
    send_retry_max_seconds: float = 60.0
    send_retry_max_attempts: int = 8
    send_failover_after: int = Field(default=3, ge=1)  # failures on a provider before its channel's next one
    send_timeout_seconds: float = 30.0
    # How long a send waits on a stored provider's queue (rate limit, or a provider just
    # disabled) before the channel's next provider is tried.
    provider_queue_timeout_seconds: float = Field(default=600.0, gt=0)

    # Campaigns: recipients per batch activity, batches in flight per campaign, concurrent
    # sends per batch (keep within smtp_pool_size).
    campaign_batch_size: int = Field(default=1000, ge=1, le=5000)
    campaign_window: int = Field(default=4, ge=1, le=100)
    campaign_send_concurrency: int = Field(default=10, ge=1)

    # Event intake over NATS JetStream (docs/events.md): `marquee events consume`, and `marquee
    # dev` when NATS answers. Unset URL: nats://127.0.0.1:4222, which `marquee dev` only uses
    # if it answers. The prefix names the subjects (<prefix>.events.>), streams
    # (<PREFIX>_EVENTS, <PREFIX>_EVENTS_DEAD) and durable consumer (<prefix>-intake).
    nats_url: str | None = None
    nats_prefix: str = Field(default="marquee", pattern=r"^[A-Za-z0-9_-]+$")
    events_ack_wait_seconds: float = Field(default=30.0, gt=0)  # unacked this long: redelivered
    events_max_deliver: int = Field(default=5, ge=1)  # deliveries of one message before it is dead-lettered

    # Dev stack
    capture_smtp_port: int = 1025
    dev_tools: bool = False
    admin_session_secret: SecretStr | None = None

    # Logs and errors (docs/observability.md): ECS JSON lines on stdout or readable text on
    # stderr; log_json=true is the older spelling of log_format=json. Sentry when a DSN is set.
    sentry_dsn: str | None = None
    sentry_environment: str | None = None
    log_format: Literal["json", "text"] | None = None
    log_json: bool = False
    log_level: str = "INFO"

    @property
    def log_as_json(self) -> bool:
        return self.log_format == "json" or (self.log_format is None and self.log_json)

    # Metrics and health (docs/observability.md). The Temporal SDK's own metrics are served
    # on this host:port (Prometheus) when set; `marquee worker` serves /healthz, /readyz and
    # its process's /metrics on the health port; each readiness check waits this long.
    temporal_metrics_address: str | None = None
    worker_health_port: int | None = Field(default=None, ge=0, le=65535)
    readiness_timeout_seconds: float = Field(default=2.0, gt=0)

    # Tracing (docs/observability.md): OpenTelemetry over OTLP/HTTP to this base URL (a
    # collector, Jaeger or Tempo, e.g. http://collector:4318), or to the standard
    # OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set. The service name defaults to
    # OTEL_SERVICE_NAME, else marquee-api, marquee-worker or marquee-dev (API and worker in one).
    otlp_endpoint: str | None = None
    otel_service_name: str | None = None

    worker_max_concurrent_activities: int = Field(default=200, ge=1)
    # Workflow tasks in hand at once. A notification's task holds its local prepare and send,
    # so this bounds what waits inside a worker, unseen by the server's backlog (which the
    # API sheds on): the rest waits on the task queue, where another worker can take it.
    worker_max_concurrent_workflow_tasks: int = Field(default=32, ge=2)
    worker_shutdown_seconds: float = 30.0  # running activities get this long to finish on stop
    embedded_pg_port: int = 5433  # the dev stack's PostgreSQL

    @field_validator("secrets_key")
    @classmethod
    def _fernet_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        try:
            Fernet(value.get_secret_value().encode())
        except ValueError as err:
            raise ValueError("must be a Fernet key: 32 url-safe base64-encoded bytes (`marquee secrets-key`)") from err
        return value

    @field_validator("jwt_algorithms", mode="before")
    @classmethod
    def _algorithm_list(cls, value: object) -> object:
        """A comma-separated list ("RS256,ES256") or a JSON one; "none" and unknown names refused."""
        if isinstance(value, str):
            value = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
        if isinstance(value, list):
            value = [str(item).strip() for item in value if str(item).strip()]
            if any(item.lower() == "none" for item in value):
                raise ValueError("'none' is never an allowed JWT algorithm")
            unknown = set(value) - SYMMETRIC_ALGORITHMS - ASYMMETRIC_ALGORITHMS
            if unknown:
                known = ", ".join(sorted(SYMMETRIC_ALGORITHMS | ASYMMETRIC_ALGORITHMS))
                raise ValueError(f"unknown JWT algorithm(s) {sorted(unknown)}; known: {known}")
        return value

    def jwt_allowed_algorithms(self) -> frozenset[str]:
        if self.jwt_algorithms:
            return frozenset(self.jwt_algorithms)
        return frozenset({"HS256", "RS256", "ES256"} if self.jwt_jwks_url else {"HS256"})

    _signing_keys: dict[tuple[str, str], bytes] = PrivateAttr(default_factory=dict)

    def resolved_jwt_secret(self) -> str:
        """The JWT secret: from the environment, else the dev stack's file under data_dir."""
        if self.jwt_secret is not None:
            return self.jwt_secret.get_secret_value()
        path = self.data_dir / DEV_SECRET_FILE
        if path.exists():
            return path.read_text().strip()
        raise RuntimeError(
            "MARQUEE_JWT_SECRET is not set and no dev secret exists: set it, or run `marquee dev` once to create one"
        )

    def ensure_dev_secret(self) -> str:
        """Create the dev stack's JWT secret file once; later runs reuse it."""
        path = self.data_dir / DEV_SECRET_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(48))
            path.chmod(0o600)
        return path.read_text().strip()

    def signing_key(self, purpose: str) -> bytes:
        """A key for one purpose (tracking links, unsubscribe links), derived from the JWT
        secret so that a leaked tracking key cannot mint API tokens."""
        # Asked for every message a campaign sends: derive (and read the dev file) once.
        # Keyed by where the secret comes from too: model_copy shares this cache.
        source = self.jwt_secret.get_secret_value() if self.jwt_secret is not None else str(self.data_dir)
        key = self._signing_keys.get((source, purpose))
        if key is None:
            secret = self.resolved_jwt_secret().encode()
            key = hmac.new(secret, f"marquee:{purpose}".encode(), hashlib.sha256).digest()
            self._signing_keys[(source, purpose)] = key
        return key

    def fernet_key(self) -> bytes:
        if self.secrets_key is not None:
            return self.secrets_key.get_secret_value().encode()
        return base64.urlsafe_b64encode(self.signing_key("provider-secrets"))

    def temporal_ui_base(self) -> str:
        return (self.temporal_ui_url or f"http://127.0.0.1:{self.temporal_ui_port}").rstrip("/")

    @model_validator(mode="after")
    def _public_url_follows_port(self) -> Settings:
        """Unset, the public URL is where this API listens (links in mail must reach it)."""
        if "public_url" not in self.model_fields_set:
            host = "127.0.0.1" if self.api_host in ("0.0.0.0", "::", "") else self.api_host
            # Not an assignment: it would mark the field as set, and TLS would keep http.
            self.__dict__["public_url"] = f"http://{host}:{self.api_port}"
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("MARQUEE_TLS_CERT and MARQUEE_TLS_KEY go together: set both or neither")
        return self

    def temporal_codec_keyring(self) -> list[tuple[str, bytes]]:
        """(key id, key) in order, the encrypting key first; empty: no codec. Checked here
        (at connect), not by a validator: pydantic's errors would print the keys."""
        return parse_codec_keys(self.temporal_codec_keys.get_secret_value()) if self.temporal_codec_keys else []

    @property
    def served_over_tls(self) -> bool:
        """Clients reach the API over TLS: ours, or a proxy's in front (an https public URL)."""
        return self.tls_cert is not None or self.public_url.startswith("https://")

    def codec_server_cors_origins(self) -> list[str]:
        if self.codec_server_origins:
            return self.codec_server_origins
        base = self.temporal_ui_base()
        # The dev Web UI is reached as 127.0.0.1 or localhost alike.
        return [base, base.replace("//127.0.0.1:", "//localhost:")] if "//127.0.0.1:" in base else [base]

    def template_limits(self) -> TemplateLimits:
        return TemplateLimits(
            sms_max_segments=self.sms_max_segments,
            push_max_bytes=self.push_max_bytes,
            email_subject_max_chars=self.email_subject_max_chars,
        )

    @property
    def chdb_path(self) -> Path:
        return self.data_dir / "chdb"

    @property
    def mail_capture_dir(self) -> Path:
        return self.data_dir / "mail"


@lru_cache
def get_settings() -> Settings:
    return Settings()
