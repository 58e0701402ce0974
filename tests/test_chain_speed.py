"""A chain step's forward (#22): `job.send` to a queue known already, with room in the window,
is sent without a coroutine of the `Sender`'s or the publisher's (`send_now`), offline; when it
must wait, or fails, it takes the awaited path and the job records the same links as before."""

from __future__ import annotations

import asyncio
import inspect
import os
import struct
import sys
from typing import Any, cast

import pytest

import aio_workq
from aio_workq import HandleInfo, Hook, Job, PublishInfo
from aio_workq._consume.delivery import Delivery
from aio_workq._exceptions import ConnectionLostError, PublishNackedError, SerializationError
from aio_workq._hooks import Hooks
from aio_workq._link.connection import fast_path_default
from aio_workq._publish.confirms import ConfirmPublisher
from aio_workq._publish.message import Sender
from aio_workq._wire.frames import LARGE_BODY, publish_write, usual_properties
from aio_workq._wire.lanes import FastLane
from aio_workq._wire.seams import Wire
from aio_workq._wire.tracker import ConfirmTracker, Outgoing
from aio_workq._wire.window import Window
from tests.test_confirms_model import FakeConnection, FakeDemux, FakeSource, FakeWriter

_HEADER = struct.pack(">HHQH", 60, 0, 1, 0)


class _Declared:
    """The router's part a `Sender` uses, every queue declared already (`lookup` finds it)."""

    queues = {"out": None}  # `Sender.send_now` finds a queue by name here, without `lookup`

    def lookup(self, queue: Any, exchange: Any, routing_key: Any) -> tuple[str, str] | None:
        return ("", queue) if isinstance(queue, str) and not exchange else None

    async def destination(self, queue: Any, exchange: Any, routing_key: Any) -> tuple[str, str]:
        return ("", queue)

    def forget_exchange(self, name: str) -> None:
        pass

    def starting(self, exchange: str, routing_key: str) -> bool:
        return False


async def _sender(window: int = 100) -> tuple[FakeSource, ConfirmPublisher, Sender]:
    source = FakeSource()
    publisher = ConfirmPublisher(source, window=Window(window), timeout=3600, resend=True)
    await publisher.start()
    return source, publisher, Sender((publisher,), cast(Any, _Declared()), 3600)


def _job(sender: Sender, tag: int = 1) -> Job:
    delivery = Delivery(cast(Any, None), "c", tag, False, "", "tasks", _HEADER, b"x")
    return Job(delivery, sender)


def _confirm_all(source: FakeSource) -> None:
    source.writer.flush()
    channel = source.connection.channels[-1]
    source.demux.sinks[channel.number].on_confirm(len(channel.published), True, True)


async def test_a_forward_to_a_known_queue_runs_no_coroutine_but_job_send_s() -> None:
    """Before: `Job.send`, `Sender.forward` and `ConfirmPublisher.send`, three coroutines per
    forward (each an object, a frame and a resume: about 4k instructions of the chain step)."""
    source, publisher, sender = await _sender()
    root = os.path.dirname(aio_workq.__file__)
    started: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        code = frame.f_code
        if (
            event == "call"
            and code.co_flags & inspect.CO_COROUTINE
            and code.co_filename.startswith(root)
        ):
            started.append(code.co_qualname)

    job = _job(sender)
    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        confirms = [await job.send(b"x", queue="out") for _ in range(10)]
    finally:
        sys.setprofile(previous)
    assert started == ["Job.send"] * 10, started
    assert job.links == confirms
    # Nor a `Properties` each: the fast lane sends their encoding only.
    assert [out.props for out in publisher.outstanding()] == [None] * 10
    _confirm_all(source)
    assert source.connection.channels[-1].published == [await c for c in confirms]
    await publisher.close(0)


async def test_a_forward_that_must_wait_for_room_is_awaited_and_linked() -> None:
    """A full window: `send_now` sends nothing and the forward waits for room, then goes out."""
    source, publisher, sender = await _sender(window=1)
    job = _job(sender)
    first = await job.send(b"1", queue="out")
    second = asyncio.ensure_future(job.send(b"2", queue="out"))
    await asyncio.sleep(0)
    assert not second.done() and job.links == [first]  # waiting for room, nothing sent
    _confirm_all(source)
    async with asyncio.timeout(5):
        confirm = await second
    assert job.links == [first, confirm]
    _confirm_all(source)
    assert source.connection.channels[-1].published == [await first, await confirm]
    await publisher.close(0)


