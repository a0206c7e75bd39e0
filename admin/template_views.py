"""Templates in the admin (FR-004, FR-005): list, create, edit, versions, diff, rollback, preview.

Every change goes through template_store (validation first, immutable versions); a form
that fails shows all of its problems and stores nothing.
"""

from __future__ import annotations

import difflib
from typing import Any

from markupsafe import Markup
from pydantic import ValidationError
from sqladmin import expose
from sqladmin.flash import Flash
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from admin.pages import TEMPLATES, AdminPage, FormErrors, form_text, not_found, parse_json, pretty_json
from core.schemas import PreviewRequest, RollbackRequest, TemplateCreate, TemplateUpdate
from core.templating import (
    Rendered,
    TemplateContent,
    TemplateInvalid,
    TemplateLimits,
)
from services import templates as template_store
from services.templates import TemplateExists, TemplateNotFound, VersionRecord

LIST_LIMIT = 500

STARTER = TemplateContent.model_validate(
    {
        "variables": [
            {"name": "title", "type": "string", "example": "The Expanse", "description": "Show title"},
            {"name": "episode", "type": "integer", "example": 6},
        ],
        "fallback_locale": "en",
        "locales": {
            "en": {
                "email": {
                    "subject": "{{ title }}: episode {{ episode }} is out",
                    "html": "<h1>Hi {{ recipient.name or 'there' }},</h1>\n"
                    "<p>Episode {{ episode }} of <b>{{ title }}</b> is out.</p>",
                },
                "push": {"title": "{{ title }}", "body": "Episode {{ episode }} is out"},
                "sms": {"text": "{{ title }}: episode {{ episode }} is out."},
            }
        },
    }
)


def content_json(content: TemplateContent) -> str:
    return pretty_json(content.model_dump(mode="json", exclude_none=True))


def example_variables(content: TemplateContent) -> dict[str, Any]:
    return {spec.name: spec.example for spec in content.variables if spec.example is not None}


def add_template_problems(errors: FormErrors, err: TemplateInvalid) -> None:
    for problem in err.problems:
        errors.add(problem.part, problem.message, problem.line)


def check_content(errors: FormErrors, data: Any, limits: TemplateLimits) -> None:
    """Report what template_store would refuse in content that is well-formed (its
    structural problems are already in `errors`), so every problem shows at once."""
    try:
        content = TemplateContent.model_validate(data)
    except ValidationError:
        return
    try:
        template_store.check(content, limits)
    except TemplateInvalid as err:
        add_template_problems(errors, err)


def side_by_side(old: VersionRecord, new: VersionRecord) -> list[tuple[str, Markup, str]]:
    """(part, HTML table, unified diff) for each part that differs between two versions."""
    before, after = template_store.parts(old.content), template_store.parts(new.content)
    tables = []
    for part, unified in template_store.diff(old, new).items():
        table = difflib.HtmlDiff(tabsize=2, wrapcolumn=70).make_table(
            before.get(part, "").splitlines(),
            after.get(part, "").splitlines(),
            fromdesc=f"v{old.version}",
            todesc=f"v{new.version}",
            context=True,
            numlines=3,
        )
        tables.append((part, Markup(table), unified))  # HtmlDiff escapes the text it shows
    return tables


async def render_preview(
    conn: AsyncConnection,
    errors: FormErrors,
    content: TemplateContent,
    *,
    variables: dict[str, Any],
    user_id: str | None,
    locale: str | None,
) -> Rendered | None:
    """What the API's preview renders, with its problems as form errors."""
    try:
        return await template_store.preview(conn, content, variables=variables, user_id=user_id, locale=locale)
    except template_store.PreviewFailed as err:
        for problem in err.problems:
            errors.add(problem.part, problem.message)
        return None


