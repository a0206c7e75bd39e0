"""OpenTelemetry tracing: one trace from the HTTP request to the provider's reply.

Off unless an OTLP endpoint is configured (MARQUEE_OTLP_ENDPOINT, or the standard
OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). Then `configure_tracing`,
called once at process start by `marquee api`, `marquee worker` and `marquee dev`, installs
an SDK tracer provider exporting over OTLP/HTTP and instruments httpx; the app, the
engine and the Temporal client are instrumented where they are built (`instrument_app`,
`instrument_engine`, `temporal_interceptors`). Off, none of that happens and the spans of
our own (`provider_call`, `campaign_batch`) go to OpenTelemetry's no-op tracer.

Spans carry names, ids, counts and outcomes, never an address, a title or a body.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span as Span  # re-exported: services annotate the spans they are given
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Interceptor
from temporalio.contrib.opentelemetry import TracingInterceptor

from core.config import Settings

# Attribute names of our own spans (docs/observability.md lists them).
PROVIDER = "marquee.provider"
PROVIDER_KIND = "marquee.provider.kind"
CHANNEL = "marquee.channel"
OUTCOME = "marquee.outcome"
CAMPAIGN_ID = "marquee.campaign.id"
RUN_ID = "marquee.campaign.run_id"
BATCH_SIZE = "marquee.batch.size"
BATCH_MESSAGES = "marquee.batch.messages"
BATCH_LANE = "marquee.batch.lane"

# Probes and scrapes every few seconds would bury the traces worth reading.
UNTRACED_URLS = "/healthz,/readyz,/metrics"

_tracer = trace.get_tracer("marquee")
_provider: TracerProvider | None = None


def otlp_traces_endpoint(settings: Settings) -> str | None:
    """Where spans are posted, or None when tracing is off."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or env.get("OTEL_TRACES_EXPORTER") == "none":
        return None
    if settings.otlp_endpoint:
        return settings.otlp_endpoint.rstrip("/") + "/v1/traces"
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"
    return None


def configure_tracing(settings: Settings, service: str) -> bool:
    """Install this process's exporting tracer provider, named `service` unless
    MARQUEE_OTEL_SERVICE_NAME or OTEL_SERVICE_NAME says otherwise. Returns whether tracing is on.
    The exporter reads the other OTEL_EXPORTER_OTLP_* variables (headers, timeout,
    certificate, compression), the provider OTEL_TRACES_SAMPLER* and OTEL_RESOURCE_ATTRIBUTES."""
    global _provider
    endpoint = otlp_traces_endpoint(settings)
    if _provider is not None or endpoint is None:
        return _provider is not None
    name = settings.otel_service_name or os.environ.get("OTEL_SERVICE_NAME") or service
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    HTTPXClientInstrumentor().instrument()  # the FCM and SMS providers' clients, built later
    _provider = provider
    return True


def shutdown_tracing() -> None:
    """Export the spans still buffered: the CLI leaves some commands with os._exit, which
    skips the SDK's own exit handler."""
    if _provider is not None:
        _provider.shutdown()


@contextmanager
def tracing(settings: Settings, service: str) -> Iterator[None]:
    """Tracing for the life of a process's main call (see configure_tracing)."""
    configure_tracing(settings, service)
    try:
        yield
    finally:
        shutdown_tracing()


def is_on() -> bool:
    return _provider is not None


def instrument_app(app: FastAPI) -> None:
    if _provider is not None:
        # Without the ASGI receive/send sub-spans: two per request, nothing to learn from them.
        FastAPIInstrumentor.instrument_app(app, excluded_urls=UNTRACED_URLS, exclude_spans=["receive", "send"])


def instrument_engine(engine: AsyncEngine) -> None:
    """SQL statements as spans (the statement's text, never its parameters). The
    instrumentor takes one engine per process: the API and the worker each have one, and
    the dev stack shares its one."""
    instrumentor = SQLAlchemyInstrumentor()
    if _provider is not None and not instrumentor.is_instrumented_by_opentelemetry:
        # Its declared range stops below SQLAlchemy 2.1, which it traces fine (tested).
        instrumentor.instrument(engine=engine.sync_engine, skip_dep_check=True)


def temporal_interceptors() -> list[Interceptor]:
    """For the Temporal client: its spans (StartWorkflow, RunWorkflow, StartActivity,
    RunActivity) carry the trace through the server's headers to every worker built from it."""
    return [TracingInterceptor()] if _provider is not None else []


@contextmanager
def provider_call(provider: str, kind: str, channel: str) -> Iterator[Span]:
    """One provider call (an SMTP transaction, an FCM or SMS API request); the caller sets
    the outcome with `finished`."""
    attributes = {PROVIDER: provider, PROVIDER_KIND: kind, CHANNEL: channel}
    # Exceptions are not recorded: a provider's error message may quote the address.
    with _tracer.start_as_current_span(
        f"{kind} send", kind=SpanKind.CLIENT, attributes=attributes, record_exception=False,
        set_status_on_exception=False,
    ) as span:  # fmt: skip
        yield span


def finished(span: Span, outcome: str, error: BaseException | None = None) -> None:
    span.set_attribute(OUTCOME, outcome)
    if error is not None:
        span.set_attribute("error.type", type(error).__name__)
        span.set_status(Status(StatusCode.ERROR))


@contextmanager
def campaign_batch(
    campaign_id: str, run_id: str, channels: Sequence[str], providers: Sequence[str], lane: str
) -> Iterator[Span]:
    """One campaign batch: the provider calls it makes are its children. The caller adds
    the size once it knows it, and the batch's result counts."""
    attributes = {CAMPAIGN_ID: campaign_id, RUN_ID: run_id, CHANNEL: list(channels), PROVIDER: list(providers),
                  BATCH_LANE: lane}  # fmt: skip
    with _tracer.start_as_current_span(
        "campaign batch", attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except BaseException as err:  # the message may quote a provider's reply: only its class
            finished(span, "interrupted", err)
            raise
        span.set_attribute(OUTCOME, "done")
