"""Settling a consuming channel's deliveries: acks coalesced once per event-loop iteration.

Deliveries are tracked in delivery order. At each flush, the completed prefix of tags is acked
with one `multiple=True` ack; completed deliveries behind one still running are acked singly;
nacks go out in the order they were asked for. On aio-workq's own connections the frames go
through the connection's ordered `FrameWriter`, which the flush empties into the socket at once
(one loop iteration after the acks were asked for, not two); otherwise through aiormq's public
`basic_ack` / `basic_nack`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiormq

from .frames import ack_frame, nack_frame
from .writer import FrameWriter, Gate

__all__ = ("Acker",)

log = logging.getLogger("aio_workq")

_ACK, _NACK = 0, 1


class Acker:
    """Settles the deliveries of one channel, each exactly once."""

    __slots__ = (
        "_gate",
        "_handle",
        "_loop",
        "_ops",
        "_tasks",
        "_unsettled",
        "_writer",
        "channel",
        "closed",
        "track",
    )

    def __init__(
        self,
        channel: aiormq.abc.AbstractChannel,
        writer: tuple[FrameWriter, Gate] | None,
    ) -> None:
        self.channel = channel
        self._writer: FrameWriter | None = writer[0] if writer is not None else None
        self._gate: Gate | None = writer[1] if writer is not None else None
        self._loop = asyncio.get_running_loop()
        # delivery tag -> True once completed (None until then), in delivery order
        self._unsettled: dict[int, bool | None] = {}
        # `track(tag)`: a delivery to settle. The dict's own method, called once per delivery:
        # a C call where a method of this class would be a Python one.
        self.track: Callable[[int], bool | None] = self._unsettled.setdefault
        self._ops: list[tuple[int, int, bool]] = []  # (kind, tag, multiple or requeue)
        self._handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False  # set by `close()` only; no ack is written after it

    @property
    def unsettled(self) -> int:
        return len(self._unsettled)

    def ack(self, tag: int) -> None:
        unsettled = self._unsettled
        if tag in unsettled:
            unsettled[tag] = True
            if self._handle is None:  # `_schedule`, inline: once per delivery
                self._handle = self._loop.call_soon(self.flush)

    def nack(self, tag: int, *, requeue: bool) -> None:
        """Nack `tag` unless it was settled already (an ack asked for wins)."""
        unsettled = self._unsettled
        if tag in unsettled and unsettled[tag] is None:
            del self._unsettled[tag]
            self._ops.append((_NACK, tag, requeue))
            self._schedule()

    def _schedule(self) -> None:
        if self._handle is None:
            self._handle = self._loop.call_soon(self.flush)

    @property
    def gone(self) -> bool:
        """No ack can be written any more: closed here, or its channel closed (the broker
        gives back every delivery not acked on it)."""
        return self.closed or self.channel.is_closed

    def close(self) -> None:
        """Write what is asked for so far, then nothing more: the channel is about to be
        closed, and a frame after its `Channel.Close` would close the whole connection."""
        self.flush()
        self.closed = True

    def flush(self) -> None:
        self._handle = None
        if self.gone:
            # The broker requeues everything unacked on a closed channel: the documented
            # duplicate case, never a loss.
            self._unsettled.clear()
            self._ops.clear()
            return
        unsettled = self._unsettled
        ops = self._ops
        last = 0
        for tag, done in unsettled.items():
            if not done:
                break
            last = tag
        else:  # every delivery tracked is completed (the usual case): acked up to the last
            if last:
                unsettled.clear()
                ops.append((_ACK, last, True))
            last = 0
        if last:
            for tag in [tag for tag in unsettled if tag <= last]:
                del unsettled[tag]
            ops.append((_ACK, last, True))
        if unsettled and any(unsettled.values()):
            for tag in [tag for tag, done in unsettled.items() if done]:
                del unsettled[tag]
                ops.append((_ACK, tag, False))
        if not ops:
            return
        self._ops = []
        writer = self._writer
        if writer is not None:
            assert self._gate is not None
            number = self.channel.number
            writer.write(
                self._gate,
                b"".join(
                    ack_frame(number, tag, flag) if kind == _ACK else nack_frame(number, tag, flag)
                    for kind, tag, flag in ops
                ),
            )
            # Now, with whatever the writer holds before them (in order), not an iteration
            # later: the broker's prefetch window reopens as soon as the acks arrive.
            writer.flush()
            return
        for kind, tag, flag in ops:  # tasks start in order: aiormq's write queue keeps it
            task: asyncio.Task[Any] = self._loop.create_task(self._plain(kind, tag, flag))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    async def _plain(self, kind: int, tag: int, flag: bool) -> None:
        if kind == _ACK:
            await self.channel.basic_ack(tag, multiple=flag, wait=False)
        else:
            await self.channel.basic_nack(tag, requeue=flag, wait=False)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.debug("an ack was not written (the channel closed: the broker redelivers): %r", exc)
