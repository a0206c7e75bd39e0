"""Campaigns and segments in the admin (FR-003): list, creation wizard, progress, actions.

The lifecycle is services.campaigns' (create, launch, pause, resume, cancel, trigger,
describe, preview), with the API's Temporal client and settings; the forms validate with
the request models the API validates with (core.schemas), so the admin accepts exactly
what the API accepts.
"""

from __future__ import annotations

import re
import uuid
import zoneinfo
from datetime import datetime
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from markupsafe import Markup
from pydantic import ValidationError
from sqladmin import expose
from sqladmin.flash import Flash
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from temporalio.service import RPCError

from admin.pages import (
    CAMPAIGNS,
    AdminPage,
    FormErrors,
    ReadOnlyView,
    form_text,
    not_found,
    parse_json,
    pretty_json,
    when,
)
from core.models import Campaign, Channel, Segment
from core.schemas import CampaignCancel, CampaignCreate
from services import campaigns as control
from services import segments
from services import templates as template_store
from services.campaign_store import SegmentNotFound
from services.campaigns import CampaignRequest
from services.templates import TemplateNotFound

SCHEDULE_KINDS = {
    "now": "Now",
    "at": "Once, at a time",
    "daily": "Daily",
    "weekly": "Weekly",
    "monthly": "Monthly",
    "cron": "Cron expression",
}
WEEKDAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
STATUS_COLOURS = {"draft": "secondary", "scheduled": "azure", "running": "blue", "paused": "yellow",
                  "completed": "green", "cancelled": "orange", "failed": "red"}  # fmt: skip
WIZARD_FIELDS = ("name", "category", "template", "template_version", "segment_id", "variables", "schedule_kind",
                 "at", "time", "weekday", "day", "cron", "timezone", "local_time", "window_start", "window_end",
                 "window_timezone", "throttle_per_second")  # fmt: skip


@lru_cache(maxsize=1)
def known_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


@lru_cache(maxsize=1)
def time_zones() -> list[str]:
    return sorted(known_zones())


def local_time(moment: datetime, zone: str) -> str:
    """The time in the schedule's own zone, when that is not UTC."""
    if zone == "UTC" or zone not in known_zones():
        return ""
    return f"{moment.astimezone(zoneinfo.ZoneInfo(zone)):%a %H:%M} {zone}"


def status_badge(status: str) -> Markup:
    colour = STATUS_COLOURS.get(status, "secondary")
    return Markup('<span class="badge bg-{0}-lt campaign-status">{1}</span>').format(colour, status)


def progress_link(campaign: Campaign, request: Request) -> Markup:
    url = request.url_for("admin:view-campaign", campaign_id=campaign.id)
    return Markup('<a href="{0}">{1}</a>').format(url, campaign.name)


class CampaignAdmin(ReadOnlyView, model=Campaign):
    name = "Campaign"
    name_plural = "Campaigns"
    icon = "fa-solid fa-bullhorn"
    list_template = "marquee/campaigns/list.html"
    column_list = ["name", "status", "template_key", "channels", "created_at"]
    column_labels = {"template_key": "template@version"}
    column_searchable_list = ["name", "template_key", "status"]
    column_sortable_list = ["name", "status", "created_at"]
    column_default_sort = ("created_at", True)
    column_formatters = {
        "name": lambda m, a, request: progress_link(m, request),
        "status": lambda m, a: status_badge(m.status),
        "template_key": lambda m, a: f"{m.template_key}@v{m.template_version}",
        "channels": lambda m, a: ", ".join(m.channels),
    }
    column_formatters_detail = {"name": lambda m, a, request: progress_link(m, request)}


class SegmentAdmin(ReadOnlyView, model=Segment):
    name = "Segment"
    name_plural = "Segments"
    icon = "fa-solid fa-users-viewfinder"
    column_list = ["id", "name", "kind", "description", "created_by", "created_at"]
    column_searchable_list = ["name", "description"]
    column_sortable_list = ["id", "name", "created_at"]
    column_default_sort = ("name", False)


