"""Domain errors: what went wrong, in the domain's words. Services raise them; each edge
maps them once (the API to problem+json, the admin to form errors, activities to
Temporal's ApplicationError, the CLI to a message)."""

from __future__ import annotations


class DomainError(Exception):
    """Base of the errors a service raises on purpose; `title` is a short summary."""

    title = "Error"

    def __init__(self, detail: str, *, title: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if title is not None:
            self.title = title


class NotFound(DomainError):
    title = "Not found"


class Invalid(DomainError):
    """Bad input, naming every field at fault: [(dotted field, message), ...]."""

    title = "Invalid request"

    def __init__(self, problems: list[tuple[str, str]], *, title: str | None = None) -> None:
        super().__init__("; ".join(f"{field}: {message}" for field, message in problems), title=title)
        self.problems = problems

    @classmethod
    def field(cls, field: str, message: str) -> Invalid:
        return cls([(field, message)])


class Conflict(DomainError):
    """The request cannot apply to the current state (a reused key, a finished run)."""

    title = "Conflict"


class Unavailable(DomainError):
    """A dependency (Temporal, a provider) did not answer, or the service is over capacity;
    retrying later may work (after `retry_after` seconds, when it is known)."""

    title = "Unavailable"

    def __init__(self, detail: str, *, title: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(detail, title=title)
        self.retry_after = retry_after


class StillRunning(DomainError):
    """A wait for an outcome ran out of time; the operation goes on."""

    title = "Still in progress"
