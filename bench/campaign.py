"""A bulk campaign end to end on this machine: PostgreSQL -> Temporal -> worker(s) -> SMTP.

Loads N recipients, then times one campaign from launch until its run is completed, with
real `marquee worker` processes sending into an SMTP server in its own process, and checks
that the server received exactly N messages.

    .venv/bin/python -m bench.campaign --recipients 100000 --workers 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import sqlalchemy as sa

from bench.common import fresh_database
from core.config import Settings
from core.db import create_engine
from core.migrate import upgrade_async
from core.templating import TemplateContent, TemplateLimits
from core.temporal import connect
from entrypoints.embedded import TemporalDevServer, free_port, wait_for_port
from services import campaigns as campaign_control
from services import templates as template_store
from services.campaign_store import campaign_runs, segments

TEMPLATE = TemplateContent.model_validate(
    {
        "variables": [{"name": "film", "example": "Dune"}],
        "locales": {
            "en": {
                "email": {
                    "subject": "{{ film }} is out, {{ recipient.name }}",
                    "html": "<h1>{{ film }}</h1><p>Hello {{ recipient.name }}, it is on the big screen tonight.</p>",
                }
            }
        },
    }
)


async def _load_recipients(database_url: str, count: int) -> None:
    conn = await asyncpg.connect(database_url)
    rows = [(f"bench-{n}", f"Viewer {n}", f"viewer{n}@example.com", ["bench"], "en", "UTC") for n in range(count)]
    columns = ["user_id", "name", "email", "tags", "locale", "timezone"]
    await conn.copy_records_to_table("recipients", records=rows, columns=columns)
    await conn.close()


async def run(recipients: int, workers: int, batch_size: int, window: int, concurrency: int) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="marquee-bench-"))
    database_url, embedded = await fresh_database(workdir)
    await upgrade_async(database_url)
    await _load_recipients(database_url, recipients)
    temporal_port = free_port()
    temporal = TemporalDevServer(workdir / "temporal.db", temporal_port, free_port(), workdir / "temporal.log")
    await asyncio.to_thread(temporal.start)
    smtp_port = free_port()
    sink = subprocess.Popen(
        [sys.executable, "-m", "bench.smtp_sink", str(smtp_port)], stdout=subprocess.PIPE, text=True
    )
    wait_for_port("127.0.0.1", smtp_port, 10)
    settings = Settings(
        _env_file=None,
        data_dir=workdir,
        database_url=database_url,
        temporal_address=f"127.0.0.1:{temporal_port}",
        jwt_secret=secrets.token_urlsafe(32),
        campaign_batch_size=batch_size,
        campaign_window=window,
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MARQUEE_")},
        "MARQUEE_DATABASE_URL": database_url,
        "MARQUEE_TEMPORAL_ADDRESS": f"127.0.0.1:{temporal_port}",
        "MARQUEE_SMTP_PORT": str(smtp_port),
        "MARQUEE_SMTP_HOST": "127.0.0.1",
        "MARQUEE_SMTP_POOL_SIZE": str(concurrency * 2),
        "MARQUEE_CAMPAIGN_SEND_CONCURRENCY": str(concurrency),
        "MARQUEE_DATABASE_POOL_SIZE": "20",
        "MARQUEE_LOG_LEVEL": "WARNING",
        "MARQUEE_JWT_SECRET": settings.resolved_jwt_secret(),  # workers sign tracking links
    }
    processes = [
        subprocess.Popen(
            [str(Path(sys.executable).parent / "marquee"), "worker"],
            env={**env, "MARQUEE_DATA_DIR": str(workdir / f"worker{n}")},
        )
        for n in range(workers)
    ]
    engine = create_engine(database_url, 5)
    client = await connect(settings)
    try:
        async with engine.begin() as conn:
            await template_store.create(conn, key="bench", category="marketing", description="", content=TEMPLATE,
                                        author="bench", change_note="", limits=TemplateLimits())  # fmt: skip
            segment_id = await conn.scalar(
                segments.insert()
                .values(name="bench", kind="filter", created_by="bench",
                        filter={"field": "tags", "op": "contains", "value": "bench"})
                .returning(segments.c.id)
            )  # fmt: skip
            campaign_id = await campaign_control.create(
                conn,
                campaign_control.CampaignRequest(
                    name="bench", category="marketing", template="bench", template_version=None,
                    segment_id=segment_id, channels=["email"], variables={"film": "Dune"},
                    schedule={"kind": "now"}, throttle_per_second=None,
                ),
                "bench",
            )  # fmt: skip
        began = time.perf_counter()
        async with engine.begin() as conn:
            await campaign_control.launch(conn, client, settings, campaign_id)
        run_id = f"campaign-{campaign_id}"
        while True:
            async with engine.connect() as conn:
                row = (await conn.execute(sa.select(campaign_runs).where(campaign_runs.c.id == run_id))).first()
            if row is not None and row.status == "completed":
                break
            if dead := [p.returncode for p in processes if p.poll() is not None]:
                raise RuntimeError(f"a worker exited (codes {dead}) before the campaign completed")
            await asyncio.sleep(0.2)
        elapsed = time.perf_counter() - began
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(60)
        sink.send_signal(signal.SIGTERM)
        received = int((sink.communicate(timeout=30)[0] or "0").split()[-1])
        await engine.dispose()
        await asyncio.to_thread(temporal.stop)
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    return {
        "recipients": recipients,
        "workers": workers,
        "batch_size": batch_size,
        "window": window,
        "sends_per_batch_in_flight": concurrency,
        "sent_recorded": row.sent,
        "received_by_smtp_server": received,
        "seconds": elapsed,
        "per_minute": recipients / elapsed * 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    result = asyncio.run(run(args.recipients, args.workers, args.batch_size, args.window, args.concurrency))
    print("| metric | value |\n|---|---|")
    for name, value in result.items():
        print(f"| {name} | {value:,.1f} |" if isinstance(value, float) else f"| {name} | {value:,} |")


if __name__ == "__main__":
    main()
