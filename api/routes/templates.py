"""Templates: immutable versions, rollback, diff and preview (FR-004, FR-005)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response, status

from api.deps import AnyRole, ConnectionDep, SettingsDep, TemplateEditor
from api.routes.audit import ReasonQuery
from core.schemas import (
    INT32_MAX,
    PreviewEmail,
    PreviewOut,
    PreviewPush,
    PreviewRequest,
    PreviewSms,
    RollbackRequest,
    TemplateCreate,
    TemplateDiff,
    TemplateOut,
    TemplateSummary,
    TemplateUpdate,
    VersionSummary,
)
from services import templates as template_store
from services.templates import VersionRecord

router = APIRouter(prefix="/v1/templates", tags=["templates"])


def _out(record: VersionRecord) -> TemplateOut:
    return TemplateOut(
        key=record.key,
        category=record.category,
        description=record.description,
        version=record.version,
        active_version=record.active_version,
        channels=sorted(record.content.channels()),
        content=record.content,
        author=record.author,
        change_note=record.change_note,
        created_at=record.created_at,
    )


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TemplateOut)
async def create_template(
    body: TemplateCreate, response: Response, conn: ConnectionDep, settings: SettingsDep, editor: TemplateEditor
) -> Any:
    """Create a template; its content is validated first and becomes version 1."""
    record = await template_store.create(
        conn,
        key=body.key,
        category=body.category,
        description=body.description,
        content=body.content,
        author=editor.subject,
        change_note=body.change_note,
        limits=settings.template_limits(),
        actor=editor,
    )
    await conn.commit()
    response.headers["Location"] = f"/v1/templates/{record.key}"
    return _out(record)


@router.get("", response_model=list[TemplateSummary])
async def list_templates(
    conn: ConnectionDep, _: AnyRole, q: str | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> Any:
    rows = await template_store.list_templates(conn, q, limit)
    return [TemplateSummary.model_validate(row._mapping, from_attributes=False) for row in rows]


@router.get("/{key}", response_model=TemplateOut)
async def get_template(key: str, conn: ConnectionDep, _: AnyRole) -> Any:
    return _out(await template_store.get(conn, key))


@router.put("/{key}", response_model=TemplateOut)
async def update_template(
    key: str, body: TemplateUpdate, conn: ConnectionDep, settings: SettingsDep, editor: TemplateEditor
) -> Any:
    """Save a new version and make it active. Runs already started keep their version."""
    record = await template_store.save_version(
        conn,
        key,
        content=body.content,
        author=editor.subject,
        change_note=body.change_note,
        limits=settings.template_limits(),
        category=body.category,
        description=body.description,
        actor=editor,
    )
    await conn.commit()
    return _out(record)


@router.delete("/{key}", status_code=status.HTTP_204_NO_CONTENT)
async def archive_template(key: str, reason: ReasonQuery, conn: ConnectionDep, editor: TemplateEditor) -> Response:
    """Archive: the template disappears from use, its versions stay for the record."""
    await template_store.archive(conn, key, actor=editor, reason=reason)
    await conn.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{key}/versions", response_model=list[VersionSummary])
async def list_versions(key: str, conn: ConnectionDep, _: AnyRole) -> Any:
    return [
        VersionSummary(
            version=record.version,
            active=record.version == record.active_version,
            author=record.author,
            change_note=record.change_note,
            created_at=record.created_at,
        )
        for record in await template_store.history(conn, key)
    ]


@router.get("/{key}/versions/{version}", response_model=TemplateOut)
async def get_version(
    key: str, version: Annotated[int, Path(ge=1, le=INT32_MAX)], conn: ConnectionDep, _: AnyRole
) -> Any:
    return _out(await template_store.get(conn, key, version))


@router.post("/{key}/rollback", response_model=TemplateOut)
async def rollback_template(
    key: str, body: RollbackRequest, conn: ConnectionDep, settings: SettingsDep, editor: TemplateEditor
) -> Any:
    """Make version N's content the new active version (a new version number)."""
    record = await template_store.rollback(
        conn, key, version=body.version, author=editor.subject, reason=body.reason, limits=settings.template_limits(),
        actor=editor,
    )  # fmt: skip
    await conn.commit()
    return _out(record)


@router.get("/{key}/diff", response_model=TemplateDiff)
async def diff_versions(
    key: str,
    conn: ConnectionDep,
    _: AnyRole,
    from_: Annotated[int, Query(alias="from", ge=1, le=INT32_MAX)],
    to: Annotated[int, Query(ge=1, le=INT32_MAX)],
) -> Any:
    old = await template_store.get(conn, key, from_)
    new = await template_store.get(conn, key, to)
    return TemplateDiff(key=key, from_version=from_, to_version=to, parts=template_store.diff(old, new))


@router.post("/{key}/preview", response_model=PreviewOut)
async def preview_template(key: str, body: PreviewRequest, conn: ConnectionDep, _: AnyRole) -> Any:
    """Render every channel part, with the given variables (examples fill the rest) and
    either a real recipient's data or an example recipient."""
    record = await template_store.get(conn, key, body.version)
    rendered = await template_store.preview(
        conn, record.content, variables=body.variables, user_id=body.user_id, locale=body.locale
    )
    return PreviewOut(
        key=key,
        version=record.version,
        locale=rendered.locale,
        email=PreviewEmail(**vars(rendered.email)) if rendered.email else None,
        push=PreviewPush(**vars(rendered.push), payload_bytes=rendered.push.payload_bytes()) if rendered.push else None,
        sms=PreviewSms(**vars(rendered.sms), characters=len(rendered.sms.text)) if rendered.sms else None,
    )
