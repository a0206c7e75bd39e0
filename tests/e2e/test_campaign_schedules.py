"""Scheduled and recurring campaigns: Temporal Schedules, time zones, DST, trigger-now."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
from temporalio.client import Client

from core.clock import next_local_time, window_state
from tests.e2e.test_campaigns import (  # noqa: F401
    create_campaign,
    make_audience,
    manager,
    tag_segment,
    template_key,
    wait_campaign,
)
from tests.e2e.test_replay import assert_replays
from tests.stack import SmtpServer


def _utc(values: list[str]) -> list[datetime]:
    return [datetime.fromisoformat(value).astimezone(UTC) for value in values]


async def test_cron_in_new_york_follows_dst_and_moscow_does_not(
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,  # noqa: F811
    template_key: str,  # noqa: F811
) -> None:
    tag, _ = await make_audience(api, 1)
    segment_id = await tag_segment(manager, tag)
    new_york = await create_campaign(
        manager, template_key, segment_id,
        schedule={"kind": "monthly", "day": 1, "time": "10:00", "timezone": "America/New_York"},
    )  # fmt: skip
    moscow = await create_campaign(
        manager, template_key, segment_id, schedule={"kind": "cron", "cron": "0 10 * * *", "timezone": "Europe/Moscow"}
    )
    for campaign in (new_york, moscow):
        launched = await manager.post(f"/v1/campaigns/{campaign['id']}/launch")
        assert launched.status_code == 200, launched.text
        assert launched.json()["status"] == "scheduled"
    try:
        ny_times = _utc((await manager.get(f"/v1/campaigns/{new_york['id']}")).json()["next_run_times"])
        msk_times = _utc((await manager.get(f"/v1/campaigns/{moscow['id']}")).json()["next_run_times"])
        assert len(ny_times) >= 6
        local = ZoneInfo("America/New_York")
        for moment in ny_times:
            assert moment.astimezone(local).day == 1
            assert moment.astimezone(local).hour == 10  # 10:00 local, whatever the offset
            # EST (UTC-5) before the second Sunday of March, EDT (UTC-4) from then to November.
            dst = moment.astimezone(local).dst() != timedelta(0)
            assert moment.hour == (14 if dst else 15)
        assert {bool(m.astimezone(local).dst()) for m in ny_times} == {True, False}  # the list crosses DST
        assert all(m.hour == 7 and m.minute == 0 for m in msk_times)  # Moscow keeps UTC+3 all year
        assert [b - a for a, b in itertools.pairwise(msk_times)] == [timedelta(days=1)] * (len(msk_times) - 1)
    finally:
        for campaign in (new_york, moscow):
            await manager.post(f"/v1/campaigns/{campaign['id']}/cancel", json={"reason": "test over"})
    assert (await manager.get(f"/v1/campaigns/{moscow['id']}")).json()["next_run_times"] == []


async def test_trigger_runs_a_recurring_campaign_now_and_it_stays_scheduled(
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,  # noqa: F811
    template_key: str,  # noqa: F811
    smtp_server: SmtpServer,
) -> None:
    tag, emails = await make_audience(api, 25)
    campaign = await create_campaign(
        manager, template_key, await tag_segment(manager, tag),
        schedule={"kind": "weekly", "weekday": 1, "time": "09:30", "timezone": "Europe/Berlin"},
    )  # fmt: skip
    await manager.post(f"/v1/campaigns/{campaign['id']}/launch")
    try:
        assert (await manager.post(f"/v1/campaigns/{campaign['id']}/trigger")).status_code == 200
        for _ in range(300):
            body = (await manager.get(f"/v1/campaigns/{campaign['id']}")).json()
            if body["runs"] and body["runs"][0]["status"] == "completed":
                break
            await asyncio.sleep(0.1)
        [run] = body["runs"]
        assert (run["status"], run["sent"]) == ("completed", 25)
        assert body["status"] == "scheduled"
        assert run["id"].startswith(f"campaign-{campaign['id']}-run")
        assert len(smtp_server.handler.delivered_to(set(emails))) == 25
        paused = await manager.post(f"/v1/campaigns/{campaign['id']}/pause", json={"reason": "holiday"})
        assert paused.json()["status"] == "paused"
        assert (await manager.post(f"/v1/campaigns/{campaign['id']}/resume")).json()["status"] == "scheduled"
    finally:
        await manager.post(f"/v1/campaigns/{campaign['id']}/cancel", json={"reason": "test over"})


async def test_a_campaign_at_a_time_waits_then_sends(
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,  # noqa: F811
    template_key: str,  # noqa: F811
    smtp_server: SmtpServer,
) -> None:
    tag, emails = await make_audience(api, 10)
    at = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    campaign = await create_campaign(
        manager, template_key, await tag_segment(manager, tag), schedule={"kind": "at", "at": at}
    )
    launched = (await manager.post(f"/v1/campaigns/{campaign['id']}/launch")).json()
    assert launched["status"] == "scheduled"
    await asyncio.sleep(1)
    assert smtp_server.handler.delivered_to(set(emails)) == []
    done = await wait_campaign(manager, campaign["id"], "completed", seconds=60)
    assert done["runs"][0]["sent"] == 10
    assert len(smtp_server.handler.delivered_to(set(emails))) == 10


async def test_spec_endpoints_bulk_and_scheduled(
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,  # noqa: F811
    template_key: str,  # noqa: F811
    smtp_server: SmtpServer,
) -> None:
    tag, _emails = await make_audience(api, 5)
    segment_id = await tag_segment(manager, tag)
    bulk = await manager.post(
        "/admin/bulk",
        json={"name": "bulk", "template": template_key, "segment_id": segment_id, "channels": ["email"],
              "variables": {"film": "Heat"}},
    )  # fmt: skip
    assert bulk.status_code == 202, bulk.text
    await wait_campaign(manager, bulk.json()["id"], "completed")

    at = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    scheduled = await manager.post(
        "/v1/notifications/scheduled",
        json={"template": template_key, "channels": ["email"], "variables": {"film": "Ran"},
              "user_ids": [f"{tag}-0", f"{tag}-1", "nobody"], "schedule": {"kind": "at", "at": at}},
    )  # fmt: skip
    assert scheduled.status_code == 202, scheduled.text
    # A service may book one too, and the same name may be used again.
    again = await api.post(
        "/v1/notifications/scheduled",
        json={"template": template_key, "channels": ["email"], "variables": {"film": "Ran"}, "name": "reminder",
              "user_ids": [f"{tag}-2"], "schedule": {"kind": "at", "at": at}},
    )  # fmt: skip
    assert again.status_code == 202, again.text
    twice = await api.post(
        "/v1/notifications/scheduled",
        json={"template": template_key, "channels": ["email"], "variables": {"film": "Ran"}, "name": "reminder",
              "user_ids": [f"{tag}-3"], "schedule": {"kind": "at", "at": at}},
    )  # fmt: skip
    assert twice.status_code == 202, twice.text
    done = await wait_campaign(manager, scheduled.json()["id"], "completed", seconds=60)
    assert done["runs"][0]["sent"] == 2
    subjects = [email_subject(raw) for rcpt, raw in smtp_server.handler.delivered_to({f"{tag}-0@example.com"})]
    assert sorted(subjects) == ["Heat for Viewer 0", "Ran for Viewer 0"]

    now = await manager.post(
        "/v1/notifications/scheduled",
        json={"template": template_key, "channels": ["email"], "variables": {"film": "Ran"},
              "user_ids": ["x"], "schedule": {"kind": "now"}},
    )  # fmt: skip
    assert now.status_code == 422


def email_subject(raw: bytes) -> str:
    import email as email_module
    from email.policy import default

    return str(email_module.message_from_bytes(raw, policy=default)["Subject"])


@pytest.mark.parametrize(
    ("now", "zone", "expected"),
    [
        # The day New York springs forward (2027-03-14): 10:00 EDT is 14:00 UTC.
        ("2027-03-14T12:00:00+00:00", "America/New_York", "2027-03-14T14:00:00+00:00"),
        # The day before: still EST, 15:00 UTC.
        ("2027-03-13T12:00:00+00:00", "America/New_York", "2027-03-13T15:00:00+00:00"),
        # Past 10:00 local: tomorrow.
        ("2027-03-13T16:00:00+00:00", "America/New_York", "2027-03-14T14:00:00+00:00"),
        ("2027-03-14T12:00:00+00:00", "Europe/Moscow", "2027-03-15T07:00:00+00:00"),
        ("2027-03-14T00:00:00+00:00", "Asia/Kolkata", "2027-03-14T04:30:00+00:00"),
    ],
)
def test_local_time_delivery_is_dst_correct(now: str, zone: str, expected: str) -> None:
    assert next_local_time(datetime.fromisoformat(now), zone, "10:00") == datetime.fromisoformat(expected)


def test_send_windows() -> None:
    day = window_state(datetime(2027, 1, 5, 12, tzinfo=UTC), "09:00", "21:00", "Europe/Moscow")
    assert day.open
    assert day.until == datetime(2027, 1, 5, 18, tzinfo=UTC)
    night = window_state(datetime(2027, 1, 5, 19, tzinfo=UTC), "09:00", "21:00", "Europe/Moscow")
    assert not night.open
    assert night.until == datetime(2027, 1, 6, 6, tzinfo=UTC)
    overnight = window_state(datetime(2027, 1, 5, 2, tzinfo=UTC), "22:00", "06:00", "UTC")
    assert overnight.open
    assert overnight.until == datetime(2027, 1, 5, 6, tzinfo=UTC)


async def test_campaign_history_replays(
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,  # noqa: F811
    template_key: str,  # noqa: F811
    temporal_client: Client,
) -> None:
    """A campaign run replays with the current code; MARQUEE_RECORD_HISTORIES=1 re-records it."""
    tag, _ = await make_audience(api, 250)
    campaign = await create_campaign(manager, template_key, await tag_segment(manager, tag))
    await manager.post(f"/v1/campaigns/{campaign['id']}/launch")
    await wait_campaign(manager, campaign["id"], "completed")
    history = await temporal_client.get_workflow_handle(f"campaign-{campaign['id']}").fetch_history()
    await assert_replays(history, "campaign_completed")


async def test_paused_before_its_time_a_campaign_waits_until_resumed(
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,  # noqa: F811
    template_key: str,  # noqa: F811
    smtp_server: SmtpServer,
) -> None:
    tag, emails = await make_audience(api, 8)
    at = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    campaign = await create_campaign(
        manager, template_key, await tag_segment(manager, tag), schedule={"kind": "at", "at": at}
    )
    await manager.post(f"/v1/campaigns/{campaign['id']}/launch")
    paused = await manager.post(f"/v1/campaigns/{campaign['id']}/pause", json={"reason": "hold"})
    assert paused.json()["status"] == "paused"
    await asyncio.sleep(3.5)  # its time passes while paused
    body = (await manager.get(f"/v1/campaigns/{campaign['id']}")).json()
    assert body["status"] == "paused"
    assert smtp_server.handler.delivered_to(set(emails)) == []
    resumed = await manager.post(f"/v1/campaigns/{campaign['id']}/resume")
    assert resumed.json()["status"] == "running"
    done = await wait_campaign(manager, campaign["id"], "completed")
    assert done["runs"][0]["sent"] == 8
