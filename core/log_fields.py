"""What a log line or an error report carries: our ids, the trace, and no personal data."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import structlog
from opentelemetry import trace
from temporalio import activity

# The ids a line (and a Sentry event) is labelled with when known.
ID_FIELDS = ("notification_id", "campaign_id", "run_id", "workflow_id")

_EMAIL = re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"\+\d{7,15}\b")
# Push tokens (FCM, APNs) are long opaque runs; nothing else we log looks like one.
_TOKEN = re.compile(r"[A-Za-z0-9_:-]{64,}")


def redact(text: str) -> str:
    """Email addresses, phone numbers and push tokens in free text (a provider's error
    message, an SMTP reply) replaced by what they were."""
    return _TOKEN.sub("[token]", _PHONE.sub("[phone]", _EMAIL.sub("[email]", text)))


def redact_values(value: Any) -> Any:
    """`redact` applied to every string in a structure of dicts and lists."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_values(item) for item in value]
    return value


def ids_of(request: object) -> dict[str, str]:
    """The notification / campaign / run ids an activity's input carries."""
    return {name: str(value) for name in ID_FIELDS if (value := getattr(request, name, None)) is not None}


@contextmanager
def bound_ids(**ids: object) -> Iterator[None]:
    """Label every line logged inside (by any logger) with these ids."""
    with structlog.contextvars.bound_contextvars(**{key: str(value) for key, value in ids.items() if value}):
        yield


def current_trace_ids() -> dict[str, str]:
    """trace_id and span_id of the OpenTelemetry span in progress, if one is recording."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


def bound_activity_ids(request: object) -> AbstractContextManager[None]:
    """The ids of an activity's input and its workflow's id, on every line it logs."""
    return bound_ids(**ids_of(request), workflow_id=activity.info().workflow_id)
