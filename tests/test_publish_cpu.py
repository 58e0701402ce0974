"""The publish path's own work per message (#22: publish <= 8 us of client CPU), offline.

`Producer.publish_many` and `Producer.publish` run against `bench.micro`'s fake broker (pamqp on
a loopback socket in a child process, which confirms every publish at once) on the fast path and
on the plain one (aiormq's public API); a profile function counts the calls of aio-workq's own
functions (and the resumes of its coroutines) per message. Each test also checks what the
messages came to: every id back, in order, every confirm settled and the window empty again.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest

import aio_workq
from aio_workq import ConfigurationError, Connection, Producer
from aio_workq._exceptions import PublishNackedError
from aio_workq._publish.confirms import ConfirmPublisher
from aio_workq._publish.message import build_message, build_usual
from aio_workq._wire.frames import Properties, encode_properties
from aio_workq._wire.lanes import plain_properties
from aio_workq._wire.tracker import Batch, ConfirmTracker, InFlight, Outgoing
from aio_workq._wire.window import Window
from bench.micro import BODY, start_fake_broker

_ROOT = os.path.dirname(aio_workq.__file__)


class _Calls:
    """Counts the calls of aio-workq's own functions while it is on (`sys.setprofile`)."""

    def __init__(self) -> None:
        self.count = 0
        self.names: dict[str, int] = {}

    def __enter__(self) -> _Calls:
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc_info: object) -> None:
        sys.setprofile(self._previous)

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(_ROOT):
            self.count += 1
            name = frame.f_code.co_qualname
            self.names[name] = self.names.get(name, 0) + 1


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    proc, url = start_fake_broker()
    try:
        yield url
    finally:
        proc.kill()
        proc.join(5)


@pytest.fixture(params=["fast", "plain"])
def fast(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "fast")


@pytest.fixture
async def producer(fast: bool, fake_url: str) -> AsyncIterator[Producer]:
    async with Connection(fake_url, fast_path=fast) as connection:
        async with Producer(connection=connection, timeout=60) as producer:
            await producer.publish_many([BODY] * 10, queue="cpu")  # declared, warmed
            yield producer


# aio-workq's own calls per message, at most (fast path). Before #22's round 5: publish_many
# 20.1, publish 32.0 (a settle, an `on_settled` and a window release per confirm, and per
# message `encode_body`, `new_message_id`, `Window.full`, `FrameWriter.buffered`, `Sender.forward`
# in publish_many, `Producer.send` and `_ready` in publish); after: 12.1 and 25.0.
_MANY_FAST = 13
_ONE_FAST = 26


async def test_publish_many_costs_a_bounded_number_of_own_calls_per_message(
    producer: Producer, fast: bool
) -> None:
    n = 500
    async with asyncio.timeout(60):
        with _Calls() as calls:
            ids = await producer.publish_many([BODY] * n, queue="cpu")
    assert len(ids) == n and len(set(ids)) == n
    assert [int(i[16:], 16) for i in ids] == sorted(int(i[16:], 16) for i in ids)  # in order
    assert producer.in_flight == 0
    per_message = calls.count / n
    if fast:
        top = sorted(calls.names.items(), key=lambda kv: -kv[1])[:40]
        assert per_message <= _MANY_FAST, (per_message, top)


async def test_publish_costs_a_bounded_number_of_own_calls_per_message(
    producer: Producer, fast: bool
) -> None:
    n = 200
    ids = []
    async with asyncio.timeout(60):
        with _Calls() as calls:
            for _ in range(n):
                ids.append(await producer.publish(BODY, queue="cpu"))
    assert len(set(ids)) == n
    assert producer.in_flight == 0
    per_message = calls.count / n
    if fast:
        top = sorted(calls.names.items(), key=lambda kv: -kv[1])[:40]
        assert per_message <= _ONE_FAST, (per_message, top)


async def test_publish_many_refuses_a_bad_timeout_before_sending_anything(
    producer: Producer,
) -> None:
    """Its timeout bounds the whole batch: checked once, as a single publish checks its own."""
    for bad in (0, -1, "5"):
        with pytest.raises(ConfigurationError, match="timeout"):
            await producer.publish_many([BODY] * 3, queue="cpu", timeout=bad)  # type: ignore[arg-type]
    assert producer.in_flight == 0
    assert len(await producer.publish_many([BODY] * 3, queue="cpu", timeout=5)) == 3