async def test_a_job_s_first_forwards_that_wait_together_are_each_linked() -> None:
    """Two first forwards of a job awaited together, the window full: each is linked, in the
    order sent: a forward that waits makes the job's list of links before its wait."""
    source, publisher, sender = await _sender(window=1)
    await _job(sender, tag=2).send(b"0", queue="out")  # another job's forward fills the window
    job = _job(sender)
    sends = [asyncio.ensure_future(job.send(b"%d" % n, queue="out")) for n in (1, 2)]
    await asyncio.sleep(0)
    assert job.links == [] and not any(s.done() for s in sends)  # both wait for room
    async with asyncio.timeout(5):
        while not all(s.done() for s in sends):
            _confirm_all(source)
            await asyncio.sleep(0)  # (a step of the loop: the next waiter goes out)
        confirms = [await s for s in sends]
    assert job.links == confirms
    _confirm_all(source)
    assert [await c for c in confirms] == source.connection.channels[-1].published[1:]
    await publisher.close(0)


async def test_a_forward_that_fails_is_linked_as_failed_on_both_ways() -> None:
    """A body that can't be encoded fails in `send_now`, a closed publisher in `send`: either
    way the job records the failure, so it is never acked."""
    _, publisher, sender = await _sender()
    job = _job(sender)
    with pytest.raises(SerializationError):
        await job.send(object(), queue="out")
    await publisher.close(0)
    with pytest.raises(ConnectionLostError):
        await job.send(b"x", queue="out")
    assert job.links is not None and len(job.links) == 2
    assert isinstance(job.links[0].exception(), SerializationError)
    assert isinstance(job.links[1].exception(), ConnectionLostError)


async def test_a_forward_asks_no_python_method_of_the_loop_s() -> None:
    """`send_now` reads asyncio's clock and makes the confirm's future without the loop's
    Python `time` and `create_future` frames (#22 round 6: two calls per chain step)."""
    source, publisher, sender = await _sender()
    asked: list[str] = []
    loop_file = inspect.getfile(asyncio.BaseEventLoop)
    root = os.path.dirname(aio_workq.__file__)

    def profile(frame: Any, event: str, arg: Any) -> None:
        caller = frame.f_back
        if (
            event == "call"
            and frame.f_code.co_filename == loop_file
            and caller is not None
            and caller.f_code.co_filename.startswith(root)
        ):
            asked.append(frame.f_code.co_name)  # a method of the loop's, called by aio-workq

    job = _job(sender)
    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        confirms = [await job.send(b"x", queue="out") for _ in range(10)]
    finally:
        sys.setprofile(previous)
    # The writer's flush and the timeout sweep are scheduled once, not per message.
    assert "time" not in asked and "create_future" not in asked, asked
    assert all(confirm.get_loop() is asyncio.get_running_loop() for confirm in confirms)
    _confirm_all(source)
    assert source.connection.channels[-1].published == [await c for c in confirms]
    await publisher.close(0)


async def test_a_loop_with_its_own_clock_and_futures_is_asked_for_them() -> None:
    """A loop whose `time` or `create_future` is not asyncio's own (uvloop's, a test's) is
    still asked for them."""
    loop = asyncio.get_running_loop()
    made: list[asyncio.Future[Any]] = []
    times: list[float] = []
    create_future, time = loop.create_future, loop.time

    def counted_future() -> asyncio.Future[Any]:
        made.append(create_future())
        return made[-1]

    def counted_time() -> float:
        times.append(time())
        return times[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "create_future", counted_future)
        patch.setattr(loop, "time", counted_time)
        source, publisher, sender = await _sender()
        job = _job(sender)
        confirm = await job.send(b"x", queue="out")
        assert made[-1] is confirm and times
    _confirm_all(source)
    assert await confirm
    await publisher.close(0)


def _calls_per_forward(job: Job, n: int = 20) -> float:
    """Python and C calls (cProfile's count) per `job.send` to a known queue, run to its end
    (2 of them this function's: its call of the coroutine's `send` and the list's append)."""
    counted = [0]

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event in ("call", "c_call"):
            counted[0] += 1

    def send() -> bool:
        step = job.send(b"x", queue="out")
        try:
            step.send(None)
        except StopIteration:
            return True  # no wait: done in its first step
        step.close()
        return False

    assert send()  # the destination's first use
    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        done = [send() for _ in range(n)]
    finally:
        sys.setprofile(previous)
    assert all(done)
    return counted[0] / n


