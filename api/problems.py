"""Errors as RFC 9457 problem details (application/problem+json), mapped once here."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import Conflict, DomainError, Invalid, NotFound, StillRunning, Unavailable
from core.templating import TemplateInvalid
from services.audit import ReasonRequired
from services.campaign_store import SegmentNotFound
from services.campaigns import CampaignInvalid, CampaignNotFound, CampaignStateError
from services.segments import NotStatic, SegmentExists
from services.templates import PreviewFailed, TemplateExists, TemplateNotFound, problems_as_errors

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """A domain error that the API answers as a problem response."""

    def __init__(
        self, status: int, title: str, detail: str | None = None, errors: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors


class InvalidInput(Problem):
    """422 naming the field at fault, in the same shape as a validation error."""

    def __init__(self, field: list[str | int], message: str) -> None:
        super().__init__(422, "Invalid request", message, errors=[{"field": _dotted(field), "message": message}])


def problem_response(
    status: int,
    title: str,
    detail: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _dotted(location: list[str | int] | tuple[str | int, ...]) -> str:
    parts = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or str(location[0]) if location else ""


# Domain errors by kind; a subclass answers as its nearest listed base.
DOMAIN_STATUS: dict[type[DomainError], int] = {
    NotFound: 404,
    Invalid: 422,
    Conflict: 409,
    Unavailable: 503,
    StillRunning: 504,
}


def domain_status(exc: DomainError) -> int:
    return next((DOMAIN_STATUS[kind] for kind in type(exc).__mro__ if kind in DOMAIN_STATUS), 400)


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        errors = (
            [{"field": field, "message": message} for field, message in exc.problems]
            if isinstance(exc, Invalid)
            else None
        )
        return problem_response(domain_status(exc), exc.title, exc.detail, errors)

    @app.exception_handler(ReasonRequired)
    async def _reason_required(_: Request, exc: ReasonRequired) -> JSONResponse:
        return problem_response(422, "Invalid request", str(exc), [{"field": "reason", "message": str(exc)}])

    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.title, exc.detail, exc.errors)

    @app.exception_handler(TemplateInvalid)
    async def _template_invalid(_: Request, exc: TemplateInvalid) -> JSONResponse:
        detail = f"{len(exc.problems)} problem(s): {exc}"
        return problem_response(422, "Template is invalid", detail, problems_as_errors(exc.problems))

    @app.exception_handler(TemplateNotFound)
    async def _template_missing(_: Request, exc: TemplateNotFound) -> JSONResponse:
        return problem_response(404, "Not found", f"no template {exc}")

    @app.exception_handler(TemplateExists)
    async def _template_exists(_: Request, exc: TemplateExists) -> JSONResponse:
        return problem_response(409, "Template exists", f"a template with key {exc} exists already")

    @app.exception_handler(CampaignNotFound)
    async def _campaign_missing(_: Request, exc: CampaignNotFound) -> JSONResponse:
        return problem_response(404, "Not found", f"no campaign {exc}")

    @app.exception_handler(SegmentNotFound)
    async def _segment_missing(_: Request, exc: SegmentNotFound) -> JSONResponse:
        return problem_response(404, "Not found", f"no segment {exc}")

    @app.exception_handler(SegmentExists)
    async def _segment_exists(_: Request, exc: SegmentExists) -> JSONResponse:
        return problem_response(409, "Segment exists", f"a segment named {str(exc)!r} exists already")

    @app.exception_handler(NotStatic)
    async def _segment_not_static(_: Request, exc: NotStatic) -> JSONResponse:
        return problem_response(409, "Not a static segment", "members can be added to static segments only")

    @app.exception_handler(PreviewFailed)
    async def _preview_failed(_: Request, exc: PreviewFailed) -> JSONResponse:
        errors = [{"field": problem.part, "message": problem.message} for problem in exc.problems]
        return problem_response(422, "Preview failed", str(exc), errors)

    @app.exception_handler(CampaignStateError)
    async def _campaign_state(_: Request, exc: CampaignStateError) -> JSONResponse:
        return problem_response(409, "Not possible now", str(exc))

    @app.exception_handler(CampaignInvalid)
    async def _campaign_invalid(_: Request, exc: CampaignInvalid) -> JSONResponse:
        return problem_response(422, "Invalid request", exc.message, [{"field": exc.field, "message": exc.message}])

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _dotted(tuple(err["loc"])), "message": err["msg"]} for err in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem_response(422, "Invalid request", detail, errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {
            401: "Unauthorized",
            403: "Forbidden",
            404: "Not found",
            405: "Method not allowed",
            413: "Content too large",
            429: "Too many requests",
            503: "Service unavailable",
        }
        return problem_response(
            exc.status_code,
            titles.get(exc.status_code, "Error"),
            str(exc.detail),
            headers=getattr(exc, "headers", None),
        )