def _records(n: int, in_flight: InFlight, tracker: ConfirmTracker) -> list[Outgoing]:
    loop = asyncio.get_running_loop()
    records = []
    for tag in range(1, n + 1):
        out = Outgoing("", "q", True, f"m{tag}", (0, b""), b"x" * tag, loop.create_future(), 0.0)
        in_flight.admit(out)
        tracker.record(tag, out)
        records.append(out)
    return records


def _future(out: Outgoing) -> asyncio.Future[str]:
    assert isinstance(out.future, asyncio.Future)
    return out.future


async def test_a_multiple_confirm_settles_its_records_in_a_constant_number_of_calls() -> None:
    """One multiple ack settles every record up to its tag with one window release, not a
    settle, an `on_settled` and a release per record; each record is settled once, and its
    mandatory id can be used again."""
    window = Window(1000)
    released: list[int] = []

    def on_settled(records: Sequence[Outgoing]) -> None:
        released.extend(len(out.body) for out in records)
        window.release_many(len(records), sum(len(out.body) for out in records))

    in_flight = InFlight(on_settled)
    tracker = ConfirmTracker(in_flight)
    records = _records(100, in_flight, tracker)
    for out in records:
        window.take(len(out.body))
    with _Calls() as calls:
        tracker.on_confirm(80, True, True)
    assert calls.count <= 5, calls.names
    assert [_future(out).result() for out in records[:80]] == [f"m{t}" for t in range(1, 81)]
    assert not any(_future(out).done() for out in records[80:])
    assert window.count == 20 and window.bytes == sum(range(81, 101))
    assert released == list(range(1, 81))
    tracker.on_confirm(80, True, True)  # again: nothing left to settle
    tracker.on_confirm(3, False, True)
    assert released == list(range(1, 81)) and len(tracker) == 20
    tracker.on_confirm(81, False, False)  # a nack: that record alone, with its error
    assert isinstance(_future(records[80]).exception(), PublishNackedError)
    tracker.on_confirm(100, True, True)
    assert window.count == 0 and window.bytes == 0 and len(tracker) == 0
    assert released == list(range(1, 101))
    again = _records(1, in_flight, ConfirmTracker(in_flight))  # "m1" is free again
    assert again[0].message_id == "m1"


async def test_a_window_released_in_a_batch_wakes_its_waiters_as_one_by_one() -> None:
    window = Window(8)
    for _ in range(8):
        window.take(10)
    waiter = asyncio.ensure_future(window.wait())
    await asyncio.sleep(0)
    window.release_many(1, 10)  # 7 in flight: not yet (hysteresis: 6)
    await asyncio.sleep(0)
    assert not waiter.done()
    window.release_many(2, 20)
    async with asyncio.timeout(5):
        await waiter
    assert window.count == 5 and window.bytes == 50 and not window.full


@pytest.mark.parametrize("body", [b"raw", "text", {"json": [1, 2.5]}, bytearray(b"view")])
def test_the_usual_message_is_built_and_encoded_as_the_general_code_does(body: Any) -> None:
    """`build_usual` (a publish without options: its properties made without the class call
    and encoded without `encode_properties`' checks) gives what the general code gives."""
    data, props, encoded = build_usual(body)
    general_data, general, mandatory, timeout = build_message(body, {"timeout": 5})
    assert data == general_data and mandatory is True
    others = [slot for slot in Properties.__slots__ if slot != "message_id"]
    assert [getattr(props, slot) for slot in others] == [getattr(general, slot) for slot in others]
    assert props.message_id != general.message_id  # each its own
    assert encoded == encode_properties(props)
    assert build_message(body, {})[1].message_id != props.message_id


