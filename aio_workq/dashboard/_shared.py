"""Reads of dead letters shared by the dashboard's viewers: each is a pass over the whole
dead-letter queue (the library reads by copying every letter to the back, to keep the order),
so concurrent viewers of one page await the same pass, and its result serves the page again
for a few seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

__all__ = ("SharedReads",)

LIFETIME = 5.0
"""Seconds a read serves the same page again (a replay or a purge from here ends it at once)."""
_KEPT = 64  # reads kept at most (distinct filters): the oldest finished ones go first


class SharedReads:
    """Single-flight reads, kept `lifetime` seconds, by key; the first part of a key is the
    queue (`forget(queue)` drops its reads)."""

    def __init__(
        self, *, lifetime: float = LIFETIME, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._lifetime = lifetime
        self._clock = clock
        self._reads: dict[tuple[str, Hashable], tuple[float, asyncio.Future[Any]]] = {}

    async def get(self, key: tuple[str, Hashable], read: Callable[[], Awaitable[Any]]) -> Any:
        """The result of the read under way for `key`, or of one that ended less than
        `lifetime` seconds ago, else of `read()` (started now; a failed read is not kept)."""
        now = self._clock()
        self._expire(now)
        held = self._reads.get(key)
        if held is None:
            future: asyncio.Future[Any] = asyncio.ensure_future(read())
            self._reads[key] = held = (now, future)
            future.add_done_callback(lambda done: self._ended(key, done))
        # shielded: a viewer who leaves does not cancel the pass the others await
        return await asyncio.shield(held[1])

    def forget(self, queue: str) -> None:
        """Drop the reads of `queue` (its dead letters changed): the next view reads again."""
        for key in [key for key in self._reads if key[0] == queue]:
            del self._reads[key]

    def _ended(self, key: tuple[str, Hashable], done: asyncio.Future[Any]) -> None:
        if done.cancelled() or done.exception() is not None:
            if self._reads.get(key, (0.0, None))[1] is done:
                del self._reads[key]
            return
        if self._reads.get(key, (0.0, None))[1] is done:
            self._reads[key] = (self._clock(), done)  # kept from when it ended

    def _expire(self, now: float) -> None:
        for key, (when, future) in list(self._reads.items()):
            if future.done() and now - when >= self._lifetime:
                del self._reads[key]
        finished = [key for key, (_, future) in self._reads.items() if future.done()]
        for key in finished[: max(len(self._reads) - _KEPT, 0)]:
            del self._reads[key]
