"""Errors as RFC 9457 problem details (application/problem+json), mapped once here."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import Conflict, DomainError, Invalid, NotFound, StillRunning, Unavailable
from core.templating import TemplateInvalid
from services.campaign_store import SegmentNotFound
from services.campaigns import CampaignInvalid, CampaignNotFound, CampaignStateError
from services.segments import NotStatic, SegmentExists
from services.templates import PreviewFailed, TemplateExists, TemplateNotFound, problems_as_errors

PROBLEM_JSON = "application/problem+json"

# The body of every error answer, as the OpenAPI shows it (components/schemas/Problem).
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; `errors` names each field at fault.",
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}

# Which problem answers an operation documents: (status, description, applies to it).
# `guarded`: it takes a bearer token; `mutating`: not a read; the rest read the operation.
_Facts = dict[str, Any]
PROBLEM_ANSWERS: list[tuple[int, str, Callable[[_Facts], bool]]] = [
    (400, "The body is not valid JSON", lambda op: op["body"]),
    (401, "No bearer token, or one that is not valid", lambda op: op["guarded"]),
    (403, "The token's role may not do this (the permission table, core.permissions)", lambda op: op["guarded"]),
    (404, "Not found", lambda op: op["path_parameters"]),
    (409, "Not possible in the current state", lambda op: op["guarded"] and op["mutating"]),
    (413, "The request body is too large", lambda op: op["body"]),
    (422, "Invalid request: `errors` names each field at fault", lambda op: op["parameters"] or op["body"]),
    (429, "Too many requests: retry after `Retry-After` seconds", lambda op: op["rate_limited"]),
    (503, "A dependency (Temporal, the token keys, analytics) is unavailable", lambda op: op["guarded"]),
]


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


# PostgreSQL stores no NUL character in text or jsonb: such a string is refused up front (422
# naming it), and the OpenAPI says so with this pattern on every free-form string.
NO_NUL_PATTERN = "^[^\\u0000]*$"


def _nul_at(value: Any, at: list[str | int]) -> list[str | int] | None:
    """Where the first string (or object key) holding a NUL is, or None."""
    if isinstance(value, str):
        return at if "\x00" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and "\x00" in key:
            return [*at, "[key]"]
        found = _nul_at(item, [*at, key])
        if found is not None:
            return found
    return None


async def refuse_nul(request: Request) -> None:
    """A dependency of every route: NUL in a path or query parameter or in a body is a 422
    before the route runs (and so before anything is written)."""
    for kind, params in (("path", list(request.path_params.items())), ("query", request.query_params.multi_items())):
        for name, value in params:
            if isinstance(value, str) and "\x00" in value:
                raise InvalidInput([kind, name], "must not contain the NUL character")
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    body = await request.body()  # starlette keeps it: the route reads the same bytes
    form = request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
    if b"\x00" in body or (form and b"%00" in body):
        raise InvalidInput(["body"], "must not contain the NUL character")
    if b"\\u0000" in body:  # JSON's escape for NUL (or an escaped backslash: parsing tells)
        try:
            found = _nul_at(json.loads(body), [])
        except ValueError:
            return  # not JSON: the route answers for that
        if found is not None:
            raise InvalidInput(["body", *found], "must not contain the NUL character")


async def refuse_misrouted(request: Request) -> None:
    """A dependency of every route, for what the OpenAPI says and routing alone does not do:
    a method a literal path does not take is a 405, also where a parameterised path's route
    caught it (GET /v1/segments/count is not GET /v1/segments/{segment_id}); a query
    parameter given twice where the OpenAPI takes one value is a 422 (not its last value)."""
    route = request.scope.get("route")
    template = getattr(route, "path_format", None)
    if not isinstance(template, str):
        return
    paths: dict[str, Any] = request.app.openapi().get("paths", {})
    literal = paths.get(request.scope.get("path", ""))
    if "{" in template and literal is not None and request.method.lower() not in literal:
        raise StarletteHTTPException(405, headers={"Allow": ", ".join(sorted(m.upper() for m in literal))})
    names = [name for name, _ in request.query_params.multi_items()]
    repeated = {name for name in names if names.count(name) > 1}
    if repeated:
        operation = paths.get(template, {}).get(request.method.lower(), {})
        for parameter in operation.get("parameters", []):
            if parameter.get("in") == "query" and parameter["name"] in repeated and not _takes_list(parameter):
                raise InvalidInput(["query", parameter["name"]], "must be given once")


def _takes_list(parameter: dict[str, Any]) -> bool:
    schema = parameter.get("schema", {})
    return any(option.get("type") == "array" for option in [schema, *schema.get("anyOf", [])])


def document(app: FastAPI, *, rate_limited: Callable[[str, str], bool]) -> None:
    """Serve an OpenAPI in which every operation declares its problem answers (see
    PROBLEM_ANSWERS) as application/problem+json with the Problem schema, in place of
    FastAPI's HTTPValidationError: the answers the handlers below give. Generic, so a new
    route is documented without a word of its own; `rate_limited(method, path)` tells the
    operations the rate limiter counts."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _add_problems(generate(), rate_limited)  # generate() caches the schema; amend it once
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def _add_problems(schema: dict[str, Any], rate_limited: Callable[[str, str], bool]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _forbid_nul(components)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            _forbid_nul(operation.get("parameters", []))
            _forbid_nul(operation.get("requestBody", {}))
    components["Problem"] = PROBLEM_SCHEMA
    content = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            parameters = operation.get("parameters", [])
            facts = {
                "guarded": bool(operation.get("security")),
                "mutating": method not in ("get", "head", "options"),
                "path_parameters": any(p.get("in") == "path" for p in parameters),
                "parameters": bool(parameters),
                "body": "requestBody" in operation,
                "rate_limited": rate_limited(method.upper(), path),
            }
            responses = operation.setdefault("responses", {})
            for status, description, applies in PROBLEM_ANSWERS:
                if applies(facts) or str(status) in responses:
                    answer = responses.setdefault(str(status), {"description": description})
                    if status == 422:
                        answer["description"] = description
                        answer["content"] = content
                    answer.setdefault("content", content)
                    if status == 429:
                        answer["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
            # A route's own 4xx without a body of its own is a problem too (e.g. a 400).
            for status, answer in responses.items():
                if status.startswith("4"):
                    answer.setdefault("content", content)
    if not _refers(schema.get("paths"), "#/components/schemas/HTTPValidationError"):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)


def _forbid_nul(node: Any) -> None:
    """Add NO_NUL_PATTERN to every string schema that has no pattern, format or enum of its own."""
    if isinstance(node, dict):
        if node.get("type") == "string" and not node.keys() & {"pattern", "format", "enum", "const"}:
            node["pattern"] = NO_NUL_PATTERN
        if node.get("type") == "object" and node.get("additionalProperties") and "propertyNames" not in node:
            node["propertyNames"] = {"pattern": NO_NUL_PATTERN}
        for value in node.values():
            _forbid_nul(value)
    elif isinstance(node, list):
        for value in node:
            _forbid_nul(value)


def _refers(node: Any, ref: str) -> bool:
    if isinstance(node, dict):
        return node.get("$ref") == ref or any(_refers(value, ref) for value in node.values())
    if isinstance(node, list):
        return any(_refers(value, ref) for value in node)
    return False


def install(app: FastAPI) -> None:
    """Answer every error as a problem; call before the routers are included (the NUL check
    is a dependency of each route included after)."""
    app.router.dependencies.append(Depends(refuse_nul))
    app.router.dependencies.append(Depends(refuse_misrouted))

    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        errors = (
            [{"field": field, "message": message} for field, message in exc.problems]
            if isinstance(exc, Invalid)
            else None
        )
        retry = exc.retry_after if isinstance(exc, Unavailable) else None
        headers = {"Retry-After": str(retry)} if retry is not None else None
        return problem_response(domain_status(exc), exc.title, exc.detail, errors, headers)

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
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {
            401: "Unauthorized",
            403: "Forbidden",
            404: "Not found",
            405: "Method not allowed",
            413: "Content too large",
            429: "Too many requests",
            503: "Service unavailable",
        }
        headers = getattr(exc, "headers", None)
        allowed = _allowed_methods(app, request) if exc.status_code == 405 else None
        if allowed:
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return problem_response(exc.status_code, titles.get(exc.status_code, "Error"), str(exc.detail), headers=headers)


def _allowed_methods(app: FastAPI, request: Request) -> list[str] | None:
    """Every method the OpenAPI gives the request's path: Starlette's 405 names only those of
    the first route whose path matched, while a path's methods are often split across routes.
    None for a path the OpenAPI does not have."""
    path = request.scope.get("path", "")
    found = [(template.count("{"), operations) for template, operations in app.openapi().get("paths", {}).items()
             if re.fullmatch(re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(template)), path)]  # fmt: skip
    if not found:
        return None
    # /v1/notifications/scheduled is that path, not /v1/notifications/{id}: the fewest parameters win.
    _, operations = min(found, key=lambda item: item[0])
    return sorted(method.upper() for method in operations)
