"""The publish hot path's shortcuts (#22 item 2), offline: each gives the same bytes and errors
as the general code, and a large body is never copied into its frames."""

from __future__ import annotations

import asyncio
import struct
from functools import partial
from typing import Any, cast

import pytest

from aio_workq import HandleInfo, Hook, Job, Outcome, Queue
from aio_workq._consume.delivery import Delivery
from aio_workq._consume.dispatch import Dispatcher
from aio_workq._consume.execution import HandlerRunner
from aio_workq._exceptions import SerializationError
from aio_workq._hooks import Hooks
from aio_workq._publish.message import build_message
from aio_workq._wire import frames
from aio_workq._wire.frames import (
    LARGE_BODY,
    Chunked,
    Properties,
    encode_properties,
    publish_frames,
    publish_write,
)
from aio_workq._wire.writer import FrameWriter


def _general(props: Properties) -> tuple[int, bytes]:
    """`encode_properties` through its general branch (a falsy-but-present header dict
    is the same message, and keeps the shortcut out)."""

    class Headers(dict[str, object]):
        def __bool__(self) -> bool:
            return False

    slow = Properties(
        message_id=props.message_id,
        content_type=props.content_type,
        delivery_mode=props.delivery_mode,
    )
    slow.headers = Headers()
    return encode_properties(slow)


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain; charset=utf-8"])
@pytest.mark.parametrize("mode", [1, 2])
def test_usual_properties_encode_as_the_general_code_does(
    content_type: str | None, mode: int
) -> None:
    props = Properties(message_id="a1b2", content_type=content_type, delivery_mode=mode)
    assert encode_properties(props) == _general(props)
    assert encode_properties(props) == _general(props)  # the cached prefix too


def test_usual_properties_refuse_what_the_general_code_refuses() -> None:
    with pytest.raises(SerializationError, match="message_id is 256 bytes long"):
        encode_properties(Properties(message_id="x" * 256))
    with pytest.raises(SerializationError, match="content_type must be a str"):
        encode_properties(Properties(message_id="m", content_type=["json"]))  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match="delivery_mode"):
        encode_properties(Properties(message_id="m", delivery_mode=True))
    with pytest.raises(SerializationError, match="message_id must be a str"):
        encode_properties(Properties(message_id=5))  # type: ignore[arg-type]


def test_a_message_without_options_is_built_as_with_the_defaults() -> None:
    data, props, mandatory, timeout = build_message({"a": 1}, {"timeout": 2.5})
    assert (data, props.content_type, props.delivery_mode, mandatory, timeout) == (
        b'{"a":1}',
        "application/json",
        2,
        True,
        2.5,
    )
    with pytest.raises(Exception, match="timeout must be > 0"):
        build_message(b"x", {"timeout": 0})


@pytest.mark.parametrize("size", [LARGE_BODY + 1, 131064, 131065, 3 * 2**20 + 7])
def test_a_large_body_is_framed_as_views_of_itself(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    encoded = encode_properties(Properties(message_id="m"))
    out = publish_write(5, "", "q", True, encoded, body, 131072)
    assert isinstance(out, Chunked)
    assert publish_frames(5, "", "q", True, encoded, body, 131072) == bytes(out)
    views = [part for part in out.parts if isinstance(part, memoryview)]
    assert views and all(view.obj is body for view in views)  # no copy of the body
    frames.LARGE_BODY, saved = 2**62, frames.LARGE_BODY
    try:
        joined = publish_frames(5, "", "q", True, encoded, body, 131072)
    finally:
        frames.LARGE_BODY = saved
    assert bytes(out) == joined and len(out) == len(joined)


class _Transport:
    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return 16384, 65536


class _Stream:
    def __init__(self) -> None:
        self.transport = _Transport()
        self.written: list[bytes | memoryview] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes | memoryview) -> None:
        self.written.append(data)

    async def drain(self) -> None:  # pragma: no cover - never full here
        return None


class _Gate:
    open = True


async def test_the_writer_hands_a_large_body_to_the_socket_without_joining_it() -> None:
    stream = _Stream()
    writer = FrameWriter(stream)  # type: ignore[arg-type]
    gate = _Gate()
    body = b"b" * (2**20)
    encoded = encode_properties(Properties(message_id="m"))
    small = publish_frames(1, "", "q", True, encoded, b"small", 131072)
    large = publish_write(1, "", "q", True, encoded, body, 131072)
    writer.write(gate, small)
    writer.write(gate, large)
    writer.write(gate, small)
    await asyncio.sleep(0)
    assert writer.buffered == 0
    assert b"".join(bytes(part) for part in stream.written) == small + bytes(large) + small
    views = [part for part in stream.written if isinstance(part, memoryview)]
    assert views and all(view.obj is body for view in views)
    assert max(len(part) for part in stream.written) <= 131072


