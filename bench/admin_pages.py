"""Admin pages at volume: every notifications and recipients page, timed over HTTP.

Loads a fresh PostgreSQL database (bench.common.fresh_database: 127.0.0.1:5432, else an
embedded server) with --notifications notifications of 3 channels each (so 3x deliveries),
--recipients recipients, three campaigns' sends and some dead letters, all with INSERT ...
SELECT generate_series (no rows cross the wire), then ANALYZE. ClickHouse history (chDB in a
temporary directory) gets --history filler rows (numbers()) and the real status events of
the notifications and campaign send whose pages are timed. The API app runs on uvicorn in
this process (Temporal is never asked: a lazy client), an admin signs in through the login
form, and each page is fetched --repeat times with httpx; the table shows the fastest,
median and slowest time and the answer's size.

    .venv/bin/python -m bench.admin_pages --notifications 1000000 --recipients 200000
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import html
import re
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvicorn
from temporalio.client import Client

from api.app import create_app
from bench.common import drop_database, fresh_database
from core.auth import Role, hash_password
from core.config import Settings
from core.db import create_engine
from core.migrate import upgrade_async
from entrypoints.embedded import free_port
from services.history import ChdbStore, HistoryWriter, campaign_send_id

BUDGET_SECONDS = 2.0  # issue #11: every list and detail page under 2 s at this volume
CAMPAIGNS = 3


def load_sql(notifications: int, recipients: int, campaign_sends: int) -> list[tuple[str, str]]:
    """(what, statement) in order. Notifications are spread over 60 days, newest last;
    statuses as a busy day has them: mostly sent, a few failed, pending and cancelled."""
    spacing = 60 * 86400 / notifications  # seconds between two notifications
    per_campaign = campaign_sends // CAMPAIGNS
    return [
        (
            "recipients",
            f"""
            INSERT INTO recipients (user_id, name, email, phone, push_tokens, locale, timezone, country, follows)
            SELECT 'u' || i, 'Person ' || i, 'u' || i || '@example.com', '+1555' || lpad(i::text, 7, '0'),
                   ARRAY['token-' || i], 'en', 'Europe/Berlin', 'DE', ARRAY['series:' || (i % 50)]
            FROM generate_series(1, {recipients}) AS i""",
        ),
        (
            "notifications",
            f"""
            INSERT INTO notifications (id, idempotency_key, request_hash, user_id, category, channels, title, body,
                                       status, requested_by, workflow_id, run_id, created_at, updated_at)
            SELECT n.id, 'bench:' || n.i, md5(n.i::text), 'u' || (1 + n.i % {recipients}), 'new_episode',
                   ARRAY['email', 'push', 'sms'], 'Episode ' || n.i, 'Episode ' || n.i || ' is out.',
                   CASE WHEN n.i % 100 < 90 THEN 'sent' WHEN n.i % 100 < 95 THEN 'failed'
                        WHEN n.i % 100 < 98 THEN 'pending' ELSE 'cancelled' END,
                   'bench', 'notification-' || n.id, 'run-' || n.i, n.at, n.at
            FROM (SELECT i, gen_random_uuid() AS id,
                         now() - make_interval(secs => ({notifications} - i) * {spacing}) AS at
                  FROM generate_series(1, {notifications}) AS i) AS n""",
        ),
        (
            "deliveries",
            """
            INSERT INTO deliveries (notification_id, channel, address, status, provider, provider_message_id,
                                    attempts, error, queued_at, sent_at, delivered_at, failed_at, updated_at)
            SELECT n.id, c.channel, n.user_id || '@' || c.channel, n.status,
                   CASE WHEN n.status IN ('sent', 'failed') THEN c.channel || '-provider' END,
                   CASE WHEN n.status = 'sent' THEN 'msg-' || c.channel || '-' || n.id END,
                   CASE WHEN n.status = 'pending' THEN 0 ELSE 1 END,
                   CASE WHEN n.status = 'failed' THEN 'provider refused' END,
                   n.created_at, CASE WHEN n.status = 'sent' THEN n.created_at + interval '1 second' END,
                   CASE WHEN n.status = 'sent' AND c.channel = 'email' THEN n.created_at + interval '5 seconds' END,
                   CASE WHEN n.status = 'failed' THEN n.created_at + interval '30 seconds' END, n.updated_at
            FROM notifications AS n CROSS JOIN unnest(ARRAY['email', 'push', 'sms']) AS c(channel)""",
        ),
        (
            "dead letters",
            """
            INSERT INTO dead_letters (notification_id, channel, reason, last_error, attempts, request)
            SELECT notification_id, channel, 'retries exhausted', 'provider refused', 6, '{}'::jsonb
            FROM deliveries WHERE status = 'failed' AND channel = 'sms' LIMIT 20000""",
        ),
        (
            "campaigns",
            f"""
            WITH segment AS (
                INSERT INTO segments (name, kind, filter, created_by)
                VALUES ('bench everyone', 'filter', '{{}}', 'bench') RETURNING id)
            INSERT INTO campaigns (id, name, category, template_key, template_version, segment_id, channels,
                                   schedule, status, created_by, created_at)
            SELECT gen_random_uuid(), 'Bench campaign ' || i, 'promo', 'bench', 1, segment.id, ARRAY['email'],
                   '{{}}', 'completed', 'bench', now() - make_interval(days => 10 * i)
            FROM generate_series(1, {CAMPAIGNS}) AS i, segment""",
        ),
        (
            "campaign runs",
            """
            INSERT INTO campaign_runs (id, campaign_id, status, started_at, finished_at)
            SELECT 'campaign-' || id, id, 'completed', created_at, created_at + interval '1 hour' FROM campaigns""",
        ),
        (
            "campaign deliveries",
            f"""
            INSERT INTO campaign_deliveries (run_id, recipient_id, channel, status, provider_message_id, error,
                                             created_at)
            SELECT r.id, 1 + (i % {recipients}), 'email',
                   CASE WHEN i % 50 = 0 THEN 'failed' ELSE 'sent' END, 'cmsg-' || r.id || '-' || i,
                   CASE WHEN i % 50 = 0 THEN 'mailbox full' END,
                   r.started_at + make_interval(secs => i * 3600.0 / {per_campaign})
            FROM campaign_runs AS r CROSS JOIN generate_series(1, {per_campaign}) AS i
            ORDER BY r.started_at, i""",
        ),
        ("analyze", "ANALYZE"),
    ]


async def load(database_url: str, notifications: int, recipients: int, campaign_sends: int) -> dict[str, float]:
    conn = await asyncpg.connect(database_url)
    took = {}
    try:
        for what, statement in load_sql(notifications, recipients, campaign_sends):
            started = time.perf_counter()
            await conn.execute(statement)
            took[what] = time.perf_counter() - started
            print(f"  loaded {what} in {took[what]:.1f} s", flush=True)
    finally:
        await conn.close()
    return took


def fill_history(store: ChdbStore, rows: int, samples: list[tuple[str, str, str, datetime]]) -> None:
    """Filler rows spread over 60 days, then each sample's own status events."""
    store.ensure_schema()
    store.query(f"""
        INSERT INTO notification_history (event_time, notification_id, channel, status, user_id, category, provider)
        SELECT now64(3) - toIntervalSecond(number * 5184000 / {rows}), generateUUIDv4(),
               ['email', 'push', 'sms'][1 + number % 3], ['sent', 'delivered', 'failed'][1 + intDiv(number, 3) % 3],
               concat('u', toString(number % 200000)), 'new_episode', 'sandbox'
        FROM numbers({rows})""")
    for notification_id, user_id, channel, at in samples:
        for offset, status in enumerate(("pending", "sent", "delivered")):
            store.query(
                "INSERT INTO notification_history (event_time, notification_id, channel, status, user_id, category, "
                "provider) VALUES ({at:DateTime64(3, 'UTC')}, {id:UUID}, {channel:String}, {status:String}, "
                "{user:String}, 'new_episode', 'sandbox')",
                {"at": at + timedelta(seconds=offset), "id": notification_id, "channel": channel, "status": status,
                 "user": user_id},
            )  # fmt: skip


