"""Campaigns end to end: segments, bulk sends through Temporal into the SMTP server."""

from __future__ import annotations

import asyncio
import email
import subprocess
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest

from core.auth import Role
from core.config import Settings
from entrypoints.embedded import venv_binary
from tests.stack import SmtpServer, token_for

TEMPLATE = {
    "category": "marketing",
    "content": {
        "variables": [{"name": "film", "example": "Dune"}],
        "locales": {
            "en": {
                "email": {"subject": "{{ film }} for {{ recipient.name }}", "html": "<p>Watch {{ film }}</p>"},
                "sms": {"text": "Watch {{ film }}"},
            }
        },
    },
}


@pytest.fixture
async def manager(api_url: str, settings: Settings) -> Any:
    headers = {"Authorization": f"Bearer {token_for(settings, Role.campaign_manager, 'cm')}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture
async def template_key(manager: httpx.AsyncClient) -> str:
    key = f"promo-{uuid.uuid4().hex[:8]}"
    response = await manager.post("/v1/templates", json={"key": key, **TEMPLATE})
    assert response.status_code == 201, response.text
    return key


async def make_audience(api: httpx.AsyncClient, count: int, **fields: Any) -> tuple[str, list[str]]:
    """`count` new recipients sharing a fresh tag; returns the tag and their emails."""
    tag = f"t{uuid.uuid4().hex[:10]}"
    people = [
        {"user_id": f"{tag}-{n}", "name": f"Viewer {n}", "email": f"{tag}-{n}@example.com", "tags": [tag], **fields}
        for n in range(count)
    ]
    for start in range(0, count, 1000):
        response = await api.post("/v1/recipients/batch", json={"recipients": people[start : start + 1000]})
        assert response.status_code == 200, response.text
    return tag, [person["email"] for person in people]


async def tag_segment(manager: httpx.AsyncClient, tag: str) -> int:
    response = await manager.post(
        "/v1/segments", json={"name": f"segment {tag}", "filter": {"field": "tags", "op": "contains", "value": tag}}
    )
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


async def create_campaign(manager: httpx.AsyncClient, template_key: str, segment_id: int, **extra: Any) -> dict:
    body = {"name": f"c-{uuid.uuid4().hex[:6]}", "template": template_key, "segment_id": segment_id,
            "channels": ["email"], "variables": {"film": "Arrival"}, **extra}  # fmt: skip
    response = await manager.post("/v1/campaigns", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def wait_campaign(manager: httpx.AsyncClient, campaign_id: str, *statuses: str, seconds: float = 120) -> dict:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        body = (await manager.get(f"/v1/campaigns/{campaign_id}")).json()
        if body["status"] in statuses:
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"campaign stayed {body['status']}: {body}")
        await asyncio.sleep(0.2)


def message_ids(delivered: list[tuple[str, bytes]]) -> Counter[str]:
    return Counter(str(email.message_from_bytes(raw)["Message-ID"]) for _, raw in delivered)


async def test_ten_thousand_recipients_get_exactly_one_message_each(
    api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, smtp_server: SmtpServer
) -> None:
    tag, emails = await make_audience(api, 10_000)
    segment_id = await tag_segment(manager, tag)
    count = (await manager.get(f"/v1/segments/{segment_id}/count")).json()
    assert count["summary"] == "matches 10,000 recipients, 0 opted out of email"

    campaign = await create_campaign(manager, template_key, segment_id)
    assert campaign["status"] == "draft"
    launched = await manager.post(f"/v1/campaigns/{campaign['id']}/launch")
    assert launched.status_code == 200, launched.text
    # Correctness, not speed (that is `make bench`): coverage tracing makes this run take
    # minutes on a slow 2-core machine.
    done = await wait_campaign(manager, campaign["id"], "completed", "failed", seconds=600)
    assert done["status"] == "completed"
    [run] = done["runs"]
    assert (run["targeted"], run["sent"], run["failed"], run["suppressed"]) == (10_000, 10_000, 0, 0)

    delivered = smtp_server.handler.delivered_to(set(emails))
    assert len(delivered) == 10_000
    assert {rcpt for rcpt, _ in delivered} == set(emails)
    sample = email.message_from_bytes(delivered[0][1])
    assert sample["Subject"].startswith("Arrival for Viewer ")


async def _wait_sent(manager: httpx.AsyncClient, campaign_id: str, at_least: int) -> dict:
    for _ in range(600):
        body = (await manager.get(f"/v1/campaigns/{campaign_id}")).json()
        if body["runs"] and body["runs"][0]["sent"] >= at_least:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} sent: {body}")


