"""The one ordered writer of aio-workq's frames on a connection.

Publishes and acks are appended in the order they are made (a publish's delivery tag is taken
at the moment it is appended) and written together once per event-loop iteration. When the
socket's send buffer is over `HIGH_WATER`, writing pauses until it drains; frames keep their
order in the buffer meanwhile, and the publisher's window bounds how much can pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

__all__ = ("HIGH_WATER", "FrameWriter", "Gate")

log = logging.getLogger("aio_workq")

HIGH_WATER = 4 * 2**20  # bytes in the socket's send buffer before writing pauses


class Gate(Protocol):
    """A channel's state as aio-workq sees it (the demux's `Tap`): frames for a channel that is
    no longer `open` are dropped."""

    open: bool


class FrameWriter:
    """Buffers whole frames in order and writes them once per loop iteration."""

    __slots__ = ("_buffer", "_draining", "_handle", "_loop", "_stream", "high_water")

    def __init__(self, stream: asyncio.StreamWriter, *, high_water: int = HIGH_WATER) -> None:
        self._stream = stream
        self._loop = asyncio.get_running_loop()
        self._buffer: list[tuple[Gate, bytes]] = []
        self._handle: asyncio.Handle | None = None
        self._draining: asyncio.Task[None] | None = None
        self.high_water = high_water

    @property
    def closed(self) -> bool:
        return self._stream.is_closing()

    @property
    def buffered(self) -> int:
        """Frames (as write calls) waiting in this writer, not yet handed to the socket."""
        return len(self._buffer)

    def write(self, gate: Gate, frames: bytes) -> None:
        """Append whole frames of one channel; they leave after every frame appended before
        them, unless the channel closes first (its `gate` is no longer open)."""
        self._buffer.append((gate, frames))
        if self._handle is None and self._draining is None:
            self._handle = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand the buffered frames to the socket now (unless it is over the high-water mark)."""
        self._handle = None
        if not self._buffer or self._draining is not None:
            return
        stream = self._stream
        if stream.is_closing():
            self._buffer.clear()  # the connection is gone: the confirm tracker fails or resends
            return
        if stream.transport.get_write_buffer_size() > self.high_water:
            self._draining = self._loop.create_task(self._drain())
            return
        data = b"".join([frames for gate, frames in self._buffer if gate.open])
        self._buffer.clear()
        if data:
            stream.write(data)

    async def _drain(self) -> None:
        try:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._stream.drain()
        finally:
            self._draining = None
            self.flush()