async def samples(database_url: str) -> dict[str, Any]:
    """Ids the pages are asked about: a notification from the middle of the table, a campaign
    with its sends, a campaign send, a recipient."""
    conn = await asyncpg.connect(database_url)
    try:
        middle = await conn.fetchrow(
            "SELECT id, user_id, created_at FROM notifications ORDER BY created_at DESC "
            "OFFSET (SELECT count(*) / 2 FROM notifications) LIMIT 1"
        )
        campaign = await conn.fetchrow("SELECT id FROM campaigns ORDER BY created_at LIMIT 1")
        send = await conn.fetchrow(
            "SELECT cd.id, cd.run_id, cd.recipient_id, cd.channel, cd.created_at, r.campaign_id "
            "FROM campaign_deliveries cd JOIN campaign_runs r ON r.id = cd.run_id ORDER BY cd.id LIMIT 1 OFFSET 1000"
        )
        person = await conn.fetchrow("SELECT user_id, email FROM recipients WHERE id = 4242")
    finally:
        await conn.close()
    return {"middle": middle, "campaign": campaign, "send": send, "person": person}


async def sign_in(client: httpx.AsyncClient, email: str, password: str) -> None:
    """Through the login form, with its CSRF token when the form carries one."""
    form = await client.get("/admin/login")
    token = re.search(r'name="csrf_token" value="([^"]*)"', form.text)
    data = {"username": email, "password": password, **({"csrf_token": token.group(1)} if token else {})}
    answer = await client.post("/admin/login", data=data)
    if answer.status_code not in (200, 302, 303) or "/admin/login" in str(answer.headers.get("location", "")):
        raise RuntimeError(f"sign-in failed: {answer.status_code}")


