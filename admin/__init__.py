"""The admin panel (SQLAdmin) on the API's ASGI app, at /admin."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from sqladmin import Admin, BaseView, ModelView
from sqladmin.authentication import AuthenticationBackend
from sqladmin.authorization import Action, AuthorizationBackend
from sqladmin.helpers import object_identifier_values
from sqladmin.templating import Jinja2Templates
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from admin.analytics_views import ANALYTICS, AnalyticsPages
from admin.campaign_views import CampaignAdmin, CampaignPages, SegmentAdmin
from admin.csrf import CsrfMiddleware
from admin.csrf import install as install_template_hooks
from admin.dead_letter_views import AUDIT_LOG, DEAD_LETTERS, AuditLogPage, DeadLetterPages
from admin.event_views import (
    EVENT_TYPES,
    EVENTS,
    TRIGGER_RULES,
    EventAdmin,
    EventPages,
    EventTypePages,
    TriggerRulePages,
)
from admin.login_throttle import LoginThrottle
from admin.notification_views import NOTIFICATIONS, NotificationPages
from admin.pages import CAMPAIGNS, TEMPLATES, TEMPLATES_DIR, ReadOnlyView, signed_in
from admin.provider_views import PROVIDERS, ProviderPages
from admin.recipient_views import RECIPIENTS, RecipientPages
from admin.template_views import TemplatePages
from admin.user_views import ADMIN_USERS, UserPages
from core.auth import Role
from core.config import Settings
from core.models import Suppression
from core.permissions import allowed
from services import admin_users, audit
from services import suppressions as suppression_ops

# Files of our own served beside SQLAdmin's under /admin/statics: vendor/chartjs (Chart.js).
STATIC_DIR = Path(__file__).parent / "static"


class PasswordLogin(AuthenticationBackend):
    """Email + password against admin_users; the role rides in the signed session cookie."""

    def __init__(self, secret_key: str, engine: AsyncEngine, https_only: bool = False) -> None:
        # https_only: the session cookie is Secure, never sent over plain HTTP.
        super().__init__(secret_key=secret_key, same_site="strict", https_only=https_only)
        self._engine = engine
        # Inside the session middleware, which it needs: the CSRF check of every POST.
        self.middlewares.append(Middleware(CsrfMiddleware))
        # mount_admin's: failed sign-ins counted, and the login form to answer 429 with.
        self.throttle: LoginThrottle | None = None
        self.templates: Jinja2Templates | None = None

    async def login(self, request: Request) -> Response | bool:
        form = await request.form()
        email, password = str(form.get("username", "")), str(form.get("password", ""))
        address = request.client.host if request.client else "unknown"
        async with contextlib.AsyncExitStack() as stack:
            if self.throttle is not None:
                await stack.enter_async_context(self.throttle.lock(email))
                retry_after = await self.throttle.retry_after(email, address)
                if retry_after is not None:
                    return await self._too_many_attempts(request, retry_after)
            async with self._engine.begin() as conn:  # begin: an old hash is upgraded
                user = await admin_users.authenticate(conn, email, password)
            if user is None:
                if self.throttle is not None:
                    await self.throttle.failed(email, address)
                return False
        request.session.clear()  # a fresh session (and CSRF token) for the signed-in user
        request.session.update({"user_id": user.id, "email": user.email, "role": user.role, "stamp": user.stamp})
        return True

    async def logout(self, request: Request) -> bool:
        request.session.clear()
        return True

    async def authenticate(self, request: Request) -> bool:
        """The session's user as the database has them now: a deactivated user, or one whose
        password was reset, is signed out at their next request; a new role applies at once."""
        user_id = request.session.get("user_id")
        if not isinstance(user_id, int):
            return False
        async with self._engine.connect() as conn:
            user = await admin_users.session_user(conn, user_id)
        if user is None or user.stamp != request.session.get("stamp"):
            request.session.clear()
            return False
        request.session.update({"email": user.email, "role": user.role})
        return True

    async def _too_many_attempts(self, request: Request, retry_after: int) -> Response:
        """The login form again, 429, with the wait in Retry-After and on the page."""
        assert self.templates is not None
        minutes = max(1, round(retry_after / 60))
        context = {"error": f"Too many failed sign-ins. Try again in {minutes} minute{'s' if minutes != 1 else ''}."}
        response = await self.templates.TemplateResponse(request, "sqladmin/login.html", context, status_code=429)
        response.headers["Retry-After"] = str(retry_after)
        return response


class SuppressionAdmin(ReadOnlyView, model=Suppression):
    """Addresses nothing is sent to. Deleting one (admins) lifts it, audited with the reason
    typed in the delete dialog (sqladmin/modals/delete.html sends it as ?reason=)."""

    name_plural = "Suppressions"
    icon = "fa-solid fa-ban"
    column_list = ["channel", "address", "reason", "source", "created_at"]
    column_searchable_list = ["address", "reason"]
    column_sortable_list = ["created_at", "channel"]
    column_default_sort = ("created_at", True)
    can_delete = True
    delete_needs_reason = True

    async def delete_model(self, request: Request, pk: Any) -> None:
        # Lifted as the API lifts one, audit row included, in one transaction. Without a
        # reason nothing is lifted: SQLAdmin shows the error above the list.
        reason = audit.required_reason(request.query_params.get("reason"))
        channel, address = object_identifier_values(str(pk), Suppression)
        engine = self._admin_ref.engine
        assert isinstance(engine, AsyncEngine)  # mount_admin's
        async with engine.begin() as conn:
            await suppression_ops.lift(conn, signed_in(request), channel, address, reason)


@dataclass(frozen=True)
class ViewActions:
    """The permission table's actions (core.permissions) behind one admin view."""

    read: str  # list, details, export
    change: str | None = None  # anything else; None: nothing here is changed by hand but by admins