async def test_every_watchdog_on_a_loop_shares_one_timer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A thousand workers must not wake the loop a thousand times per interval."""
    from aio_workq._consume import execution
    from aio_workq._consume.execution import HandlerRunner

    async def handler(job: object) -> None:
        pass

    sleeps = 0
    real_sleep = asyncio.sleep

    async def counting_sleep(delay: float) -> None:
        nonlocal sleeps
        sleeps += 1
        await real_sleep(delay)

    monkeypatch.setattr(asyncio, "sleep", counting_sleep)  # the module execution uses
    runner = HandlerRunner(handler, executor="thread", concurrency=1, timeout=None, name="w")
    busy = [0] * 20
    watches = [
        asyncio.ensure_future(runner.watch_loop(partial(busy.__getitem__, i), int, f"worker {i}"))
        for i in range(20)
    ]
    await real_sleep(0.35)
    assert 1 <= sleeps <= 5  # one timer, ~3 intervals (was one per watch: ~60)
    busy[7] = 1
    import time

    time.sleep(0.7)  # noqa: ASYNC251 - the blocked loop the watch reports
    async with asyncio.timeout(5):
        while not any("worker 7" in r.getMessage() for r in caplog.records):
            await real_sleep(0.05)
    blamed = {r.getMessage().split(" of ")[1].split(" blocked")[0] for r in caplog.records}
    assert blamed == {"worker 7"}  # only the one with a handler running
    for watch in watches:
        watch.cancel()
    await asyncio.gather(*watches, return_exceptions=True)
    await real_sleep(0.15)
    assert not execution._WATCHES[asyncio.get_running_loop()]._watched


class _Channel:
    def __init__(self) -> None:
        self.is_closed = False

    async def close(self) -> None:
        self.is_closed = True

    def close_now(self) -> None:
        self.is_closed = True


class _Connection:
    def __init__(self) -> None:
        self.is_closed = False
        self.opened: list[_Channel] = []

    async def channel(self, publisher_confirms: bool = False) -> _Channel:
        self.opened.append(_Channel())
        return self.opened[-1]


class _Link:
    def __init__(self) -> None:
        self.connection = _Connection()


class _Source:
    def __init__(self) -> None:
        self.current = _Link()

    async def link(self, timeout: float | None = None) -> _Link:
        return self.current


async def test_declarations_reuse_a_channel_until_one_fails() -> None:
    from aio_workq._link.declare import declaring_channel

    source: Any = _Source()
    opened: list[_Channel] = source.current.connection.opened
    for _ in range(5):  # one after the other (workers starting): one channel
        async with declaring_channel(source) as channel:
            assert not channel.is_closed
    assert len(opened) == 1 and not opened[0].is_closed
    with pytest.raises(RuntimeError):
        async with declaring_channel(source):
            raise RuntimeError("a 406, say")
    assert opened[0].is_closed  # an error closes it, as raw_channel does
    async with declaring_channel(source) as channel:
        assert channel is opened[1]
    opened[1].close_now()  # closed under it (the broker): not handed out again
    async with declaring_channel(source) as channel:
        assert channel is opened[2]
    source.current = _Link()  # a new connection: its own channels
    async with declaring_channel(source) as channel:
        assert channel is source.current.connection.opened[0]


async def test_one_link_is_awaited_as_gather_would_report_it() -> None:
    from aio_workq._consume.dispatch import _first_failure

    loop = asyncio.get_running_loop()
    ok: asyncio.Future[str] = loop.create_future()
    ok.set_result("id")
    assert await _first_failure([ok], loop) is None
    failed: asyncio.Future[str] = loop.create_future()
    failed.set_exception(ValueError("nacked"))
    assert isinstance(await _first_failure([failed], loop), ValueError)
    cancelled: asyncio.Future[str] = loop.create_future()
    cancelled.cancel()
    assert isinstance(await _first_failure([cancelled], loop), asyncio.CancelledError)
    pending: asyncio.Future[str] = loop.create_future()
    waiting = asyncio.ensure_future(_first_failure([pending], loop))
    await asyncio.sleep(0)
    waiting.cancel()  # the task itself is stopped: it raises, as with gather
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pending.cancelled()  # and the confirm it awaited is cancelled, as gather does


class _Settled:
    """An acker's interface, noting what was settled."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.closed = False

    def track(self, tag: int) -> None:
        pass

    def ack(self, tag: int) -> None:
        self.acked.append(tag)

    def nack(self, tag: int, *, requeue: bool) -> None:
        raise AssertionError(f"nack({tag}, requeue={requeue})")


