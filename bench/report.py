"""Writes the figures of the last runs (.data/bench/*.json) into docs/benchmarks.md and
draws docs/benchmarks/*.png.

Each generated part of the document sits between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->` and is replaced whole on every run, so a re-run never leaves stale
tables behind; the rest of the document (prose, other sections) is left as it is.

    .venv/bin/python -m bench.report [--label "validation run on a loaded machine"]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt

from bench.common import RESULTS
from entrypoints.embedded import venv_binary

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
PLOTS = ROOT / "docs" / "benchmarks"


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def replace_block(document: str, name: str, body: str) -> str:
    """The document with the block `name` replaced (appended at the end when it is new)."""
    block = f"<!-- bench:{name} -->\n{body.strip()}\n<!-- /bench:{name} -->"
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.DOTALL)
    if pattern.search(document):
        return pattern.sub(lambda _: block, document)
    return document.rstrip() + "\n\n" + block + "\n"


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _when(result: dict[str, Any], label: str | None) -> str:
    load = ", ".join(f"{value:.1f}" for value in result.get("load_average", []))
    note = f" **{label}**;" if label else ""
    return f"Measured {result['measured_at']};{note} load average at the end {load}."


def machine_block(results: dict[str, dict[str, Any]]) -> str:
    memory = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    temporal_cli = subprocess.run([str(venv_binary("temporal")), "--version"], capture_output=True, text=True)
    postgres = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "SHOW server_version"],
                              capture_output=True, text=True)  # fmt: skip
    ceilings = results.get("ceilings", {})
    campaign = results.get("campaign", {})
    instant = results.get("instant", {})
    rows = [
        ("cores", str(os.cpu_count())),
        ("CPU", model),
        ("memory", f"{int(memory.split()[1]) / 1024 / 1024:.1f} GiB"),
        ("kernel", platform.release()),
        ("Python", platform.python_version()),
        ("PostgreSQL", postgres.stdout.strip() or "embedded (127.0.0.1:5432 did not answer)"),
        ("Temporal", (temporal_cli.stdout.strip() or "?") + "; dev server, SQLite file, WAL, synchronous=normal"),
        ("temporalio SDK", metadata.version("temporalio")),
        ("aiosmtplib", metadata.version("aiosmtplib")),
        ("Postfix smtp-sink / smtp-source", ceilings.get("postfix") or "missing (aiosmtpd receiver)"),
        (
            "campaign settings",
            f"batch {campaign.get('batch_size', '?')}, window {campaign.get('window', '?')}, "
            f"{campaign.get('sends_per_batch_in_flight', '?')} sends in flight per batch, "
            f"receiver {campaign.get('receiver', '?')}",
        ),
        (
            "instant settings",
            f"{instant.get('duration_s', '?')} s per offered rate, receiver "
            f"{instant.get('receiver', '?')}, API rate limits off (one token)",
        ),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def ceilings_block(ceilings: dict[str, Any], label: str | None) -> str:
    lines = [_when(ceilings, label), "", "| ceiling | messages | time | per minute |", "|---|---|---|---|"]
    if smtp := ceilings.get("smtp"):
        lines.append(f"| smtp-source -> smtp-sink (C to C, {smtp['sessions']} sessions, 1 KB) | {_n(smtp['received'])} "
                     f"| {smtp['seconds']:.1f} s | {_n(smtp['per_minute'])} |")  # fmt: skip
    if loop := ceilings.get("aiosmtplib"):
        lines.append(f"| aiosmtplib loop, pre-built bytes, {loop['connections']} connections -> {loop['receiver']} "
                     f"| {_n(loop['received'])} | {loop['seconds']:.1f} s | {_n(loop['per_minute'])} |")  # fmt: skip
    if shapes := ceilings.get("temporal"):
        lines += ["", f"Temporal dev server, trivial workflow, {shapes[0]['starters']} concurrent starters and the "
                  f"worker in one process, {shapes[0]['workflows']} workflows a shape:", "",
                  "| workflow shape | workflows/s | start p95 | end-to-end p95 |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {row['shape']} | {row['per_second']:.1f} | {_n(row['start_p95_ms'])} ms "
                  f"| {_n(row['end_to_end_p95_ms'])} ms |" for row in shapes]  # fmt: skip
    return "\n".join(lines)


def campaign_block(campaign: dict[str, Any], ceilings: dict[str, Any] | None, label: str | None) -> str:
    ceiling = campaign.get("ceiling")
    loop = (ceilings or {}).get("aiosmtplib")
    lines = [
        _when(campaign, label),
        "",
        "| workers | recipients | received | recorded sent | time | per minute | / C-to-C | / aiosmtplib loop "
        "| worker CPU a message | worker peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in campaign["runs"]:
        to_c = f"{run['per_minute'] / ceiling['per_minute']:.2f}" if ceiling else "n/a"
        to_loop = f"{run['per_minute'] / loop['per_minute']:.2f}" if loop else "n/a"
        rss = " + ".join(f"{_n(value)} MiB" for value in run["worker_peak_rss_mib"])
        cpu = f"{run['worker_cpu_ms_per_message']:.3f} ms" if "worker_cpu_ms_per_message" in run else "n/a"
        lines.append(f"| {run['workers']} | {_n(campaign['recipients'])} | {_n(run['received_by_smtp_server'])} "
                     f"| {_n(run['sent_recorded'])} | {run['seconds']:.1f} s | {_n(run['per_minute'])} | {to_c} "
                     f"| {to_loop} | {cpu} | {rss} |")  # fmt: skip
    lines.append("")
    if ceiling:
        lines.append(f"C-to-C ceiling in the same run: {_n(ceiling['per_minute'])}/min "
                     f"({_n(ceiling['received'])} messages, smtp-source -> smtp-sink).")  # fmt: skip
    lines.append(f"API peak RSS: {_n(campaign['api_peak_rss_mib'])} MiB.")
    if naive := campaign.get("naive"):
        first = campaign["runs"][0] if campaign["runs"] else None
        factor = (
            f"; the {first['workers']}-worker campaign is {first['per_minute'] / naive['per_minute']:.0f}x that"
            if first
            else ""
        )
        lines.append(f"Naive design (one NotificationWorkflow per recipient via POST /v1/notifications, one worker, "
                     f"32 clients): {_n(naive['recipients'])} recipients, {_n(naive['received'])} received, "
                     f"{naive['seconds']:.1f} s = {_n(naive['per_minute'])}/min{factor} "
                     f"({_n(naive.get('shed', 0))} requests shed, sent again after Retry-After).")  # fmt: skip
    lines += memory_lines(campaign)
    lines.append("")
    lines.append("![Sends per second over time, each campaign run](benchmarks/campaign-sends.png)")
    lines += profile_lines(
        {
            f"{run['workers']} worker(s), {name}": found
            for run in campaign["runs"]
            for name, found in run["profiles"].items()
        }
    )
    return "\n".join(lines)


# Issue #14: worker and API peak RSS flat (within this fraction) from 100k to 1M recipients.
MEMORY_FLAT = 0.10


def memory_lines(campaign: dict[str, Any]) -> list[str]:
    """The Memory table: the `--memory-recipients` run beside the 1-worker run of `--recipients`."""
    big = campaign.get("memory_run")
    small = next((run for run in campaign["runs"] if run["workers"] == 1), None)
    if big is None or small is None:
        return []
    lines = ["", "Memory (one worker, a fresh worker process each run, the API's peak restarted before each run):", "",
             "| recipients | received | recorded sent | exactly once | time | per minute | worker peak RSS "
             "| API peak RSS |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in (small, big):
        recipients = run.get("recipients", campaign["recipients"])
        lines.append(f"| {_n(recipients)} | {_n(run['received_by_smtp_server'])} | {_n(run['sent_recorded'])} "
                     f"| {'yes' if run.get('exactly_once') else 'no'} | {run['seconds']:,.1f} s "
                     f"| {_n(run['per_minute'])} | {_n(run['worker_peak_rss_mib'][0])} MiB "
                     f"| {_n(run['api_peak_rss_mib'])} MiB |")  # fmt: skip
    cells = []
    for name, before, after in (("worker", small["worker_peak_rss_mib"][0], big["worker_peak_rss_mib"][0]),
                                ("API", small["api_peak_rss_mib"], big["api_peak_rss_mib"])):  # fmt: skip
        ratio = after / before
        verdict = "within" if abs(ratio - 1) <= MEMORY_FLAT else "NOT within"
        cells.append(f"{name} {ratio:.2f} ({verdict} {MEMORY_FLAT:.0%})")
    lines += ["", f"Peak RSS {_n(big['recipients'])} / {_n(small.get('recipients', campaign['recipients']))} "
              f"recipients: {', '.join(cells)}."]  # fmt: skip
    return lines


def instant_block(instant: dict[str, Any], ceilings: dict[str, Any] | None, label: str | None) -> str:
    shapes = {row["shape"]: row for row in (ceilings or {}).get("temporal", [])}
    lines = [
        _when(instant, label),
        "",
        f"{instant['topology']}; receiver {instant['receiver']}. Latency is counted from each request's scheduled "
        "time. Accept -> sent is read from PostgreSQL (deliveries.sent_at, written after the SMTP server's 250, "
        "minus notifications.created_at): smtp-sink cannot time a message.",
        "",
        "| offered/s | fired/s | requests | accepted | shed (429/503) | errors | API p50 | API p95 | API p99 "
        "| accept -> sent p50 | accept -> sent p95 | delivered/s | CPU ms per notification: API / worker / Temporal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in instant["rates"]:
        cells = [f"{row['offered_per_s']:g}", f"{row['fired_per_s']:.1f}", _n(row["requests"]), _n(row["accepted"]),
                 str(row["shed"]), str(row["errors"])]  # fmt: skip
        cells += [f"{_n(row[key])} ms" for key in ("api_p50_ms", "api_p95_ms", "api_p99_ms", "accept_to_sent_p50_ms",
                                                   "accept_to_sent_p95_ms")]  # fmt: skip
        cpu = row.get("cpu_ms_per_notification")
        used = " / ".join(f"{cpu[name]:.1f}" for name in ("api", "worker", "temporal")) if cpu else "-"
        lines.append("| " + " | ".join([*cells, f"{row['delivered_per_s']:.1f}", used]) + " |")
    lines.append("")
    best = max((row["delivered_per_s"] for row in instant["rates"]), default=0.0)
    for shape in ("one regular activity", "one local activity, request_eager_start=True"):
        if shape in shapes:
            lines.append(f"- best delivered rate / ceiling ({shape}, {shapes[shape]['per_second']:.1f}/s): "
                         f"{best / shapes[shape]['per_second']:.2f}")  # fmt: skip
    for row in instant["rates"]:
        if answers := row.get("api_ms_by_answer"):
            split = "; ".join(f"{answer}: p50 {_n(ms['p50'])} ms, p95 {_n(ms['p95'])} ms"
                              for answer, ms in answers.items())  # fmt: skip
            lines.append(f"- API latency by answer at {row['offered_per_s']:g}/s: {split}")
    peaks = instant["peak_rss_mib"]
    lines.append(f"- SMTP server received {_n(instant['received_by_smtp_server'])}, sent recorded "
                 f"{_n(instant['sent_recorded'])} (with one warm-up); peak RSS: API {_n(peaks['api'])} MiB, "
                 f"worker {_n(peaks['worker'])} MiB")  # fmt: skip
    if closed := load("instant-closed-loop"):
        lines.append(f"- the dev stack (API, worker and aiosmtpd in one process), closed loop of "
                     f"{closed['concurrency']} clients, {_n(closed['notifications'])} notifications "
                     f"({closed['measured_at']}): API p50 {_n(closed['api_p50_ms'])} ms, "
                     f"p95 {_n(closed['api_p95_ms'])} ms, {closed['end_to_end_per_s']:.1f} delivered/s, "
                     f"{_n(closed.get('shed', 0))} requests shed and retried after Retry-After")  # fmt: skip
    lines += ["", "![API and accept -> sent latency against offered rate](benchmarks/instant-latency.png)"]
    lines += profile_lines(instant.get("profiles", {}))
    return "\n".join(lines)


def profile_lines(profiles: dict[str, dict[str, Any]]) -> list[str]:
    """Top functions by own time (py-spy, 100 samples/s; own time includes the native code a
    Python frame called, so the event loop's select and the SDK's Rust bridge show up too)."""
    lines: list[str] = []
    for name, found in profiles.items():
        if not found.get("top"):
            lines += ["", f"py-spy, {name}: no samples ({found.get('error', '')})"]
            continue
        raw = Path(found["file"]).relative_to(ROOT)
        lines += ["", f"py-spy, {name} ({_n(found['samples'])} samples; raw stacks in `{raw}`):", "",
                  "| function | own | total |", "|---|---|---|"]  # fmt: skip
        lines += [f"| `{row['function']}` | {row['own']:.1%} | {row['total']:.1%} |" for row in found["top"]]
    return lines


def plot_campaign(campaign: dict[str, Any], label: str | None) -> Path:
    figure, axes = plt.subplots(figsize=(8, 4))
    for run in campaign["runs"]:
        samples = run["samples"]
        times = [(a[0] + b[0]) / 2 for a, b in itertools.pairwise(samples)]
        rates = [(b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else 0 for a, b in itertools.pairwise(samples)]
        axes.plot(times, rates, label=f"{run['workers']} worker(s), {run['per_minute'] / 60:,.0f}/s mean")
    if ceiling := campaign.get("ceiling"):
        axes.axhline(ceiling["per_minute"] / 60, color="grey", linestyle="--", label="C-to-C ceiling")
    axes.set_xlabel("seconds since launch")
    axes.set_ylabel("messages/s at the SMTP server")
    axes.set_title(_title(f"Campaign, {campaign['recipients']:,} recipients ({campaign['measured_at']})", label))
    axes.legend()
    axes.grid(alpha=0.3)
    return _save(figure, "campaign-sends.png")


def plot_instant(instant: dict[str, Any], label: str | None) -> Path:
    figure, axes = plt.subplots(figsize=(8, 4))
    rates = [row["offered_per_s"] for row in instant["rates"]]
    for key, name in (("api_p50_ms", "API p50"), ("api_p95_ms", "API p95"), ("api_p99_ms", "API p99"),
                      ("accept_to_sent_p95_ms", "accept -> sent p95")):  # fmt: skip
        axes.plot(rates, [row[key] for row in instant["rates"]], marker="o", label=name)
    axes.set_yscale("log")
    axes.set_xlabel("offered requests/s (open loop)")
    axes.set_ylabel("ms")
    axes.axhline(50, color="grey", linestyle="--", label="API p95 target (50 ms)")
    axes.set_title(_title(f"Instant notifications, open loop ({instant['measured_at']})", label))
    axes.legend()
    axes.grid(alpha=0.3, which="both")
    return _save(figure, "instant-latency.png")


def _title(title: str, label: str | None) -> str:
    return f"{title}\n{label}" if label else title


def _save(figure: Any, name: str) -> Path:
    PLOTS.mkdir(parents=True, exist_ok=True)
    path = PLOTS / name
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", help='marks every figure, e.g. "validation run on a loaded machine"')
    args = parser.parse_args()
    matplotlib.use("Agg")  # files only, no display
    results = {name: found for name in ("ceilings", "campaign", "instant") if (found := load(name)) is not None}
    document = DOC.read_text()
    document = replace_block(document, "machine", machine_block(results))
    ceilings = results.get("ceilings")
    if ceilings:
        document = replace_block(document, "ceilings", ceilings_block(ceilings, args.label))
    if campaign := results.get("campaign"):
        document = replace_block(document, "campaign", campaign_block(campaign, ceilings, args.label))
        print(f"wrote {plot_campaign(campaign, args.label)}")
    if instant := results.get("instant"):
        document = replace_block(document, "instant", instant_block(instant, ceilings, args.label))
        print(f"wrote {plot_instant(instant, args.label)}")
    DOC.write_text(document)
    print(f"updated {DOC} from {', '.join(results) or 'nothing'}")


if __name__ == "__main__":
    main()