async def test_a_forward_to_a_known_queue_costs_a_bounded_number_of_calls() -> None:
    """#22 round 7: 35.1 calls here before; 27.1 with the usual properties formatted from the
    id's counter (no `usual_properties`), the body measured once and no `InFlight.admit`;
    24.1 with the queue found by name without `Router.lookup` and the record put in its
    tracker without `ConfirmTracker.record`; 23.1 with the `Outgoing` made inline; round 9:
    21.1 with the usual message's frames packed by `FastLane.write` itself (no
    `publish_write`, no `len` of the body); 22.1 with the id decoded from the properties'
    encoding (a `decode` call where the id's `%` format was none, about 1k instructions
    less: the bound counts calls, not their cost)."""
    source, publisher, sender = await _sender()
    job = _job(sender)
    per_forward = _calls_per_forward(job)
    # (the timeout sweep may start once in 20); the plain lane (`AIO_WORKQ_FAST_PATH=0`) sends
    # through aiormq's `basic_publish`, so round 9's packing is not its: 23.45, as before it
    assert per_forward <= (23 if fast_path_default() else 24), per_forward
    assert job.links is not None and len(job.links) == 21
    _confirm_all(source)
    assert source.connection.channels[-1].published == [await c for c in job.links]
    await publisher.close(0)


async def test_the_fast_lane_writes_what_publish_write_packs_at_every_size() -> None:
    """`FastLane.write` packs a body of one frame itself (#22 round 9): the same bytes as
    `publish_write` for every size around its roads' bounds (empty, one frame, several, large),
    and the frame_max the connection negotiated (0: no limit)."""
    for frame_max in (4096, 0):
        connection = FakeConnection()
        channel = await connection.channel()
        writer = FakeWriter(cast(Any, connection))  # keeps each write (`pending`)
        wire = Wire(cast(Any, FakeDemux()), cast(Any, writer))
        lane = FastLane(cast(Any, channel), wire, ConfirmTracker(cast(Any, None)), frame_max)
        limit = frame_max or 131072
        for size in (0, 1, 64, limit - 9, limit - 8, limit - 7, 2 * limit, LARGE_BODY,
                     LARGE_BODY + 1, 3 * LARGE_BODY):  # fmt: skip
            for exchange, key, mandatory in (("", "out", True), ("ex", "rk", False)):
                body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
                encoded = usual_properties(f"id-{size}", "application/json")
                out = Outgoing(exchange, key, mandatory, "m", encoded, body, cast(Any, None), 0.0)
                lane.write(out)
                expected = publish_write(
                    channel.number, exchange, key, mandatory, encoded, body, limit
                )
                frames: Any = writer.pending[-1][1]
                assert bytes(frames) == bytes(expected), (frame_max, size, exchange)
                assert type(frames) is type(expected)


async def test_a_multiple_ack_of_every_record_costs_one_call_a_record() -> None:
    """The usual multiple ack confirms everything its channel has pending: the tracker takes
    the records at once (#22 round 9; before, an append and a delete each), and each costs
    only its future's `set_result`, the release of the window counted once per ack."""
    source, publisher, sender = await _sender(window=1000)
    job = _job(sender)
    for _ in range(200):
        await job.send(b"x", queue="out")
    source.writer.flush()
    channel = source.connection.channels[-1]
    sink = source.demux.sinks[channel.number]
    counted = [0]

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event in ("call", "c_call"):
            counted[0] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        sink.on_confirm(len(channel.published) + 5, True, True)  # (a later tag: all of them)
    finally:
        sys.setprofile(previous)
    assert counted[0] <= 200 + 20, counted[0]
    assert job.links is not None and [await c for c in job.links] == channel.published
    assert publisher.in_flight == 0
    await publisher.close(0)


def test_a_forward_s_properties_are_the_usual_ones() -> None:
    """The encoding `send_now` formats from the id's counter is `usual_properties`' of the id,
    for any count, also after a fork gave the process ids of its own; the id is its last 32
    octets, which `send_now` decodes for the message's id (round 9)."""
    from aio_workq._publish import message
    from aio_workq._wire.frames import usual_properties

    for format_ in (message._ID_FORMAT, "0123456789abcdef%016x"):
        prefix = format_[:-5]
        flags, bare = message._bare_format(prefix)
        for n in (0, 1, 255, 2**32 + 7, 2**64 - 1):
            assert (flags, bare % n) == usual_properties(f"{prefix}{n:016x}", None)
            assert (bare % n)[-32:].decode() == f"{prefix}{n:016x}"  # `send_now` reads it there
    assert (message._BARE_FLAGS, message._BARE_FORMAT % 5) == usual_properties(
        message._ID_FORMAT % 5, None
    )


