"""The publish timeouts: messages past their deadline fail, and keep their window room until
their frames have left.

A publisher's messages each carry a deadline (`send()` plus its timeout). While any are in
flight, `Expiry` looks every `SWEEP_INTERVAL` s for those past it, wherever they are (written
on a channel, or waiting for the next one), and fails them with `PublishTimeoutError`. One
sweep for all of them, rather than a timer per message: the publish path only checks that a
sweep is due, and whether the message's deadline is the earliest (a sweep walks the messages
only once the earliest deadline has passed, not the whole window every 0.1 s).

A message that timed out after it took a delivery tag may still have frames in the writer's
buffer, which go out once the broker reads again: its window room is freed only once they have
left, so the window bounds the bytes held in every state (#20, finding 5).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from .._exceptions import PublishError, PublishTimeoutError
from .._link.connection import LinkSource
from .._wire.tracker import Outgoing
from .._wire.window import Window

__all__ = ("SLOW", "SWEEP_INTERVAL", "Expiry", "Records")

SWEEP_INTERVAL = 0.1
SLOW = (
    "the broker did not confirm in time (it may be overloaded, or blocking publishers on a "
    "memory or disk alarm)"
)


class Records(Protocol):
    """What the sweep needs of its publisher (`ConfirmPublisher`)."""

    def outstanding(self) -> list[Outgoing]:
        """Every unsettled message: written on a channel or waiting for one."""
        ...

    def fail(self, records: Iterable[Outgoing], cls: type[PublishError], why: str) -> None:
        """Fail `records` with a `cls` error each: not confirmed (or not sent) `why`."""

    def when_flushed(self, callback: Callable[[], None]) -> None:
        """Call `callback` once every frame written so far has left (at once if none wait)."""


class Expiry:
    """Fails the messages of one publisher whose deadline passed.

    Args:
        records: the publisher, whose messages these are.
        window: the publisher's window, which `on_settled` releases.
        source: the connection, which may say why nothing was confirmed.
    """

    __slots__ = (
        "_expiring",
        "_held",
        "_loop",
        "_records",
        "_source",
        "_window",
        "earliest",
        "handle",
    )

    def __init__(self, records: Records, window: Window, source: LinkSource) -> None:
        self._records = records
        self._window = window
        self._source = source
        self._loop = asyncio.get_running_loop()
        self._expiring = False  # in _sweep: settled messages may still have frames buffered
        self._held: list[int] = []  # their body sizes: window room once their frames left
        self.handle: asyncio.TimerHandle | None = None  # the next sweep, while one is due
        # No message in flight has a deadline before this: a sweep before it walks none.
        self.earliest = math.inf

    def expect(self, deadline: float) -> None:
        """A message with `deadline` earlier than `earliest` is in flight (the publisher
        calls this only then: one comparison per message)."""
        self.earliest = deadline

    def start(self) -> None:
        """Sweep in `SWEEP_INTERVAL` s, and after that as long as messages are in flight."""
        self.handle = self._loop.call_later(SWEEP_INTERVAL, self.sweep)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def on_settled(self, records: Sequence[Outgoing]) -> None:
        """`InFlight`'s callback: settled messages' window room is free, unless one timed
        out after it took a tag (its frames may still wait in the writer's buffer)."""
        if self._expiring:
            for out in records:
                if out.tag:
                    self._held.append(out.size)
                else:
                    self._window.release(out.size)
            return
        size = 0
        for out in records:
            size += out.size
        self._window.release_many(len(records), size)

    def sweep(self) -> None:
        """Fail the messages past their deadline now (`start` runs this on a timer)."""
        self.handle = None
        now = self._loop.time()
        expired: list[Outgoing] = []
        if now >= self.earliest:  # one may have expired: walk them (else none has)
            earliest = math.inf
            for out in self._records.outstanding():
                if out.deadline <= now:
                    expired.append(out)
                elif out.deadline < earliest:
                    earliest = out.deadline
            self.earliest = earliest
        if expired:
            self._expiring = True
            try:
                why = f"within its timeout: {self._source.trouble() or SLOW}"
                self._records.fail(expired, PublishTimeoutError, why)
            finally:
                self._expiring = False
        if self._held:
            held, self._held = self._held, []
            release = self._window.release

            def free() -> None:
                for size in held:
                    release(size)

            self._records.when_flushed(free)
        if self._window.count:
            self.start()
