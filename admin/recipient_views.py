"""Recipients in the admin: found by user_id, email or phone (keyset pages), and one
person's page with their preferences, suppressions, follows and recent notifications and
campaign sends; for admins, the GDPR export (a JSON download) and erasure
(services.gdpr), each with a reason kept in the audit log.

Every role of the panel reads (recipients.read); export and erase are the permission
table's recipients.export and recipients.erase, admins only.
"""

from __future__ import annotations

import json

from sqladmin import expose
from sqladmin.flash import Flash
from starlette import status
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from admin.notification_views import status_colour
from admin.pages import AdminPage, FormErrors, form_text, not_found
from core.errors import Invalid, NotFound, Unavailable
from core.permissions import allowed
from services import audit, gdpr
from services import notification_lookup as lookup
from services import recipients as recipient_store
from services.audit import record_action
from services.history import HistoryReader
from services.notification_lookup import Filters

# Permission identity of these pages: RolePermissions maps it to the table's actions.
RECIPIENTS = "recipient"

RECENT = 20  # notifications and campaign sends shown on a person's page
GDPR_ACTIONS = {"export": "recipients.export", "erase": "recipients.erase"}


class RecipientPages(AdminPage):
    name = "Recipients"
    icon = "fa-solid fa-user"
    permission = RECIPIENTS

    def history(self) -> HistoryReader | None:
        reader: HistoryReader | None = getattr(self._app_state(), "history", None)
        return reader

    @staticmethod
    def may(request: Request, what: str) -> bool:
        """May the signed-in user export or erase (the permission table's own actions)?"""
        role = str(request.session.get("role"))
        return allowed(role, "admin_panel.use") and allowed(role, GDPR_ACTIONS[what])

    def _require(self, request: Request, what: str) -> None:
        if not self.may(request, what):
            raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail=f"Only admins may {what} a person.")

    # The first exposed route is the one the menu links to.
    @expose("/recipients", identity="recipients")
    async def list_page(self, request: Request) -> Response:
        text = (request.query_params.get("q") or "").strip()
        cursor = request.query_params.get("cursor") or None
        errors = FormErrors()
        async with self.connect() as conn:
            try:
                page = await lookup.search_recipients(conn, text or None, cursor=cursor)
            except lookup.InvalidCursor as err:
                errors.add("cursor", str(err))
                page = await lookup.search_recipients(conn, text or None)
        older = request.url.include_query_params(cursor=page.next_cursor) if page.next_cursor else None
        newest = request.url.remove_query_params("cursor") if cursor else None
        context = {"title": "Recipients", "q": text, "page": page, "older": older, "newest": newest,
                   "errors": errors}  # fmt: skip
        return await self.render(request, "marquee/recipients/list.html", context, 400 if errors else 200)

    @expose("/recipients/view/{user_id:path}", identity="recipient-detail")
    async def detail_page(self, request: Request) -> Response:
        return await self._detail(request, request.path_params["user_id"], FormErrors(), {})

    async def _detail(
        self, request: Request, user_id: str, errors: FormErrors, form: dict[str, str], status_code: int = 200
    ) -> Response:
        async with self.connect() as conn:
            try:
                person = await recipient_store.get(conn, user_id)
            except NotFound as err:
                raise not_found(f"recipient {user_id!r}") from err
            preferences = await recipient_store.preferences_of(conn, user_id)
            suppressed = await lookup.suppressions_of(conn, person)
            recent = await lookup.search_notifications(conn, Filters(user_id=user_id), limit=RECENT)
            sends = await lookup.search_campaign_sends(conn, Filters(user_id=user_id), limit=RECENT)
        context = {"title": person.name or user_id, "pretitle": "Recipient", "person": person,
                   "preferences": preferences, "suppressions": suppressed, "recent": recent, "sends": sends,
                   "colour": status_colour, "may_export": self.may(request, "export"),
                   "may_erase": self.may(request, "erase"), "errors": errors, "form": form,
                   "min_reason": audit.MIN_REASON}  # fmt: skip
        return await self.render(request, "marquee/recipients/detail.html", context, status_code)

    @expose("/recipients/export/{user_id:path}", methods=["POST"], identity="recipient-export")
    async def export(self, request: Request) -> Response:
        """Everything held about the person as one JSON document, downloaded; audited with the reason."""
        self._require(request, "export")
        user_id = request.path_params["user_id"]
        reason = form_text(await request.form(), "export_reason")
        try:
            reason = audit.required_reason(reason)
        except audit.ReasonRequired as err:
            errors = FormErrors()
            errors.add("export_reason", str(err))
            return await self._detail(request, user_id, errors, {"export_reason": reason}, 400)
        async with self.connect() as conn:
            try:
                # Audited here rather than by gdpr.export: the panel's row carries the reason.
                document = await gdpr.export(conn, self.history(), user_id)
            except NotFound as err:
                raise not_found(f"anything about {user_id!r}") from err
            except Unavailable as err:
                Flash.error(request, f"Nothing was exported: {err.detail}")
                return self.redirect(request.url_for("admin:view-recipient-detail", user_id=user_id))
            await record_action(conn, self.actor(request), "recipient.export", "recipient", user_id, reason=reason)
            await conn.commit()
        body = json.dumps(document, ensure_ascii=False, indent=2, default=str)
        filename = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in user_id)[:80] or "recipient"
        headers = {"Content-Disposition": f'attachment; filename="marquee-export-{filename}.json"',
                   "Cache-Control": "no-store"}  # fmt: skip
        return Response(body, media_type="application/json", headers=headers)

    @expose("/recipients/erase/{user_id:path}", methods=["POST"], identity="recipient-erase")
    async def erase(self, request: Request) -> Response:
        """Remove the person from every store (services.gdpr.erase); the reason is audited
        and must not name them."""
        self._require(request, "erase")
        user_id = request.path_params["user_id"]
        submitted = await request.form()
        form = {"erase_reason": form_text(submitted, "erase_reason"), "confirm": form_text(submitted, "confirm")}
        errors = FormErrors()
        reason = ""
        try:
            reason = audit.required_reason(form["erase_reason"])
        except audit.ReasonRequired as err:
            errors.add("erase_reason", str(err))
        if form["confirm"] != user_id:
            errors.add("confirm", "type the user_id exactly, to confirm whom you erase")
        if errors:
            return await self._detail(request, user_id, errors, form, 400)
        async with self.connect() as conn:
            try:
                report = await gdpr.erase(conn, self.history(), self.temporal(), self.settings(), user_id,
                                          self.actor(request), reason)  # fmt: skip
            except NotFound as err:
                raise not_found(f"anything about {user_id!r}") from err
            except Invalid as err:  # the reason names the person
                for field, message in err.problems:
                    errors.add("erase_reason" if field == "reason" else field, message)
                return await self._detail(request, user_id, errors, form, 400)
            except Unavailable as err:
                Flash.error(request, f"Nothing was erased: {err.detail}")
                return self.redirect(request.url_for("admin:view-recipient-detail", user_id=user_id))
        removed = sum(sum(counts.values()) for counts in report.counts.values())
        Flash.success(request, f"Erased: {removed} rows and objects removed; erasure record #{report.erasure_id}.")
        return self.redirect(request.url_for("admin:view-recipients"))