async def test_a_forward_over_a_small_frame_max_is_refused_before_it_is_sent() -> None:
    """The usual properties are measured only when the connection's frame_max could be too
    small for them; then a forward that does not fit is refused, nothing sent."""
    source = FakeSource()
    source.connection.connection_tune.frame_max = 50  # 28 bytes of properties: 34 needed
    publisher = ConfirmPublisher(source, window=Window(10), timeout=3600, resend=True)
    await publisher.start()
    job = _job(Sender((publisher,), cast(Any, _Declared()), 3600))
    with pytest.raises(SerializationError, match="frame_max"):
        await job.send(b"x", queue="out")
    assert publisher.in_flight == 0 and not source.connection.channels[-1].published
    await publisher.close(0)


async def test_a_confirm_cancelled_by_its_owner_is_still_settled_by_its_ack() -> None:
    """A multiple ack settles the records whose futures their owners cancelled (set_result
    on them is skipped) with the others: their window room is freed, the others confirmed."""
    source, publisher, sender = await _sender()
    job = _job(sender)
    confirms = [await job.send(b"x", queue="out") for _ in range(3)]
    confirms[1].cancel()
    _confirm_all(source)
    assert publisher.in_flight == 0
    assert confirms[1].cancelled()
    assert [confirms[0].result(), confirms[2].result()] == [
        source.connection.channels[-1].published[i] for i in (0, 2)
    ]
    await publisher.close(0)


async def test_a_record_s_then_is_called_once_with_what_its_future_holds() -> None:
    """`Outgoing.then` (#22 round 8: a chain step's delivery settled by its forward's
    record): once per record as it is settled, after its future, with None (confirmed), a
    `CancelledError` (its owner cancelled the future), or the record's error (nacked); a
    record whose `then` was unset (a worker's stop requeued its delivery) calls nothing."""
    source, publisher, sender = await _sender()
    job = _job(sender)
    confirms = [await job.send(b"x", queue="out") for _ in range(4)]
    records = {out.future: out for out in publisher.outstanding()}
    called: list[tuple[int, BaseException | None, bool]] = []

    def then(out: Any, error: BaseException | None) -> None:
        called.append((confirms.index(out.future), error, out.future.done()))

    for confirm in confirms:
        records[confirm].then = then
    records[confirms[3]].then = None  # disarmed
    confirms[1].cancel()
    source.writer.flush()
    sink = source.demux.sinks[source.connection.channels[-1].number]
    sink.on_confirm(2, True, True)  # confirms 0 and 1 (multiple)
    sink.on_confirm(3, False, False)  # nacks 2
    sink.on_confirm(4, False, True)  # confirms 3, disarmed
    assert [(index, type(error), done) for index, error, done in called] == [
        (0, type(None), True),
        (1, asyncio.CancelledError, True),
        (2, PublishNackedError, True),
    ]
    assert publisher.in_flight == 0
    await publisher.close(0)


async def test_hooks_that_see_no_publish_leave_a_forward_on_its_road_without_a_wait() -> None:
    """A forward goes through the hooks only when one sees publishes (`before_publish`,
    `after_publish`): a worker's job recorder, or a hook told only of deliveries, leaves it
    on `send_now`'s road (and its delivery may be settled by the record)."""

    class Deliveries(Hook):
        def after_handle(self, info: HandleInfo) -> None:
            pass

    class Publishes(Hook):
        def after_publish(self, message: PublishInfo, state: Any) -> None:
            pass

    source, publisher, _ = await _sender()
    quiet = Sender((publisher,), cast(Any, _Declared()), 3600, Hooks.of([Deliveries()]))
    seeing = Sender((publisher,), cast(Any, _Declared()), 3600, Hooks.of([Publishes()]))
    assert quiet.send_now(b"x", "out", "", None, {}) is not None
    assert seeing.send_now(b"x", "out", "", None, {}) is None
    _confirm_all(source)
    await publisher.close(0)
