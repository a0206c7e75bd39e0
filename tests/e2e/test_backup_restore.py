"""The restore drill: `marquee dev` on a data dir of its own (the Temporal dev server's SQLite
file, chDB) and a PostgreSQL database of its own; send, back up, wipe, restore, and all of it
is back. The time to recover (restore + the stack answering again) is measured and printed;
docs/operations.md quotes it.

`marquee dev` runs as a subprocess because chDB opens a directory in one process only, and
this test process may hold the session worker's.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from core.auth import Role, create_token
from entrypoints.embedded import free_port
from tests.e2e.test_dev_stack import Stack, banner_token, marquee_dev, stop_with_ctrl_c

MARQUEE = Path(sys.executable).parent / "marquee"
RECOVERY_BUDGET_SECONDS = 60  # what the drill may take here; the documented target is 5 minutes
TEMPLATE = {
    "category": "marketing",
    "content": {"locales": {"en": {"email": {"subject": "Premiere v1", "html": "<p>Tonight</p>"}}}},
}


@dataclass
class DrillStack(Stack):
    """The dev stack on PostgreSQL of its own (MARQUEE_DATABASE_URL): a database is quicker to
    create and drop than an embedded server; the Temporal dev server and chDB stay embedded."""

    database_url: str = ""

    def env(self) -> dict[str, str]:
        return {**super().env(), "MARQUEE_DATABASE_URL": self.database_url}


async def marquee(stack: DrillStack, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        str(MARQUEE), *args, env=stack.env(), cwd=stack.data_dir.parent,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def snapshot(api: httpx.AsyncClient, ids: dict[str, Any]) -> dict[str, Any]:
    """What must come back: the notification, the template's versions, the campaign, the counts."""
    notification = (await api.get(f"/v1/notifications/{ids['notification']}")).json()
    versions = (await api.get(f"/v1/templates/{ids['template']}/versions")).json()
    campaign = (await api.get(f"/v1/campaigns/{ids['campaign']}")).json()
    counts = (await api.get("/v1/analytics/counts", params={"granularity": "all", "by": "channel,status"})).json()
    return {"notification": notification, "versions": versions, "campaign": campaign, "counts": counts}


async def make_history(api: httpx.AsyncClient) -> dict[str, Any]:
    """A sent notification, a template with two versions, a finished campaign."""
    user = f"drill-{uuid.uuid4().hex[:6]}"
    assert (
        await api.post("/v1/recipients", json={"user_id": user, "email": f"{user}@example.com", "tags": [user]})
    ).status_code == 200
    message = {"user_id": user, "type": "premiere", "channels": ["email"], "title": "T", "body": "B"}
    sent = await api.post("/v1/notifications?wait=true", json=message)
    assert sent.json()["status"] == "sent", sent.text
    key = f"drill-{uuid.uuid4().hex[:6]}"
    assert (await api.post("/v1/templates", json={"key": key, **TEMPLATE})).status_code == 201
    edited = {"locales": {"en": {"email": {"subject": "Premiere v2", "html": "<p>Tonight</p>"}}}}
    assert (await api.put(f"/v1/templates/{key}", json={"content": edited, "change_note": "v2"})).status_code == 200
    segment = await api.post(
        "/v1/segments", json={"name": user, "filter": {"field": "tags", "op": "contains", "value": user}}
    )
    campaign = await api.post("/v1/campaigns", json={"name": user, "template": key, "segment_id": segment.json()["id"],
                                                     "channels": ["email"]})  # fmt: skip
    assert campaign.status_code == 201, campaign.text
    launched = await api.post(f"/v1/campaigns/{campaign.json()['id']}/launch")
    assert launched.status_code == 200, launched.text
    for _ in range(300):
        body = (await api.get(f"/v1/campaigns/{campaign.json()['id']}")).json()
        if body["status"] == "completed":
            break
        await asyncio.sleep(0.1)
    assert body["status"] == "completed", body
    return {"notification": sent.json()["id"], "workflow": sent.json()["workflow_id"], "template": key,
            "campaign": campaign.json()["id"]}  # fmt: skip


@pytest.fixture
async def drill_stack(tmp_path: Path, database_url: str) -> AsyncIterator[DrillStack]:
    """A stack on its own data dir and its own database of the test server."""
    server = database_url.rsplit("/", 1)[0]
    name = f"marquee_drill_{uuid.uuid4().hex[:8]}"
    ports = {port: free_port() for port in ("api_port", "temporal_port", "temporal_ui_port", "smtp_port", "pg_port")}
    stack = DrillStack(data_dir=tmp_path / "data", database_url=f"{server}/{name}", **ports)
    admin = await asyncpg.connect(f"{server}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    yield stack
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


def admin_client(stack: DrillStack) -> httpx.AsyncClient:
    secret = (stack.data_dir / "jwt-secret").read_text().strip()
    token = create_token(secret, "drill-admin", Role.admin, 3600)
    return httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


async def test_restore_drill_brings_back_every_notification_template_version_campaign_and_history(
    drill_stack: DrillStack,
) -> None:
    stack, backup_dir = drill_stack, drill_stack.data_dir.parent / "backup"
    async with marquee_dev(stack, "before") as run:
        async with admin_client(stack) as api:
            ids = await make_history(api)
            before = await snapshot(api, ids)
        await stop_with_ctrl_c(stack, run)
    assert before["counts"], "the history store holds the sends"

    code, output = await marquee(stack, "backup", str(backup_dir))
    assert code == 0, output
    manifest = json.loads((backup_dir / "manifest.json").read_text())
    assert manifest["postgres"]["rows"]["notifications"] >= 1
    assert manifest["postgres"]["rows"]["template_versions"] == 2
    assert manifest["history"]["rows"] > 0
    assert manifest["temporal"]["bytes"] > 0
    code, output = await marquee(stack, "restore", str(backup_dir))  # over live data: refused
    assert code == 1, output
    assert "refusing to overwrite database" in output
    assert "pass --force" in output

    # The disaster: the database, the history store and Temporal's state are gone.
    admin = await asyncpg.connect(stack.database_url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'DROP DATABASE "{stack.database_url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()
    shutil.rmtree(stack.data_dir / "chdb")
    for leftover in stack.data_dir.glob("temporal.db*"):
        leftover.unlink()

    started = time.monotonic()
    code, output = await marquee(stack, "restore", str(backup_dir))
    assert code == 0, output
    restored_in = time.monotonic() - started
    async with marquee_dev(stack, "after") as run:
        async with admin_client(stack) as api:
            ready = await api.get("/readyz")
            recovered_in = time.monotonic() - started
            after = await snapshot(api, ids)
        temporal = await Client.connect(f"127.0.0.1:{stack.temporal_port}")
        described = await temporal.get_workflow_handle(ids["workflow"]).describe()
        await stop_with_ctrl_c(stack, run)
    print(f"\nrestore drill: restore {restored_in:.1f} s, time to recover (restore + stack ready) {recovered_in:.1f} s")
    assert ready.status_code == 200
    assert after == before
    assert described.status == WorkflowExecutionStatus.COMPLETED
    assert banner_token(run)
    assert recovered_in < RECOVERY_BUDGET_SECONDS
