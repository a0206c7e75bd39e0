"""`marquee dev` (what `make run` starts): the whole service on embedded defaults.

One process runs the API, the admin, the worker, the capture SMTP server and, when NATS
answers, the NATS event intake; PostgreSQL and the Temporal dev server run as child
processes with their data under data_dir. chDB can be opened by one process only, which is
why API and worker share this one.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
from contextlib import AsyncExitStack

import sqlalchemy as sa
import uvicorn

from api.app import create_app
from core.auth import Role, create_token, hash_password
from core.config import Settings
from core.db import create_engine
from core.logging import configure_logging
from core.migrate import upgrade_async
from core.models import AdminUser
from core.temporal import connect
from entrypoints.embedded import EmbeddedPostgres, TemporalDevServer, ensure_database, start_capture_smtp
from entrypoints.event_consumer import EventConsumer, NatsUnavailable, nats_url, open_consumer, shown
from entrypoints.tls import uvicorn_tls, with_tls
from worker import create_worker, worker_services

DEV_ADMIN_EMAIL = "admin@marquee.localhost"


async def ensure_dev_admin(settings: Settings, database_url: str) -> str | None:
    """Create the first admin user with a random password; return it, or None if users exist."""
    engine = create_engine(database_url, pool_size=1)
    table = AdminUser.__table__  # type: ignore[attr-defined]
    password_file = settings.data_dir / "admin-password"
    try:
        async with engine.begin() as conn:
            if await conn.scalar(sa.select(sa.func.count()).select_from(table)):
                return password_file.read_text().strip() if password_file.exists() else None
            password = secrets.token_urlsafe(12)
            await conn.execute(
                table.insert().values(
                    email=DEV_ADMIN_EMAIL, password_hash=hash_password(password), role=Role.admin.value
                )
            )
        password_file.write_text(password)
        password_file.chmod(0o600)
        return password
    finally:
        await engine.dispose()


async def run_dev(settings: Settings) -> None:
    settings = with_tls(settings)  # MARQUEE_TLS_CERT/KEY: HTTPS, TLS 1.3 only
    configure_logging(settings)
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    jwt_secret = settings.ensure_dev_secret()
    updates: dict[str, object] = {"dev_tools": True, "data_dir": data_dir}

    async with AsyncExitStack() as stack:
        lines: list[tuple[str, str]] = []
        if settings.database_url is None:
            postgres = EmbeddedPostgres(data_dir / "postgres", settings.embedded_pg_port)
            server_url = await asyncio.to_thread(postgres.start)
            stack.callback(postgres.stop)
            updates["database_url"] = await ensure_database(server_url, "marquee")
            lines.append(("PostgreSQL (embedded)", f"{updates['database_url']}"))
        if settings.temporal_address is None:
            temporal_server = TemporalDevServer(
                data_dir / "temporal.db", settings.temporal_port, settings.temporal_ui_port, data_dir / "temporal.log"
            )
            await asyncio.to_thread(temporal_server.start)
            stack.callback(temporal_server.stop)
            lines.append(("Temporal Web UI", f"http://127.0.0.1:{settings.temporal_ui_port}"))
            lines.append(("Temporal frontend", f"127.0.0.1:{settings.temporal_port}"))
        if "smtp_host" not in settings.model_fields_set:  # no real SMTP server configured
            capture = start_capture_smtp(data_dir / "mail", settings.capture_smtp_port)
            stack.callback(capture.stop)
            updates.update(smtp_host="127.0.0.1", smtp_port=settings.capture_smtp_port)
            lines.append(("Capture SMTP server", f"127.0.0.1:{settings.capture_smtp_port}"))

        settings = settings.model_copy(update=updates)
        assert settings.database_url is not None
        await upgrade_async(settings.database_url)
        password = await ensure_dev_admin(settings, settings.database_url)

        client = await connect(settings)
        engine = create_engine(settings.database_url, settings.database_pool_size)
        stack.push_async_callback(engine.dispose)
        services = await stack.enter_async_context(worker_services(settings, engine))
        worker = create_worker(client, settings, services)
        app = create_app(settings, engine=engine, temporal=client, history=services.history)
        tls = uvicorn_tls(settings)
        server = uvicorn.Server(
            uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_config=None, lifespan="on", **tls)
        )
        token = create_token(jwt_secret, "dev-service", Role.service, ttl_seconds=30 * 24 * 3600)
        base = settings.public_url
        lines = [
            ("API", base),
            ("OpenAPI docs", f"{base}/docs"),
            ("Admin", f"{base}/admin  ({DEV_ADMIN_EMAIL} / {password or 'see ' + str(data_dir / 'admin-password')})"),
            ("Captured mail and sandbox push/SMS", f"{base}/dev"),
            *lines,
        ]
        # The NATS intake when NATS answers (MARQUEE_NATS_URL, else the machine's own); never required.
        intake: EventConsumer | None = None
        try:
            intake, close_nats = await open_consumer(settings, engine, client, wait_seconds=1.0)
            stack.push_async_callback(close_nats)
            lines.append(("NATS event intake", f"{shown(nats_url(settings))}  (publish to {intake.names.subjects})"))
        except NatsUnavailable as err:
            lines.append(("NATS event intake", f"off: {err}"))

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        worker_task = asyncio.create_task(worker.run(), name="worker")
        server_task = asyncio.create_task(server.serve(), name="api")
        intake_task = asyncio.create_task(intake.run(stop), name="nats-intake") if intake is not None else None
        while not server.started and not server_task.done():  # noqa: ASYNC110 - uvicorn only offers a flag
            await asyncio.sleep(0.05)
        if server_task.done():
            await server_task  # raises the reason it could not start (port taken, ...)
        width = max(len(name) for name, _ in lines)
        print("\nMarquee is running (Ctrl-C stops everything):\n")
        for name, where in lines:
            print(f"  {name:<{width}}  {where}")
        print(f"\n  A service token (30 days):\n  export TOKEN={token}\n", flush=True)

        done, _ = await asyncio.wait(
            [asyncio.create_task(stop.wait()), worker_task, server_task], return_when=asyncio.FIRST_COMPLETED
        )
        print("\nStopping...", flush=True)
        stop.set()
        server.should_exit = True
        await worker.shutdown() if worker.is_running else None
        await asyncio.gather(server_task, worker_task, *([intake_task] if intake_task else []), return_exceptions=True)
        for task in done:
            if task in (worker_task, server_task) and task.exception():
                raise task.exception()  # type: ignore[misc]