def schedule_from(form: dict[str, str], errors: FormErrors) -> dict[str, Any]:
    """The CampaignSchedule fields of the wizard's schedule section (validated later, with the rest)."""
    kind = form["schedule_kind"] or "now"
    zone = form["timezone"] or "UTC"
    schedule: dict[str, Any] = {"kind": kind, "timezone": zone}
    if kind == "at" and form["at"]:
        # A datetime-local field: the time is in the schedule's time zone.
        try:
            moment = datetime.fromisoformat(form["at"])
        except ValueError:
            errors.add("schedule.at", f"{form['at']!r} is not a date and time")
        else:
            if moment.tzinfo is None and zone in known_zones():
                moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(zone))
            schedule["at"] = moment.isoformat()
    for name, kinds in (("time", ("daily", "weekly", "monthly")), ("weekday", ("weekly",)), ("day", ("monthly",)),
                        ("cron", ("cron",))):  # fmt: skip
        if kind in kinds:
            schedule[name] = form[name] or None
    if form["local_time"]:
        schedule["local_time"] = form["local_time"]
    if form["window_start"] or form["window_end"]:
        schedule["window"] = {"start": form["window_start"], "end": form["window_end"],
                              "timezone": form["window_timezone"] or zone}  # fmt: skip
    return schedule


def wizard_payload(form: dict[str, str], channels: list[str], errors: FormErrors) -> dict[str, Any]:
    variables = parse_json(errors, "variables", form["variables"] or "{}", want=dict)
    return {
        "name": form["name"],
        "category": form["category"] or "marketing",
        "template": form["template"],
        "template_version": form["template_version"] or None,
        "segment_id": form["segment_id"] or None,
        "channels": channels,
        "variables": variables if variables is not None else {},
        "schedule": schedule_from(form, errors),
        "throttle_per_second": form["throttle_per_second"] or None,
    }


def place_schedule_problems(errors: FormErrors) -> None:
    """CampaignSchedule reports a missing field on the schedule ("kind 'weekly' needs
    'weekday' ..."): show it on that field, unless the field has a problem already."""
    for problem in list(errors.problems):
        needed = re.search(r"needs '(\w+)'", problem.message) if problem.part == "schedule" else None
        if needed:
            errors.problems.remove(problem)
            if not errors.has(f"schedule.{needed[1]}"):
                errors.add(f"schedule.{needed[1]}", problem.message)


def count_summary(counted: dict[str, Any]) -> str:
    parts = [f"matches {counted['matches']:,} recipient{'s' if counted['matches'] != 1 else ''}"]
    parts += [f"{count:,} reachable by {channel}" for channel, count in counted["reachable"].items()]
    parts += [f"{count:,} opted out of {channel}" for channel, count in counted["opted_out"].items() if count]
    return ", ".join(parts)


