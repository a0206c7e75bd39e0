"""Dead letters and the audit log in the admin: list with filters, bulk replay and discard,
a detail page with the original request and what was done to it.

The actions are dead_letter_ops' (the API's own), in one transaction per request; admins
act, campaign managers and analysts only look.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup
from pydantic import ValidationError
from sqladmin import expose
from sqladmin.flash import Flash
from starlette.datastructures import FormData, ImmutableMultiDict
from starlette.requests import Request
from starlette.responses import Response

from admin.pages import AdminPage, FormErrors, form_text, not_found
from core.models import Channel
from services import audit
from services import dead_letters as ops
from services.dead_letters import DeadLetterFilter, DeadLetterStatus, Outcome

# Permission identities: RolePermissions maps them to the permission table's actions.
DEAD_LETTERS = "dead-letters"
AUDIT_LOG = "audit-log"

PAGE_SIZE = 50
MIN_REASON = 3
STATUS_COLOURS = {"open": "red", "replayed": "green", "discarded": "secondary"}


def status_badge(status: str) -> Markup:
    colour = STATUS_COLOURS.get(status, "secondary")
    return Markup('<span class="badge bg-{0}-lt dead-letter-status">{1}</span>').format(colour, status)


def selected_ids(values: list[str]) -> list[int]:
    return list(dict.fromkeys(int(value) for value in values if value.strip().isdigit()))


def summary(results: list[ops.ActionResult], done: str) -> tuple[str, str]:
    """A flash message for a (bulk) action's results, and its category."""
    count = sum(1 for result in results if result.outcome in (Outcome.replayed, Outcome.discarded))
    parts = [f"{done.capitalize()} {count} dead letter{'s' if count != 1 else ''}."]
    skipped = [result for result in results if result.outcome is Outcome.not_open]
    missing = [result for result in results if result.outcome is Outcome.not_found]
    if skipped:
        listed = ", ".join(f"#{result.id} ({result.status})" for result in skipped)
        parts.append(f"Not open, left alone: {listed}.")
    if missing:
        parts.append("Not found: " + ", ".join(f"#{result.id}" for result in missing) + ".")
    return " ".join(parts), "success" if count and not (skipped or missing) else "warning" if count else "error"


def _flash(request: Request, message: str, category: str) -> None:
    {"success": Flash.success, "warning": Flash.warning, "error": Flash.error}[category](request, message)


