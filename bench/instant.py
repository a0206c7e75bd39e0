"""Instant notifications end to end: HTTP API -> Temporal -> SMTP, on this machine.

Two modes:

- open loop (`--rates 25,50,100,150 --duration 20`), the production topology: `marquee api`
  and `marquee worker` as separate processes, the Temporal dev server (SQLite file with WAL,
  as the dev stack runs it), PostgreSQL (the machine's at 127.0.0.1:5432 when it answers,
  else embedded) and Postfix's smtp-sink as the receiver. Each rate fires requests on a
  fixed schedule for `--duration` seconds whatever the answers (latency counted from the
  scheduled time, so a slow server cannot slow the load down), then waits for the
  deliveries to drain. Per rate: API latency p50/p95/p99 (all, and by answer), errors,
  sheds (429/503), and accept -> sent p50/p95 read from PostgreSQL (deliveries.sent_at,
  written right after the SMTP server's 250, minus notifications.created_at): smtp-sink
  cannot time a message.
  `--profile` samples the API and the worker with py-spy.
- closed loop (`--count 1000 --concurrency 32`, the default): the whole service in one
  process (as `marquee dev` runs it) with an aiosmtpd sink, C clients sending N requests.

    .venv/bin/python -m bench.instant --rates 25,50,100,150 --duration 20
    .venv/bin/python -m bench.instant --count 2000 --concurrency 50
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.common import (
    MarqueeChild,
    Profiler,
    cpu_seconds,
    drop_database,
    fresh_database,
    in_process_stack,
    marquee_env,
    percentile,
    post_admitted,
    profile_path,
    save_result,
)
from bench.postfix import find_postfix, start_sink
from core.auth import Role, create_token
from core.config import Settings
from core.migrate import upgrade_async
from entrypoints.embedded import MailCapture, TemporalDevServer, free_port


async def run(count: int, concurrency: int) -> dict[str, float]:
    capture = MailCapture(None)
    async with in_process_stack(Path(tempfile.mkdtemp(prefix="marquee-bench-")), capture) as stack:
        return await _drive(stack.settings, stack.api_url, capture, count, concurrency)


async def _drive(
    settings: Settings, api_url: str, capture: MailCapture, count: int, concurrency: int
) -> dict[str, float]:
    token = create_token(settings.resolved_jwt_secret(), "bench", Role.service, 3600)
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=api_url, headers=headers, limits=limits) as api:
        users = [{"user_id": f"bench-{n}", "email": f"bench-{n}@example.com"} for n in range(count)]
        for start in range(0, count, 1000):
            batch = {"recipients": users[start : start + 1000]}
            (await api.post("/v1/recipients/batch", json=batch)).raise_for_status()

        latencies: list[float] = []
        shed = 0
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(count):
            queue.put_nowait(n)

        async def client() -> None:
            nonlocal shed
            while not queue.empty():
                n = queue.get_nowait()
                body = {"user_id": f"bench-{n}", "type": "bench", "channels": ["email"], "title": f"#{n}", "body": "x"}
                started = time.perf_counter()
                response, times = await post_admitted(api, "/v1/notifications", body)
                latencies.append(time.perf_counter() - started)  # shed waits included
                shed += times
                response.raise_for_status()

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        accepted_in = time.perf_counter() - began
        while len(capture.messages) < count:  # noqa: ASYNC110 - the SMTP thread appends, no event to await
            await asyncio.sleep(0.05)
        delivered_in = time.perf_counter() - began

    latencies.sort()
    return {
        "notifications": count,
        "concurrency": concurrency,
        "api_accept_per_s": count / accepted_in,
        "api_p50_ms": statistics.median(latencies) * 1000,
        "api_p95_ms": latencies[int(len(latencies) * 0.95) - 1] * 1000,
        "shed": shed,
        "end_to_end_per_s": count / delivered_in,
        "end_to_end_per_min": count / delivered_in * 60,
    }


async def open_loop(rates: list[float], duration: float, drain: float, profile: bool) -> dict[str, Any]:
    """Each rate in turn against `marquee api` + `marquee worker` processes (see the module doc)."""
    workdir = Path(tempfile.mkdtemp(prefix="marquee-bench-"))
    database_url, embedded = await fresh_database(workdir)
    await upgrade_async(database_url)
    temporal_port = free_port()
    temporal = TemporalDevServer(workdir / "temporal.db", temporal_port, free_port(), workdir / "temporal.log")
    await asyncio.to_thread(temporal.start)
    sink = start_sink(workdir, find_postfix())
    secret = secrets.token_urlsafe(32)
    api_port = free_port()
    env = marquee_env(database_url, f"127.0.0.1:{temporal_port}", sink.port, secret, MARQUEE_API_PORT=str(api_port))
    api = MarqueeChild("api", {**env, "MARQUEE_DATA_DIR": str(workdir / "api")}, workdir / "logs")
    worker = MarqueeChild("worker", {**env, "MARQUEE_DATA_DIR": str(workdir / "worker")}, workdir / "logs")
    profilers: dict[str, Profiler] = {}
    db = await asyncpg.connect(database_url)
    try:
        token = create_token(secret, "bench", Role.service, 3600)
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {token}"},
            limits=limits, timeout=60,
        ) as http:  # fmt: skip
            await asyncio.gather(api.wait_ready(), worker.wait_ready())
            users = sum(int(rate * duration) for rate in rates) + 1
            for start in range(0, users, 1000):
                batch = [{"user_id": f"bench-{n}", "email": f"bench-{n}@example.com"}
                         for n in range(start, min(users, start + 1000))]  # fmt: skip
                (await http.post("/v1/recipients/batch", json={"recipients": batch})).raise_for_status()
            # One end to end first: the worker is polling and every pool is warm before timing.
            warm = {
                "user_id": f"bench-{users - 1}",
                "type": "bench",
                "channels": ["email"],
                "title": "warm",
                "body": "x",
            }
            (await http.post("/v1/notifications", params={"wait": "true"}, json=warm)).raise_for_status()
            if profile:
                profilers = {p.name: Profiler(p.pid, profile_path("instant", p.name)) for p in (api, worker)}
            first_user = 0
            results = []
            for rate in rates:
                results.append(
                    await _offered_rate(http, db, rate, duration, drain, first_user, (api, worker), temporal.pid)
                )
                first_user += int(rate * duration)
                print(_rate_line(results[-1]), flush=True)
        profiles = {name: profiler.stop() for name, profiler in profilers.items()}
        peaks = {"api": api.peak_rss_mib(), "worker": worker.peak_rss_mib()}
    finally:
        for profiler in profilers.values():
            profiler.stop()
        await db.close()
        for child in (api, worker):
            await asyncio.to_thread(child.stop)
        received = await asyncio.to_thread(sink.stop)
        await asyncio.to_thread(temporal.stop)
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        else:
            await drop_database(database_url)
    sent = sum(row["sent"] for row in results) + 1  # and the warm-up
    return {
        "mode": "open loop",
        "topology": "marquee api + marquee worker processes, Temporal dev server (SQLite, WAL), PostgreSQL",
        "receiver": sink.kind,
        "duration_s": duration,
        "rates": results,
        "received_by_smtp_server": received,
        "sent_recorded": sent,
        "peak_rss_mib": peaks,
        "profiles": profiles,
        "logs": str(workdir / "logs"),
    }


async def _offered_rate(
    http: httpx.AsyncClient,
    db: asyncpg.Connection,
    rate: float,
    duration: float,
    drain: float,
    first_user: int,
    children: tuple[MarqueeChild, ...],
    temporal_pid: int,
) -> dict[str, Any]:
    """Fire rate x duration requests on schedule, then wait for their deliveries. CPU per
    notification is each process's CPU time over the rate's whole run (drain included) by
    the notifications sent: it shows where the cost is even when the machine is shared."""
    loop = asyncio.get_running_loop()
    pids = {child.name: child.pid for child in children} | {"temporal": temporal_pid}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    total = int(rate * duration)
    latencies: list[float] = []
    by_answer: dict[str, list[float]] = {}  # above capacity: are the refusals fast, or do they wait too?
    outcomes: Counter[str] = Counter()
    accepted: list[uuid.UUID] = []

    async def fire(n: int, scheduled: float) -> None:
        body = {"user_id": f"bench-{first_user + n}", "type": "bench", "channels": ["email"],
                "title": f"{rate}/s #{n}", "body": "x"}  # fmt: skip
        try:
            response = await http.post("/v1/notifications", json=body)
        except httpx.HTTPError as error:
            outcomes[type(error).__name__] += 1
            return
        latencies.append(loop.time() - scheduled)  # from the schedule: a late send is latency too
        by_answer.setdefault(str(response.status_code), []).append(latencies[-1])
        outcomes[str(response.status_code)] += 1
        if response.status_code == 202:
            accepted.append(uuid.UUID(response.json()["id"]))

    began = loop.time()
    tasks = []
    for n in range(total):
        scheduled = began + n / rate
        if (delay := scheduled - loop.time()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(n, scheduled)))
    fired_in = loop.time() - began
    await asyncio.gather(*tasks)
    answered_in = loop.time() - began

    query = """SELECT n.created_at, d.sent_at, d.status FROM notifications n
               JOIN deliveries d ON d.notification_id = n.id WHERE n.id = ANY($1::uuid[])"""
    deadline = loop.time() + drain
    while True:
        rows = await db.fetch(query, accepted)
        settled = [row for row in rows if row["status"] in ("sent", "delivered", "failed", "bounced")]
        if len(settled) >= len(accepted) or loop.time() > deadline:
            break
        for child in children:
            child.check_alive()
        await asyncio.sleep(0.25)
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    sent = [row for row in rows if row["sent_at"] is not None]
    to_sent = [(row["sent_at"] - row["created_at"]).total_seconds() for row in sent]
    span = (max(r["sent_at"] for r in sent) - min(r["created_at"] for r in sent)).total_seconds() if sent else 0
    sheds = outcomes["429"] + outcomes["503"]
    return {
        "offered_per_s": rate,
        "requests": total,
        "fired_per_s": total / fired_in if fired_in else 0.0,
        "answered_in_s": answered_in,
        "accepted": len(accepted),
        "shed": sheds,
        "errors": total - len(accepted) - sheds,
        "outcomes": dict(outcomes),
        "api_p50_ms": percentile(latencies, 0.50) * 1000,
        "api_p95_ms": percentile(latencies, 0.95) * 1000,
        "api_p99_ms": percentile(latencies, 0.99) * 1000,
        "api_ms_by_answer": {
            answer: {"p50": percentile(values, 0.50) * 1000, "p95": percentile(values, 0.95) * 1000}
            for answer, values in sorted(by_answer.items())
        },
        "sent": len(sent),
        "unsettled_after_drain": len(accepted) - len(settled),
        "accept_to_sent_p50_ms": percentile(to_sent, 0.50) * 1000,
        "accept_to_sent_p95_ms": percentile(to_sent, 0.95) * 1000,
        "delivered_per_s": len(sent) / span if span else 0.0,
        "cpu_ms_per_notification": {name: 1000 * used / len(sent) if sent else 0.0 for name, used in cpu.items()},
    }


def _rate_line(row: dict[str, Any]) -> str:
    by_answer = ", ".join(f"{answer} {ms['p95']:.0f} ms" for answer, ms in row["api_ms_by_answer"].items())
    return (
        f"{row['offered_per_s']:g}/s offered ({row['fired_per_s']:.1f} fired): API p50 {row['api_p50_ms']:.0f} ms, "
        f"p95 {row['api_p95_ms']:.0f} ms, p99 {row['api_p99_ms']:.0f} ms; accepted {row['accepted']}, "
        f"shed {row['shed']}, errors {row['errors']}; accept->sent p95 {row['accept_to_sent_p95_ms']:.0f} ms; "
        f"CPU ms/notification {', '.join(f'{k} {v:.1f}' for k, v in row['cpu_ms_per_notification'].items())}; "
        f"delivered {row['delivered_per_s']:.1f}/s; API p95 by answer {by_answer}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", help="open loop: offered rates per second, e.g. 25,50,100,150")
    parser.add_argument("--duration", type=float, default=20, help="open loop: seconds per rate")
    parser.add_argument("--drain", type=float, default=120, help="open loop: longest wait for deliveries per rate")
    parser.add_argument("--profile", action="store_true", help="open loop: py-spy on the API and worker processes")
    parser.add_argument("--count", type=int, default=1000, help="closed loop: notifications")
    parser.add_argument("--concurrency", type=int, default=32, help="closed loop: concurrent clients")
    args = parser.parse_args()
    if args.rates:
        rates = [float(rate) for rate in args.rates.split(",")]
        report = asyncio.run(open_loop(rates, args.duration, args.drain, args.profile))
        print(f"SMTP server received {report['received_by_smtp_server']:,}, sent recorded {report['sent_recorded']:,}; "
              f"peak RSS {report['peak_rss_mib']}")  # fmt: skip
        for name, found in report["profiles"].items():
            print(f"py-spy, {name}: {found.get('samples', 0)} samples, top: "
                  + "; ".join(f"{row['function']} {row['own']:.1%}" for row in found["top"][:5]))  # fmt: skip
        print(f"written to {save_result('instant', report)}")
        return
    result = asyncio.run(run(args.count, args.concurrency))
    save_result("instant-closed-loop", result)
    print("| metric | value |\n|---|---|")
    for name, value in result.items():
        print(f"| {name} | {value:,.1f} |" if isinstance(value, float) else f"| {name} | {value} |")


if __name__ == "__main__":
    main()