def older_link(page: str) -> str:
    found = re.search(r'href="([^"]+)" id="older"', page)
    if found is None:
        raise RuntimeError("the page has no Older link")
    return html.unescape(found.group(1))


async def timed(fetch: Callable[[], Awaitable[httpx.Response]], repeat: int) -> tuple[list[float], int, int]:
    seconds, size, status = [], 0, 0
    for _ in range(repeat):
        started = time.perf_counter()
        answer = await fetch()
        seconds.append(time.perf_counter() - started)
        size, status = len(answer.content), answer.status_code
    return seconds, size, status


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="marquee-bench-admin-"))
    database_url, embedded = await fresh_database(workdir)
    store: ChdbStore | None = None
    try:
        await upgrade_async(database_url)
        deliveries = args.notifications * 3
        print(f"Loading {args.notifications:,} notifications, {deliveries:,} deliveries, "
              f"{args.recipients:,} recipients, {args.campaign_sends:,} campaign sends ...", flush=True)  # fmt: skip
        started = time.perf_counter()
        await load(database_url, args.notifications, args.recipients, args.campaign_sends)
        print(f"  PostgreSQL loaded in {time.perf_counter() - started:.0f} s", flush=True)
        found = await samples(database_url)
        store = ChdbStore(workdir / "chdb")
        started = time.perf_counter()
        send = found["send"]
        history_samples = [
            (str(found["middle"]["id"]), found["middle"]["user_id"], "email", found["middle"]["created_at"]),
            (campaign_send_id(send["campaign_id"], send["run_id"], send["recipient_id"], send["channel"]),
             "u1", send["channel"], send["created_at"]),
        ]  # fmt: skip
        await asyncio.to_thread(fill_history, store, args.history, history_samples)
        print(f"  ClickHouse history: {args.history:,} rows in {time.perf_counter() - started:.0f} s", flush=True)

        email, password = "bench-admin@example.com", secrets.token_urlsafe(16)
        conn = await asyncpg.connect(database_url)
        await conn.execute("INSERT INTO admin_users (email, password_hash, role) VALUES ($1, $2, $3)",
                           email, hash_password(password), Role.admin.value)  # fmt: skip
        await conn.close()

        port = free_port()
        settings = Settings(_env_file=None, data_dir=workdir, database_url=database_url,
                            jwt_secret=secrets.token_urlsafe(32), public_url=f"http://127.0.0.1:{port}",
                            rate_limit_enabled=False)  # fmt: skip
        engine = create_engine(database_url, 10)
        temporal = await Client.connect("127.0.0.1:1", lazy=True)  # no page here asks Temporal
        history = HistoryWriter(store)
        app = create_app(settings, engine=engine, temporal=temporal, history=history)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        serving = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn only offers a flag
            await asyncio.sleep(0.02)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                await sign_in(client, email, password)
                await report(client, found, args.repeat)
        finally:
            server.should_exit = True
            await serving
            await engine.dispose()
            store = None
            await history.close()
    finally:
        if store is not None:
            store.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        else:
            await drop_database(database_url)
        shutil.rmtree(workdir, ignore_errors=True)


