"""Structured logs (structlog) for our loggers, the Temporal SDK's and uvicorn's alike.

MARQUEE_LOG_FORMAT=json: one ECS document per line on stdout (@timestamp, log.level,
log.logger, message, trace.id, span.id, labels.notification_id / campaign_id / workflow_id),
which Elasticsearch ingests without a mapping. text: readable lines on stderr, for a terminal
(stdout stays the dev stack's banner). Personal data never belongs in a log line: log ids,
not addresses or content; core.log_fields.redact is the safety net for a provider's error text.
Sentry (core.sentry) is initialised here too, when MARQUEE_SENTRY_DSN is set.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from ecs_logging import StructlogFormatter
from temporalio.runtime import LogForwardingConfig, LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter

from core.config import Settings
from core.log_fields import ID_FIELDS, current_trace_ids, redact_values
from core.sentry import init_sentry

# The Temporal SDK's Rust core writes its own lines to stderr unless they are forwarded to a
# Python logger: warnings and errors, through our formatter. A Runtime built elsewhere (the
# metrics one in core.temporal) should pass this too.
TEMPORAL_CORE_LOGGING = LoggingConfig(
    filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
    forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")),
)


def _add_trace_ids(_: Any, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    for key, value in current_trace_ids().items():
        event.setdefault(key, value)
    return event


def _add_temporal_ids(_: Any, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """The workflow id of the Temporal SDK's own activity and workflow lines (its `extra`)."""
    record = event.get("_record")
    for extra in ("temporal_activity", "temporal_workflow"):
        details = getattr(record, extra, None)
        if isinstance(details, dict) and details.get("workflow_id"):
            event.setdefault("workflow_id", details["workflow_id"])
    return event


def _redact_event(_: Any, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    return {key: redact_values(value) if not key.startswith("_") else value for key, value in event.items()}


def _ecs_fields(_: Any, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """Our keys under their ECS names (dotted keys become objects in the formatter)."""
    renames = {"timestamp": "@timestamp", "level": "log.level", "logger": "log.logger",
               "trace_id": "trace.id", "span_id": "span.id"}  # fmt: skip
    for old, new in renames.items():
        if old in event:
            event[new] = event.pop(old)
    for name in ID_FIELDS:
        if name in event:
            event[f"labels.{name}"] = event.pop(name)
    if isinstance(event.get("error"), str):  # `error` is an object in ECS
        event["error.message"] = event.pop("error")
    return event


# Typed for structlog's processor list (the formatter annotates its event as a plain dict).
_ecs_json: structlog.typing.Processor = StructlogFormatter()  # type: ignore[assignment]


def configure_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    json_lines = settings.log_as_json
    # Run for structlog's lines and for the standard library's (Temporal SDK, uvicorn, ...).
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
    ]
    rendering: list[structlog.typing.Processor] = (
        [structlog.processors.format_exc_info, _redact_event, _ecs_fields, _ecs_json]
        if json_lines
        else [_redact_event, structlog.dev.ConsoleRenderer(colors=False)]
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _add_temporal_ids],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
    )
    handler = logging.StreamHandler(sys.stdout if json_lines else sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn (with log_config=None) and the Temporal SDK only propagate to the root handler.
    for name in ("uvicorn", "uvicorn.error", "temporalio"):
        logging.getLogger(name).handlers[:] = []
    # Per-command chatter of the capture SMTP server and Alembic drowns the useful lines.
    for noisy in ("uvicorn.access", "mail.log", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The SDK's worker logs each activity completion at DEBUG with its payloads (addresses,
    # names, titles, bodies): never below INFO, whatever MARQUEE_LOG_LEVEL says.
    logging.getLogger("temporalio.worker").setLevel(max(level, logging.INFO))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    Runtime.set_default(Runtime(telemetry=TelemetryConfig(logging=TEMPORAL_CORE_LOGGING)), error_if_already_set=False)
    init_sentry(settings)
