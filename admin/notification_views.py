"""Notifications in the admin: search instant notifications and campaign sends (by user,
status, channel, campaign, period; keyset pages, newest first), and one send's page with
its timeline (PostgreSQL and ClickHouse history), its content, its run in the Temporal
Web UI, and for admins a cancel with a reason (audited, as the API's).

Every role of the panel reads (notifications.read); cancelling is notifications.send,
which in the panel leaves admins.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import sqlalchemy as sa
from sqladmin import expose
from sqladmin.flash import Flash
from starlette.requests import Request
from starlette.responses import Response

from admin.pages import AdminPage, FormErrors, form_text, not_found
from core.errors import Conflict, NotFound, StillRunning
from core.models import Channel, DeliveryStatus
from services import audit
from services import notification_lookup as lookup
from services import notifications as notification_ops
from services.campaign_store import campaigns
from services.history import HistoryReader
from services.notification_lookup import Filters

# Permission identity of these pages: RolePermissions maps it to the table's actions.
NOTIFICATIONS = "notification"

KINDS = {"notifications": "Instant notifications", "campaign": "Campaign sends"}
STATUS_COLOURS = {"pending": "blue", "sent": "green", "delivered": "green", "opened": "teal", "clicked": "teal",
                  "failed": "red", "bounced": "red", "suppressed": "orange", "unreachable": "orange",
                  "cancelled": "secondary", "accepted": "azure"}  # fmt: skip
CAMPAIGN_CHOICES = 100  # the newest campaigns offered in the campaign field's list


def status_colour(status: str) -> str:
    return STATUS_COLOURS.get(status, "secondary")


def temporal_link(base: str, namespace: str, workflow_id: str, run_id: str | None) -> str:
    """The run in the Temporal Web UI (its history when the run is known)."""
    link = f"{base}/namespaces/{namespace}/workflows/{workflow_id}"
    return f"{link}/{run_id}/history" if run_id else link


def parse_filters(params: Any, errors: FormErrors) -> tuple[dict[str, str], Filters]:
    """The form as typed (to show it again) and the filters it means; problems into `errors`."""
    names = ("kind", "user_id", "status", "channel", "campaign", "since", "until")
    form = {name: str(params.get(name) or "").strip() for name in names}
    if form["campaign"]:
        form["kind"] = "campaign"  # only campaign sends belong to a campaign
    if form["kind"] not in KINDS:
        form["kind"] = "notifications"
    status = form["status"] or None
    if status is not None and status not in DeliveryStatus.__members__:
        errors.add("status", f"choose one of {', '.join(DeliveryStatus)}")
        status = None
    channel = form["channel"] or None
    if channel is not None and channel not in Channel.__members__:
        errors.add("channel", f"choose one of {', '.join(Channel)}")
        channel = None
    campaign_id = None
    if form["campaign"]:
        try:
            campaign_id = uuid.UUID(form["campaign"])
        except ValueError:
            errors.add("campaign", "a campaign id (a UUID): pick one from the list")
    since = _day(form["since"], "since", errors)
    until = _day(form["until"], "until", errors)
    if since is not None and until is not None and since > until:
        errors.add("until", "must be on or after the first day")
    filters = Filters(
        user_id=form["user_id"] or None, status=status, channel=channel, campaign_id=campaign_id,
        since=datetime.combine(since, time(), UTC) if since else None,
        # The last day counts whole: up to the next midnight (UTC).
        until=datetime.combine(until + timedelta(days=1), time(), UTC) if until else None,
    )  # fmt: skip
    return form, filters


def _day(text: str, name: str, errors: FormErrors) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        errors.add(name, "a day as YYYY-MM-DD")
        return None


class NotificationPages(AdminPage):
    name = "Notifications"
    icon = "fa-solid fa-bell"
    permission = NOTIFICATIONS

    def history(self) -> HistoryReader | None:
        """The API's history reader (as analytics reads it); None in an API process without ClickHouse."""
        reader: HistoryReader | None = getattr(self._app_state(), "history", None)
        return reader

    # The first exposed route is the one the menu links to.
    @expose("/notifications", identity="notifications")
    async def list_page(self, request: Request) -> Response:
        errors = FormErrors()
        form, filters = parse_filters(request.query_params, errors)
        cursor = request.query_params.get("cursor") or None
        search = lookup.search_campaign_sends if form["kind"] == "campaign" else lookup.search_notifications
        async with self.connect() as conn:
            try:
                page = await search(conn, filters, cursor=cursor)
            except lookup.InvalidCursor as err:
                errors.add("cursor", str(err))
                page = await search(conn, filters)
            newest_campaigns = sa.select(campaigns.c.id, campaigns.c.name).order_by(campaigns.c.created_at.desc())
            choices = list(await conn.execute(newest_campaigns.limit(CAMPAIGN_CHOICES)))
        older = request.url.include_query_params(cursor=page.next_cursor) if page.next_cursor else None
        newest = request.url.remove_query_params("cursor") if cursor else None
        context = {"title": "Notifications", "form": form, "errors": errors, "page": page, "kinds": KINDS,
                   "statuses": list(DeliveryStatus), "channels": list(Channel), "campaigns": choices,
                   "older": older, "newest": newest, "colour": status_colour}  # fmt: skip
        return await self.render(request, "marquee/notifications/list.html", context, 400 if errors else 200)

    @expose("/notifications/view/{notification_id:uuid}", identity="notification-detail")
    async def detail_page(self, request: Request) -> Response:
        return await self._detail(request, request.path_params["notification_id"], FormErrors(), "")

    async def _detail(
        self, request: Request, notification_id: uuid.UUID, errors: FormErrors, reason: str, status_code: int = 200
    ) -> Response:
        settings = self.settings()
        async with self.connect() as conn:
            try:
                detail = await lookup.notification(conn, self.history(), notification_id)
            except NotFound as err:
                raise not_found(f"notification {notification_id}") from err
            rendered, render_problem = await lookup.rendered(conn, detail.row, detail.recipient)
        row = detail.row
        context = {"title": f"Notification {row.id}", "pretitle": f"{row.category} to {row.user_id}",
                   "detail": detail, "row": row, "rendered": rendered, "render_problem": render_problem,
                   "temporal_ui": temporal_link(settings.temporal_ui_base(), settings.temporal_namespace,
                                                row.workflow_id, row.run_id),
                   "cancellable": row.status == DeliveryStatus.pending.value, "errors": errors,
                   "reason": reason, "colour": status_colour, "min_reason": audit.MIN_REASON}  # fmt: skip
        return await self.render(request, "marquee/notifications/detail.html", context, status_code)

    @expose("/notifications/cancel/{notification_id:uuid}", methods=["POST"], identity="notification-cancel")
    async def cancel(self, request: Request) -> Response:
        """Cancel a pending notification with a reason (audited); the form again if none."""
        self.require_change(request)
        notification_id: uuid.UUID = request.path_params["notification_id"]
        reason = form_text(await request.form(), "reason")
        errors = FormErrors()
        try:
            reason = audit.required_reason(reason)
        except audit.ReasonRequired as err:
            errors.add("reason", str(err))
            return await self._detail(request, notification_id, errors, reason, 400)
        async with self.connect() as conn:
            try:
                await notification_ops.cancel(conn, self.temporal(), notification_id, self.actor(request), reason)
            except NotFound as err:
                raise not_found(f"notification {notification_id}") from err
            except Conflict as err:  # finished meanwhile
                errors.add("reason", err.detail)
                await conn.rollback()
                return await self._detail(request, notification_id, errors, reason, 409)
            except StillRunning:
                # Asked of the run and audited; it has not recorded its end yet.
                await conn.commit()
                Flash.info(request, "Cancellation requested; the run has not finished yet: reload in a moment.")
                return self.redirect(request.url_for("admin:view-notification-detail", notification_id=notification_id))
            await conn.commit()
        Flash.success(request, "Notification cancelled; channels already sent stay sent.")
        return self.redirect(request.url_for("admin:view-notification-detail", notification_id=notification_id))

    @expose("/notifications/campaign-send/{send_id:int}", identity="campaign-send")
    async def campaign_send_page(self, request: Request) -> Response:
        settings = self.settings()
        send_id: int = request.path_params["send_id"]
        async with self.connect() as conn:
            try:
                detail = await lookup.campaign_send(conn, self.history(), send_id)
            except NotFound as err:
                raise not_found(f"campaign send {send_id}") from err
        row = detail.row
        context = {"title": f"Campaign send {row.id}", "pretitle": f"{row.campaign_name} to {row.user_id or '?'}",
                   "detail": detail, "row": row, "colour": status_colour,
                   "temporal_ui": temporal_link(settings.temporal_ui_base(), settings.temporal_namespace,
                                                row.run_id, None)}  # fmt: skip
        return await self.render(request, "marquee/notifications/campaign_send.html", context)
