"""What producers and workers open their channels on: a `LinkSource` hands out a `Link`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from aiormq.abc import AbstractConnection

from .._wire.seams import Wire

__all__ = ("Link", "LinkSource")


@dataclass(frozen=True, slots=True)
class Link:
    """The current aiormq connection and, on the fast path, aio-workq's wire on it."""

    connection: AbstractConnection
    wire: Wire | None


class LinkSource(Protocol):
    """What producers and workers open their channels on: a `Connection`, or an adapter of a
    robust aio-pika connection that someone else opened."""

    @property
    def is_connected(self) -> bool: ...

    @property
    def is_closed(self) -> bool:
        """Closed for good: no channel will be opened on it again."""
        ...

    async def link(self, timeout: float | None = None) -> Link: ...

    def trouble(self) -> str | None:
        """What is known to keep messages from getting through, in words for an error: the
        connection is down (since when), or the broker blocked publishers (memory or disk
        alarm); None when nothing is known."""
        ...