class TemplatePages(AdminPage):
    name = "Templates"
    icon = "fa-solid fa-file-lines"
    permission = TEMPLATES

    # The first exposed route is the one the menu links to.
    @expose("/templates", identity="templates")
    async def list_page(self, request: Request) -> Response:
        search = request.query_params.get("q", "").strip()
        async with self.connect() as conn:
            rows = await template_store.list_templates(conn, search or None, LIST_LIMIT)
        context = {"title": "Templates", "rows": rows, "q": search, "limit": LIST_LIMIT}
        return await self.render(request, "marquee/templates/list.html", context)

    @expose("/templates/new", methods=["GET", "POST"], identity="template-new")
    async def create_page(self, request: Request) -> Response:
        self.require_change(request)
        fields = ("key", "category", "description", "change_note", "content")
        if request.method == "GET":
            form = {"key": "", "category": "", "description": "", "change_note": "created"}
            return await self._form(request, "new", None, {**form, "content": content_json(STARTER)}, FormErrors())
        submitted = await request.form()
        form = {name: form_text(submitted, name) for name in fields}
        errors = FormErrors()
        limits = self.settings().template_limits()
        data = parse_json(errors, "content", form["content"], want=dict)
        body = None
        try:
            given = {name: form[name] for name in ("key", "category", "description")}
            body = TemplateCreate.model_validate(
                {**given, "change_note": form["change_note"] or "created", "content": data}
            )
        except ValidationError as err:
            errors.add_validation(err, empty={name for name in ("key", "category") if not form[name]},
                                  skip={"content"} if data is None else ())  # fmt: skip
            check_content(errors, data, limits)
        if body is not None:
            async with self.connect() as conn:
                try:
                    record = await template_store.create(
                        conn, key=body.key, category=body.category, description=body.description,
                        content=body.content, author=self.author(request), change_note=body.change_note,
                        limits=limits, actor=self.actor(request),
                    )  # fmt: skip
                except TemplateInvalid as err:
                    add_template_problems(errors, err)
                except TemplateExists:
                    errors.add("key", f"a template with the key {body.key!r} exists already (perhaps archived)")
                else:
                    await conn.commit()
                    Flash.success(request, f"Template {record.key} created as version 1.")
                    return self.redirect(request.url_for("admin:view-template-versions", key=record.key))
        return await self._form(request, "new", None, form, errors, status_code=400)

    @expose("/templates/change/{key}", methods=["GET", "POST"], identity="template-edit")
    async def edit_page(self, request: Request) -> Response:
        self.require_change(request)
        key = request.path_params["key"]
        fields = ("category", "description", "change_note", "content")
        async with self.connect() as conn:
            try:
                record = await template_store.get(conn, key)
            except TemplateNotFound as err:
                raise not_found(f"template {key!r}") from err
            if request.method == "GET":
                form = {"category": record.category, "description": record.description, "change_note": "",
                        "content": content_json(record.content)}  # fmt: skip
                return await self._form(request, "edit", record, form, FormErrors())
            submitted = await request.form()
            form = {name: form_text(submitted, name) for name in fields}
            errors = FormErrors()
            limits = self.settings().template_limits()
            data = parse_json(errors, "content", form["content"], want=dict)
            body = None
            try:
                body = TemplateUpdate.model_validate({**form, "content": data})
            except ValidationError as err:
                errors.add_validation(err, empty={name for name in ("category", "change_note") if not form[name]},
                                      skip={"content"} if data is None else ())  # fmt: skip
                check_content(errors, data, limits)
            if body is not None:
                try:
                    saved = await template_store.save_version(
                        conn, key, content=body.content, author=self.author(request), change_note=body.change_note,
                        limits=limits, category=body.category, description=body.description,
                        actor=self.actor(request),
                    )  # fmt: skip
                except TemplateInvalid as err:
                    add_template_problems(errors, err)
                else:
                    await conn.commit()
                    Flash.success(request, f"Saved {key} as version {saved.version}; it is the active version now.")
                    return self.redirect(request.url_for("admin:view-template-versions", key=key))
        return await self._form(request, "edit", record, form, errors, status_code=400)

    async def _form(
        self,
        request: Request,
        mode: str,
        record: VersionRecord | None,
        form: dict[str, str],
        errors: FormErrors,
        status_code: int = 200,
    ) -> Response:
        title = "New template" if record is None else f"Edit {record.key}"
        context = {"title": title, "mode": mode, "record": record, "form": form, "errors": errors}
        return await self.render(request, "marquee/templates/form.html", context, status_code)

    @expose("/templates/versions/{key}", identity="template-versions")
    async def versions_page(self, request: Request) -> Response:
        return await self._versions(request, request.path_params["key"], FormErrors())

    async def _versions(
        self, request: Request, key: str, errors: FormErrors, compare: tuple[str, str] | None = None
    ) -> Response:
        async with self.connect() as conn:
            try:
                history = await template_store.history(conn, key)
            except TemplateNotFound as err:
                raise not_found(f"template {key!r}") from err
        newest = history[0]
        if compare is None:
            compare = (str(history[1].version if len(history) > 1 else newest.version), str(newest.version))
        context = {"title": f"Versions of {key}", "key": key, "template": newest, "versions": history,
                   "compare": compare, "errors": errors}  # fmt: skip
        return await self.render(request, "marquee/templates/versions.html", context, 400 if errors else 200)

    @expose("/templates/version/{key}/{version:int}", identity="template-version")
    async def version_page(self, request: Request) -> Response:
        key, version = request.path_params["key"], request.path_params["version"]
        async with self.connect() as conn:
            try:
                record = await template_store.get(conn, key, version)
            except TemplateNotFound as err:
                raise not_found(f"version {version} of template {key!r}") from err
        context = {"title": f"{key} version {version}", "record": record, "content": content_json(record.content)}
        return await self.render(request, "marquee/templates/version.html", context)

    @expose("/templates/diff/{key}", identity="template-diff")
    async def diff_page(self, request: Request) -> Response:
        key = request.path_params["key"]
        given = (request.query_params.get("from", "").strip(), request.query_params.get("to", "").strip())
        errors = FormErrors()
        numbers = []
        for name, value in zip(("from", "to"), given, strict=True):
            if not value.isdigit() or int(value) < 1:
                errors.add(name, "choose a version")
            numbers.append(int(value) if value.isdigit() else 0)
        if errors:
            return await self._versions(request, key, errors, given)
        async with self.connect() as conn:
            try:
                await template_store.get(conn, key)
            except TemplateNotFound as err:
                raise not_found(f"template {key!r}") from err
            records = []
            for name, number in zip(("from", "to"), numbers, strict=True):
                try:
                    records.append(await template_store.get(conn, key, number))
                except TemplateNotFound:
                    errors.add(name, f"{key} has no version {number}")
        if errors:
            return await self._versions(request, key, errors, given)
        old, new = records
        context = {"title": f"{key}: v{old.version} → v{new.version}", "key": key, "old": old, "new": new,
                   "parts": side_by_side(old, new)}  # fmt: skip
        return await self.render(request, "marquee/templates/diff.html", context)

    @expose("/templates/rollback/{key}/{version:int}", methods=["GET", "POST"], identity="template-rollback")
    async def rollback_page(self, request: Request) -> Response:
        self.require_change(request)
        key, version = request.path_params["key"], request.path_params["version"]
        errors = FormErrors()
        reason = ""
        async with self.connect() as conn:
            try:
                record = await template_store.get(conn, key, version)
            except TemplateNotFound as err:
                raise not_found(f"version {version} of template {key!r}") from err
            if request.method == "POST":
                reason = form_text(await request.form(), "reason")
                try:
                    body = RollbackRequest(version=version, reason=reason)
                except ValidationError as err:
                    errors.add_validation(err, empty={"reason"} if not reason else ())
                else:
                    try:
                        saved = await template_store.rollback(
                            conn, key, version=body.version, author=self.author(request), reason=body.reason,
                            limits=self.settings().template_limits(), actor=self.actor(request),
                        )  # fmt: skip
                    except TemplateInvalid as err:
                        add_template_problems(errors, err)
                    else:
                        await conn.commit()
                        Flash.success(request, f"Rolled back {key} to version {version}: now version {saved.version}.")
                        return self.redirect(request.url_for("admin:view-template-versions", key=key))
        context = {"title": f"Roll {key} back to version {version}", "record": record, "reason": reason,
                   "errors": errors}  # fmt: skip
        return await self.render(request, "marquee/templates/rollback.html", context, 400 if errors else 200)

    @expose("/templates/preview/{key}", methods=["GET", "POST"], identity="template-preview")
    async def preview_page(self, request: Request) -> Response:
        key = request.path_params["key"]
        errors = FormErrors()
        source = await request.form() if request.method == "POST" else request.query_params
        async with self.connect() as conn:
            try:
                history = await template_store.history(conn, key)
            except TemplateNotFound as err:
                raise not_found(f"template {key!r}") from err
            numbers = {str(record.version): record for record in history}
            active = next(record for record in history if record.version == record.active_version)
            record = numbers.get(form_text(source, "version"), active)
            form = {
                "version": str(record.version),
                "variables": form_text(source, "variables") or pretty_json(example_variables(record.content)),
                "user_id": form_text(source, "user_id"),
                "locale": form_text(source, "locale"),
            }
            if form_text(source, "version") and form_text(source, "version") not in numbers:
                errors.add("version", f"{key} has no version {form_text(source, 'version')}")
            variables = parse_json(errors, "variables", form["variables"], want=dict)
            rendered = None
            try:
                body = PreviewRequest.model_validate(
                    {"variables": variables or {}, "user_id": form["user_id"] or None, "locale": form["locale"] or None}
                )
            except ValidationError as err:
                errors.add_validation(err)
            else:
                if not errors:
                    rendered = await render_preview(conn, errors, record.content, variables=body.variables,
                                                    user_id=body.user_id, locale=body.locale)  # fmt: skip
        context = {"title": f"Preview {key}", "key": key, "record": record, "versions": history, "form": form,
                   "locales": sorted(record.content.locales), "rendered": rendered, "errors": errors}  # fmt: skip
        return await self.render(request, "marquee/templates/preview.html", context, 400 if errors else 200)