async def _settled(manager: httpx.AsyncClient, campaign_id: str) -> dict:
    """Wait until no batch is in flight (a paused run finishes the batches it started)."""
    for _ in range(600):
        body = (await manager.get(f"/v1/campaigns/{campaign_id}")).json()
        live = body["runs"][0]["live"]
        if live is not None and live["batches_in_flight"] == 0:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"batches still in flight: {body}")


async def test_pause_then_resume_sends_only_the_remainder(
    api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, smtp_server: SmtpServer
) -> None:
    tag, emails = await make_audience(api, 1200)
    campaign = await create_campaign(manager, template_key, await tag_segment(manager, tag), throttle_per_second=400)
    await manager.post(f"/v1/campaigns/{campaign['id']}/launch")
    await _wait_sent(manager, campaign["id"], 1)
    paused = await manager.post(f"/v1/campaigns/{campaign['id']}/pause", json={"reason": "checking the copy"})
    assert paused.json()["status"] == "paused"
    settled = await _settled(manager, campaign["id"])
    sent_while_paused = settled["runs"][0]["sent"]
    assert 0 < sent_while_paused < 1200
    await asyncio.sleep(1.0)
    assert len(smtp_server.handler.delivered_to(set(emails))) == sent_while_paused  # nothing more went out

    resumed = await manager.post(f"/v1/campaigns/{campaign['id']}/resume")
    assert resumed.json()["status"] == "running"
    done = await wait_campaign(manager, campaign["id"], "completed")
    assert done["runs"][0]["sent"] == 1200
    delivered = smtp_server.handler.delivered_to(set(emails))
    assert sorted(rcpt for rcpt, _ in delivered) == sorted(emails)  # each exactly once


async def test_cancel_leaves_the_rest_unsent_and_counts_right(
    api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, smtp_server: SmtpServer
) -> None:
    tag, emails = await make_audience(api, 1500)
    campaign = await create_campaign(manager, template_key, await tag_segment(manager, tag), throttle_per_second=400)
    await manager.post(f"/v1/campaigns/{campaign['id']}/launch")
    await _wait_sent(manager, campaign["id"], 100)
    no_reason = await manager.post(f"/v1/campaigns/{campaign['id']}/cancel", json={})
    assert no_reason.status_code == 422
    cancelled = await manager.post(f"/v1/campaigns/{campaign['id']}/cancel", json={"reason": "wrong audience"})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status_reason"] == "wrong audience"
    done = await wait_campaign(manager, campaign["id"], "cancelled")
    run = done["runs"][0]
    for _ in range(100):  # the run records its end once in-flight batches have stopped
        if run["status"] == "cancelled":
            break
        await asyncio.sleep(0.1)
        run = (await manager.get(f"/v1/campaigns/{campaign['id']}")).json()["runs"][0]
    assert run["status"] == "cancelled"
    await asyncio.sleep(0.5)
    delivered = smtp_server.handler.delivered_to(set(emails))
    assert 100 <= run["sent"] < 1500
    assert len(delivered) == run["sent"]
    assert len({rcpt for rcpt, _ in delivered}) == run["sent"]
    again = await manager.post(f"/v1/campaigns/{campaign['id']}/resume")
    assert again.status_code == 409


async def test_opted_out_and_unreachable_recipients_are_counted_not_sent(
    api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, smtp_server: SmtpServer
) -> None:
    tag, emails = await make_audience(api, 30)
    opted = [{"user_id": f"{tag}-opted-{n}", "email": f"{tag}-o{n}@example.com", "tags": [tag],
              "opted_out_channels": ["email"]} for n in range(5)]  # fmt: skip
    no_email = [{"user_id": f"{tag}-sms-{n}", "phone": "+15550001111", "tags": [tag]} for n in range(3)]
    await api.post("/v1/recipients/batch", json={"recipients": opted + no_email})
    segment_id = await tag_segment(manager, tag)
    count = (await manager.get(f"/v1/segments/{segment_id}/count", params={"channels": ["email", "sms"]})).json()
    assert count["matches"] == 38
    assert count["opted_out"] == {"email": 5, "sms": 0}
    assert count["reachable"] == {"email": 30, "sms": 3}
    assert count["summary"] == "matches 38 recipients, 5 opted out of email, 0 opted out of sms"

    campaign = await create_campaign(manager, template_key, segment_id)
    await manager.post(f"/v1/campaigns/{campaign['id']}/launch")
    done = await wait_campaign(manager, campaign["id"], "completed")
    run = done["runs"][0]
    # One rule for both send paths: opting out is "suppressed", having no email is "unreachable".
    assert (run["targeted"], run["sent"], run["suppressed"], run["unreachable"], run["failed"]) == (38, 30, 5, 3, 0)
    assert len(smtp_server.handler.delivered_to({str(o["email"]) for o in opted})) == 0
    assert len(smtp_server.handler.delivered_to(set(emails))) == 30


