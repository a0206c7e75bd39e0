"""The Temporal client, configured the same way by the API, the worker and the CLI."""

from __future__ import annotations

import dataclasses

import structlog
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from core.codec import EncryptionCodec
from core.config import Settings
from core.logging import TEMPORAL_CORE_LOGGING
from core.sentry import SentryInterceptor
from core.tracing import temporal_interceptors

logger = structlog.get_logger("marquee.temporal")

# One Runtime per metrics address: each binds its Prometheus port, and every client of the
# process (the API's and the worker's in the dev stack) shares it.
_runtimes: dict[str, Runtime] = {}


def metrics_runtime(address: str | None) -> Runtime | None:
    """The SDK runtime serving its own metrics (polls, task latencies, slots, request
    failures) in Prometheus format on `address`; None (the SDK's default runtime) when unset."""
    if not address:
        return None
    if address not in _runtimes:
        prometheus = PrometheusConfig(bind_address=address, durations_as_seconds=True)
        # The SDK core's own warnings keep going through our log formatter.
        _runtimes[address] = Runtime(telemetry=TelemetryConfig(metrics=prometheus, logging=TEMPORAL_CORE_LOGGING))
    return _runtimes[address]


def temporal_address(settings: Settings) -> str:
    return settings.temporal_address or f"127.0.0.1:{settings.temporal_port}"


def data_converter(settings: Settings) -> DataConverter:
    """Pydantic models as JSON, encrypted when codec keys are set (core.codec). Failure
    messages and stack traces then move into the encrypted attributes too: an SMTP reply
    quoting an address must not sit in the history in clear either."""
    keys = settings.temporal_codec_keyring()
    if not keys:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=EncryptionCodec(keys),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


async def connect(settings: Settings) -> Client:
    converter = data_converter(settings)
    if converter.payload_codec is None and not settings.dev_tools:
        logger.warning("temporal payloads are stored in clear: MARQUEE_TEMPORAL_CODEC_KEYS is not set")
    return await Client.connect(
        temporal_address(settings),
        namespace=settings.temporal_namespace,
        data_converter=converter,
        # Sentry's after tracing: inside the activity's span, so its events carry the trace id.
        interceptors=[*temporal_interceptors(), SentryInterceptor()],
        runtime=metrics_runtime(settings.temporal_metrics_address),
    )
