"""docs/ops/: the alert rules and the Grafana dashboard load, and every Marquee metric they
name is one /metrics exports (collected from the registries, with a reading of each kind).
The Temporal SDK's names are checked against a real scrape in tests/e2e/test_health.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # no stubs in the lock
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.routes import metrics as route
from services import metrics
from services.breaker import BreakerState

OPS = Path(__file__).resolve().parents[2] / "docs" / "ops"
NAME = re.compile(r"\b((?:marquee|process|temporal)_[a-z0-9_]+)\b")
SUFFIXES = ("", "_total", "_bucket", "_count", "_sum", "_created")


def alert_rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load((OPS / "alerts.yml").read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((OPS / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def names_used() -> set[str]:
    text = " ".join([rule["expr"] for rule in alert_rules()] + dashboard_exprs())
    return set(NAME.findall(text))


def exported(exposition: str) -> set[str]:
    """Every series name an exposition can carry, family names with their suffixes."""
    return {f"{family.name}{suffix}" for family in text_string_to_metric_families(exposition) for suffix in SUFFIXES}


async def test_alert_rules_are_well_formed() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "MarqueeProviderCircuitOpen", "MarqueeProviderDown", "MarqueeDeadLettersGrowing",
        "MarqueeHistoryOutboxLag", "MarqueeCampaignStalled",
    }  # fmt: skip
    for rule in rules:
        assert rule["expr"].strip(), rule
        assert rule["labels"]["severity"] in ("page", "ticket"), rule
        assert rule["annotations"]["summary"], rule


async def test_the_dashboard_is_grafana_json() -> None:
    dashboard = json.loads((OPS / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] == "marquee-overview"
    assert dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        for target in panel.get("targets", []):
            assert target["refId"], panel["title"]
            assert target["expr"], panel["title"]


async def test_every_marquee_metric_the_docs_use_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    # One reading of each kind, so that every gauge family has a sample.
    reading = metrics.Reading(
        providers=[metrics.ProviderReading("smtp", "email", True, BreakerState.open, 3)],
        deliveries={("email", "sent"): 1},
        dead_letters_open=2,
        runs=[metrics.RunReading("c", "r", "running", 10, 1, dict.fromkeys(metrics.RUN_STATUSES, 1), 5.0)],
        outbox_rows=1,
        outbox_oldest_seconds=3.0,
    )

    async def read(_: object) -> metrics.Reading:
        return reading

    monkeypatch.setattr(metrics, "read", read)
    registry = await route.collect(None)  # type: ignore[arg-type]
    available = exported((generate_latest(registry) + generate_latest(metrics.PROCESS)).decode())
    used = {name for name in names_used() if not name.startswith("temporal_")}
    assert used, "no metric names found in docs/ops"
    assert used - available == set()
    # The counters' and histograms' own names, as Prometheus stores them.
    assert {"marquee_notifications_sent_total", "marquee_provider_send_seconds_bucket"} <= used
