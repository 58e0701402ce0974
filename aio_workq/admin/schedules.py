"""The schedules' status as rows, for `aio-workq schedules` and the dashboard."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from aio_workq.schedules import State

__all__ = ("schedule_rows",)


def schedule_rows(state: State | None) -> list[dict[str, Any]]:
    """One JSON-able dict per schedule of `state` (none without a state), sorted by name:
    its spec, queue, time zone, next fire (UTC and local to its zone) and last fire."""
    if state is None:
        return []
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
            }
        )
    return rows


def _iso(moment: datetime | None, tz: str | None = None) -> str | None:
    if moment is None:
        return None
    if tz is not None:
        moment = moment.astimezone(ZoneInfo(tz))
    return moment.isoformat(timespec="seconds")
