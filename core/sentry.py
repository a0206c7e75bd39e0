"""Errors to Sentry when MARQUEE_SENTRY_DSN is set: the API's unhandled exceptions (the
SDK's FastAPI integration, automatic once initialised) and the worker's activity and
workflow failures (SentryInterceptor, on every client core.temporal.connect builds, so on
every worker built from one). Events are tagged with the notification / campaign / run id,
the workflow id and the OpenTelemetry trace id, and carry no personal data: no PII by
default, no request bodies or local variables, our sensitive fields dropped, addresses and
tokens in messages redacted, and an activity's own address, title and body removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import sentry_sdk
import structlog
from pydantic import BaseModel
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber
from sentry_sdk.types import Event, Hint
from temporalio import activity, client, workflow
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    ExecuteWorkflowInput,
    Interceptor,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

from core.config import Settings
from core.log_fields import ID_FIELDS, current_trace_ids, ids_of, redact_values

# Fields of our inputs, rows and requests that hold an address or a message's content.
SENSITIVE_FIELDS = ("address", "email", "phone", "push_tokens", "dead_push_tokens", "title", "body", "data",
                    "variables", "html", "text", "subject")  # fmt: skip


def init_sentry(settings: Settings) -> bool:
    """Initialise the process's Sentry client if a DSN is set; say whether it was."""
    if not settings.sentry_dsn:
        return False
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment,
        send_default_pii=False,
        include_local_variables=False,  # a frame's locals hold messages and addresses
        max_request_body_size="never",  # request bodies hold recipients and content
        event_scrubber=EventScrubber(denylist=[*DEFAULT_DENYLIST, *SENSITIVE_FIELDS], recursive=True),
        before_send=scrub_event,
        before_breadcrumb=lambda crumb, _: redact_values(crumb),
    )
    return True


def scrub_event(event: Event, _: Hint | None = None) -> Event:
    """Tag the event with the ids and trace in context, then redact addresses and tokens in
    every string (exception messages quote SMTP replies and providers' errors)."""
    tags = event.setdefault("tags", {})
    context = structlog.contextvars.get_contextvars()
    for name in ID_FIELDS:
        if name in context:
            tags.setdefault(name, str(context[name]))
    trace_ids = current_trace_ids()
    if "trace_id" in trace_ids:
        tags.setdefault("trace_id", trace_ids["trace_id"])
    scrubbed: Event = redact_values(event)
    return scrubbed


def _sensitive_values(value: Any, sensitive: bool = False) -> Iterator[str]:
    """Every string under a sensitive field of an input (model or JSON structure)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _sensitive_values(item, sensitive or key in SENSITIVE_FIELDS)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _sensitive_values(item, sensitive)
    elif sensitive and isinstance(value, str) and len(value) >= 3:
        yield value


def _without(values: set[str], value: Any) -> Any:
    if isinstance(value, str):
        for secret in values:
            value = value.replace(secret, "[redacted]")
        return value
    if isinstance(value, dict):
        return {key: _without(values, item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without(values, item) for item in value]
    return value


def _report(error: BaseException, kind: str, name: str, args: Iterable[Any], tags: dict[str, str]) -> None:
    """Send `error` with the ids of the first input that has any, and none of its content."""
    inputs = list(args)
    ids = next((found for arg in inputs if (found := ids_of(arg))), {})
    secrets = {text for arg in inputs for text in _sensitive_values(arg)}
    with sentry_sdk.new_scope() as scope:
        for key, value in {**ids, **tags, f"temporal.{kind}": name}.items():
            scope.set_tag(key, value)
        scope.fingerprint = [f"temporal-{kind}", name, type(error).__name__, getattr(error, "type", None) or ""]
        scope.level = "warning" if isinstance(error, ApplicationError) else "error"
        if secrets:
            scope.add_event_processor(lambda event, _: _without(secrets, event))
        scope.capture_exception(error)


def _final(error: BaseException, info: activity.Info) -> bool:
    """Whether Temporal gives up on the activity after this attempt: expected retries
    (a busy provider, a transient error) are not worth an event each."""
    if not isinstance(error, ApplicationError):
        return True  # not one of ours: a bug or an outage, reported on every attempt
    if error.non_retryable:
        return True
    policy = info.retry_policy
    return bool(policy and policy.maximum_attempts and info.attempt >= policy.maximum_attempts)


class _ActivityInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await super().execute_activity(input)
        except Exception as error:
            info = activity.info()
            if sentry_sdk.is_initialized() and _final(error, info):
                _report(error, "activity", info.activity_type, input.args,
                        {"workflow_id": info.workflow_id or "", **_trace_tag()})  # fmt: skip
            raise


class _WorkflowInbound(WorkflowInboundInterceptor):
    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        try:
            return await super().execute_workflow(input)
        except Exception as error:
            # A replay re-raises what was reported when the failure first happened.
            if not workflow.unsafe.is_replaying():
                info = workflow.info()
                with workflow.unsafe.sandbox_unrestricted():
                    if sentry_sdk.is_initialized():
                        _report(error, "workflow", info.workflow_type, input.args,
                                {"workflow_id": info.workflow_id, **_trace_tag()})  # fmt: skip
            raise


def _trace_tag() -> dict[str, str]:
    trace_ids = current_trace_ids()
    return {"trace_id": trace_ids["trace_id"]} if trace_ids else {}


class SentryInterceptor(client.Interceptor, Interceptor):
    """Reports activity failures Temporal will not retry and failed workflows; a no-op
    while Sentry is not initialised. Given to the client, it reaches its workers."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityInbound(next)

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor]:
        return _WorkflowInbound
