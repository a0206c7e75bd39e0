"""Admin users in the admin (admins only): the list, a new user, and a user's page where an
admin changes their role, deactivates or reactivates them, or sets a new password.

The pages call services.admin_users, as `marquee user ...` does: the same checks, the same
audit rows (the signed-in admin as the actor), the reason a role change or deactivation
needs, and the refusal to leave no active admin (shown as the form's problem). A
deactivated user's open session ends at their next request (PasswordLogin.authenticate).
"""

from __future__ import annotations

from typing import Any

from sqladmin import expose
from sqladmin.flash import Flash
from starlette.requests import Request
from starlette.responses import Response

from admin.pages import AdminPage, FormErrors, form_text, not_found
from core.errors import Conflict, Invalid
from services import admin_users
from services.audit import ReasonRequired

ADMIN_USERS = "admin-user"  # the permission identity: admin_users.manage, admins only
OPERATIONS = ("role", "deactivate", "activate", "password")
ROLE_HELP = {
    "admin": "everything, including providers, admin users and erasure",
    "campaign_manager": "templates, segments, campaigns, event rules; reads notifications",
    "analyst": "reads everything, plus analytics and exports",
}


def _user_id(request: Request) -> int:
    raw = request.path_params["user_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise not_found(f"admin user {raw!r}")
    return int(raw)


class UserPages(AdminPage):
    name = "Admin users"
    icon = "fa-solid fa-user-shield"
    permission = ADMIN_USERS

    # The first exposed route is the one the menu links to.
    @expose("/users", identity="admin-users")
    async def list_page(self, request: Request) -> Response:
        async with self.connect() as conn:
            users = await admin_users.list_users(conn)
        me = request.session.get("user_id")
        return await self.render(request, "marquee/users/list.html", {"title": "Admin users", "users": users, "me": me})

    @expose("/users/new", methods=["GET", "POST"], identity="admin-user-new")
    async def create_page(self, request: Request) -> Response:
        self.require_change(request)
        form = {"email": "", "role": "analyst"}
        errors = FormErrors()
        if request.method == "POST":
            submitted = await request.form()
            form = {"email": form_text(submitted, "email"), "role": form_text(submitted, "role")}
            password = submitted.get("password")
            async with self.connect() as conn:
                try:
                    user_id = await admin_users.create(conn, form["email"], password if isinstance(password, str)
                                                       else "", form["role"], self.actor(request))  # fmt: skip
                    await conn.commit()
                except Invalid as err:
                    for field, message in err.problems:
                        errors.add(field, message)
                except Conflict as err:
                    errors.add("email", err.detail)
                else:
                    Flash.success(request, f"User {form['email'].strip().lower()} created.")
                    return self.redirect(request.url_for("admin:view-admin-user", user_id=user_id))
        context = {"title": "New admin user", "form": form, "errors": errors, "roles": ROLE_HELP}
        return await self.render(request, "marquee/users/form.html", context, 400 if errors else 200)

    @expose("/users/view/{user_id}", identity="admin-user")
    async def user_page(self, request: Request) -> Response:
        return await self._user_page(request, _user_id(request))

    async def _user_page(
        self,
        request: Request,
        user_id: int,
        *,
        failed: str | None = None,
        errors: FormErrors | None = None,
        form: dict[str, str] | None = None,
        status_code: int = 200,
    ) -> Response:
        async with self.connect() as conn:
            try:
                user = await admin_users.get_user(conn, user_id)
            except admin_users.UserNotFound as err:
                raise not_found(f"admin user {user_id}") from err
        context: dict[str, Any] = {"title": user.email, "user": user, "roles": ROLE_HELP, "failed": failed,
                                   "errors": errors or FormErrors(), "form": form or {},
                                   "me": request.session.get("user_id") == user.id}  # fmt: skip
        return await self.render(request, "marquee/users/detail.html", context, status_code)

    @expose("/users/act/{user_id}/{operation}", methods=["POST"], identity="admin-user-act")
    async def act(self, request: Request) -> Response:
        """Change the role, deactivate, activate, or set a new password; problems come back on
        the user's page, above the form that caused them."""
        self.require_change(request)
        user_id, operation = _user_id(request), request.path_params["operation"]
        if operation not in OPERATIONS:
            raise not_found(f"action {operation!r}")
        submitted = await request.form()
        form = {"role": form_text(submitted, "role"), "reason": form_text(submitted, "reason")}
        password = submitted.get("password")
        errors = FormErrors()
        status_code = 400
        async with self.connect() as conn:
            try:
                if operation == "role":
                    user = await admin_users.set_role(conn, self.actor(request), user_id, form["role"], form["reason"])
                    done = f"{user.email} is now {user.role}."
                elif operation == "password":
                    user = await admin_users.reset_password(conn, self.actor(request), user_id,
                                                            password if isinstance(password, str) else "")  # fmt: skip
                    done = f"New password set for {user.email}; their open sessions end."
                else:
                    active = operation == "activate"
                    user = await admin_users.set_active(conn, self.actor(request), user_id, active, form["reason"])
                    done = f"{user.email} {'may sign in again' if active else 'is deactivated; their sessions end'}."
                await conn.commit()
                if user.id == request.session.get("user_id") and operation == "password":
                    # Their own new password: this session goes on (the others end).
                    signed_in = await admin_users.session_user(conn, user.id)
                    if signed_in is not None:
                        request.session["stamp"] = signed_in.stamp
            except admin_users.UserNotFound as err:
                raise not_found(f"admin user {user_id}") from err
            except Invalid as err:
                for field, message in err.problems:
                    errors.add(field, message)
            except ReasonRequired as err:
                errors.add("reason", str(err))
            except Conflict as err:
                errors.add("form", err.detail)
                status_code = 409
            else:
                Flash.success(request, done)
                return self.redirect(request.url_for("admin:view-admin-user", user_id=user_id))
        return await self._user_page(
            request, user_id, failed=operation, errors=errors, form=form, status_code=status_code
        )
