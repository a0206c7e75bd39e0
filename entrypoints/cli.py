"""The `marquee` command: dev, api, worker, events, migrate, backup, restore, tokens, users, the secrets
key, and the Temporal codec server and its keys. The processes (entrypoints.servers) and the
store-wide commands (entrypoints.maintenance) live in modules of their own, loaded when run."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import pkgutil
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncConnection

from core.auth import Principal, Role, create_token
from core.codec import CodecKeyError
from core.codec import new_key as new_codec_key
from core.config import Settings
from core.db import create_engine
from core.errors import Conflict, Invalid, NotFound
from services import admin_users
from services.audit import ReasonRequired

Handler = Callable[[Settings, argparse.Namespace], int]
# The commands that start a server or change the stores as a whole, by name: importing the
# API, the admin, the worker or chDB takes seconds, which `marquee user list` need not wait.
SERVERS = "entrypoints.servers"
MAINTENANCE = "entrypoints.maintenance"


def _cmd_codec_key(settings: Settings, args: argparse.Namespace) -> int:
    try:
        print(new_codec_key(args.id))
    except CodecKeyError as err:
        raise SystemExit(f"marquee codec-key: {err}") from err
    return 0


def _cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    try:
        secret = settings.resolved_jwt_secret()
    except RuntimeError as err:
        raise SystemExit(f"marquee token create: {err}") from err
    ttl = args.ttl or settings.jwt_ttl_seconds
    print(create_token(secret, args.subject or f"cli-{args.role}", Role(args.role), ttl, settings.jwt_issuer))
    return 0


def _cli_actor() -> Principal:
    """Who the audit log names for `marquee user ...`: whoever can reach the database acts as admin."""
    return Principal(subject=f"cli:{getpass.getuser()}", role=Role.admin)


def _users(settings: Settings, action: str, work: Callable[[AsyncConnection], Awaitable[str]]) -> int:
    """Run one `marquee user` action in a transaction; print what it says, or exit with the problem."""
    if not settings.database_url:
        raise SystemExit(f"marquee user {action}: MARQUEE_DATABASE_URL is not set")

    async def run() -> str:
        engine = create_engine(settings.database_url or "", pool_size=1)
        try:
            async with engine.begin() as conn:
                return await work(conn)
        finally:
            await engine.dispose()

    try:
        print(asyncio.run(run()))
    except Invalid as err:
        raise SystemExit(f"marquee user {action}: {'; '.join(message for _, message in err.problems)}") from err
    except (Conflict, NotFound) as err:
        raise SystemExit(f"marquee user {action}: {err.detail}") from err
    except ReasonRequired as err:
        raise SystemExit(f"marquee user {action}: {err} (--reason)") from err
    return 0


def _new_password(args: argparse.Namespace) -> str:
    return sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass("Password: ")


def _cmd_user(settings: Settings, args: argparse.Namespace) -> int:
    password = _new_password(args)

    async def create(conn: AsyncConnection) -> str:
        await admin_users.create(conn, args.email, password, Role(args.role), _cli_actor())
        return f"created {args.role} {args.email}"

    return _users(settings, "create", create)


def _cmd_user_change(settings: Settings, args: argparse.Namespace) -> int:
    """deactivate, activate, set-role, reset-password: one user, named by email."""
    password = _new_password(args) if args.action == "reset-password" else ""

    async def change(conn: AsyncConnection) -> str:
        user_id = await admin_users.user_id_for(conn, args.email)
        if args.action == "reset-password":
            user = await admin_users.reset_password(conn, _cli_actor(), user_id, password)
            return f"new password for {user.email}; their open sessions end"
        if args.action == "set-role":
            user = await admin_users.set_role(conn, _cli_actor(), user_id, args.role, args.reason)
            return f"{user.email} is now {user.role}"
        user = await admin_users.set_active(conn, _cli_actor(), user_id, args.action == "activate", args.reason)
        return f"{user.email} is {'active' if user.is_active else 'deactivated; their open sessions end'}"

    return _users(settings, args.action, change)


def _cmd_user_list(settings: Settings, args: argparse.Namespace) -> int:
    async def listing(conn: AsyncConnection) -> str:
        users = await admin_users.list_users(conn)
        if args.json:
            return json.dumps([{"email": u.email, "role": u.role, "active": u.is_active,
                                "created_at": u.created_at.isoformat()} for u in users], indent=2)  # fmt: skip
        lines = [f"{u.email}\t{u.role}\t{'active' if u.is_active else 'deactivated'}" for u in users]
        return "\n".join(lines) if lines else "no admin users"

    return _users(settings, "list", listing)


def _cmd_secrets_key(settings: Settings, _: argparse.Namespace) -> int:
    print(Fernet.generate_key().decode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marquee", description="Marquee notification service")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("dev", help="run everything on embedded defaults (what `make run` starts)").set_defaults(
        handler=f"{SERVERS}:dev"
    )
    api = commands.add_parser("api", help="run the HTTP API and admin")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    _tls_arguments(api)
    api.set_defaults(handler=f"{SERVERS}:api")
    worker = commands.add_parser("worker", help="run a Temporal worker")
    worker.add_argument("--health-port", type=int, metavar="PORT",
                        help="serve /healthz, /readyz and this worker's /metrics on PORT "
                        "(default: MARQUEE_WORKER_HEALTH_PORT; unset: no health port)")  # fmt: skip
    worker.set_defaults(handler=f"{SERVERS}:worker")
    events = commands.add_parser("events", help="event intake").add_subparsers(dest="action", required=True)
    events.add_parser(
        "consume", help="take events from NATS JetStream (MARQUEE_NATS_URL, default nats://127.0.0.1:4222)"
    ).set_defaults(handler=f"{SERVERS}:events_consume")
    migrate = commands.add_parser("migrate", help="apply database and history store (ClickHouse) migrations")
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(handler=f"{MAINTENANCE}:migrate")

    backup_cmd = commands.add_parser(
        "backup", help="dump PostgreSQL, the history store and the dev stack's Temporal file into DIR"
    )
    backup_cmd.add_argument("directory", type=Path, metavar="DIR", help="a new or empty directory")
    backup_cmd.set_defaults(handler=f"{MAINTENANCE}:backup")
    restore_cmd = commands.add_parser("restore", help="restore a backup made by `marquee backup`")
    restore_cmd.add_argument("directory", type=Path, metavar="DIR")
    restore_cmd.add_argument("--force", action="store_true", help="replace targets that hold data")
    restore_cmd.set_defaults(handler=f"{MAINTENANCE}:restore")

    token = commands.add_parser("token", help="API tokens").add_subparsers(dest="action", required=True)
    create_token = token.add_parser("create", help="print a signed JWT")
    create_token.add_argument("--role", required=True, choices=[role.value for role in Role])
    create_token.add_argument("--subject", help="who the token stands for (default: cli-<role>)")
    create_token.add_argument("--ttl", type=int, help="lifetime in seconds (default: MARQUEE_JWT_TTL_SECONDS, 3600)")
    create_token.set_defaults(handler=_cmd_token)

    codec = commands.add_parser(
        "codec-server", help="serve the Temporal codec endpoint (/decode, /encode) for the Web UI, to admins"
    )
    codec.add_argument("--host", help="default: MARQUEE_CODEC_SERVER_HOST (127.0.0.1)")
    codec.add_argument("--port", type=int, help="default: MARQUEE_CODEC_SERVER_PORT (8234)")
    _tls_arguments(codec)
    codec.set_defaults(handler=f"{SERVERS}:codec_server")
    codec_key = commands.add_parser(
        "codec-key", help="print a new key entry (id:base64) for MARQUEE_TEMPORAL_CODEC_KEYS"
    )
    codec_key.add_argument("--id", help="the key's id, kept in each payload it encrypts (default: random)")
    codec_key.set_defaults(handler=_cmd_codec_key)

    commands.add_parser(
        "secrets-key", help="print a new key for MARQUEE_SECRETS_KEY (encrypts provider secrets)"
    ).set_defaults(handler=_cmd_secrets_key)

    user = commands.add_parser("user", help="admin panel users").add_subparsers(dest="action", required=True)
    create_user = user.add_parser("create", help="create an admin panel user")
    create_user.add_argument("--email", required=True)
    create_user.add_argument("--role", required=True, choices=[r.value for r in Role if r is not Role.service])
    create_user.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    create_user.set_defaults(handler=_cmd_user)
    person_roles = [r.value for r in admin_users.PERSON_ROLES]
    for action, helptext in (("deactivate", "end a user's access (and their open sessions)"),
                             ("activate", "let a deactivated user sign in again"),
                             ("set-role", "give a user another role"),
                             ("reset-password", "set a new password (their open sessions end)")):  # fmt: skip
        change = user.add_parser(action, help=helptext)
        change.add_argument("email")
        if action == "set-role":
            change.add_argument("role", choices=person_roles)
        if action == "reset-password":
            change.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        else:
            required = action != "activate"
            change.add_argument("--reason", required=required, help="why, for the audit log")
        change.set_defaults(handler=_cmd_user_change, reason=None)
    list_users = user.add_parser("list", help="list admin panel users")
    list_users.add_argument("--json", action="store_true")
    list_users.set_defaults(handler=_cmd_user_list)
    return parser


def _tls_arguments(parser: argparse.ArgumentParser) -> None:
    tls_cert_help = "serve HTTPS, TLS 1.3 only, with this certificate chain (default: MARQUEE_TLS_CERT)"
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help=tls_cert_help)
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key (default: MARQUEE_TLS_KEY)")


def handler_of(args: argparse.Namespace) -> Handler:
    """The command's function: given, or named "module:function" and imported now."""
    handler: Handler = pkgutil.resolve_name(args.handler) if isinstance(args.handler, str) else args.handler
    return handler


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    code = handler_of(args)(Settings(), args)
    sys.stdout.flush()
    sys.stderr.flush()
    if args.command in ("dev", "worker", "events"):
        # The Temporal SDK's native bridge can crash during interpreter teardown after a
        # clean shutdown; the work is done, so leave without running that teardown.
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
