"""Wall-clock arithmetic in a time zone: next local time, daily windows (DST-correct)."""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import time as clock
from zoneinfo import ZoneInfo

from core.contracts import WindowState


def _parse_clock(value: str) -> clock:
    hours, minutes = value.split(":")
    return clock(int(hours), int(minutes))


def next_local_time(now: datetime, zone: str, local_time: str) -> datetime:
    """The next instant (at or after `now`) when it is `local_time` in `zone`, DST-correct."""
    tz = ZoneInfo(zone)
    wanted = _parse_clock(local_time)
    local_now = now.astimezone(tz)
    candidate = datetime.combine(local_now.date(), wanted, tzinfo=tz)
    if candidate < local_now:
        candidate = datetime.combine(local_now.date() + timedelta(days=1), wanted, tzinfo=tz)
    # A wall time skipped by a DST jump resolves forward; round-trip through UTC to normalise.
    return candidate.astimezone(ZoneInfo("UTC"))


def window_state(now: datetime, start: str, end: str, zone: str) -> WindowState:
    """Whether `now` is inside the daily [start, end) window in `zone`, and until when."""
    tz = ZoneInfo(zone)
    local_now = now.astimezone(tz)
    opens, closes = _parse_clock(start), _parse_clock(end)
    today = local_now.date()
    open_today = datetime.combine(today, opens, tzinfo=tz)
    close_today = datetime.combine(today, closes, tzinfo=tz)
    if close_today <= open_today:  # a window across midnight, e.g. 22:00-06:00
        close_today += timedelta(days=1)
        if local_now < open_today and local_now < close_today - timedelta(days=1):
            open_today -= timedelta(days=1)
            close_today -= timedelta(days=1)
    if open_today <= local_now < close_today:
        return WindowState(open=True, until=close_today.astimezone(ZoneInfo("UTC")))
    next_open = open_today if local_now < open_today else open_today + timedelta(days=1)
    return WindowState(open=False, until=next_open.astimezone(ZoneInfo("UTC")))
