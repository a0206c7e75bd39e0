"""The audit log (FR-008): search with filters in keyset pages, or export it as CSV.

Read-only, like the log itself (PostgreSQL refuses changes to it). Admins and analysts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.deps import ConnectionDep, permit
from api.problems import InvalidInput
from core.auth import Principal
from core.schemas import DateTime
from services import audit

AuditReader = Annotated[Principal, Depends(permit("audit.read"))]
CSV_MEDIA_TYPE = "text/csv; charset=utf-8"

# Destructive and risky actions (cancel, rollback, delete, replay, provider changes) require a
# reason: a body field where the route takes an action body, else ?reason=. Missing: 422.
REASON_HELP = "Why: kept in the audit log (required for this action)"
Reason = Annotated[str, StringConstraints(min_length=audit.MIN_REASON, max_length=audit.MAX_REASON,
                                          strip_whitespace=True)]  # fmt: skip
ReasonQuery = Annotated[str, Query(min_length=audit.MIN_REASON, max_length=audit.MAX_REASON, description=REASON_HELP)]


class WithReason(BaseModel):
    """The body of an action that needs nothing but its reason."""

    model_config = ConfigDict(extra="forbid")

    reason: Reason = Field(description=REASON_HELP)


router = APIRouter(prefix="/v1/audit", tags=["audit"])


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    role: str
    action: str
    entity: str
    entity_id: str
    reason: str | None = Field(default=None, description="Why: required of destructive and risky actions")
    client_address: str | None = Field(default=None, description="The request's client address; null outside one")
    changes: dict[str, Any] = Field(default_factory=dict, description='{field: {"before": .., "after": ..}}')
    details: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end")


def audit_out(row: Any) -> AuditOut:
    return AuditOut.model_validate(dict(row._mapping))


@router.get(
    "",
    response_model=AuditPage,
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                     "description": "JSON pages, or every matching row as CSV with ?format=csv"}},
)  # fmt: skip
async def list_audit(
    request: Request,
    conn: ConnectionDep,
    _: AuditReader,
    actor: Annotated[str | None, Query(max_length=320, description="Email or token subject")] = None,
    action: Annotated[str | None, Query(max_length=64, description="e.g. dead_letter.replay")] = None,
    entity: Annotated[str | None, Query(max_length=64, description="e.g. dead_letter")] = None,
    entity_id: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[DateTime | None, Query(description="From (inclusive); ISO 8601, UTC without a zone")] = None,
    until: Annotated[DateTime | None, Query(description="To (exclusive)")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    format: Annotated[Literal["json", "csv"], Query(description="csv: every matching row, no paging")] = "json",
) -> Any:
    """Who did what to which object, newest first, in keyset pages."""
    filters = audit.AuditFilter(actor=actor, action=action, entity=entity, entity_id=entity_id, since=since,
                                until=until)  # fmt: skip
    try:
        if format == "csv":
            audit.check(filters)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            return StreamingResponse(
                _csv(request, filters),
                media_type=CSV_MEDIA_TYPE,
                headers={"Content-Disposition": f'attachment; filename="marquee-audit-{stamp}.csv"'},
            )
        page = await audit.search(conn, filters, limit=limit, cursor=cursor)
    except audit.InvalidFilter as err:
        raise InvalidInput([err.field], err.message) from err
    return AuditPage(items=[audit_out(row) for row in page.rows], next_cursor=page.next_cursor)


async def _csv(request: Request, filters: audit.AuditFilter) -> AsyncIterator[str]:
    yield audit.csv_header()
    async for row in audit.export(request.app.state.engine, filters):
        yield audit.csv_row(row)
