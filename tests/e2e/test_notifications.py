"""Instant notifications end to end: HTTP in, real SMTP message and sandbox records out."""

from __future__ import annotations

import httpx
from temporalio.client import Client

from tests.stack import SmtpServer, wait_for_status
from tests.workflows.harness import eventually
from worker import WorkerServices
from workflows.notification import NotificationWorkflow


async def test_email_reaches_smtp_server_and_reads_sent(
    api: httpx.AsyncClient,
    recipient: dict,
    smtp_server: SmtpServer,
    services: WorkerServices,
    temporal_client: Client,
) -> None:
    address = recipient["email"]
    response = await api.post(
        "/v1/notifications",
        json={
            "user_id": recipient["user_id"],
            "content_id": "film-42",
            "type": "new_episode",
            "channels": ["email"],
            "title": "Episode 5 is out",
            "body": "Watch episode 5 of The Long Night tonight.",
        },
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "pending"
    assert response.headers["Location"] == accepted["links"]["self"]

    done = await wait_for_status(api, accepted["id"], "sent")
    [channel] = done["channels"]
    assert channel["status"] == "sent"
    assert channel["attempts"] == 1
    assert channel["sent_at"] is not None
    assert done["workflow_id"] == f"notification-{accepted['id']}"
    assert done["run_id"]

    [message] = smtp_server.handler.to(address)
    assert message["Subject"] == "Episode 5 is out"
    assert message["Message-ID"] == channel["provider_message_id"]
    text, footer = message.get_content().replace("\r\n", "\n").split("\n--\n")
    assert text.strip() == "Watch episode 5 of The Long Night tonight."
    # Not a transactional type: an unsubscribe link, and RFC 8058 one-click headers.
    unsubscribe = message["List-Unsubscribe"].strip("<>")
    assert unsubscribe in footer
    assert unsubscribe.startswith(f"{api_url_of(api)}/u/")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

    # The history rows were queued with each status (PostgreSQL's outbox) and reach
    # ClickHouse with the workers' next shipment, whatever the run does after.
    outcome = await temporal_client.get_workflow_handle_for(NotificationWorkflow.run, done["workflow_id"]).result()
    assert outcome.channels[0].status == "sent"

    async def shipped() -> list[str] | None:
        rows = await services.history.query(
            f"SELECT status FROM notification_history WHERE notification_id = '{accepted['id']}' ORDER BY event_time"
        )
        return [row["status"] for row in rows] if len(rows) >= 2 else None

    assert await eventually(shipped) == ["pending", "sent"]


async def test_wait_answers_with_the_outcome(api: httpx.AsyncClient, recipient: dict) -> None:
    response = await api.post(
        "/v1/notifications?wait=true",
        json={
            "user_id": recipient["user_id"],
            "type": "premiere",
            "channels": ["email", "sms", "push"],
            "title": "Premiere tonight",
            "body": "Dune: Part Three starts at 20:00.",
            "data": {"deep_link": "cinema://film/dune-3"},
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "sent"
    assert {c["channel"]: c["status"] for c in body["channels"]} == {"email": "sent", "sms": "sent", "push": "sent"}

    outbox = (await api.get("/dev/outbox")).json()
    addresses = (recipient["phone"], recipient["push_tokens"][0])
    mine = {row["channel"]: row for row in outbox if row["address"] in addresses}
    assert mine["sms"]["payload"]["body"] == "Dune: Part Three starts at 20:00."
    assert mine["push"]["payload"]["data"] == {"deep_link": "cinema://film/dune-3"}
    assert mine["push"]["address"] == recipient["push_tokens"][0]


async def test_opted_out_channel_is_suppressed_not_sent(
    api: httpx.AsyncClient, recipient: dict, smtp_server: SmtpServer
) -> None:
    user = recipient["user_id"]
    update = {k: v for k, v in recipient.items() if k not in ("user_id", "created_at", "updated_at")}
    update["opted_out_channels"] = ["email"]
    assert (await api.put(f"/v1/recipients/{user}", json=update)).status_code == 200

    response = await api.post(
        "/v1/notifications?wait=true",
        json={"user_id": user, "type": "promo", "channels": ["email", "sms"], "title": "Sale", "body": "50% off"},
    )
    body = response.json()
    assert {c["channel"]: c["status"] for c in body["channels"]} == {"email": "suppressed", "sms": "sent"}
    assert body["status"] == "sent"
    assert smtp_server.handler.to(recipient["email"]) == []


async def test_list_pages_by_keyset_and_filters(api: httpx.AsyncClient, recipient: dict) -> None:
    user = recipient["user_id"]
    ids = []
    for n in range(3):
        response = await api.post(
            "/v1/notifications?wait=true",
            json={"user_id": user, "type": "digest", "channels": ["sms"], "title": f"Digest {n}", "body": "..."},
        )
        ids.append(response.json()["id"])

    first = (await api.get("/v1/notifications", params={"user_id": user, "limit": 2})).json()
    assert [item["id"] for item in first["items"]] == ids[::-1][:2]
    assert first["next_cursor"]
    params = {"user_id": user, "limit": 2, "cursor": first["next_cursor"]}
    second = (await api.get("/v1/notifications", params=params)).json()
    assert [item["id"] for item in second["items"]] == [ids[0]]
    assert second["next_cursor"] is None

    failed = (await api.get("/v1/notifications", params={"user_id": user, "status": "failed"})).json()
    assert failed["items"] == []


def api_url_of(api: httpx.AsyncClient) -> str:
    return str(api.base_url).rstrip("/")