@pytest.mark.parametrize("links", [0, 1], ids=["consume", "chain"])
async def test_a_delivery_is_handled_without_asking_for_the_running_loop(
    links: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Python 3.11 every `asyncio.get_running_loop()`, and `current_task()` without its
    loop, is a getpid() system call: the consume and chain paths make none per delivery (the
    dispatcher knows its loop), where a8e9305 made one and main two (#22 item 1); nor any
    `current_task()` at all, a Python function (the job carries its task)."""
    loop = asyncio.get_running_loop()
    asked: list[str] = []
    running, current = asyncio.get_running_loop, asyncio.current_task

    def get_running_loop() -> asyncio.AbstractEventLoop:
        asked.append("get_running_loop")
        return running()

    tasks_asked: list[object] = []

    def current_task(loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Task[Any] | None:
        if loop is None:
            asked.append("current_task")
        tasks_asked.append(loop)  # a Python function on 3.11
        return current(loop)

    confirm: asyncio.Future[str] = loop.create_future()
    confirm.set_result("m")

    async def handler(job: Job) -> None:
        if links:
            job.links = [confirm]  # as Job.send leaves it once the message is sent

    queue = Queue("tasks")
    runner = HandlerRunner(handler, executor="thread", concurrency=1, timeout=None, name="t")
    dispatcher = Dispatcher(
        runner=runner,
        policy=None,
        queue=queue,
        publisher=cast(Any, None),
        mover=cast(Any, None),
        forwarder=cast(Any, None),
        concurrency=1,
        prefetch=1,
    )
    settled = _Settled()
    header = struct.pack(">HHQH", 60, 0, 1, 0)
    monkeypatch.setattr(asyncio, "get_running_loop", get_running_loop)
    monkeypatch.setattr(asyncio, "current_task", current_task)
    for tag in (1, 2, 3):
        delivery = Delivery(cast(Any, None), "c", tag, False, "", "tasks", header, b"x")
        dispatcher.dispatch(delivery, cast(Any, settled))
    await asyncio.wait(dispatcher.tasks)
    assert settled.acked == [1, 2, 3]
    assert asked == []
    assert tasks_asked == []  # the job carries its task to `_process` (#22 round 6)


async def _nothing(job: Job) -> None:
    pass


def _dispatcher(handler: Any = _nothing, hooks: Hooks | None = None) -> Dispatcher:
    runner = HandlerRunner(handler, executor="thread", concurrency=1, timeout=None, name="t")
    return Dispatcher(
        hooks=hooks,
        runner=runner,
        policy=None,
        queue=Queue("tasks"),
        publisher=cast(Any, None),
        mover=cast(Any, None),
        forwarder=cast(Any, None),
        concurrency=1,
        prefetch=1,
    )


def _count_call_soon(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> list[object]:
    """The callbacks `loop.call_soon` is asked to schedule from now on, in order."""
    scheduled: list[object] = []
    call_soon = loop.call_soon

    def counted(callback: Any, *args: Any, context: Any = None) -> asyncio.Handle:
        scheduled.append(callback)
        return call_soon(callback, *args, context=context)

    monkeypatch.setattr(loop, "call_soon", counted)
    return scheduled


async def test_a_delivery_costs_the_event_loop_one_callback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its task's one step: no done callback per delivery to take the task out of the
    dispatcher's set (a Handle, a call_soon and a Context.run each) (#22 item 2)."""
    loop = asyncio.get_running_loop()
    scheduled = _count_call_soon(loop, monkeypatch)
    header = struct.pack(">HHQH", 60, 0, 1, 0)

    async def callbacks(deliveries: int) -> int:
        dispatcher, settled = _dispatcher(), _Settled()
        scheduled.clear()
        for tag in range(1, deliveries + 1):
            delivery = Delivery(cast(Any, None), "c", tag, False, "", "tasks", header, b"x")
            dispatcher.dispatch(delivery, cast(Any, settled))
        await asyncio.wait(set(dispatcher.tasks))  # adds one callback per task of its own
        assert settled.acked == list(range(1, deliveries + 1))
        assert not dispatcher.tasks
        return len(scheduled)

    one, five = await callbacks(1), await callbacks(5)
    assert (five - one) / 4 == 2  # the task's step, and asyncio.wait's own


async def test_a_task_cancelled_before_it_ran_leaves_the_dispatcher() -> None:
    dispatcher, settled = _dispatcher(), _Settled()
    header = struct.pack(">HHQH", 60, 0, 1, 0)
    delivery = Delivery(cast(Any, None), "c", 1, False, "", "tasks", header, b"x")
    dispatcher.dispatch(delivery, cast(Any, settled))
    dispatcher.stopping = True
    hurry = asyncio.Event()
    hurry.set()
    await dispatcher.drain(0, hurry)  # cancels it before its first step
    assert not dispatcher.tasks and settled.acked == []


def _own_calls(counted: list[int]) -> Any:
    """A profile function counting the calls (and coroutine resumes) of aio-workq's own code."""
    import os
    import sys

    import aio_workq

    root = os.path.dirname(aio_workq.__file__)
    previous = sys.getprofile()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(root):
            counted[0] += 1

    sys.setprofile(profile)
    return previous


async def _own_calls_per_delivery(handler: Any, hooks: Hooks | None = None) -> float:
    """aio-workq's own calls (and resumes) per delivery dispatched to `handler` and acked: the
    count for 11 deliveries less that for 1, over 10 (what a dispatcher costs once left out)."""
    import sys

    header = struct.pack(">HHQH", 60, 0, 1, 0)

    async def count(deliveries: int) -> int:
        dispatcher, settled = _dispatcher(handler, hooks), _Settled()
        counted = [0]
        previous = _own_calls(counted)
        try:
            for tag in range(1, deliveries + 1):
                delivery = Delivery(cast(Any, None), "c", tag, False, "", "tasks", header, b"x")
                dispatcher.dispatch(delivery, cast(Any, settled))
            await asyncio.wait(set(dispatcher.tasks))
        finally:
            sys.setprofile(previous)
        assert settled.acked == list(range(1, deliveries + 1))
        return counted[0]

    one, eleven = await count(1), await count(11)
    return (eleven - one) / 10


@pytest.mark.parametrize("links", [0, 1], ids=["consume", "chain"])
async def test_a_delivery_to_an_async_handler_runs_in_its_task_s_one_coroutine(links: int) -> None:
    """An async handler with no timeout, no payload type and no hooks is awaited by the
    delivery's task itself, and so is the one confirm of a chain step: no coroutine of the
    runner's, of `_handle` or of `_first_failure` in between (#22 item 2: each coroutine is
    an object, a frame and a resume per delivery)."""
    confirm: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    confirm.set_result("m")

    async def handler(job: Job) -> None:
        if links:
            job.links = [confirm]  # as Job.send leaves it once the message is sent

    per_delivery = await _own_calls_per_delivery(handler)
    # The Delivery, dispatch, the Job and the task's coroutine: 6 before #22 round 5 (the
    # delivery's reply_to and the log fields' `handling` too), 9 before item 2.
    assert per_delivery <= 4, per_delivery


async def test_a_delivery_with_hooks_runs_in_its_task_s_one_coroutine() -> None:
    """With hooks installed the usual delivery takes the same path, the hooks called around
    it: no coroutine of `_handle`, of the handler's timing or of `_settle` (each an object, a
    frame and a resume per delivery), and the handler's time still reaches `after_handle`."""
    seen: list[HandleInfo] = []

    class Noted(Hook):
        def after_handle(self, info: HandleInfo) -> None:
            seen.append(info)

    async def handler(job: Job) -> None:
        pass

    per_delivery = await _own_calls_per_delivery(handler, Hooks.of([Noted()]))
    # Without hooks 4; `begin`, `end` and the HandleInfo (its __init__) add 3 (12 before).
    assert per_delivery <= 7, per_delivery
    assert len(seen) == 12 and all(info.outcome is Outcome.OK for info in seen)
    assert all(info.seconds is not None and info.seconds >= 0 for info in seen)


async def test_a_delivery_whole_in_one_read_is_taken_in_one_step() -> None:
    """Its method, content header and body frame are taken together, not frame by frame
    through the tap's state machine (#22 item 2)."""
    import sys

    from pamqp import frame
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader

    from aio_workq._wire.demux import FrameDemux
    from aio_workq._wire.seams import ALIVE_FRAME
    from tests.test_demux import PROPS, TAPPED, FakeChannel, Pieces, collect, deliver

    def message(tag: int) -> bytes:  # one body frame, as RabbitMQ sends a small body
        header = ContentHeader(body_size=64, properties=PROPS)
        return b"".join(
            frame.marshal(value, TAPPED) for value in (deliver(tag), header, ContentBody(b"x" * 64))
        )

    async def per_read(deliveries: int) -> int:
        data = b"".join(message(tag) for tag in range(deliveries))
        demux = FrameDemux(Pieces(data, len(data)), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
        taken: list[Delivery] = []
        demux.attach(FakeChannel(TAPPED), on_delivery=collect(taken))  # type: ignore[arg-type]
        counted = [0]
        previous = _own_calls(counted)
        try:
            passed = await demux.read()  # every frame taken: aiormq gets a sign of life only
        finally:
            sys.setprofile(previous)
        assert passed == ALIVE_FRAME
        assert [d.body for d in taken] == [b"x" * 64] * deliveries
        return counted[0]

    one, eleven = await per_read(1), await per_read(11)
    # The tap's step and the consumer's Delivery: 3 before #22 round 5 (the delivery's fields
    # in a method of their own), 9 before item 2 (a step per frame, the short strings one
    # call each, the content completed on its own).
    assert (eleven - one) / 10 <= 2, (eleven - one) / 10


async def test_a_delivery_s_task_is_named_after_its_queue() -> None:
    """`asyncio.all_tasks()` says whose a task is; and on Python 3.11 a task without a name
    formats a fresh "Task-N" string, one per delivery (#22 item 2)."""
    dispatcher, settled = _dispatcher(), _Settled()
    header = struct.pack(">HHQH", 60, 0, 1, 0)
    delivery = Delivery(cast(Any, None), "c", 1, False, "", "tasks", header, b"x")
    dispatcher.dispatch(delivery, cast(Any, settled))
    (task,) = dispatcher.tasks
    assert task.get_name() == "aio-workq worker 'tasks'"
    await task
    assert settled.acked == [1]


async def test_publish_many_waits_for_settled_confirms_without_a_callback_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`settle_in_order` (publish_many, the outbox) awaits the confirms one by one: one
    settled already costs nothing, where gather added a done callback (a Handle, a
    call_soon and a Context.run) to each (#22 item 2). Outcomes as gather's."""
    from aio_workq._exceptions import PublishError
    from aio_workq._publish.message import settle_in_order

    loop = asyncio.get_running_loop()
    scheduled = _count_call_soon(loop, monkeypatch)
    confirms: list[asyncio.Future[str]] = [loop.create_future() for _ in range(100)]
    for i, confirm in enumerate(confirms):
        confirm.set_result(f"m{i}")
    nacked = PublishError("nacked")
    confirms[3] = loop.create_future()
    confirms[3].set_exception(nacked)
    confirms[5] = loop.create_future()
    confirms[5].cancel()
    refused = PublishError("not sent")
    results = await settle_in_order([*confirms, refused])
    assert len(scheduled) <= 1  # gather: 101
    assert results[:3] == ["m0", "m1", "m2"] and results[3] is nacked and results[4] == "m4"
    assert isinstance(results[5], asyncio.CancelledError) and results[-1] is refused


async def test_publish_many_cancelled_cancels_the_confirms_it_waits_for() -> None:
    """As gather did: a cancelled wait cancels every confirm still pending."""
    from aio_workq._publish.message import settle_in_order

    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()
    done.set_result("m0")
    pending = [loop.create_future() for _ in range(3)]
    failed: asyncio.Future[str] = loop.create_future()
    waiting = asyncio.ensure_future(settle_in_order([done, *pending, failed]))
    await asyncio.sleep(0)
    failed.set_exception(ValueError("nacked"))
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert all(confirm.cancelled() for confirm in pending)
    assert failed.done() and not failed.cancelled()


async def test_an_ack_is_one_call_of_the_acker_s() -> None:
    """`Acker.ack` schedules its flush inline: one call per delivery, not two (#22 item 2)."""
    import sys

    from aio_workq._wire.acker import Acker

    class Channel:
        number = 3
        is_closed = False
        acked: list[int] = []
        written = asyncio.Event()

        async def basic_ack(self, tag: int, *, multiple: bool, wait: bool) -> None:
            self.acked.append(tag)
            self.written.set()

    channel = Channel()
    acker = Acker(cast(Any, channel), None)
    for tag in range(1, 12):
        acker.track(tag)
    counted = [0]
    previous = _own_calls(counted)
    try:
        for tag in range(1, 12):
            acker.ack(tag)
    finally:
        sys.setprofile(previous)
    assert counted[0] == 11  # 22 before (`_schedule` each time)
    async with asyncio.timeout(5):
        await channel.written.wait()
    assert channel.acked == [11]  # one multiple ack, written through aiormq's API


async def test_the_timeout_sweep_walks_the_records_only_once_one_may_have_expired() -> None:
    """Every 0.1 s the publisher's sweep looked at every record in flight (up to the whole
    window) for one past its deadline; it now knows the earliest deadline and walks them
    only once it has passed (#22 item 2)."""
    from aio_workq._exceptions import PublishError
    from aio_workq._publish.expiry import Expiry
    from aio_workq._wire.window import Window

    loop = asyncio.get_running_loop()
    now = loop.time()

    class Out:
        def __init__(self, deadline: float) -> None:
            self.deadline = deadline

    class Records:
        def __init__(self) -> None:
            self.live = [Out(now + 60), Out(now + 30)]
            self.walks = 0
            self.failed: list[Out] = []

        def outstanding(self) -> list[Any]:
            self.walks += 1
            return list(self.live)

        def fail(self, records: Any, cls: type[PublishError], why: str) -> None:
            for out in records:
                self.live.remove(out)
                self.failed.append(out)

        def when_flushed(self, callback: Any) -> None:
            callback()

    class Source:
        def trouble(self) -> str | None:
            return None

    records, window = Records(), Window()
    window.take(1)
    expiry = Expiry(cast(Any, records), window, cast(Any, Source()))
    for out in records.live:
        expiry.expect(out.deadline)
    for _ in range(5):
        expiry.sweep()
    assert records.walks == 0 and records.failed == []
    late = Out(now - 1)
    records.live.append(late)
    expiry.expect(late.deadline)
    for _ in range(5):
        expiry.sweep()
    assert records.walks == 1 and records.failed == [late]  # then none: the next is in 30 s
    expiry.stop()


def _own_and_c_calls(counted: list[int], c_calls: list[str]) -> Any:
    """As `_own_calls`, noting the names of the C functions aio-workq's own code calls too
    (not those of a weak reference's callback or a finalizer the collector runs meanwhile:
    the demux's C-call count saw a `WeakSet`'s `discard` in a full run)."""
    import os
    import sys

    import aio_workq

    root = os.path.dirname(aio_workq.__file__)
    previous = sys.getprofile()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if not frame.f_code.co_filename.startswith(root):
            return
        if event == "call":
            counted[0] += 1
        elif event == "c_call":
            c_calls.append(getattr(arg, "__name__", "?"))

    sys.setprofile(profile)
    return previous


async def test_a_repeated_consumer_tag_and_routing_key_are_not_decoded_again() -> None:
    """The consumer tag and routing key of a delivery are mostly those of the last one: the
    demux compares their bytes and reuses the strings; an empty exchange is no decode
    either (#22 round 5: three decodes per delivery before)."""
    import sys

    from pamqp import frame
    from pamqp.body import ContentBody
    from pamqp.commands import Basic
    from pamqp.header import ContentHeader

    from aio_workq._wire.demux import FrameDemux
    from aio_workq._wire.seams import ALIVE_FRAME
    from tests.test_demux import PROPS, TAPPED, FakeChannel, Pieces, collect

    def message(tag: int, exchange: str, routing_key: str) -> bytes:
        header = ContentHeader(body_size=3, properties=PROPS)
        method = Basic.Deliver(
            consumer_tag="ctag", delivery_tag=tag, exchange=exchange, routing_key=routing_key
        )
        return b"".join(
            frame.marshal(value, TAPPED) for value in (method, header, ContentBody(b"abc"))
        )

    async def decodes(keys: list[str]) -> tuple[int, list[Delivery]]:
        data = b"".join(message(tag, "", key) for tag, key in enumerate(keys, 1))
        demux = FrameDemux(Pieces(data, len(data)), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
        taken: list[Delivery] = []
        demux.attach(FakeChannel(TAPPED), on_delivery=collect(taken))  # type: ignore[arg-type]
        c_calls: list[str] = []
        previous = _own_and_c_calls([0], c_calls)
        try:
            await demux.read()
        finally:
            sys.setprofile(previous)
        return c_calls.count("decode"), taken

    one, _ = await decodes(["rk"])
    eleven, taken = await decodes(["rk"] * 10 + ["other"])
    assert (eleven - one) / 10 <= 0.1, (eleven - one) / 10  # the one new routing key
    assert [(d.consumer_tag, d.exchange, d.routing_key) for d in taken] == [
        ("ctag", "", "rk")
    ] * 10 + [("ctag", "", "other")]
    assert [d.body for d in taken] == [b"abc"] * 11


async def test_a_delivery_whole_in_one_read_costs_the_demux_two_c_calls() -> None:
    """The demux's C calls for a delivery whose method frame and content header length
    repeat the last one's but for its tag (the same consumer tag, exchange and routing key):
    the channel's closed check and one struct unpack, the layout's; the frames that follow
    one whole in a read are taken by its tap without the frame loop's step (#22 round 10:
    seven before, with the tap looked up, the frame header's, the content header's and the
    body frame header's unpacks apart and the read's length; twelve before round 8)."""
    import sys

    from pamqp import frame
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader

    from aio_workq._wire.demux import FrameDemux
    from aio_workq._wire.seams import ALIVE_FRAME
    from tests.test_demux import PROPS, TAPPED, FakeChannel, Pieces, deliver

    def message(tag: int) -> bytes:
        header = ContentHeader(body_size=64, properties=PROPS)
        return b"".join(
            frame.marshal(value, TAPPED) for value in (deliver(tag), header, ContentBody(b"x" * 64))
        )

    async def c_calls(deliveries: int) -> list[str]:
        data = b"".join(message(tag) for tag in range(1, deliveries + 1))
        demux = FrameDemux(Pieces(data, len(data)), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
        tags: list[int] = []

        def take(*fields: Any) -> None:  # Python: no C call of its own counted
            tags.append(fields[2])

        demux.attach(FakeChannel(TAPPED), on_delivery=take)  # type: ignore[arg-type]
        called: list[str] = []
        previous = _own_and_c_calls([0], called)
        try:
            await demux.read()
        finally:
            sys.setprofile(previous)
        assert tags == list(range(1, deliveries + 1))
        return called

    one, eleven = await c_calls(1), await c_calls(11)
    own = [name for name in eleven if name != "append"], [name for name in one if name != "append"]
    assert (len(own[0]) - len(own[1])) / 10 == 2, sorted(own[0])
    assert "startswith" not in eleven and "decode" not in eleven[len(one) :]


async def test_a_repeated_exchange_is_not_decoded_again() -> None:
    """A named exchange, like the consumer tag and the routing key, is decoded only when it
    differs from the last named one; the default exchange in between is `""` (#22 round 8:
    one decode per delivery from a named exchange before)."""
    import sys

    from pamqp import frame
    from pamqp.body import ContentBody
    from pamqp.commands import Basic
    from pamqp.header import ContentHeader

    from aio_workq._wire.demux import FrameDemux
    from aio_workq._wire.seams import ALIVE_FRAME
    from tests.test_demux import PROPS, TAPPED, FakeChannel, Pieces, collect

    def message(tag: int, exchange: str) -> bytes:
        header = ContentHeader(body_size=3, properties=PROPS)
        method = Basic.Deliver(
            consumer_tag="ctag", delivery_tag=tag, exchange=exchange, routing_key="rk"
        )
        return b"".join(
            frame.marshal(value, TAPPED) for value in (method, header, ContentBody(b"abc"))
        )

    exchanges = ["ex"] * 5 + ["", "ex", "", "other", "other", "ex"]
    data = b"".join(message(tag, exchange) for tag, exchange in enumerate(exchanges, 1))
    demux = FrameDemux(Pieces(data, len(data)), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
    taken: list[Delivery] = []
    demux.attach(FakeChannel(TAPPED), on_delivery=collect(taken))  # type: ignore[arg-type]
    c_calls: list[str] = []
    previous = _own_and_c_calls([0], c_calls)
    try:
        await demux.read()
    finally:
        sys.setprofile(previous)
    assert [d.exchange for d in taken] == exchanges
    # the consumer tag, the routing key, "ex", "other" and "ex" again
    assert c_calls.count("decode") == 5, c_calls.count("decode")


async def test_a_delivery_goes_from_the_socket_to_its_ack_in_three_calls() -> None:
    """The fast path's own calls per delivery, from the read to the ack: `Dispatcher.take`
    (the tap takes a run of like deliveries in one step, #22 round 10; bound to the
    channel's gate and acker: no closure of the subscription's in between; it makes the Job
    inline, its Delivery made only when asked for), the task's coroutine and the ack;
    tracking it is the acker's dict's own method (#22 round 5: 11 before, with the tap's
    `_deliver`, the subscription's closure, `dispatch` for `take`, `Acker.track`, the
    delivery's `reply_to` and the log fields' `handling`)."""
    import functools
    import sys

    from pamqp import frame
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader

    from aio_workq._wire.acker import Acker
    from aio_workq._wire.demux import FrameDemux
    from aio_workq._wire.seams import ALIVE_FRAME
    from tests.test_demux import PROPS, TAPPED, FakeChannel, Pieces, deliver

    def message(tag: int) -> bytes:
        header = ContentHeader(body_size=64, properties=PROPS)
        return b"".join(
            frame.marshal(value, TAPPED) for value in (deliver(tag), header, ContentBody(b"x" * 64))
        )

    class Channel(FakeChannel):
        acked: list[tuple[int, bool]]
        written: asyncio.Event

        async def basic_ack(self, tag: int, *, multiple: bool, wait: bool) -> None:
            self.acked.append((tag, multiple))
            self.written.set()

    async def per_read(deliveries: int) -> int:
        data = b"".join(message(tag) for tag in range(1, deliveries + 1))
        demux = FrameDemux(Pieces(data, len(data)), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
        channel = Channel(TAPPED)
        channel.acked, channel.written = [], asyncio.Event()
        dispatcher = _dispatcher()
        acker = Acker(cast(Any, channel), None)
        tap = demux.attach(cast(Any, channel))
        tap.on_delivery = functools.partial(dispatcher.take, tap, acker)
        counted = [0]
        previous = _own_calls(counted)
        try:
            await demux.read()
            await asyncio.wait(set(dispatcher.tasks))
        finally:
            sys.setprofile(previous)
        async with asyncio.timeout(5):
            await channel.written.wait()  # the acker's flush, then its write task
        assert channel.acked == [(deliveries, True)]  # one multiple ack for the whole run
        assert dispatcher.counters.processed == deliveries
        return counted[0]

    one, eleven = await per_read(1), await per_read(11)
    # 3 per delivery (6 before #22 round 6: the Delivery's __init__, now made only when asked
    # for; 5 before round 8: `job_of`, now inline; 4 before round 10: the tap's step per
    # delivery); the acker's one flush may fall inside the window with 11, not with 1.
    assert (eleven - one) / 10 <= 3.2, (eleven - one) / 10


async def test_a_delivery_for_a_closed_acker_is_dropped() -> None:
    """Once the subscription closes the acker (the channel is closing, its acks so far
    written), a delivery still arriving is not handled: the broker redelivers it."""
    dispatcher, settled = _dispatcher(), _Settled()

    class Gate:
        open = True

    header = struct.pack(">HHQH", 60, 0, 1, 0)
    take = dispatcher.take
    take(Gate(), cast(Any, settled), cast(Any, None), "c", 1, False, "", "tasks", header, b"x")
    settled.closed = True
    take(Gate(), cast(Any, settled), cast(Any, None), "c", 2, False, "", "tasks", header, b"x")
    closed_gate = Gate()
    closed_gate.open = False
    settled.closed = False
    take(closed_gate, cast(Any, settled), cast(Any, None), "c", 3, False, "", "t", header, b"x")
    await asyncio.wait(set(dispatcher.tasks))
    assert settled.acked == [1]
    assert dispatcher.counters.deliveries == 1


async def test_the_dispatcher_makes_a_job_off_the_socket_as_job_of_does() -> None:
    """`Dispatcher.take` makes its job inline (#22 round 8: a call less per delivery): every
    slot of the job is set as `job_of` sets it, so neither can drift from the other."""
    from aio_workq._consume.job import job_of

    handled: list[Job] = []

    async def keep(job: Job) -> None:
        handled.append(job)

    dispatcher, settled = _dispatcher(keep), _Settled()

    class Gate:
        open = True

    header, channel, forwarder = struct.pack(">HHQH", 60, 0, 1, 0), object(), object()
    dispatcher._forwarder = cast(Any, forwarder)
    fields = (cast(Any, channel), "c", 1, True, "ex", "tasks", header, b"x")
    dispatcher.take(Gate(), cast(Any, settled), *fields)
    await asyncio.wait(set(dispatcher.tasks))
    expected = job_of(cast(Any, forwarder), *fields)
    assert settled.acked == [1] and len(handled) == 1
    for slot in Job.__slots__:
        mine, theirs = getattr(handled[0], slot, "unset"), getattr(expected, slot, "unset")
        assert mine is theirs or mine == theirs, (slot, mine, theirs)


async def test_tracking_a_delivery_is_no_call_of_the_acker_s() -> None:
    """`Acker.track` is the dict's own `setdefault`: a C call per delivery, where a method
    of the acker's was a Python one (#22 round 5); a nack after an ack still loses."""
    import sys

    from aio_workq._wire.acker import Acker

    class Channel:
        number = 3
        is_closed = False
        done: list[tuple[str, int, bool]] = []
        written = asyncio.Event()

        async def basic_ack(self, tag: int, *, multiple: bool, wait: bool) -> None:
            self.done.append(("ack", tag, multiple))
            self.written.set()

        async def basic_nack(self, tag: int, *, requeue: bool, wait: bool) -> None:
            self.done.append(("nack", tag, requeue))
            self.written.set()

        async def until(self, n: int) -> None:
            async with asyncio.timeout(5):
                while len(self.done) < n:
                    self.written.clear()
                    await self.written.wait()

    channel = Channel()
    acker = Acker(cast(Any, channel), None)
    counted = [0]
    previous = _own_calls(counted)
    try:
        for tag in range(1, 12):
            acker.track(tag)
    finally:
        sys.setprofile(previous)
    assert counted[0] == 0  # 11 before
    assert acker.unsettled == 11
    for tag in (1, 2, 3, 5):
        acker.ack(tag)
    acker.nack(5, requeue=True)  # acked already: the ack wins
    acker.nack(6, requeue=False)
    acker.flush()
    await channel.until(3)
    assert channel.done == [("nack", 6, False), ("ack", 3, True), ("ack", 5, False)]
    assert acker.unsettled == 6  # 4 and 7 to 11
    for tag in (4, *range(7, 12)):
        acker.ack(tag)
    acker.flush()  # a completed run: cleared at once, acked up to its last tag
    await channel.until(4)
    assert channel.done[3] == ("ack", 11, True) and acker.unsettled == 0


def test_a_delivery_says_whether_it_is_an_rpc_request_from_one_byte() -> None:
    """`Delivery.is_request` is read off the property flags when the delivery is made (the
    dispatcher asked the `reply_to` property per delivery before, #22 round 5), and agrees
    with `reply_to` on both paths: raw header bytes (the demux) and pamqp's (aiormq)."""
    from pamqp.commands import Basic
    from pamqp.header import ContentHeader

    from aio_workq._wire.frames import decode_header

    for properties in (
        Basic.Properties(reply_to="amq.rabbitmq.reply-to", correlation_id="c"),
        Basic.Properties(reply_to=""),
        Basic.Properties(message_id="m", headers={"x": 1}),
        Basic.Properties(),
    ):
        raw = ContentHeader(body_size=1, properties=properties).marshal()
        for header in (raw, decode_header(raw)):
            delivery = Delivery(cast(Any, None), "c", 1, False, "", "q", header, b"x")
            assert delivery.is_request == (delivery.reply_to is not None), properties
            assert delivery.is_request == bool(properties.reply_to), properties


@pytest.mark.parametrize("asked_first", ["job", "delivery"])
def test_a_job_off_the_socket_makes_its_delivery_only_when_asked_for(
    asked_first: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path's job holds the delivery's fields itself (#22 round 6: one object and one
    call less per message): its `delivery` is made on first use, the same each time, with the
    same fields; the properties are decoded once, whether the job or its delivery asks first,
    and a job reads "no headers" and "no reply_to" off the flags without decoding them."""
    from pamqp.commands import Basic
    from pamqp.header import ContentHeader

    from aio_workq._consume.job import job_of
    from aio_workq._wire.frames import decode_header

    decoded: list[bytes] = []

    def counted(payload: bytes) -> ContentHeader:
        decoded.append(payload)
        return decode_header(payload)

    monkeypatch.setattr("aio_workq._consume.job.decode_header", counted)
    monkeypatch.setattr("aio_workq._consume.delivery.decode_header", counted)
    props = Basic.Properties(
        message_id="m1", content_type="application/json", headers={"x-a": 1},
        reply_to="back", correlation_id="c1",
    )  # fmt: skip
    header = ContentHeader(body_size=2, properties=props).marshal()  # the frame's payload
    channel = cast(Any, object())
    job = job_of(cast(Any, None), channel, "ctag", 7, True, "ex", "key", header, b"{}")
    assert (job.body, job.delivery_tag, job.redelivered) == (b"{}", 7, True)
    assert (job.exchange, job.routing_key, decoded) == ("ex", "key", [])
    if asked_first == "job":
        assert (job.message_id, job.data) == ("m1", {})
    delivery = job.delivery
    assert delivery is job.delivery
    assert (delivery.channel, delivery.consumer_tag, delivery.delivery_tag) == (channel, "ctag", 7)
    assert (delivery.exchange, delivery.routing_key, delivery.body) == ("ex", "key", b"{}")
    assert delivery.redelivered and delivery.is_request
    assert job.headers == {"x-a": 1} and job.attempt == 1
    assert (job.reply_to, job.correlation_id, job.content_type) == (
        "back",
        "c1",
        "application/json",
    )
    assert delivery.properties.message_id == "m1" == job.message_id
    assert len(decoded) == 1

    bare = struct.pack(">HHQH", 60, 0, 2, 0)  # no property at all
    job = job_of(cast(Any, None), channel, "ctag", 8, False, "", "key", bare, b"{}")
    assert (job.headers, job.reply_to, job.attempt) == ({}, None, 1)
    assert len(decoded) == 1  # read off the flags
    assert job.message_id is None and len(decoded) == 2


async def test_a_delivery_whole_in_one_read_costs_one_struct_unpack() -> None:
    """A delivery like the last one but for its tag: one unpack of its layout, the frame
    header with the class and method ids, the delivery tag and bits, the content header's
    frame header and body size, and the body frame's header (#22 round 10: four before, the
    frame header, the tag, the content header and the body frame's header apart; six before
    round 6; about 0.6k instructions each)."""
    import sys

    from pamqp import frame
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader

    from aio_workq._wire.demux import FrameDemux
    from aio_workq._wire.seams import ALIVE_FRAME
    from tests.test_demux import PROPS, TAPPED, FakeChannel, Pieces, collect, deliver

    def message(tag: int) -> bytes:
        header = ContentHeader(body_size=64, properties=PROPS)
        return b"".join(
            frame.marshal(value, TAPPED) for value in (deliver(tag), header, ContentBody(b"x" * 64))
        )

    async def unpacks(deliveries: int) -> int:
        data = b"".join(message(tag) for tag in range(deliveries))
        demux = FrameDemux(Pieces(data, len(data)), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
        taken: list[Delivery] = []
        demux.attach(FakeChannel(TAPPED), on_delivery=collect(taken))  # type: ignore[arg-type]
        count = [0]
        previous = sys.getprofile()

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "c_call" and getattr(arg, "__name__", "") == "unpack_from":
                count[0] += 1

        sys.setprofile(profile)
        try:
            await demux.read()
        finally:
            sys.setprofile(previous)
        assert [d.body for d in taken] == [b"x" * 64] * deliveries
        return count[0]

    one, eleven = await unpacks(1), await unpacks(11)
    assert (eleven - one) / 10 == 1, (eleven - one) / 10
