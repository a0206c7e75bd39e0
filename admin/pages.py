"""What the admin's views share: the read-only table view, the signed-in user, and for its
own pages (templates, campaigns...) permissions, rendering and form errors.

The pages are SQLAdmin BaseViews whose routes call the domain modules (template_store,
campaign_control, campaign_store); nothing here knows about templates or campaigns.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ValidationError
from sqladmin import BaseView, ModelView
from sqladmin.authorization import Action
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette import status
from starlette.datastructures import URL
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from temporalio.client import Client

from core.auth import Principal, Role
from core.config import Settings
from services.audit import ReasonRequired, required_reason

TEMPLATES_DIR = Path(__file__).parent / "templates"

# Permission identities (what RolePermissions is asked about) of the pages.
TEMPLATES = "templates"
CAMPAIGNS = "campaign"  # the same as the campaigns list (a ModelView of Campaign)

READ_ONLY_MESSAGE = "Your role may look at this page but not change anything."


@dataclass(frozen=True)
class FormProblem:
    part: str  # the field, or a path inside it: "content.locales.en.email.subject", "en.sms.text"
    message: str
    line: int | None = None


@dataclass
class FormErrors:
    """Every problem of one submitted form, shown together above it."""

    problems: list[FormProblem] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.problems)

    def add(self, part: str, message: str, line: int | None = None) -> None:
        problem = FormProblem(part, message, line)
        if problem not in self.problems:
            self.problems.append(problem)

    def has(self, name: str) -> bool:
        """Does a problem concern the form field `name` (or something inside it)?"""
        return any(p.part == name or p.part.startswith(f"{name}.") for p in self.problems)

    def has_other(self, *names: str) -> bool:
        """Does a problem concern something other than these form fields (e.g. a content part)?"""
        return any(p.part.split(".")[0] not in names for p in self.problems)

    def messages(self, name: str) -> list[str]:
        return [p.message for p in self.problems if p.part == name]

    def add_validation(self, err: ValidationError, *, empty: Collection[str] = (), skip: Collection[str] = ()) -> None:
        """Pydantic's errors, one per problem; `empty` names fields the user left blank,
        `skip` fields whose problem is already reported (e.g. JSON that did not parse)."""
        for detail in err.errors():
            part = ".".join(str(item) for item in detail["loc"])
            if any(part == name or part.startswith(f"{name}.") for name in skip):
                continue
            message = str(detail["msg"]).removeprefix("Value error, ")
            if part in empty:
                message = "required"
            elif detail["type"] == "string_pattern_mismatch" and part in FRIENDLY_PATTERNS:
                message = FRIENDLY_PATTERNS[part]
            elif detail["type"] == "too_short" and part == "channels":
                message = "choose at least one channel"
            self.add(part or "form", message)


FRIENDLY_PATTERNS = {
    "key": "use 1 to 64 lowercase letters, digits, '-' or '_', starting with a letter or digit",
    "category": "use 1 to 64 lowercase letters, digits, '.', '-' or '_', starting with a letter or digit",
    "template": "choose a template",
    "schedule.time": "a time of day as HH:MM",
    "schedule.local_time": "a time of day as HH:MM",
    "schedule.window.start": "a time of day as HH:MM",
    "schedule.window.end": "a time of day as HH:MM",
    "schedule.cron": "five fields, e.g. 0 9 * * 1",
}


def parse_json(errors: FormErrors, name: str, text: str, *, want: type | None = None) -> Any:
    """The JSON in a textarea, or None with the reason added to `errors`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        errors.add(name, f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}", err.lineno)
        return None
    if want is dict and not isinstance(value, dict):
        errors.add(name, 'must be a JSON object, e.g. {"name": "value"}')
        return None
    return value


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def when(moment: datetime | None) -> str:
    """A time as shown on the pages: to the second, with its offset."""
    if moment is None:
        return ""
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def form_text(form: Any, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def reason_of(form: Any, errors: FormErrors, name: str = "reason") -> str:
    """The form's reason for a destructive or risky action (audited), as the API requires
    it (services.audit.required_reason); its problem into `errors` when there is none."""
    try:
        return required_reason(form_text(form, name))
    except ReasonRequired as err:
        errors.add(name, str(err))
        return ""


class ReadOnlyView(ModelView):
    """A table listed, searched and exported; a view allows a change by setting its flag."""

    can_create = False
    can_edit = False
    can_delete = False
    can_export = True
    page_size = 50


def signed_in(request: Request) -> Principal:
    """The signed-in user, as the audit log records them."""
    author = str(request.session.get("email") or request.session.get("user_id") or "admin")
    return Principal(subject=author, role=Role(request.session.get("role", Role.admin.value)))


class AdminPage(BaseView):
    """A page of our own in the admin: its routes are @expose'd methods.

    SQLAdmin gives a BaseView the identity of its first exposed route, so every page
    class names the identity RolePermissions is asked about in `permission` instead.
    """

    permission: ClassVar[str]

    def _allowed(self, request: Request, action: str) -> bool:
        return self._authorization_backend().has_permission(request, self.permission, action)

    def is_accessible(self, request: Request) -> bool:
        return self._allowed(request, Action.LIST)

    def can_change(self, request: Request) -> bool:
        return self._allowed(request, Action.EDIT)

    def require_change(self, request: Request) -> None:
        """Refuse the request (403) unless the user's role may change things here."""
        if not self.can_change(request):
            raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail=READ_ONLY_MESSAGE)

    def _app_state(self) -> Any:
        # request.app is SQLAdmin's mounted sub-application; the engine, Temporal client
        # and settings live on the main application's state.
        return self._admin_ref.app.state

    def settings(self) -> Settings:
        settings: Settings = self._app_state().settings
        return settings

    def temporal(self) -> Client:
        client: Client = self._app_state().temporal
        return client

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection; whatever is not committed is rolled back when it closes."""
        engine: AsyncEngine = self._app_state().engine
        async with engine.connect() as conn:
            yield conn

    @staticmethod
    def author(request: Request) -> str:
        return signed_in(request).subject

    @staticmethod
    def actor(request: Request) -> Principal:
        return signed_in(request)

    async def render(self, request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
        context = {
            "can_change": self.can_change(request),
            "when": when,
            "pretty_json": pretty_json,
            "errors": FormErrors(),
            **context,
        }
        return await self.templates.TemplateResponse(request, name, context, status_code=status_code)

    @staticmethod
    def redirect(url: URL | str) -> RedirectResponse:
        return RedirectResponse(str(url), status_code=status.HTTP_303_SEE_OTHER)


def not_found(what: str) -> HTTPException:
    return HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=f"{what} not found")