async def report(client: httpx.AsyncClient, found: dict[str, Any], repeat: int) -> None:
    middle, person, campaign, send = found["middle"], found["person"], found["campaign"], found["send"]
    month_ago = (datetime.now(UTC) - timedelta(days=30)).date()
    first = await client.get("/admin/notifications")
    pages: dict[str, str] = {
        "notifications: newest": "/admin/notifications",
        "notifications: page 2 (cursor)": older_link(first.text),
        "notifications: by user": f"/admin/notifications?user_id={middle['user_id']}",
        "notifications: status failed": "/admin/notifications?status=failed",
        "notifications: pending + sms": "/admin/notifications?status=pending&channel=sms",
        "notifications: one day 30 days ago": f"/admin/notifications?since={month_ago}&until={month_ago}",
        "notifications: user + period": f"/admin/notifications?user_id={middle['user_id']}&since={month_ago}",
        "campaign sends: newest": "/admin/notifications?kind=campaign",
        "campaign sends: by campaign": f"/admin/notifications?campaign={campaign['id']}",
        "campaign sends: by user": f"/admin/notifications?kind=campaign&user_id={person['user_id']}",
        "notification detail (+ history)": f"/admin/notifications/view/{middle['id']}",
        "campaign send detail (+ history)": f"/admin/notifications/campaign-send/{send['id']}",
        "recipients: newest": "/admin/recipients",
        "recipients: by email": f"/admin/recipients?q={person['email']}",
        "recipient detail": f"/admin/recipients/view/{person['user_id']}",
    }
    print(f"\n{'page':38} {'min ms':>8} {'median':>8} {'max ms':>8} {'KiB':>6} {'status':>6}")
    slowest = 0.0
    for name, path in pages.items():
        await client.get(path)  # warm: the first request of a page compiles its template
        seconds, size, status = await timed(functools.partial(client.get, path), repeat)
        slowest = max(slowest, max(seconds))
        print(f"{name:38} {min(seconds) * 1000:8.1f} {statistics.median(seconds) * 1000:8.1f} "
              f"{max(seconds) * 1000:8.1f} {size / 1024:6.1f} {status:6d}", flush=True)  # fmt: skip
        if status != 200:
            raise RuntimeError(f"{path} answered {status}")
        if "history" in name:  # the timeline's ClickHouse part was read, not skipped
            shown = (await client.get(path)).text.count('data-source="clickhouse"')
            print(f"{'':38} ({shown} ClickHouse history rows on the timeline)")
    verdict = "within" if slowest < BUDGET_SECONDS else "OVER"
    print(f"\nslowest request {slowest * 1000:.0f} ms: {verdict} the {BUDGET_SECONDS:g} s budget")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notifications", type=int, default=1_000_000, help="3 deliveries each")
    parser.add_argument("--recipients", type=int, default=200_000)
    parser.add_argument("--campaign-sends", type=int, default=300_000)
    parser.add_argument("--history", type=int, default=3_000_000, help="ClickHouse history rows")
    parser.add_argument("--repeat", type=int, default=5)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
