"""The schedules' status as rows, for `aio-workq schedules` and the dashboard."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from aio_workq.schedules import State

__all__ = ("OVERDUE_AFTER", "schedule_rows")

OVERDUE_AFTER = timedelta(seconds=30)
"""How far past its fire time a tick's `next` is overdue: the active scheduler fires a due tick
within 5 s and records the next one, so a `next` this far past says no scheduler fired it (the
last active one was killed, or its tick is refused; its log says which)."""


def schedule_rows(state: State | None, now: datetime | None = None) -> list[dict[str, Any]]:
    """One JSON-able dict per schedule of `state` (none without a state), sorted by name:
    its spec, queue, time zone, next fire (UTC and local to its zone), last fire, and whether
    its next fire is overdue at `now` (`OVERDUE_AFTER` past it: no scheduler fired it)."""
    if state is None:
        return []
    late = (now or datetime.now(UTC)) - OVERDUE_AFTER
    rows = []
    for name, entry in sorted(state.entries.items()):
        rows.append(
            {
                "name": name,
                "spec": entry.describe,
                "queue": entry.queue,
                "tz": entry.tz,
                "next_utc": _iso(entry.next),
                "next_local": _iso(entry.next, entry.tz),
                "last_utc": _iso(entry.last),
                "known_to_active": entry.next is not None,
                "overdue": entry.next is not None and entry.next < late,
            }
        )
    return rows


def _iso(moment: datetime | None, tz: str | None = None) -> str | None:
    if moment is None:
        return None
    if tz is not None:
        moment = moment.astimezone(ZoneInfo(tz))
    return moment.isoformat(timespec="seconds")
