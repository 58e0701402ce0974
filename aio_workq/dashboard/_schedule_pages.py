"""The schedules page: the schedulers' group status (read at most every 10 s, a connection each
time), and the queues the schedules publish to (the overview watches them too)."""

from __future__ import annotations

from typing import Any

from aio_workq import WorkqError
from aio_workq.admin.schedules import schedule_rows
from aio_workq.schedules import read_status

from ._data import Cached
from ._http import Request, Response
from ._site import Site

__all__ = ("SchedulePages",)

_SCHEDULES_TTL = 10.0


class SchedulePages:
    """The schedules page's handlers, on the status of the schedulers' `group`."""

    def __init__(self, *, site: Site, url: str, group: str, connect_timeout: float) -> None:
        self._site = site
        self._url = url
        self._connect_timeout = connect_timeout
        self._group = group
        # the schedules change once per tick: read (a connection each time) every 10 s at most
        self._schedules: Cached[Any] = Cached(self._read, ttl=_SCHEDULES_TTL)
        self._last: Any = None

    async def _read(self) -> Any:
        try:
            state = await read_status(
                self._url, group=self._group, connect_timeout=self._connect_timeout
            )
        except WorkqError as exc:
            return exc
        self._last = state
        return state

    def queues(self) -> list[str]:
        """The queues of the schedules last read (none before the first read)."""
        state = self._last
        return [] if state is None else [row["queue"] for row in schedule_rows(state)]

    async def _context(self) -> dict[str, Any]:
        state = await self._schedules.get()
        error = str(state) if isinstance(state, Exception) else None
        state = None if error else state
        return {"state": state, "rows": schedule_rows(state), "error": error, "group": self._group}

    async def index(self, request: Request, match: dict[str, str]) -> Response:
        return self._site.render(request, "schedules.html", **await self._context())

    async def fragment(self, request: Request, match: dict[str, str]) -> Response:
        return self._site.render(request, "_schedules.html", **await self._context())