class CampaignPages(AdminPage):
    """The wizard, the progress page and the actions; the list is CampaignAdmin's."""

    name = "Campaign pages"
    permission = CAMPAIGNS

    def is_visible(self, request: Request) -> bool:
        return False  # reached from the campaigns list, not the menu

    @expose("/campaigns/new", methods=["GET", "POST"], identity="campaign-new")
    async def wizard_page(self, request: Request) -> Response:
        self.require_change(request)
        errors = FormErrors()
        if request.method == "GET":
            form = {name: "" for name in WIZARD_FIELDS}
            form.update(category="marketing", variables="{}", schedule_kind="now", timezone="UTC",
                        template=request.query_params.get("template", ""))  # fmt: skip
            return await self._wizard(request, form, ["email"], errors)
        submitted = await request.form()
        form = {name: form_text(submitted, name) for name in WIZARD_FIELDS}
        channels = [str(value) for value in submitted.getlist("channels")]
        payload = wizard_payload(form, channels, errors)
        body = None
        try:
            body = CampaignCreate.model_validate(payload)
        except ValidationError as err:
            blank = {name for name in ("name", "template", "segment_id") if not form[name]}
            errors.add_validation(err, empty=blank, skip={"variables"} if errors.has("variables") else ())
            place_schedule_problems(errors)
        if body is not None and not errors:
            async with self.connect() as conn:
                try:
                    campaign_id = await control.create(conn, CampaignRequest.of(body, body.segment_id, body.name),
                                                       self.author(request), self.actor(request))  # fmt: skip
                except control.CampaignInvalid as err:
                    errors.add(err.field, err.message)
                else:
                    await conn.commit()
                    Flash.success(request, f"Draft campaign {body.name!r} created: check it, then launch it.")
                    return self.redirect(request.url_for("admin:view-campaign", campaign_id=campaign_id))
        return await self._wizard(request, form, channels, errors, status_code=400)

    async def _wizard(
        self, request: Request, form: dict[str, str], channels: list[str], errors: FormErrors, status_code: int = 200
    ) -> Response:
        async with self.connect() as conn:
            templates = await template_store.list_templates(conn, None, 500)
            choices = await segments.rows_by_name(conn)
        context = {"title": "New campaign", "form": form, "channels": channels, "errors": errors,
                   "templates": templates, "segments": choices, "all_channels": [c.value for c in Channel],
                   "kinds": SCHEDULE_KINDS, "weekdays": WEEKDAYS, "time_zones": time_zones()}  # fmt: skip
        return await self.render(request, "marquee/campaigns/wizard.html", context, status_code)

    @expose("/campaigns/segment-count", identity="campaign-segment-count")
    async def segment_count(self, request: Request) -> Response:
        """The wizard's live count: how many recipients the segment matches, per channel."""
        raw = request.query_params.get("segment_id", "")
        channels = [c for c in request.query_params.getlist("channels") if c in Channel.__members__]
        if not raw.isdigit():
            return JSONResponse({"error": "choose a segment"}, status_code=400)
        async with self.connect() as conn:
            try:
                counted = await segments.count(conn, int(raw), channels)
            except SegmentNotFound:
                return JSONResponse({"error": f"no segment {raw}"}, status_code=404)
        return JSONResponse({**counted, "summary": count_summary(counted)})

    @expose("/campaigns/template-info", identity="campaign-template-info")
    async def template_info(self, request: Request) -> Response:
        """The wizard's hint for the chosen template: versions, channels, variables."""
        key = request.query_params.get("key", "")
        async with self.connect() as conn:
            try:
                history = await template_store.history(conn, key)
            except TemplateNotFound:
                return JSONResponse({"error": f"no template {key!r}"}, status_code=404)
        active = next(record for record in history if record.version == record.active_version)
        content = active.content
        return JSONResponse(
            {
                "key": key,
                "active_version": active.version,
                "versions": [record.version for record in history],
                "channels": sorted(content.channels()),
                "variables": [spec.model_dump(mode="json") for spec in content.variables],
                "examples": {spec.name: spec.example for spec in content.variables if spec.example is not None},
            }
        )

    @expose("/campaigns/view/{campaign_id:uuid}", identity="campaign")
    async def detail_page(self, request: Request) -> Response:
        campaign_id: uuid.UUID = request.path_params["campaign_id"]
        async with self.connect() as conn:
            try:
                campaign = await control.describe(conn, self.temporal(), self.settings(), campaign_id)
            except control.CampaignNotFound as err:
                raise not_found(f"campaign {campaign_id}") from err
            try:
                segment = await segments.get(conn, campaign["segment_id"])
            except SegmentNotFound:
                segment = None
        schedule = campaign["schedule"]
        live = campaign["status"] == "running" or any(run["status"] == "running" for run in campaign["runs"])
        zone = schedule.get("timezone") or "UTC"
        next_runs = [(when(moment), local_time(moment, zone)) for moment in campaign["next_run_times"][:5]]
        context = {"title": campaign["name"], "campaign": campaign, "segment": segment, "live": live,
                   "recurring": bool(schedule.get("cron")), "next_runs": next_runs, "status_badge": status_badge,
                   "schedule_json": pretty_json({k: v for k, v in schedule.items() if v is not None})}  # fmt: skip
        return await self.render(request, "marquee/campaigns/detail.html", context)

    @expose("/campaigns/act/{campaign_id:uuid}/{operation}", methods=["POST"], identity="campaign-act")
    async def act(self, request: Request) -> Response:
        """Launch, pause, resume or trigger; refusals come back as a flash message."""
        self.require_change(request)
        campaign_id: uuid.UUID = request.path_params["campaign_id"]
        operation = request.path_params["operation"]
        if operation not in ("launch", "pause", "resume", "trigger"):
            raise not_found(f"action {operation!r}")
        temporal = self.temporal()
        actor = self.actor(request)
        async with self.connect() as conn:
            try:
                if operation == "launch":
                    await control.launch(conn, temporal, self.settings(), campaign_id, actor)
                elif operation == "pause":
                    await control.pause(conn, temporal, campaign_id, f"paused by {self.author(request)}", actor)
                elif operation == "resume":
                    await control.resume(conn, temporal, campaign_id, f"resumed by {self.author(request)}", actor)
                else:
                    await control.trigger(conn, temporal, campaign_id, actor)
            except control.CampaignNotFound as err:
                raise not_found(f"campaign {campaign_id}") from err
            except control.CampaignInvalid as err:
                Flash.error(request, f"Cannot {operation}: {err.field}: {err.message}")
            except (control.CampaignStateError, RPCError) as err:
                Flash.error(request, f"Cannot {operation}: {err}")
            else:
                await conn.commit()
                done = {"launch": "Launched", "pause": "Paused", "resume": "Resumed", "trigger": "Triggered a run"}
                Flash.success(request, f"{done[operation]}.")
        return self.redirect(request.url_for("admin:view-campaign", campaign_id=campaign_id))

    @expose("/campaigns/cancel/{campaign_id:uuid}", methods=["GET", "POST"], identity="campaign-cancel")
    async def cancel_page(self, request: Request) -> Response:
        self.require_change(request)
        campaign_id: uuid.UUID = request.path_params["campaign_id"]
        errors = FormErrors()
        reason = ""
        async with self.connect() as conn:
            row = await self._campaign_row(conn, campaign_id)
            if request.method == "POST":
                reason = form_text(await request.form(), "reason")
                try:
                    body = CampaignCancel(reason=reason)
                except ValidationError as err:
                    errors.add_validation(err, empty={"reason"} if not reason else ())
                else:
                    try:
                        await control.cancel(conn, self.temporal(), campaign_id, body.reason, self.actor(request))
                    except (control.CampaignStateError, RPCError) as err:
                        Flash.error(request, f"Cannot cancel: {err}")
                    else:
                        await conn.commit()
                        Flash.success(request, "Cancelled. What was sent stays counted.")
                    return self.redirect(request.url_for("admin:view-campaign", campaign_id=campaign_id))
        context = {"title": f"Cancel {row.name}", "row": row, "reason": reason, "errors": errors,
                   "status_badge": status_badge}  # fmt: skip
        return await self.render(request, "marquee/campaigns/cancel.html", context, 400 if errors else 200)

    @expose("/campaigns/preview/{campaign_id:uuid}", identity="campaign-preview")
    async def preview_page(self, request: Request) -> Response:
        """The campaign's pinned template rendered for the first recipient of its segment."""
        campaign_id: uuid.UUID = request.path_params["campaign_id"]
        async with self.connect() as conn:
            try:
                preview = await control.preview(conn, campaign_id)
            except control.CampaignNotFound as err:
                raise not_found(f"campaign {campaign_id}") from err
        errors = FormErrors()
        for problem in preview.problems:
            errors.add(problem.part, problem.message)
        context = {"title": f"Preview of {preview.campaign.name}", "row": preview.campaign,
                   "person": preview.recipient, "segment": preview.segment, "rendered": preview.rendered,
                   "errors": errors}  # fmt: skip
        return await self.render(request, "marquee/campaigns/preview.html", context)

    @staticmethod
    async def _campaign_row(conn: AsyncConnection, campaign_id: uuid.UUID) -> sa.Row[Any]:
        try:
            return await control.load(conn, campaign_id)
        except control.CampaignNotFound as err:
            raise not_found(f"campaign {campaign_id}") from err