def test_a_message_in_flight_on_the_fast_path_holds_only_its_future_and_its_encoding() -> None:
    """What a message keeps alive while it waits for its confirm is what the garbage collector
    walks and counts (#22: on a quorum queue the client's collections cost more): on the fast
    path its properties are in its encoding already, so the `Properties` object is not kept
    (the plain lane, which hands aiormq the properties, rebuilds them from the encoding)."""
    from tests.test_confirms_model import FakeSource

    async def scenario() -> None:
        source = FakeSource()
        publisher = ConfirmPublisher(source, window=Window(1000), timeout=3600, resend=True)
        await publisher.start()
        futures = []
        gc.disable()  # no collection untracks anything while it is counted
        try:
            for _ in range(50):
                data, props, encoded = build_usual(BODY)
                futures.append(await publisher.send("", "q", data, props, encoded=encoded))
            records = publisher.outstanding()
            assert len(records) == 50
            own = {
                id(obj): type(obj).__name__
                for out in records
                for obj in gc.get_referents(out)
                if gc.is_tracked(obj) and obj is not out.tracker and type(obj) is not type
            }
        finally:
            gc.enable()
        kinds = sorted(set(own.values()))
        assert len(own) / len(records) <= 2, kinds  # the future and the encoding's tuple
        assert "Properties" not in kinds
        source.writer.flush()
        source.demux.sinks[source.connection.channels[-1].number].on_confirm(50, True, True)
        assert [await f for f in futures] == [out.message_id for out in records]
        await publisher.close(0)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "props",
    [
        Properties(message_id="m1"),
        Properties(message_id="m2", content_type="application/json", delivery_mode=1),
        Properties(
            message_id="m3",
            headers={"a": 1, "b": "x", "f": 2.5},
            priority=3,
            correlation_id="c",
            reply_to="r",
            expiration="1500",
            timestamp=1_700_000_000,
            type="t",
        ),  # fmt: skip
    ],
)
def test_the_plain_lane_rebuilds_the_properties_of_a_message_first_written_on_the_fast_path(
    props: Properties,
) -> None:
    """A message written on the fast path keeps only its encoding; resent on a plain channel
    (a reconnect without the fast path), aiormq gets the same properties, which marshal to
    the same bytes."""
    encoded = encode_properties(props)
    loop = asyncio.new_event_loop()
    try:
        fields = ("", "q", True, props.message_id, encoded, b"x")
        kept = Outgoing(*fields, loop.create_future(), 0.0, props)
        dropped = Outgoing(*fields, loop.create_future(), 0.0)
        ours, rebuilt = plain_properties(kept), plain_properties(dropped)
    finally:
        loop.close()
    assert rebuilt.marshal() == ours.marshal()
    assert dict(rebuilt) == dict(ours)  # every field pamqp has, as aiormq reads them


class _OwnFutures:
    """Counts the futures aio-workq's own code makes (`loop.create_future()` called from it)."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> _OwnFutures:
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc_info: object) -> None:
        sys.setprofile(self._previous)

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == "create_future":
            caller = frame.f_back
            if caller is not None and caller.f_code.co_filename.startswith(_ROOT):
                self.count += 1


async def test_publish_many_makes_no_future_per_message(producer: Producer) -> None:
    """A batch's outcomes are counted in one `Batch`: no future per message to make, settle
    and await, nor for the garbage collector to walk while the batch runs (#22)."""
    n = 500
    async with asyncio.timeout(60):
        with _OwnFutures() as futures:
            ids = await producer.publish_many([BODY] * n, queue="cpu")
    assert len(set(ids)) == n and producer.in_flight == 0
    assert futures.count <= 10, futures.count


def test_a_batch_resolves_once_every_message_sent_in_it_is_settled_each_with_its_own_outcome() -> (
    None
):
    """The batch's future waits for every message counted, also when all sent so far were
    settled before the next was sent; a nacked message's error is kept under its own id;
    `wait_idle` waits for the batch too."""
    from tests.test_confirms_model import FakeSource

    async def scenario() -> None:
        source = FakeSource()
        publisher = ConfirmPublisher(source, window=Window(1000), timeout=3600, resend=True)
        await publisher.start()
        sink = source.demux.sinks[source.connection.channels[-1].number]
        batch = Batch(asyncio.get_running_loop())
        ids = []

        async def send() -> None:
            data, props, encoded = build_usual(BODY)
            before = batch.left
            await publisher.send("", "q", data, props, encoded=encoded, batch=batch)
            assert batch.left == before + 1  # counted in the batch (no future of its own)
            ids.append(props.message_id)

        await send()
        await send()
        early = batch.wait()
        sink.on_confirm(2, True, True)  # all sent so far: settled
        assert early.done() and batch.left == 0
        for _ in range(3):
            await send()
        waiting = batch.wait()
        assert not waiting.done() and batch.left == 3
        idle = asyncio.ensure_future(publisher.wait_idle(5))
        sink.on_confirm(4, False, False)  # the 4th message, nacked
        sink.on_confirm(3, False, True)
        await asyncio.sleep(0)
        assert not waiting.done() and not idle.done() and batch.left == 1
        sink.on_confirm(5, True, True)
        async with asyncio.timeout(5):
            await waiting
            assert await idle
        assert list(batch.errors) == [ids[3]]
        assert isinstance(batch.errors[ids[3]], PublishNackedError)
        assert publisher.in_flight == 0
        await publisher.close(0)

    asyncio.run(scenario())
