"""A bulk campaign end to end on this machine: PostgreSQL -> Temporal -> worker(s) -> SMTP.

Loads N recipients, then for each worker count (`--workers 1,2`) times one campaign from
its launch (POST /v1/campaigns/{id}/launch on a `marquee api` process) until its run is
completed, with real `marquee worker` processes sending into Postfix's smtp-sink (the
aiosmtpd sink, with a warning, when the binary cannot be fetched; see bench/postfix.py).
Every run must reach the SMTP server exactly N times. Also measured in the same run: the
C-to-C SMTP ceiling (smtp-source -> smtp-sink, 20 sessions, 1 KB), each run's sends per
second over time (the sink's count, sampled), the peak RSS (VmHWM) of the workers and the
API, and with `--naive N` the naive design on N recipients: one NotificationWorkflow per
recipient through POST /v1/notifications (32 concurrent clients, one worker).

`--memory-recipients M` (issue #14's memory target: peak RSS flat from 100k to 1M) then
loads the segment up to M recipients and runs one more campaign to all of them with one
worker, beside the 1-worker run of `--recipients`: the worker is a fresh process each run,
and the API's peak is restarted before each run (clear_refs), so both peaks are per run.

    .venv/bin/python -m bench.campaign --recipients 100000 --workers 1,2 --naive 2000 \
        [--memory-recipients 1000000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import sqlalchemy as sa

from bench.ceilings import smtp_c_to_c
from bench.common import (
    MarqueeChild,
    Profiler,
    cpu_seconds,
    drop_database,
    fresh_database,
    marquee_env,
    post_admitted,
    profile_path,
    rss_mib,
    save_result,
)
from bench.postfix import Sink, find_postfix, start_sink
from core.auth import Role, create_token
from core.db import create_engine
from core.migrate import upgrade_async
from core.templating import TemplateContent, TemplateLimits
from entrypoints.embedded import TemporalDevServer, free_port
from services import campaigns as campaign_control
from services import templates as template_store
from services.campaign_store import campaign_deliveries, campaign_runs, segments

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


async def _load_recipients(database_url: str, count: int, start: int = 0) -> None:
    """Recipients `start` to `count` - 1, all in the bench segment."""
    conn = await asyncpg.connect(database_url)
    rows = (
        (f"bench-{n}", f"Viewer {n}", f"viewer{n}@example.com", ["bench"], "en", "UTC") for n in range(start, count)
    )
    columns = ["user_id", "name", "email", "tags", "locale", "timezone"]
    await conn.copy_records_to_table("recipients", records=rows, columns=columns)
    await conn.close()


async def run(
    recipients: int, workers: list[int], batch_size: int, window: int, concurrency: int,
    naive: int, ceiling_messages: int, profile: bool, memory_recipients: int = 0,
) -> dict[str, Any]:  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="marquee-bench-"))
    postfix = find_postfix()
    ceiling = await asyncio.to_thread(smtp_c_to_c, postfix, workdir, ceiling_messages) if postfix else None
    if ceiling:
        print(f"C-to-C ceiling: {ceiling['per_minute']:,.0f}/min", flush=True)
    database_url, embedded = await fresh_database(workdir)
    await upgrade_async(database_url)
    # The campaign runs' segment holds exactly `recipients`; the naive and memory runs grow it.
    loaded = recipients
    await _load_recipients(database_url, loaded)
    temporal_port = free_port()
    temporal = TemporalDevServer(workdir / "temporal.db", temporal_port, free_port(), workdir / "temporal.log")
    await asyncio.to_thread(temporal.start)
    sink = start_sink(workdir, postfix)
    secret = secrets.token_urlsafe(32)
    api_port = free_port()
    env = marquee_env(
        database_url, f"127.0.0.1:{temporal_port}", sink.port, secret,
        MARQUEE_API_PORT=str(api_port),
        MARQUEE_SMTP_POOL_SIZE=str(concurrency * 2),
        MARQUEE_CAMPAIGN_SEND_CONCURRENCY=str(concurrency),
        MARQUEE_CAMPAIGN_BATCH_SIZE=str(batch_size),
        MARQUEE_CAMPAIGN_WINDOW=str(window),
        MARQUEE_DATABASE_POOL_SIZE="20",
    )  # fmt: skip
    logs = workdir / "logs"
    api = MarqueeChild("api", {**env, "MARQUEE_DATA_DIR": str(workdir / "api")}, logs)
    engine = create_engine(database_url, 5)
    token = create_token(secret, "bench", Role.admin, 3600)
    runs: list[dict[str, Any]] = []
    naive_result: dict[str, Any] | None = None
    memory_run: dict[str, Any] | None = None
    api_peaks: list[float] = []  # the API's peak before each restart of it, and at the end
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as http:
            await api.wait_ready()
            segment_id = await _template_and_segment(engine)
            for count in workers:
                api_peaks.append(api.reset_peak_rss())
                runs.append(
                    await _campaign(engine, http, sink, api, env, workdir, segment_id, recipients, count, profile)
                )
                print(_run_line(runs[-1], ceiling), flush=True)
            if memory_recipients > loaded:
                # The same segment, grown only now: the runs above had exactly `recipients`.
                await _load_recipients(database_url, memory_recipients, start=loaded)
                loaded = memory_recipients
                api_peaks.append(api.reset_peak_rss())
                memory_run = await _campaign(
                    engine, http, sink, api, env, workdir, segment_id, memory_recipients, 1, profile=False
                )
                print("memory run: " + _run_line(memory_run, ceiling), flush=True)
            if naive:
                if naive > loaded:  # the naive run sends to bench-0 .. bench-(naive - 1)
                    await _load_recipients(database_url, naive, start=loaded)
                naive_result = await _naive(http, sink, env, workdir, naive)
                print(f"naive: {naive} recipients in {naive_result['seconds']:.1f} s = "
                      f"{naive_result['per_minute']:,.0f}/min", flush=True)  # fmt: skip
        api_peaks.append(api.peak_rss_mib())
    finally:
        await asyncio.to_thread(api.stop)
        received = await asyncio.to_thread(sink.stop)
        await engine.dispose()
        await asyncio.to_thread(temporal.stop)
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        else:
            await drop_database(database_url)
    return {
        "recipients": recipients,
        "batch_size": batch_size,
        "window": window,
        "sends_per_batch_in_flight": concurrency,
        "receiver": sink.kind,
        "ceiling": ceiling,
        "runs": runs,
        "naive": naive_result,
        "memory_run": memory_run,
        "received_by_smtp_server": received,
        "api_peak_rss_mib": max(api_peaks),
        "logs": str(logs),
    }


async def _template_and_segment(engine: Any) -> int:
    async with engine.begin() as conn:
        await template_store.create(conn, key="bench", category="marketing", description="", content=TEMPLATE,
                                    author="bench", change_note="", limits=TemplateLimits())  # fmt: skip
        segment_id: int = await conn.scalar(
            segments.insert()
            .values(name="bench", kind="filter", created_by="bench",
                    filter={"field": "tags", "op": "contains", "value": "bench"})
            .returning(segments.c.id)
        )  # fmt: skip
    return segment_id


async def _campaign(
    engine: Any, http: httpx.AsyncClient, sink: Sink, api: MarqueeChild, env: dict[str, str], workdir: Path,
    segment_id: int, recipients: int, count: int, profile: bool,
) -> dict[str, Any]:  # fmt: skip
    """One campaign to the whole segment (`recipients`) with `count` fresh worker processes."""
    name = f"bench-{count}w-{uuid.uuid4().hex[:4]}"
    logs = workdir / "logs"
    workers = [
        MarqueeChild("worker", {**env, "MARQUEE_DATA_DIR": str(workdir / name / str(n))}, logs, f"{name}-{n}")
        for n in range(count)
    ]
    profilers: dict[str, Profiler] = {}
    try:
        await asyncio.gather(*(worker.wait_ready() for worker in workers))
        async with engine.begin() as conn:
            campaign_id = await campaign_control.create(
                conn,
                campaign_control.CampaignRequest(
                    name=name, category="marketing", template="bench", template_version=None,
                    segment_id=segment_id, channels=["email"], variables={"film": "Dune"},
                    schedule={"kind": "now"}, throttle_per_second=None,
                ),
                "bench",
            )  # fmt: skip
        if profile:
            children = [("api", api), *((f"worker {n}", worker) for n, worker in enumerate(workers))]
            profilers = {
                label: Profiler(child.pid, profile_path(f"campaign-{count}w", label.replace(" ", "")))
                for label, child in children
            }
        before = sink.count()
        cpu_before = [cpu_seconds(worker.pid) for worker in workers]
        began = time.perf_counter()
        (await http.post(f"/v1/campaigns/{campaign_id}/launch")).raise_for_status()
        samples: list[tuple[float, int]] = [(0.0, 0)]
        rss: list[tuple[float, float]] = []  # the first worker's resident set over time: does it grow?
        run_id = f"campaign-{campaign_id}"
        while True:
            await asyncio.sleep(0.5)
            samples.append((time.perf_counter() - began, sink.count() - before))
            rss.append((samples[-1][0], rss_mib(workers[0].pid)))
            async with engine.connect() as conn:
                row = (await conn.execute(sa.select(campaign_runs).where(campaign_runs.c.id == run_id))).first()
            if row is not None and row.status == "completed":
                break
            for worker in workers:
                worker.check_alive()
        elapsed = time.perf_counter() - began
        # Less noisy than the rate on a shared VM: what a message costs the workers, all threads.
        worker_cpu = sum(cpu_seconds(worker.pid) - start for worker, start in zip(workers, cpu_before, strict=True))
        received = await asyncio.to_thread(sink.wait_for, before + recipients, 10) - before
        samples.append((time.perf_counter() - began, received))
        profiles = {name: profiler.stop() for name, profiler in profilers.items()}
        peaks = [worker.peak_rss_mib() for worker in workers]
        api_peak = api.peak_rss_mib()
        async with engine.connect() as conn:
            sent_to = await conn.scalar(
                sa.select(sa.func.count(sa.distinct(campaign_deliveries.c.recipient_id))).where(
                    campaign_deliveries.c.run_id == run_id, campaign_deliveries.c.status == "sent"
                )
            )
    finally:
        for profiler in profilers.values():
            profiler.stop()
        for worker in workers:
            await asyncio.to_thread(worker.stop)
    return {
        "workers": count,
        "recipients": recipients,
        "sent_recorded": row.sent,
        "received_by_smtp_server": received,
        # Each recipient once: as many messages at the server as recipients recorded sent, each once.
        "exactly_once": received == row.sent == sent_to == recipients,
        "seconds": elapsed,
        "per_minute": recipients / elapsed * 60,
        "worker_cpu_ms_per_message": worker_cpu / recipients * 1000,
        "worker_peak_rss_mib": peaks,
        "api_peak_rss_mib": api_peak,
        "samples": samples,
        "worker_rss_mib": rss,
        "profiles": profiles,
    }


async def _naive(http: httpx.AsyncClient, sink: Sink, env: dict[str, str], workdir: Path, count: int) -> dict[str, Any]:
    """One NotificationWorkflow per recipient through the API, one worker, 32 clients at a time."""
    worker = MarqueeChild("worker", {**env, "MARQUEE_DATA_DIR": str(workdir / "naive")}, workdir / "logs", "naive")
    try:
        await worker.wait_ready()
        # Warm: one notification all the way through before the clock starts.
        warm = {"user_id": "bench-0", "type": "bench", "channels": ["email"], "title": "warm", "body": "x"}
        (await http.post("/v1/notifications", params={"wait": "true"}, json=warm)).raise_for_status()
        before = sink.count()
        pending = iter(range(count))
        shed = 0

        async def client() -> None:
            nonlocal shed
            for n in pending:
                body = {"user_id": f"bench-{n}", "type": "bench", "channels": ["email"], "title": "Dune", "body": "x"}
                response, times = await post_admitted(http, "/v1/notifications", body)
                response.raise_for_status()
                shed += times

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(32)))
        deadline = time.monotonic() + 600
        while (received := sink.count() - before) < count and time.monotonic() < deadline:
            worker.check_alive()
            await asyncio.sleep(0.1)
        elapsed = time.perf_counter() - began
    finally:
        await asyncio.to_thread(worker.stop)
    return {
        "recipients": count,
        "received": received,
        "seconds": elapsed,
        "per_minute": count / elapsed * 60,
        "shed": shed,
    }


def _run_line(row: dict[str, Any], ceiling: dict[str, Any] | None) -> str:
    ratio = f", {row['per_minute'] / ceiling['per_minute']:.2f} of the C-to-C ceiling" if ceiling else ""
    return (
        f"{row['workers']} worker(s): {row['received_by_smtp_server']:,} received, {row['sent_recorded']:,} recorded, "
        f"{row['seconds']:.1f} s = {row['per_minute']:,.0f}/min{ratio}; exactly once: {row['exactly_once']}; "
        f"worker CPU {row['worker_cpu_ms_per_message']:.3f} ms a message; "
        f"peak RSS: worker {row['worker_peak_rss_mib']}, API {row['api_peak_rss_mib']:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--workers", default="1,2", help="worker process counts, one campaign each")
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--naive", type=int, default=0, help="recipients for the naive design (0: skip)")
    parser.add_argument("--ceiling-messages", type=int, default=100_000, help="smtp-source messages for the ceiling")
    parser.add_argument("--profile", action="store_true", help="py-spy on the workers and the API")
    parser.add_argument(
        "--memory-recipients", type=int, default=0, help="then a 1-worker campaign to this many, for peak RSS (0: skip)"
    )
    args = parser.parse_args()
    workers = [int(count) for count in args.workers.split(",")]
    if args.memory_recipients and (1 not in workers or args.memory_recipients <= max(args.recipients, args.naive)):
        parser.error("--memory-recipients needs a 1-worker run in --workers and more than --recipients and --naive")
    result = asyncio.run(
        run(args.recipients, workers, args.batch_size, args.window, args.concurrency, args.naive,
            args.ceiling_messages, args.profile, args.memory_recipients)
    )  # fmt: skip
    naive = result["naive"]
    if naive and result["runs"]:
        print(f"campaign ({result['runs'][0]['workers']} worker) / naive: "
              f"{result['runs'][0]['per_minute'] / naive['per_minute']:.0f}x")  # fmt: skip
    for run_result in result["runs"]:
        for name, found in run_result["profiles"].items():
            print(f"py-spy, {name}: {found.get('samples', 0)} samples, top: "
                  + "; ".join(f"{row['function']} {row['own']:.1%}" for row in found["top"][:5]))  # fmt: skip
    print(f"written to {save_result('campaign', result)}")


if __name__ == "__main__":
    main()
