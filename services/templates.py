"""Templates in PostgreSQL: immutable versions, one active; rollback, diff, archive."""

from __future__ import annotations

import difflib
import json
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from core.models import Template, TemplateVersion
from core.queries import recipients
from core.templating import (
    Problem,
    Rendered,
    RenderError,
    TemplateContent,
    TemplateInvalid,
    TemplateLimits,
    coerce_variables,
    recipient_context,
    render,
    validate,
)
from services import audit
from services.audit import Actor, record_action, required_reason

templates = Template.__table__  # type: ignore[attr-defined]
versions = TemplateVersion.__table__  # type: ignore[attr-defined]


class TemplateNotFound(Exception):
    pass


class TemplateExists(Exception):
    pass


@dataclass(frozen=True)
class VersionRecord:
    key: str
    category: str
    description: str
    version: int
    active_version: int
    content: TemplateContent
    author: str
    change_note: str
    created_at: datetime


def check(content: TemplateContent, limits: TemplateLimits) -> None:
    """Raise TemplateInvalid listing every problem; nothing is stored when it raises."""
    problems = validate(content, limits)
    if problems:
        raise TemplateInvalid(problems)


async def _template_row(conn: AsyncConnection, key: str, *, lock: bool = False) -> sa.Row[Any]:
    query = sa.select(templates).where(templates.c.key == key, templates.c.archived_at.is_(None))
    row = (await conn.execute(query.with_for_update() if lock else query)).first()
    if row is None:
        raise TemplateNotFound(key)
    return row


def _record(template: sa.Row[Any], version: sa.Row[Any]) -> VersionRecord:
    return VersionRecord(
        key=template.key,
        category=template.category,
        description=template.description,
        version=version.version,
        active_version=template.active_version,
        content=TemplateContent.model_validate(version.content),
        author=version.author,
        change_note=version.change_note,
        created_at=version.created_at,
    )


async def create(
    conn: AsyncConnection,
    *,
    key: str,
    category: str,
    description: str,
    content: TemplateContent,
    author: str,
    change_note: str,
    limits: TemplateLimits,
    actor: Actor | None = None,
) -> VersionRecord:
    check(content, limits)
    exists = await conn.scalar(sa.select(templates.c.archived_at.is_(None)).where(templates.c.key == key))
    if exists is not None:
        raise TemplateExists(key)
    try:
        template_id = await conn.scalar(
            templates.insert()
            .values(key=key, category=category, description=description, active_version=1)
            .returning(templates.c.id)
        )
    except sa.exc.IntegrityError as err:
        raise TemplateExists(key) from err  # created by another request since the check
    await conn.execute(
        versions.insert().values(
            template_id=template_id,
            version=1,
            content=content.model_dump(mode="json"),
            author=author,
            change_note=change_note,
        )
    )
    await record_action(conn, actor, "template.create", "template", key, {"version": 1, "category": category})
    return await get(conn, key)


async def save_version(
    conn: AsyncConnection,
    key: str,
    *,
    content: TemplateContent,
    author: str,
    change_note: str,
    limits: TemplateLimits,
    category: str | None = None,
    description: str | None = None,
    actor: Actor | None = None,
    action: str = "template.update",
    reason: str | None = None,
) -> VersionRecord:
    """Store `content` as the next version and make it active."""
    check(content, limits)
    template = await _template_row(conn, key, lock=True)  # serialises concurrent saves
    latest = await conn.scalar(sa.select(sa.func.max(versions.c.version)).where(versions.c.template_id == template.id))
    number = int(latest or 0) + 1
    await conn.execute(
        versions.insert().values(
            template_id=template.id,
            version=number,
            content=content.model_dump(mode="json"),
            author=author,
            change_note=change_note,
        )
    )
    changes: dict[str, Any] = {"active_version": number, "updated_at": sa.func.now()}
    if category is not None:
        changes["category"] = category
    if description is not None:
        changes["description"] = description
    await conn.execute(templates.update().where(templates.c.id == template.id).values(**changes))
    before = {"active_version": template.active_version, "category": template.category,
              "description": template.description}  # fmt: skip
    after = {**before, **{field: changes[field] for field in before if field in changes}}
    await record_action(conn, actor, action, "template", key, {"version": number, "change_note": change_note},
                        reason=reason, changes=audit.diff(before, after))  # fmt: skip
    return await get(conn, key)


async def get(conn: AsyncConnection, key: str, version: int | None = None) -> VersionRecord:
    template = await _template_row(conn, key)
    number = version if version is not None else template.active_version
    row = (
        await conn.execute(
            sa.select(versions).where(versions.c.template_id == template.id, versions.c.version == number)
        )
    ).first()
    if row is None:
        raise TemplateNotFound(f"{key} version {number}")
    return _record(template, row)


async def load_pinned(conn: AsyncConnection, key: str, version: int) -> TemplateContent:
    """A version's content for a run that pinned it, even if the template was archived since."""
    content = await conn.scalar(
        sa.select(versions.c.content)
        .join(templates, templates.c.id == versions.c.template_id)
        .where(templates.c.key == key, versions.c.version == version)
    )
    if content is None:
        raise TemplateNotFound(f"{key} version {version}")
    return TemplateContent.model_validate(content)


