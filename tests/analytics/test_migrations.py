"""ClickHouse migrations upgrade a table of the first release in place.

chDB opens one path per process (this one's is the session worker's), so the upgrade runs
in a child process on a store of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from services.history import MIGRATIONS, event_id

UPGRADE = """
import json, sys
from pathlib import Path
from services.history import SCHEMA, ChdbStore

store = ChdbStore(Path(sys.argv[1]), retention_days=30)
store._command(SCHEMA)  # the first release's table, as an old install has it
store._command("INSERT INTO notification_history (event_time, notification_id, channel, status, user_id, category, "
               "provider, attempt, error, campaign_id) VALUES (now64(3) - INTERVAL 1 DAY, '" + sys.argv[2] + "', "
               "'email', 'sent', 'u-1', 'promo', 'smtp', 1, '', 'c-1')")
store.ensure_schema()
store.ensure_schema()  # idempotent: nothing applied twice
print(json.dumps({
    "rows": store.query("SELECT toString(event_id) AS event_id, toString(notification_id) AS notification_id, "
                        "status, provider, run_id, template_key, template_version, country, error_class, "
                        "toString(cost) AS cost, currency, latency_ms FROM notification_history"),
    "migrations": store.query("SELECT version FROM marquee_migrations ORDER BY version"),
    "stats": store.query("SELECT status, toUInt64(sum(events)) AS events FROM notification_stats GROUP BY status"),
    "channel": store.query("SELECT channel, provider, status, toUInt64(sum(events)) AS events "
                           "FROM notification_stats_channel GROUP BY channel, provider, status"),
    "minutes": store.query("SELECT campaign_id, status, toUInt64(sum(events)) AS events "
                           "FROM notification_campaign_minutes GROUP BY campaign_id, status"),
    "campaigns": store.query("SELECT campaign_id, status, toUInt64(sum(events)) AS events "
                             "FROM notification_campaign_stats GROUP BY campaign_id, status"),
    "indexes": store.query("SELECT name FROM system.data_skipping_indices WHERE database = currentDatabase() "
                           "AND table = 'notification_history' ORDER BY name"),
    "views": store.query("SELECT name FROM system.tables WHERE database = currentDatabase() "
                         "AND engine = 'MaterializedView' ORDER BY name"),
    "ttl": store.query("SELECT name, engine_full FROM system.tables WHERE database = currentDatabase() AND name IN "
                       "('notification_history', 'notification_stats', 'notification_stats_channel', "
                       "'notification_campaign_minutes', 'notification_campaign_stats') ORDER BY name"),
}))
"""


def test_an_old_table_upgrades_in_place(tmp_path: Path) -> None:
    nid = str(uuid.uuid4())
    done = subprocess.run([sys.executable, "-c", UPGRADE, str(tmp_path / "chdb"), nid], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).parents[2], timeout=120)  # fmt: skip
    found = json.loads(done.stdout.strip().splitlines()[-1])
    # The old row is still there; its event id is the one the writer gives the same event.
    assert found["rows"] == [{
        "event_id": str(event_id(nid, "email", "sent")), "notification_id": nid, "status": "sent", "provider": "smtp",
        "run_id": "", "template_key": "", "template_version": 0, "country": "", "error_class": "", "cost": "0",
        "currency": "", "latency_ms": 0,
    }]  # fmt: skip
    assert [int(row["version"]) for row in found["migrations"]] == [migration.version for migration in MIGRATIONS]
    # The stats hold the rows stored before their view existed, once.
    assert [(row["status"], int(row["events"])) for row in found["stats"]] == [("sent", 1)]
    # So do the rollups of migration 4, which dropped the campaign_id skip index.
    assert [(row["channel"], row["provider"], row["status"], int(row["events"])) for row in found["channel"]] == [
        ("email", "smtp", "sent", 1)]  # fmt: skip
    assert [(row["campaign_id"], row["status"], int(row["events"])) for row in found["minutes"]] == [("c-1", "sent", 1)]
    assert [row["name"] for row in found["indexes"]] == ["event_id_bloom"]
    # And migration 5's rollup by campaign.
    assert [(row["campaign_id"], row["status"], int(row["events"])) for row in found["campaigns"]] == [
        ("c-1", "sent", 1)]  # fmt: skip
    minutes_table, campaign_table, history_table, stats_table, channel_table = found["ttl"]
    assert "TTL toDateTime(event_time) + toIntervalDay(30)" in history_table["engine_full"]
    assert "TTL hour + toIntervalDay(30)" in stats_table["engine_full"]
    assert "TTL hour + toIntervalDay(30)" in channel_table["engine_full"]
    assert "TTL minute + toIntervalDay(30)" in minutes_table["engine_full"]
    assert "TTL hour + toIntervalDay(30)" in campaign_table["engine_full"]
    # Migration 6: an insert's parts are Compact (a few files each) on every table it writes.
    for table in found["ttl"]:
        assert "min_rows_for_wide_part = 1000000" in table["engine_full"], table["name"]
    # Migration 7: two views feed notification_stats instead of one.
    assert [row["name"] for row in found["views"]] == [
        "notification_campaign_minutes_mv", "notification_campaign_stats_mv", "notification_stats_channel_mv",
        "notification_stats_counts_mv", "notification_stats_latency_mv"]  # fmt: skip