VIEW_ACTIONS: dict[str, ViewActions] = {
    # The list, a notification's or campaign send's page; cancelling is the API's notifications.send.
    NOTIFICATIONS: ViewActions("notifications.read", "notifications.send"),
    # The list and a person's page; GDPR export and erase ask recipients.export/.erase themselves.
    RECIPIENTS: ViewActions("recipients.read", "recipients.write"),
    SuppressionAdmin.identity: ViewActions("suppressions.read", "suppressions.write"),
    ADMIN_USERS: ViewActions("admin_users.manage", "admin_users.manage"),
    CAMPAIGNS: ViewActions("campaigns.read", "campaigns.write"),  # the list and the pages
    SegmentAdmin.identity: ViewActions("segments.read", "segments.write"),
    TEMPLATES: ViewActions("templates.read", "templates.write"),
    EVENT_TYPES: ViewActions("event_rules.read", "event_rules.write"),
    TRIGGER_RULES: ViewActions("event_rules.read", "event_rules.write"),
    EVENTS: ViewActions("events.read"),  # the list and the event's page
    PROVIDERS: ViewActions("providers.read", "providers.manage"),
    DEAD_LETTERS: ViewActions("dead_letters.read", "dead_letters.resolve"),
    AUDIT_LOG: ViewActions("audit.read"),
    ANALYTICS: ViewActions("analytics.read"),  # the dashboard and the campaign reports
}
READ_ACTIONS = {Action.LIST.value, Action.DETAILS.value, Action.EXPORT.value}


def view_action(identity: str, action: str) -> str | None:
    """The table's action for an admin action on a view; None if only admins may do it."""
    actions = VIEW_ACTIONS.get(identity)
    if actions is None:
        return None  # a view nobody mapped is for admins
    return actions.read if action in READ_ACTIONS else actions.change


class RolePermissions(AuthorizationBackend):
    """The permission table's answer for the signed-in user's role (kept in the session)."""

    def has_permission(self, request: Request, identity: str, action: str, obj: Any | None = None) -> bool:
        role = str(request.session.get("role"))
        named = view_action(identity, action)
        if named is None:
            return role == Role.admin.value
        return allowed(role, "admin_panel.use") and allowed(role, named)


def session_secret(settings: Settings, jwt_secret: str) -> str:
    if settings.admin_session_secret is not None:
        return settings.admin_session_secret.get_secret_value()
    # Derived, not reused: a leaked session key must not mint API tokens.
    return hashlib.sha256(b"marquee-admin-session:" + jwt_secret.encode()).hexdigest()


def mount_admin(app: FastAPI, engine: AsyncEngine, settings: Settings) -> Admin:
    admin = Admin(
        app,
        engine=engine,
        title="Marquee admin",
        authentication_backend=PasswordLogin(
            session_secret(settings, app.state.jwt_secret), engine, https_only=settings.served_over_tls
        ),
        authorization_backend=RolePermissions(),
        templates_dir=str(TEMPLATES_DIR),
        # StaticFiles looks in the directory first, then in SQLAdmin's package.
        static_files_kwargs={"directory": str(STATIC_DIR)},
    )
    install_template_hooks(admin.templates.env)  # CSRF fields and CSP nonces (admin.csrf)
    login = admin.authentication_backend
    assert isinstance(login, PasswordLogin)
    login.throttle, login.templates = LoginThrottle(settings.rate_limit_storage), admin.templates
    views: tuple[type[BaseView] | type[ModelView], ...] = (
        *(NotificationPages, DeadLetterPages, RecipientPages, SuppressionAdmin, UserPages),
        *(TemplatePages, CampaignAdmin, CampaignPages, SegmentAdmin),
        *(EventTypePages, TriggerRulePages, EventAdmin, EventPages),
        *(ProviderPages, AuditLogPage, AnalyticsPages),
    )
    for view in views:
        # SQLAdmin keeps its Admin (and through it our app's state) on the view CLASS: a class
        # of this app's own, so that a second app in the process (tests, tools) cannot take
        # over this one's pages.
        admin.add_view(type(view.__name__, (view,), {"__module__": view.__module__}))
    return admin