class DeadLetterPages(AdminPage):
    name = "Dead letters"
    icon = "fa-solid fa-skull-crossbones"
    permission = DEAD_LETTERS

    # The first exposed route is the one the menu links to.
    @expose("/dead-letters", identity="dead-letters")
    async def list_page(self, request: Request) -> Response:
        params = request.query_params
        form = {name: params.get(name, "").strip() for name in ("status", "channel", "q", "user_id")}
        if "status" not in params:
            form["status"] = DeadLetterStatus.open.value  # what needs an operator
        errors = FormErrors()
        try:
            filters = DeadLetterFilter(
                status=form["status"] or None, channel=form["channel"] or None, reason=form["q"] or None,
                user_id=form["user_id"] or None,
            )  # fmt: skip
        except ValidationError as err:
            errors.add_validation(err)
            filters = DeadLetterFilter()
        cursor = params.get("cursor") or None
        async with self.connect() as conn:
            try:
                page = await ops.list_dead_letters(conn, **filters.model_dump(), limit=PAGE_SIZE, cursor=cursor)
            except ops.InvalidFilter as err:
                errors.add(err.field, err.message)
                page = await ops.list_dead_letters(conn, **filters.model_dump(), limit=PAGE_SIZE)
        older = request.url.include_query_params(cursor=page.next_cursor) if page.next_cursor else None
        context = {"title": "Dead letters", "rows": page.rows, "form": form, "errors": errors, "older": older,
                   "statuses": [s.value for s in DeadLetterStatus], "channels": [c.value for c in Channel],
                   "status_badge": status_badge, "back": str(request.url)}  # fmt: skip
        return await self.render(request, "marquee/dead_letters/list.html", context, 400 if errors else 200)

    @expose("/dead-letters/view/{dead_letter_id:int}", identity="dead-letter")
    async def detail_page(self, request: Request) -> Response:
        dead_letter_id: int = request.path_params["dead_letter_id"]
        async with self.connect() as conn:
            row = await ops.get_dead_letter(conn, dead_letter_id)
            if row is None:
                raise not_found(f"dead letter {dead_letter_id}")
            history = await ops.history(conn, dead_letter_id)
        settings = self.settings()
        temporal_ui = f"{settings.temporal_ui_base()}/namespaces/{settings.temporal_namespace}/workflows"
        context = {"title": f"Dead letter #{row.id}", "row": row, "history": history, "status_badge": status_badge,
                   "temporal_ui": temporal_ui, "back": str(request.url)}  # fmt: skip
        return await self.render(request, "marquee/dead_letters/detail.html", context)

    @expose("/dead-letters/replay", methods=["POST"], identity="dead-letter-replay")
    async def replay(self, request: Request) -> Response:
        """Replay the checked (or the one) dead letters; back to where the form was."""
        self.require_change(request)
        form = await request.form()
        ids = selected_ids([str(value) for value in form.getlist("ids")])
        back = self._back(request, form)
        if not ids:
            Flash.error(request, "Check the dead letters to replay first.")
            return self.redirect(back)
        if len(ids) > ops.MAX_BULK:
            Flash.error(request, f"At most {ops.MAX_BULK} at once.")
            return self.redirect(back)
        reason = form_text(form, "reason")
        if len(reason) < MIN_REASON:
            Flash.error(request, f"Give the reason for the replay (at least {MIN_REASON} characters): it is audited.")
            return self.redirect(back)
        async with self.connect() as conn:
            try:
                results = await ops.replay(conn, self.temporal(), self.settings(), ids, self.actor(request), reason)
            except ops.ReplayImpossible as err:
                Flash.error(request, f"Nothing was replayed: {err}.")
                return self.redirect(back)
            except ops.ReplayUnavailable as err:
                await conn.rollback()
                Flash.error(request, f"Not recorded: {err}. Try again; runs already started are reused, not repeated.")
                return self.redirect(back)
            await conn.commit()
        _flash(request, *summary(results, "replayed"))
        return self.redirect(back)

    @expose("/dead-letters/discard", methods=["GET", "POST"], identity="dead-letter-discard")
    async def discard_page(self, request: Request) -> Response:
        """Ask for the reason (GET, from the list's checked rows or a detail page), then discard."""
        self.require_change(request)
        errors = FormErrors()
        submitted: ImmutableMultiDict[str, Any] = request.query_params
        if request.method == "POST":
            submitted = await request.form()
        ids = selected_ids([str(value) for value in submitted.getlist("ids")])
        back = self._back(request, submitted)
        reason = form_text(submitted, "reason")
        if not ids:
            Flash.error(request, "Check the dead letters to discard first.")
            return self.redirect(back)
        if len(ids) > ops.MAX_BULK:
            Flash.error(request, f"At most {ops.MAX_BULK} at once.")
            return self.redirect(back)
        if request.method == "POST":
            if not reason:
                errors.add("reason", "required: say why these are not resent")
            elif len(reason) < MIN_REASON:
                errors.add("reason", f"at least {MIN_REASON} characters")
            else:
                async with self.connect() as conn:
                    results = await ops.discard(conn, ids, self.actor(request), reason)
                    await conn.commit()
                _flash(request, *summary(results, "discarded"))
                return self.redirect(back)
        async with self.connect() as conn:
            rows = [row for row in [await ops.get_dead_letter(conn, i) for i in ids] if row is not None]
        context = {"title": "Discard dead letters", "rows": rows, "ids": ids, "reason": reason, "errors": errors,
                   "back": back, "status_badge": status_badge}  # fmt: skip
        return await self.render(request, "marquee/dead_letters/discard.html", context, 400 if errors else 200)

    def _back(self, request: Request, form: FormData | ImmutableMultiDict[str, Any]) -> str:
        """Where to return: the page the action came from, if it is one of ours."""
        back = str(form.get("back") or "")
        home = str(request.url_for("admin:view-dead-letters"))
        base = home.rsplit("/dead-letters", 1)[0]
        return back if back.startswith(f"{base}/dead-letters") else home


class AuditLogPage(AdminPage):
    name = "Audit log"
    icon = "fa-solid fa-clipboard-list"
    permission = AUDIT_LOG

    @expose("/audit", identity="audit-log")
    async def list_page(self, request: Request) -> Response:
        params = request.query_params
        form = {name: params.get(name, "").strip() for name in ("entity", "entity_id", "actor", "action")}
        errors = FormErrors()
        async with self.connect() as conn:
            given = {name: value or None for name, value in form.items()}
            filters = audit.AuditFilter(actor=given["actor"], action=given["action"], entity=given["entity"],
                                        entity_id=given["entity_id"])  # fmt: skip
            try:
                page = await audit.search(conn, filters, limit=PAGE_SIZE, cursor=params.get("cursor") or None)
            except audit.InvalidFilter as err:
                errors.add(err.field, err.message)
                page = await audit.search(conn, filters, limit=PAGE_SIZE)
        older = request.url.include_query_params(cursor=page.next_cursor) if page.next_cursor else None
        context = {"title": "Audit log", "rows": page.rows, "form": form, "errors": errors, "older": older}
        return await self.render(request, "marquee/audit/list.html", context, 400 if errors else 200)
