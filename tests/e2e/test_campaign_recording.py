"""What a campaign batch records for its outcomes: delivery rows, the run's counters and
history rows, each once, also when a chunk is written again (a retried batch)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from core.templating import TemplateContent, TemplateLimits
from services import campaign_store as store
from services import campaigns as campaign_control
from services import templates as template_store
from services.campaign_batches import CampaignSpec, _Recorder
from services.history import HistorySubject, campaign_send_id
from worker import WorkerServices

CONTENT = TemplateContent.model_validate(
    {"locales": {"en": {"email": {"subject": "Hi", "html": "<p>Hello</p>"}, "sms": {"text": "Hello"}}}}
)


async def _run(engine: AsyncEngine) -> tuple[CampaignSpec, str]:
    key = f"rec-{uuid.uuid4().hex[:8]}"
    async with engine.begin() as conn:
        await template_store.create(conn, key=key, category="marketing", description="", content=CONTENT,
                                    author="t", change_note="", limits=TemplateLimits())  # fmt: skip
        segment_id = await conn.scalar(
            store.segments.insert()
            .values(name=key, kind="filter", created_by="t", filter={"field": "tags", "op": "contains", "value": key})
            .returning(store.segments.c.id)
        )
        campaign_id = await campaign_control.create(
            conn,
            campaign_control.CampaignRequest(
                name=key, category="marketing", template=key, template_version=None, segment_id=segment_id,
                channels=["email", "sms"], variables={}, schedule={"kind": "now"}, throttle_per_second=None,
            ),
            "t",
        )  # fmt: skip
        run_id = f"campaign-{campaign_id}"
        await conn.execute(store.campaign_runs.insert().values(id=run_id, campaign_id=campaign_id, status="running"))
    spec = CampaignSpec(
        campaign_id=campaign_id, category="marketing", channels=["email", "sms"], variables={}, content=CONTENT,
        template_key=key, template_version=1, segment=cast(Any, None), schedule={},
    )  # fmt: skip
    return spec, run_id


def _person(n: int) -> Any:
    return SimpleNamespace(id=1_000 + n, user_id=f"user-{n}", country="DE" if n % 2 else None, timezone="Europe/Berlin")


# (recipient, channel, status, details): what a batch's senders report.
OUTCOMES: list[tuple[int, str, str, dict[str, Any]]] = [
    (1, "email", "sent", {"message_id": "<m1@example.com>", "provider": "smtp"}),
    (1, "sms", "unreachable", {"error": "recipient has no phone for sms"}),
    (2, "email", "failed", {"error": "550 no such user " + "x" * 1200, "error_class": "rejected by provider"}),
    (3, "email", "suppressed", {"error": "address suppressed: bounce"}),
    (4, "email", "sent", {"message_id": "<m4@example.com>", "provider": "smtp"}),
]


COMPARED = ("channel", "status", "user_id", "category", "provider", "error", "campaign_id", "run_id", "template_key",
            "template_version", "country", "timezone", "error_class", "currency")  # fmt: skip


async def _record(services: WorkerServices, spec: CampaignSpec, run_id: str, outcomes: list[Any]) -> _Recorder:
    recorder = _Recorder(services.engine, services.history, services.directory, spec, run_id)
    for n, channel, status, details in outcomes:
        await recorder.add(_person(n), channel, status, **details)
    await recorder.close()
    return recorder


async def test_a_chunk_written_again_records_each_outcome_once(services: WorkerServices) -> None:
    spec, run_id = await _run(services.engine)
    first = await _record(services, spec, run_id, OUTCOMES[:3])
    # The batch's retry writes the first chunk's outcomes again, beside new ones.
    second = await _record(services, spec, run_id, OUTCOMES)
    assert first.totals == {"sent": 1, "unreachable": 1, "failed": 1}
    assert second.totals == {"sent": 1, "suppressed": 1}  # only what was new

    async with services.engine.connect() as conn:
        deliveries = (await conn.execute(
            sa.select(store.campaign_deliveries).where(store.campaign_deliveries.c.run_id == run_id)
        )).all()  # fmt: skip
        run = (await conn.execute(sa.select(store.campaign_runs).where(store.campaign_runs.c.id == run_id))).one()
    stored = {(row.recipient_id, row.channel): row for row in deliveries}
    assert len(deliveries) == len(OUTCOMES)
    for n, channel, status, details in OUTCOMES:
        row = stored[(1_000 + n, channel)]
        assert (row.status, row.provider_message_id, row.error) == (status, details.get("message_id"),
                                                                    details.get("error"))  # fmt: skip
    assert (run.sent, run.failed, run.suppressed, run.unreachable) == (2, 1, 1, 1)
    chunk_times = {row.created_at for row in deliveries}
    assert len(chunk_times) == 2  # one transaction's time a chunk

    history = await services.history.query(
        "SELECT * FROM notification_history WHERE run_id = {run:String}",
        {"run": run_id},
    )
    assert len(history) == len(OUTCOMES)
    history.sort(key=lambda row: (str(row["notification_id"]), row["channel"]))
    # Each row is the event a HistorySubject of its own recipient makes (as every other
    # history row is made), at its delivery row's time.
    expected = []
    for n, channel, status, details in OUTCOMES:
        person, row = _person(n), stored[(1_000 + n, channel)]
        subject = HistorySubject(
            campaign_send_id(spec.campaign_id, run_id, person.id, channel), person.user_id, "marketing",
            str(spec.campaign_id), run_id=run_id, template_key=spec.template_key, template_version=1,
            country=person.country or "", timezone=person.timezone,
        )  # fmt: skip
        event = subject.event(channel, status, error=details.get("error"), provider=details.get("provider", ""),
                              error_class=details.get("error_class", ""), event_time=row.created_at)  # fmt: skip
        expected.append(event)
    expected.sort(key=lambda event: (event.notification_id, event.channel))
    for got, want in zip(history, expected, strict=True):
        assert uuid.UUID(str(got["event_id"])) == want.event_id
        assert str(got["notification_id"]) == want.notification_id
        for column in COMPARED:
            assert got[column] == getattr(want, column), column
