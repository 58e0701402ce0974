"""The workers page: the live workers' beats, read by a `PresenceWatcher` opened on first use
(the overview reads its queues and counters too, without the management API)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aio_workq import Connection, PresenceWatcher, WorkerPresence, WorkqError

from ._http import Request, Response
from ._site import Site, duration

__all__ = ("WorkerPages",)

# A running worker beats when it starts and every `presence_interval` (5 s by default): after
# this long listening, a worker that has not been heard from is not there (or beats less often).
_FIRST_BEATS = 6.0
# A watcher that could not be opened (the broker refused or did not answer) is tried again after
# this long; the pages meanwhile say why it failed.
_RETRY = 30.0


class WorkerPages:
    """The workers page's handlers, and the watcher of the workers' beats they read."""

    def __init__(self, *, site: Site, url: str, connect_timeout: float) -> None:
        self._site = site
        self._url = url
        self._connect_timeout = connect_timeout
        self._connection: Connection | None = None
        self._watcher: PresenceWatcher | None = None
        self._watcher_error: str | None = None
        self._watcher_lock = asyncio.Lock()
        self._opened_at: float | None = None
        self._retry_at = float("-inf")

    async def presence(self) -> PresenceWatcher | None:
        """The watcher of the workers' beats, opened on first use (None while it can't be).

        After a failed open it is tried again `_RETRY` seconds later, not on every request:
        requests that waited for the attempt take its outcome instead of starting their own
        (a broker that never answers would otherwise hold each tab for a connect timeout, one
        after the other)."""
        if self._watcher is None and time.monotonic() < self._retry_at:
            return None
        async with self._watcher_lock:
            if self._watcher is None and time.monotonic() >= self._retry_at:
                # its own connection, for the dashboard's connect timeout (not the default 10 s)
                connection = Connection(
                    self._url, name="aio-workq dashboard presence",
                    connect_timeout=self._connect_timeout,
                )  # fmt: skip
                watcher = PresenceWatcher(connection)
                try:
                    await connection.open()
                    await watcher.open(timeout=self._connect_timeout)
                except WorkqError as exc:
                    await connection.close()
                    self._watcher_error = str(exc)
                    self._retry_at = time.monotonic() + _RETRY
                    return None
                self._watcher, self._watcher_error = watcher, None
                self._connection = connection
                self._opened_at = time.monotonic()
            return self._watcher

    def listening(self) -> bool:
        """True for the first beat interval after the watcher opened: workers that run may not
        have been heard from yet."""
        opened = self._opened_at
        return opened is not None and time.monotonic() - opened < _FIRST_BEATS

    def unheard(self) -> str | None:
        """Why the watcher could not be opened (None when it is open, or not tried yet)."""
        return self._watcher_error if self._watcher is None else None

    def seen(self) -> list[WorkerPresence]:
        """The workers the watcher has seen (none before it is open)."""
        return [] if self._watcher is None else self._watcher.workers()

    def handled(self) -> int | None:
        """The live workers' handled count (their own counters), for a rate without the
        management API."""
        if self._watcher is None:
            return None
        return sum(w.beat.handled for w in self._watcher.workers() if w.alive)

    async def close(self) -> None:
        """Close the watcher, if it was opened."""
        watcher, self._watcher = self._watcher, None
        connection, self._connection = self._connection, None
        if watcher is not None:
            await watcher.close()
        if connection is not None:
            await connection.close()

    async def _context(self) -> dict[str, Any]:
        watcher = await self.presence()
        found = [] if watcher is None else watcher.workers()
        now = time.time()
        rows = [
            {
                "id": w.beat.id, "host": w.beat.host, "pid": w.beat.pid,
                "queues": ", ".join(w.beat.queues), "concurrency": w.beat.concurrency,
                "in_flight": w.beat.in_flight, "handled": w.beat.handled,
                "failed": w.beat.failed, "uptime": duration(w.uptime),
                "version": w.beat.version, "alive": w.alive,
                "seen": duration(now - w.last_seen),
            }
            for w in found
        ]  # fmt: skip
        return {
            "rows": rows,
            "alive": sum(1 for row in rows if row["alive"]),
            "error": self._watcher_error if watcher is None else None,
        }

    async def index(self, request: Request, match: dict[str, str]) -> Response:
        return self._site.render(request, "workers.html", **await self._context())

    async def fragment(self, request: Request, match: dict[str, str]) -> Response:
        return self._site.render(request, "_workers.html", **await self._context())
