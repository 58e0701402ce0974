"""The one ordered writer of aio-workq's frames on a connection.

Publishes and acks are appended in the order they are made (a publish's delivery tag is taken
at the moment it is appended) and written together once per event-loop iteration. The socket's
send buffer (the transport's) is filled only up to `HIGH_WATER`, in whole writes: what does not
fit waits here, in order, until the transport drains (asyncio's flow control, `StreamWriter.drain`;
reliance 6 in `_seams`). The publisher's window bounds how much can wait here: a message's slot is
held until its frames have left (`when_flushed`). A large body (`Chunked`) is handed over a frame
at a time, only while the transport's buffer is under the transport's own high-water mark: the
transport copies what the socket does not take at once, and a whole body handed to it was held
twice until sent (#22).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

from .frames import Chunked

__all__ = ("HIGH_WATER", "FrameWriter", "Gate")

log = logging.getLogger("aio_workq")

HIGH_WATER = 4 * 2**20  # bytes in the socket's send buffer beyond which nothing more is written


class Gate(Protocol):
    """A channel's state as aio-workq sees it (the demux's `Tap`): frames for a channel that is
    no longer `open` are dropped."""

    open: bool


class FrameWriter:
    """Buffers whole frames in order and writes them once per loop iteration, never filling the
    transport's buffer past `high_water` by more than one write."""

    __slots__ = (
        "_buffer",
        "_chunked",
        "_draining",
        "_handle",
        "_left",
        "_loop",
        "_pressed",
        "_stream",
        "_watchers",
        "buffered",
        "high_water",
    )

    def __init__(self, stream: asyncio.StreamWriter, *, high_water: int = HIGH_WATER) -> None:
        self._stream = stream
        self._loop = asyncio.get_running_loop()
        self._buffer: list[tuple[Gate, bytes | Chunked]] = []
        self._chunked = 0  # `Chunked` writes in the buffer (large bodies, written part by part)
        self._left = 0  # writes that have left the buffer (to the transport, or dropped), ever
        self._pressed = False  # the buffer has not fit under the mark since it last emptied
        self._watchers: deque[tuple[int, Callable[[], None]]] = deque()
        self._handle: asyncio.Handle | None = None
        self._draining: asyncio.Task[None] | None = None
        self.high_water = high_water
        # Writes (calls of `write`) waiting here, not yet handed to the socket: an attribute,
        # kept where the buffer changes, as a publishing lane reads it after every write.
        self.buffered = 0

    @property
    def closed(self) -> bool:
        return self._stream.is_closing()

    @property
    def buffered_bytes(self) -> int:
        """Bytes waiting in this writer, not yet handed to the socket (counted on each call)."""
        return sum(len(frames) for _, frames in self._buffer)

    @property
    def socket_buffered(self) -> int:
        """Bytes written to the transport that it has not yet handed to the kernel."""
        return self._stream.transport.get_write_buffer_size()

    def write(self, gate: Gate, frames: bytes | Chunked) -> None:
        """Append whole frames of one channel; they leave after every frame appended before
        them, unless the channel closes first (its `gate` is no longer open). A `Chunked`
        write (a large body) is handed to the socket part by part, never joined."""
        self._buffer.append((gate, frames))
        self.buffered += 1
        if type(frames) is Chunked:
            self._chunked += 1
        if self._handle is None and self._draining is None:
            self._handle = self._loop.call_soon(self.flush)

    def when_flushed(self, callback: Callable[[], None]) -> None:
        """Call `callback` once every write appended so far has left this writer (handed to
        the socket, or dropped with its channel or connection): at once if none waits."""
        if not self._buffer:
            callback()
        else:
            self._watchers.append((self._left + len(self._buffer), callback))

    def flush(self) -> None:
        """Hand the buffered frames to the socket now, up to its high-water mark."""
        self._handle = None
        buffer = self._buffer
        if not buffer or self._draining is not None:
            return
        stream = self._stream
        if stream.is_closing():  # the connection is gone: the confirm tracker fails or resends
            self._gone(len(buffer))
            return
        room = self.high_water - stream.transport.get_write_buffer_size()
        if room <= 0:
            self._draining = self._loop.create_task(self._drain())
            return
        if not self._pressed and not self._chunked:  # the usual case: all of it fits
            data: bytes
            if len(buffer) == 1:  # one publish awaited at a time: no list, no join
                gate, frames = buffer[0]
                data = frames if gate.open else b""  # type: ignore[assignment]
            else:
                data = b"".join([frames for gate, frames in buffer if gate.open])  # type: ignore[misc]
            if len(data) <= room:
                self._left += len(buffer)
                buffer.clear()
                self.buffered = 0
                if self._watchers:
                    self._notify()
                if data:
                    stream.write(data)
                return
            self._pressed = True  # until the buffer empties: measured write by write
        if self._chunked:
            self._write_chunked(stream, room)
            return
        count = size = 0
        for _, frames in buffer:  # whole writes up to the mark; the rest once it drains
            count += 1
            size += len(frames)
            if size >= room:
                break
        taken = [frames for gate, frames in buffer[:count] if gate.open]
        self._gone(count)
        if buffer:
            self._draining = self._loop.create_task(self._drain())
        else:
            self._pressed = False
        data = b"".join(taken)  # type: ignore[arg-type]
        if data:
            stream.write(data)

    def _write_chunked(self, stream: asyncio.StreamWriter, room: int) -> None:
        """`flush` with large bodies (`Chunked`) in the buffer: runs of small writes joined up
        to the mark as usual, and a large body's frames handed to the transport one by one
        while its buffer is under the transport's own high-water mark (its flow control:
        `drain()` waits while it is over). asyncio's transport copies into its buffer what the
        socket does not take at once, so whole bodies handed to it were held twice; this way
        it copies at most about one frame. A body can stop between two frames, at the head of
        the buffer, and goes on from there once the transport drains; only the rest of it
        may follow on its channel, so nothing else waiting passes it.

        A body's channel closed by the broker meanwhile (its gate shut) gets none of the rest:
        the broker drops a closing channel's frames until it is answered, and none may follow
        the answer. A channel aio-workq closes itself first hands over the rest (`complete`).
        """
        buffer = self._buffer
        transport = stream.transport
        mark = min(self.high_water, transport.get_write_buffer_limits()[1])

        def full() -> bool:
            return transport.get_write_buffer_size() > mark

        small: list[bytes] = []
        count = size = 0
        for gate, frames in buffer:
            if type(frames) is Chunked:
                if gate.open:
                    if small:
                        stream.write(b"".join(small))
                        small.clear()
                    if not frames.write(stream.write, full):
                        break  # it stays first, partly written
                count += 1
                if full():
                    break
                room, size = self.high_water - transport.get_write_buffer_size(), 0
                continue
            count += 1
            if gate.open:
                small.append(frames)  # type: ignore[arg-type]
                size += len(frames)
            if size >= room:
                break
        if small:
            stream.write(b"".join(small))
        self._gone(count)
        if buffer:
            self._pressed = True
            self._draining = self._loop.create_task(self._drain())
        else:
            self._pressed = False

    def complete(self, gate: Gate) -> None:
        """Hand the socket the rest of a large body of `gate`'s channel that is partly written
        now, whatever the socket holds: its channel is about to be closed by aio-workq, and the
        `Channel.Close` must not come between the frames of one message (the broker would close
        the whole connection). Nothing else changes order: such a body is first in line."""
        buffer = self._buffer
        if not buffer or buffer[0][0] is not gate:
            return
        frames = buffer[0][1]
        if type(frames) is Chunked and frames.started and not self._stream.is_closing():
            frames.write(self._stream.write, _never)
            self._gone(1)

    def _gone(self, count: int) -> None:
        """The first `count` writes have left the buffer."""
        if count == len(self._buffer):
            self._buffer.clear()
            self._chunked = 0
        else:
            if self._chunked:
                self._chunked -= sum(type(f) is Chunked for _, f in self._buffer[:count])
            del self._buffer[:count]
        self.buffered = len(self._buffer)
        self._left += count
        if self._watchers:
            self._notify()

    def _notify(self) -> None:
        watchers, left = self._watchers, self._left
        while watchers and watchers[0][0] <= left:
            watchers.popleft()[1]()

    async def _drain(self) -> None:
        try:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._stream.drain()
        finally:
            self._draining = None
            self.flush()


def _never() -> bool:
    return False
