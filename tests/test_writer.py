"""The ordered frame writer, the acker and the window, offline."""

from __future__ import annotations

import asyncio

from pamqp import frame as pamqp_frame
from pamqp.commands import Basic

from aio_workq._wire.acker import Acker
from aio_workq._wire.frames import ack_frame
from aio_workq._wire.window import Window
from aio_workq._wire.writer import FrameWriter


class Transport:
    def __init__(self) -> None:
        self.size = 0

    def get_write_buffer_size(self) -> int:
        return self.size


class Stream:
    """A StreamWriter whose send buffer can be made to look full, then drained."""

    def __init__(self) -> None:
        self.transport = Transport()
        self.written: list[bytes] = []
        self.drained = asyncio.Event()

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    async def drain(self) -> None:
        await self.drained.wait()
        self.transport.size = 0


class Gate:
    def __init__(self) -> None:
        self.open = True


def acks(data: bytes) -> list[tuple[int, int, bool]]:
    out = []
    while data:
        size, channel, value = pamqp_frame.unmarshal(data)
        data = data[size:]
        assert isinstance(value, Basic.Ack)
        out.append((channel, value.delivery_tag, value.multiple))
    return out


async def test_frames_leave_in_order_even_while_the_socket_is_full() -> None:
    stream = Stream()
    writer = FrameWriter(stream, high_water=100)  # type: ignore[arg-type]
    gate = Gate()
    writer.write(gate, ack_frame(1, 1, False))
    writer.flush()
    stream.transport.size = 1000  # over the high-water mark: writing pauses
    for tag in range(2, 50):
        writer.write(gate, ack_frame(1, tag, False))
        await asyncio.sleep(0)
    assert acks(b"".join(stream.written)) == [(1, 1, False)]
    stream.drained.set()
    for _ in range(10):  # the drain task, then the flush it schedules
        await asyncio.sleep(0)
    assert [tag for _, tag, _ in acks(b"".join(stream.written))] == list(range(1, 50))


async def test_frames_of_a_closed_channel_are_dropped_others_kept() -> None:
    stream = Stream()
    writer = FrameWriter(stream)  # type: ignore[arg-type]
    one, two = Gate(), Gate()
    writer.write(one, ack_frame(1, 1, False))
    writer.write(two, ack_frame(2, 1, False))
    one.open = False  # its Channel.Close arrived before the flush
    writer.flush()
    assert acks(b"".join(stream.written)) == [(2, 1, False)]


class Channel:
    number = 3
    is_closed = False


async def test_the_acker_coalesces_a_completed_prefix_into_one_multiple_ack() -> None:
    stream = Stream()
    writer = FrameWriter(stream)  # type: ignore[arg-type]
    acker = Acker(Channel(), (writer, Gate()))  # type: ignore[arg-type]
    for tag in range(1, 6):
        acker.track(tag)
    for tag in (1, 2, 4):
        acker.ack(tag)
    acker.nack(4, requeue=True)  # settled already: an ack asked for wins
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert acks(b"".join(stream.written)) == [(3, 2, True), (3, 4, False)]
    assert acker.unsettled == 2


async def test_acks_reach_the_socket_in_the_loop_iteration_after_they_are_asked_for() -> None:
    """One hop, not two: the acker's flush hands what the writer holds to the socket itself,
    so the broker's prefetch window reopens an iteration sooner (#22 item 1)."""
    stream = Stream()
    writer = FrameWriter(stream)  # type: ignore[arg-type]
    gate = Gate()
    acker = Acker(Channel(), (writer, gate))  # type: ignore[arg-type]
    writer.write(gate, ack_frame(5, 9, False))  # another channel's frame, written first
    for tag in range(1, 4):
        acker.track(tag)
        acker.ack(tag)
    assert stream.written == []
    await asyncio.sleep(0)  # one loop iteration: the acker's flush
    assert acks(b"".join(stream.written)) == [(5, 9, False), (3, 3, True)]
    writes = len(stream.written)
    await asyncio.sleep(0)  # the writer's own flush finds nothing left
    assert len(stream.written) == writes


async def test_the_window_resumes_waiters_together_at_three_quarters() -> None:
    window = Window(8)
    for _ in range(8):
        window.take(1)
    waiter = asyncio.ensure_future(window.wait())
    await asyncio.sleep(0)
    window.release(1)  # 7 in flight: not yet
    await asyncio.sleep(0)
    assert not waiter.done()
    window.release(1)  # 6 = 8 - 8 // 4: resume
    await asyncio.wait_for(waiter, 1)
    assert window.count == 6 and window.bytes == 6


def test_one_message_bigger_than_the_byte_window_still_fits_when_alone() -> None:
    window = Window(10, max_bytes=100)
    assert not window.full
    window.take(1000)
    assert window.full
    window.release(1000)
    assert not window.full


class FillingStream(Stream):
    """A StreamWriter whose send buffer holds what was written until drained."""

    def write(self, data: bytes) -> None:
        super().write(data)
        self.transport.size += len(data)

    async def drain(self) -> None:
        await self.drained.wait()
        self.drained.clear()
        self.transport.size = 0


async def test_the_writer_fills_the_socket_buffer_only_up_to_the_high_water_mark() -> None:
    # Finding 10 (#20): the mark was checked only before writing, and then the whole buffer went.
    stream = FillingStream()
    writer = FrameWriter(stream, high_water=100)  # type: ignore[arg-type]
    gate = Gate()
    frame = ack_frame(1, 1, False)  # 21 bytes
    for tag in range(1, 51):
        writer.write(gate, ack_frame(1, tag, False))
    assert writer.buffered_bytes == 50 * len(frame)
    writer.flush()
    assert stream.transport.size < 100 + len(frame)  # up to the mark, in whole frames
    sent = [tag for _, tag, _ in acks(b"".join(stream.written))]
    assert sent == list(range(1, len(sent) + 1))
    assert writer.buffered_bytes == (50 - len(sent)) * len(frame)
    async with asyncio.timeout(5):
        while writer.buffered:  # each drain lets the next high-water mark's worth go
            stream.drained.set()
            await asyncio.sleep(0)
            assert stream.transport.size < 100 + len(frame)
    assert [tag for _, tag, _ in acks(b"".join(stream.written))] == list(range(1, 51))
    assert writer.buffered_bytes == 0


async def test_when_flushed_runs_once_everything_buffered_before_it_has_left() -> None:
    stream = FillingStream()
    writer = FrameWriter(stream, high_water=50)  # type: ignore[arg-type]
    gate, closed = Gate(), Gate()
    calls: list[str] = []
    writer.when_flushed(lambda: calls.append("empty"))
    assert calls == ["empty"]  # nothing buffered: at once
    for tag in range(1, 7):
        writer.write(closed if tag == 2 else gate, ack_frame(1, tag, False))
    closed.open = False  # dropped, which counts as leaving
    writer.when_flushed(lambda: calls.append("first six"))
    writer.write(gate, ack_frame(1, 7, False))
    writer.when_flushed(lambda: calls.append("seven"))
    writer.flush()  # 3 of 21 bytes fit under 50
    assert calls == ["empty"]
    stream.drained.set()
    async with asyncio.timeout(5):
        while len(calls) < 3:
            await asyncio.sleep(0)
            stream.drained.set()
    assert calls == ["empty", "first six", "seven"]
    assert [tag for _, tag, _ in acks(b"".join(stream.written))] == [1, 3, 4, 5, 6, 7]
