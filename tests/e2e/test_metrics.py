"""/metrics on the test stack (API and worker in one process, as `marquee dev`): a send and a
campaign move the counters and the latency histogram; a running campaign shows its progress
and rate until it ends; the outbox backlog is reported."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.e2e import test_campaigns as campaigns
from tests.e2e.test_campaigns import create_campaign, make_audience, tag_segment, wait_campaign
from tests.e2e.test_health import sample
from tests.stack import wait_for_status

# The campaign tests' fixtures: a campaign manager's client and a fresh template.
manager = campaigns.manager
template_key = campaigns.template_key


async def scrape(api_url: str) -> str:
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as anonymous:  # /metrics needs no token
        response = await anonymous.get("/metrics")
    assert response.status_code == 200
    return response.text


async def test_a_send_moves_the_counters_and_the_latency_histogram(
    api: httpx.AsyncClient, api_url: str, recipient: dict
) -> None:
    email = {"channel": "email", "provider": "smtp", "kind": "instant"}
    before = await scrape(api_url)
    body = {"user_id": recipient["user_id"], "channels": ["email"], "type": "metrics", "title": "Hi", "body": "Once."}
    response = await api.post("/v1/notifications", json=body)
    assert response.status_code == 202, response.text
    await wait_for_status(api, response.json()["id"], "sent")
    after = await scrape(api_url)

    for name in ("marquee_notifications_accepted_total", "marquee_notifications_sent_total"):
        assert sample(after, name, **email) - sample(before, name, **email) == 1, name
    latency = {"channel": "email", "provider": "smtp", "outcome": "ok"}
    assert sample(after, "marquee_provider_send_seconds_count", **latency) == (
        sample(before, "marquee_provider_send_seconds_count", **latency) + 1
    )
    assert sample(after, "marquee_provider_send_seconds_sum", **latency) > 0
    assert "marquee_history_outbox_rows " in after
    assert "marquee_history_outbox_oldest_seconds " in after
    assert "process_resident_memory_bytes " in after


async def test_a_running_campaign_shows_its_progress_until_it_ends(
    api: httpx.AsyncClient, api_url: str, manager: Any, template_key: str
) -> None:
    tag, _ = await make_audience(api, 6)
    campaign = await create_campaign(manager, template_key, await tag_segment(manager, tag), throttle_per_second=3)
    counted = {"channel": "email", "provider": "smtp", "kind": "campaign"}
    before = await scrape(api_url)
    await manager.post(f"/v1/campaigns/{campaign['id']}/launch")

    seen: list[float] = []
    deadline = asyncio.get_running_loop().time() + 30
    while not seen or seen[-1] < 1:
        text = await scrape(api_url)
        mine = {"campaign_id": campaign["id"], "campaign_status": "running"}
        if sample(text, "marquee_campaign_run_targeted", **mine):
            assert sample(text, "marquee_campaign_run_targeted", **mine) == 6
            seen.append(sample(text, "marquee_campaign_run_progress_ratio", **mine))
            assert sample(text, "marquee_campaign_run_age_seconds", **mine) > 0
            if seen[-1] > 0:
                assert sample(text, "marquee_campaign_run_rate", **mine) > 0
        elif seen:
            break  # the run finished between two scrapes
        assert asyncio.get_running_loop().time() < deadline, "no running run seen"
        await asyncio.sleep(0.2)
    assert any(0 < progress < 1 for progress in seen), seen  # seen part-way (3 a second for 6)
    assert seen == sorted(seen)

    await wait_campaign(manager, campaign["id"], "completed", seconds=30)
    after = await scrape(api_url)
    assert campaign["id"] not in after  # only runs in progress are reported
    assert (
        sample(after, "marquee_notifications_sent_total", **counted)
        - sample(before, "marquee_notifications_sent_total", **counted)
        == 6
    )
    assert (
        sample(after, "marquee_notifications_accepted_total", **counted)
        - sample(before, "marquee_notifications_accepted_total", **counted)
        == 6
    )
