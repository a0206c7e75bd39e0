"""Who may do what: one table of named actions and the roles allowed each.

The API's dependencies (api/deps.py) and the admin panel's RolePermissions both ask it.
An admin may do everything; the table lists the other roles an action allows.
"""

from __future__ import annotations

from collections.abc import Mapping

from core.auth import Role

_EVERY_ROLE = frozenset(Role)
_STAFF = frozenset({Role.campaign_manager, Role.analyst})  # people who look, in the panel and the API
_NO_ONE_BUT_ADMINS: frozenset[Role] = frozenset()

# Besides admins, who may do each action.
_OTHERS: Mapping[str, frozenset[Role]] = {
    # Submitting and cancelling instant notifications is for the backends that send.
    "notifications.send": frozenset({Role.service}),
    # Scheduled sends sit under /v1/notifications: services may book them as well as managers.
    "notifications.schedule": frozenset({Role.service, Role.campaign_manager}),
    "notifications.read": _EVERY_ROLE,
    "recipients.read": _EVERY_ROLE,
    "recipients.write": frozenset({Role.service}),
    # GDPR: a person's whole record out (export), or removed everywhere (erase).
    "recipients.export": _NO_ONE_BUT_ADMINS,
    "recipients.erase": _NO_ONE_BUT_ADMINS,
    "templates.read": _EVERY_ROLE,
    "templates.write": frozenset({Role.campaign_manager}),
    "segments.read": _EVERY_ROLE,
    "segments.write": frozenset({Role.campaign_manager}),
    "campaigns.read": _EVERY_ROLE,
    "campaigns.write": frozenset({Role.campaign_manager}),
    "providers.read": _STAFF,  # the list; settings and which secrets are set are for admins
    # One provider's whole definition is for those who change, enable, test and remove it.
    "providers.manage": _NO_ONE_BUT_ADMINS,
    "suppressions.read": _STAFF,
    "suppressions.write": _NO_ONE_BUT_ADMINS,
    "dead_letters.read": _STAFF,
    "dead_letters.resolve": _NO_ONE_BUT_ADMINS,  # replay or discard
    "audit.read": frozenset({Role.analyst}),
    # Analytics (the /v1/analytics API and the admin's dashboard and campaign report) only look.
    "analytics.read": _STAFF,
    # Other backends publish the facts; managers decide who hears what.
    "events.publish": frozenset({Role.service}),
    "events.read": _EVERY_ROLE,
    "event_rules.read": _EVERY_ROLE,
    "event_rules.write": frozenset({Role.campaign_manager}),
    "admin_users.manage": _NO_ONE_BUT_ADMINS,
    # Signing in to the admin panel is for people; a service account has nothing to do there.
    "admin_panel.use": _STAFF,
}

PERMISSIONS: Mapping[str, frozenset[Role]] = {action: others | {Role.admin} for action, others in _OTHERS.items()}
"""Every action and every role allowed it, admins included."""


def roles(action: str) -> frozenset[Role]:
    """The roles allowed `action`; KeyError names an action the table does not know (a typo)."""
    try:
        return PERMISSIONS[action]
    except KeyError:
        raise KeyError(f"no action {action!r} in the permission table") from None


def allowed(role: Role | str, action: str) -> bool:
    """May `role` (a Role, or its name as a session stores it) do `action`?"""
    permitted = roles(action)
    try:
        return Role(role) in permitted
    except ValueError:
        return False  # an unknown role may do nothing