async def test_invalid_campaigns_are_refused(
    manager: httpx.AsyncClient, api: httpx.AsyncClient, template_key: str, settings: Settings
) -> None:
    tag, _ = await make_audience(api, 1)
    segment_id = await tag_segment(manager, tag)
    base = {"name": "x", "template": template_key, "segment_id": segment_id, "channels": ["email"],
            "variables": {"film": "Up"}}  # fmt: skip
    cases = [
        ({**base, "segment_id": 999_999}, "segment_id"),
        ({**base, "template": "nope"}, "template"),
        ({**base, "channels": ["push"]}, "channels.0"),
        ({**base, "variables": {}}, "variables.film"),
        ({**base, "schedule": {"kind": "cron"}}, "schedule"),
        ({**base, "schedule": {"kind": "at", "at": "2030-01-01T10:00:00"}}, "schedule"),
        ({**base, "schedule": {"kind": "daily", "time": "25:00"}}, "schedule.time"),
        ({**base, "schedule": {"kind": "daily", "time": "10:00", "timezone": "Mars/Base"}}, "schedule.timezone"),
    ]
    for body, field in cases:
        response = await manager.post("/v1/campaigns", json=body)
        assert response.status_code == 422, (field, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert field in [error["field"] for error in response.json()["errors"]], response.json()
    analyst = {"Authorization": f"Bearer {token_for(settings, Role.analyst)}"}
    assert (await manager.post("/v1/campaigns", json=base, headers=analyst)).status_code == 403


async def test_a_campaign_keeps_its_template_version_when_the_template_changes(
    api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, smtp_server: SmtpServer
) -> None:
    tag, emails = await make_audience(api, 20)
    campaign = await create_campaign(manager, template_key, await tag_segment(manager, tag))
    edited = {
        "variables": [{"name": "film", "example": "Dune"}],
        "locales": {"en": {"email": {"subject": "EDITED {{ film }}", "html": "<p>edited</p>"}}},
    }
    assert (await manager.put(f"/v1/templates/{template_key}", json={"content": edited, "change_note": "v2"})).json()[
        "version"
    ] == 2
    await manager.post(f"/v1/campaigns/{campaign['id']}/launch")
    done = await wait_campaign(manager, campaign["id"], "completed")
    assert done["template_version"] == 1
    subjects = {
        str(email.message_from_bytes(raw)["Subject"]) for _, raw in smtp_server.handler.delivered_to(set(emails))
    }
    assert all(subject.startswith("Arrival for Viewer") for subject in subjects)
    assert len(subjects) == 20


async def test_temporal_cli_cancel_stops_a_campaign(
    api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, temporal_client: Any
) -> None:
    tag, _ = await make_audience(api, 800)
    campaign = await create_campaign(manager, template_key, await tag_segment(manager, tag), throttle_per_second=200)
    await manager.post(f"/v1/campaigns/{campaign['id']}/launch")
    await _wait_sent(manager, campaign["id"], 1)
    result = await asyncio.to_thread(
        subprocess.run,
        [str(venv_binary("temporal")), "workflow", "cancel", "--workflow-id", f"campaign-{campaign['id']}",
         "--address", temporal_client.service_client.config.target_host],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    done = await wait_campaign(manager, campaign["id"], "cancelled")
    assert 0 < done["runs"][0]["sent"] < 800


async def test_a_throttle_below_the_window_still_sends(
    api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, smtp_server: SmtpServer
) -> None:
    tag, emails = await make_audience(api, 4)
    campaign = await create_campaign(manager, template_key, await tag_segment(manager, tag), throttle_per_second=2)
    await manager.post(f"/v1/campaigns/{campaign['id']}/launch")
    done = await wait_campaign(manager, campaign["id"], "completed", seconds=60)
    assert done["runs"][0]["sent"] == 4
    assert len(smtp_server.handler.delivered_to(set(emails))) == 4
