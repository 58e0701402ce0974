"""The publisher's window: how many messages (and body bytes) may wait for their confirms."""

from __future__ import annotations

import asyncio

from .._exceptions import ConfigurationError

__all__ = ("DEFAULT_WINDOW", "DEFAULT_WINDOW_BYTES", "Window")

DEFAULT_WINDOW = 10_000
DEFAULT_WINDOW_BYTES = 64 * 2**20


class Window:
    """Counts messages and body bytes in flight; senders wait while either limit is reached.

    Hysteresis: waiting senders resume together once a quarter of the window is free, so they
    refill it in one burst (one write) instead of one message per confirm. One message larger
    than `max_bytes` still goes, alone. A sender that stops waiting (its timeout) is let go at
    once, not kept until the window drains.
    """

    __slots__ = ("_bytes", "_count", "_low", "_low_bytes", "_waiters", "full", "max_bytes", "size")

    def __init__(self, size: int = DEFAULT_WINDOW, max_bytes: int = DEFAULT_WINDOW_BYTES) -> None:
        if size < 1:
            raise ConfigurationError(f"window must be >= 1, got {size!r}")
        if max_bytes < 1:
            raise ConfigurationError(f"window_bytes must be >= 1, got {max_bytes!r}")
        self.size = size
        self.max_bytes = max_bytes
        self._low = size - max(1, size // 4)
        self._low_bytes = max_bytes - max_bytes // 4
        self._count = 0
        self._bytes = 0
        self.full = False  # either limit is reached (kept by take and release: read per send)
        self._waiters: dict[asyncio.Future[None], None] = {}  # in arrival order

    @property
    def count(self) -> int:
        """Messages in flight."""
        return self._count

    @property
    def bytes(self) -> int:
        """Body bytes in flight."""
        return self._bytes

    @property
    def waiting(self) -> int:
        """Senders waiting for room."""
        return len(self._waiters)

    def take(self, size: int) -> None:
        """A message of `size` body bytes is now in flight."""
        self._count = count = self._count + 1
        self._bytes = total = self._bytes + size
        if count >= self.size or total >= self.max_bytes:
            self.full = True

    def release(self, size: int) -> None:
        """A message of `size` body bytes settled."""
        self.release_many(1, size)

    def release_many(self, count: int, size: int) -> None:
        """`count` messages of `size` body bytes in all settled (a multiple confirm's)."""
        self._count -= count
        self._bytes -= size
        self.full = self._count >= self.size or self._bytes >= self.max_bytes
        if self._waiters and self._count <= self._low and self._bytes <= self._low_bytes:
            waiters, self._waiters = self._waiters, {}
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait(self) -> None:
        """Wait until the window has room (the caller bounds this with a timeout)."""
        while self.full:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[waiter] = None
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
                self._waiters.pop(waiter, None)  # timed out or cancelled: let go now