class PinnedVersions:
    """Versions never change, so each worker keeps the ones it has parsed."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._cache: OrderedDict[tuple[str, int], TemplateContent] = OrderedDict()

    async def get(self, conn: AsyncConnection, key: str, version: int) -> TemplateContent:
        cache_key = (key, version)
        if cache_key in self._cache:
            self._cache.move_to_end(cache_key)
            return self._cache[cache_key]
        content = await load_pinned(conn, key, version)
        self._cache[cache_key] = content
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return content


async def history(conn: AsyncConnection, key: str) -> list[VersionRecord]:
    template = await _template_row(conn, key)
    rows = await conn.execute(
        sa.select(versions).where(versions.c.template_id == template.id).order_by(versions.c.version.desc())
    )
    return [_record(template, row) for row in rows]


async def rollback(
    conn: AsyncConnection,
    key: str,
    *,
    version: int,
    author: str,
    reason: str,
    limits: TemplateLimits,
    actor: Actor | None = None,
) -> VersionRecord:
    """Make an old version's content the new active version; history is never rewritten.
    A person's rollback needs a reason (ReasonRequired)."""
    if actor is not None:
        reason = required_reason(reason)
    old = await get(conn, key, version)
    return await save_version(conn, key, content=old.content, author=author, limits=limits, actor=actor,
                              change_note=f"rollback to v{version}: {reason}", action="template.rollback",
                              reason=reason)  # fmt: skip


async def archive(conn: AsyncConnection, key: str, actor: Actor | None = None, reason: str | None = None) -> None:
    """Take the template out of use (the API's DELETE); a reason goes to the audit log."""
    template = await _template_row(conn, key, lock=True)
    await conn.execute(templates.update().where(templates.c.id == template.id).values(archived_at=sa.func.now()))
    changes = audit.diff({"archived": template.archived_at is not None}, {"archived": True})
    await record_action(conn, actor, "template.archive", "template", key, reason=reason, changes=changes)


async def list_templates(conn: AsyncConnection, search: str | None, limit: int) -> list[sa.Row[Any]]:
    query = sa.select(templates).where(templates.c.archived_at.is_(None)).order_by(templates.c.key).limit(limit)
    if search:
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        query = query.where(sa.or_(templates.c.key.ilike(pattern), templates.c.description.ilike(pattern)))
    return list((await conn.execute(query)).all())


def parts(content: TemplateContent) -> OrderedDict[str, str]:
    """The content flattened into named text parts: what diff compares."""
    flat: OrderedDict[str, str] = OrderedDict()
    flat["variables"] = "\n".join(
        json.dumps(variable.model_dump(mode="json"), ensure_ascii=False, sort_keys=True)
        for variable in content.variables
    )
    flat["fallback_locale"] = content.fallback_locale
    for path, source, _ in content.iter_sources():
        flat[path] = source
    return flat


def diff(old: VersionRecord, new: VersionRecord) -> dict[str, str]:
    """A unified diff per part that differs (added and removed parts included)."""
    before, after = parts(old.content), parts(new.content)
    result: dict[str, str] = {}
    for name in list(before) + [name for name in after if name not in before]:
        a, b = before.get(name, ""), after.get(name, "")
        if a == b:
            continue
        lines = difflib.unified_diff(
            a.splitlines(keepends=True),
            b.splitlines(keepends=True),
            fromfile=f"v{old.version}/{name}",
            tofile=f"v{new.version}/{name}",
        )
        result[name] = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    return result


PREVIEW_RECIPIENT: dict[str, Any] = {"user_id": "preview", "name": "Alex Example", "timezone": "UTC", "attributes": {}}


class PreviewFailed(Exception):
    """The preview could not be rendered; each problem names its field (user_id,
    variables.<name>, render)."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{p.part}: {p.message}" for p in problems))
        self.problems = problems


async def preview(
    conn: AsyncConnection,
    content: TemplateContent,
    *,
    variables: dict[str, Any],
    user_id: str | None,
    locale: str | None,
) -> Rendered:
    """Render every part with the given variables (examples fill the rest), for a real
    recipient's data or an example recipient. Used by the API and the admin."""
    recipient: dict[str, Any] = {**PREVIEW_RECIPIENT, "locale": locale or "en"}
    if user_id:
        row = (await conn.execute(sa.select(recipients).where(recipients.c.user_id == user_id))).first()
        if row is None:
            raise PreviewFailed([Problem("user_id", f"no recipient with user_id {user_id!r}")])
        recipient = recipient_context(dict(row._mapping))
    values, problems = coerce_variables(content.variables, variables, use_examples=True)
    if problems:
        raise PreviewFailed(problems)
    try:
        return render(content, locale_wanted=locale or recipient.get("locale"), variables=values, recipient=recipient)
    except RenderError as err:
        raise PreviewFailed([Problem("render", f"rendering failed: {err}")]) from err


def problems_as_errors(problems: list[Problem]) -> list[dict[str, Any]]:
    return [{"field": f"content.{p.part}", **p.as_dict()} for p in problems]
