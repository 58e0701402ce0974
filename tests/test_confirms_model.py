"""A model-based test of the publish path: `ConfirmPublisher` + `FastLane` + `ConfirmTracker`.

Offline, with a fake channel and a fake wire that records what was written. Hypothesis runs
random sequences of good sends, bad sends (a property that can't be encoded), acks and nacks
(`multiple` both ways), returns, timeouts and channel losses (with resend on the next channel),
and checks every outcome against a reference model: for each channel, the broker's delivery tag
n is the n-th publish written on it; a message's future settles once, with its own outcome.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pamqp import frame as pamqp_frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from aio_workq import (
    ConnectionLostError,
    MessageTooLargeError,
    PublishNackedError,
    PublishTimeoutError,
    SerializationError,
    UnroutableError,
)
from aio_workq._link.connection import Link
from aio_workq._publish.confirms import ConfirmPublisher
from aio_workq._wire.frames import Properties
from aio_workq._wire.window import Window


class FakeTune:
    frame_max = 131072


class FakeConnection:
    def __init__(self) -> None:
        self.is_closed = False
        self.connection_tune = FakeTune()
        self.channels: list[FakeChannel] = []
        self.closing: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def channel(self, **_: Any) -> FakeChannel:
        channel = FakeChannel(self, len(self.channels) + 1)
        self.channels.append(channel)
        return channel


class FakeChannel:
    def __init__(self, connection: FakeConnection, number: int) -> None:
        self.connection = connection
        self.number = number
        self.closing: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.published: list[str] = []  # message ids in the order the broker got them

    @property
    def is_closed(self) -> bool:
        return self.closing.done()

    async def close(self) -> None:
        if not self.closing.done():
            self.closing.set_result(None)


class Gate:
    def __init__(self) -> None:
        self.open = True


class FakeDemux:
    def __init__(self) -> None:
        self.sinks: dict[int, Any] = {}

    def attach(self, channel: FakeChannel, *, confirms: Any = None, **_: Any) -> Gate:
        if confirms is not None:
            self.sinks[channel.number] = confirms
        return Gate()

    def tap(self, channel: FakeChannel) -> Gate | None:
        return None


class FakeWriter:
    """Parses what the lane writes, as the broker would: one Basic.Publish per message."""

    def __init__(self, connection: FakeConnection) -> None:
        self.connection = connection
        self.pending: list[tuple[Gate, bytes]] = []
        self.watchers: list[Any] = []

    @property
    def buffered(self) -> int:
        return len(self.pending)

    def write(self, gate: Gate, frames: bytes) -> None:
        self.pending.append((gate, frames))

    def when_flushed(self, callback: Any) -> None:
        if self.pending:
            self.watchers.append(callback)
        else:
            callback()

    def flush(self) -> None:
        for gate, frames in self.pending:
            if gate.open:
                self._receive(frames)
        self.pending.clear()
        watchers, self.watchers = self.watchers, []
        for callback in watchers:
            callback()

    def _receive(self, data: bytes) -> None:
        channel_number = None
        while data:
            size, number, value = pamqp_frame.unmarshal(data)
            data = data[size:]
            if isinstance(value, Basic.Publish):
                channel_number = number
            elif isinstance(value, ContentHeader):
                channel = self.connection.channels[channel_number - 1]  # type: ignore[operator]
                channel.published.append(value.properties.message_id or "")


class FakeSource:
    def __init__(self) -> None:
        self.connection = FakeConnection()
        self.writer = FakeWriter(self.connection)
        self.demux = FakeDemux()

    @property
    def is_connected(self) -> bool:
        return True

    @property
    def is_closed(self) -> bool:
        return False

    def trouble(self) -> str | None:
        return None

    async def link(self, timeout: float | None = None) -> Link:
        from aio_workq._wire.seams import Wire

        return Link(self.connection, Wire(self.demux, self.writer))  # type: ignore[arg-type]


async def _new_source() -> FakeSource:
    return FakeSource()  # on the machine's loop: its futures belong to it


class PublishMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.source: FakeSource = self.run(_new_source())
        self.publisher: ConfirmPublisher = self.run(self._start())
        self.futures: dict[str, asyncio.Future[str]] = {}
        self.expected: dict[str, str] = {}  # message id -> "ok" | "nacked" | ...
        self.unsettled: list[str] = []  # in send order
        self.mandatory: set[str] = set()
        self.count = 0

    async def _start(self) -> ConfirmPublisher:
        publisher = ConfirmPublisher(
            self.source, window=Window(1000), timeout=3600, resend=True, what="model"
        )
        await publisher.start()
        return publisher

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def settle_loop(self) -> None:
        """Let callbacks run and the writer flush, as the event loop would."""
        for _ in range(5):
            self.run(asyncio.sleep(0))
            self.source.writer.flush()

    @property
    def channel(self) -> FakeChannel:
        return self.source.connection.channels[-1]

    def teardown(self) -> None:
        self.run(self.publisher.close(0))
        for future in self.futures.values():
            assert future.done()
            future.exception()  # retrieved
        self.loop.close()

    # -- rules -----------------------------------------------------------------------------

    @rule(mandatory=st.booleans())
    def send(self, mandatory: bool) -> None:
        self.count += 1
        message_id = f"m{self.count}"
        props = Properties(message_id=message_id)
        future = self.run(self.publisher.send("", "q", b"x", props, mandatory=mandatory))
        self.futures[message_id] = future
        self.unsettled.append(message_id)
        if mandatory:
            self.mandatory.add(message_id)
        self.settle_loop()

    @rule(bad=st.sampled_from(["header", "priority", "expiration", "id", "key"]))
    def bad_send(self, bad: str) -> None:
        props = Properties(message_id="bad")
        routing_key = "q"
        if bad == "header":
            props.headers = {"x": object()}
        elif bad == "priority":
            props.priority = "high"  # type: ignore[assignment]
        elif bad == "expiration":
            props.expiration = 60  # type: ignore[assignment]
        elif bad == "id":
            props.message_id = "i" * 300
        else:
            routing_key = "k" * 300
        with pytest.raises(SerializationError):
            self.run(self.publisher.send("", routing_key, b"x", props))
        self.settle_loop()

    def _broker_pending(self) -> list[tuple[int, str]]:
        """(tag, id) of messages the broker got on the current channel and not settled yet."""
        published = self.channel.published
        return [(i + 1, mid) for i, mid in enumerate(published) if mid in self.unsettled]

    def _settle(self, message_id: str, outcome: str) -> None:
        if message_id in self.unsettled:
            self.unsettled.remove(message_id)
            self.expected[message_id] = outcome

    @precondition(lambda self: self._broker_pending())
    @rule(data=st.data(), multiple=st.booleans(), ack=st.booleans())
    def confirm(self, data: st.DataObject, multiple: bool, ack: bool) -> None:
        pending = self._broker_pending()
        tag, message_id = data.draw(st.sampled_from(pending))
        if multiple:
            # The broker confirms with multiple only when every earlier tag is settled too.
            published = self.channel.published
            for earlier in published[: tag - 1]:
                self._settle(earlier, "ok" if ack else "nacked")
        self._settle(message_id, "ok" if ack else "nacked")
        self.source.demux.sinks[self.channel.number].on_confirm(tag, multiple, ack)
        self.settle_loop()

    def _returnable(self) -> list[tuple[int, str]]:
        return [(tag, mid) for tag, mid in self._broker_pending() if mid in self.mandatory]

    @precondition(lambda self: self._returnable())
    @rule(data=st.data())
    def returned(self, data: st.DataObject) -> None:
        # Only mandatory messages come back; the broker acks each right after its return.
        tag, message_id = data.draw(st.sampled_from(self._returnable()))
        sink = self.source.demux.sinks[self.channel.number]
        self._settle(message_id, "unroutable")
        sink.on_return(312, "NO_ROUTE", _returned(message_id))
        sink.on_confirm(tag, False, True)
        self.settle_loop()

    @precondition(lambda self: self.unsettled)
    @rule(data=st.data())
    def timeout(self, data: st.DataObject) -> None:
        message_id = data.draw(st.sampled_from(self.unsettled))
        for out in self.publisher.outstanding():
            if out.message_id == message_id:
                out.deadline = 0
        self.publisher._expiry.expect(0)  # as the publisher says of a deadline the earliest
        self._settle(message_id, "timeout")
        self.publisher._expiry.sweep()
        self.settle_loop()

    @rule()
    def lose_channel(self) -> None:
        channel = self.channel
        channel.connection.is_closed = False
        channel.closing.set_exception(ConnectionError("connection lost"))
        self.settle_loop()
        self.run(self.publisher._lanes._channel.wait_open(5))  # reopened: unconfirmed ones resent
        self.settle_loop()
        assert self.channel is not channel
        assert self.channel.published == self.unsettled  # every unconfirmed one, in order

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def every_outcome_is_its_own(self) -> None:
        for message_id, outcome in self.expected.items():
            future = self.futures[message_id]
            assert future.done(), (message_id, outcome)
            assert _outcome(future) == outcome, (message_id, outcome, future)
        for message_id in self.unsettled:
            assert not self.futures[message_id].done(), message_id

    @invariant()
    def window_counts_what_is_unsettled(self) -> None:
        assert self.publisher.in_flight == len(self.unsettled)


def _returned(message_id: str) -> bytes:
    """The content header payload of a returned message, as the demux hands it over."""
    return ContentHeader(body_size=0, properties=Basic.Properties(message_id=message_id)).marshal()


def _outcome(future: asyncio.Future[str]) -> str:
    exc = future.exception()
    if exc is None:
        return "ok"
    names: dict[type[BaseException], str] = {
        PublishNackedError: "nacked",
        UnroutableError: "unroutable",
        PublishTimeoutError: "timeout",
        ConnectionLostError: "lost",
    }
    return names[type(exc)]


PublishMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_publish_model = PublishMachine.TestCase


def test_a_body_over_rabbitmqs_limit_is_refused_before_anything_is_sent() -> None:
    from aio_workq._publish.confirms import MAX_MESSAGE_SIZE

    async def scenario() -> None:
        source = FakeSource()
        publisher = ConfirmPublisher(source, window=Window(10), timeout=5, resend=True)
        await publisher.start()
        with pytest.raises(MessageTooLargeError, match="128 MiB") as refused:
            await publisher.send("", "q", bytes(MAX_MESSAGE_SIZE + 1), Properties(message_id="big"))
        assert isinstance(refused.value, SerializationError)
        too_large = refused.value
        fields = ("big", MAX_MESSAGE_SIZE + 1, MAX_MESSAGE_SIZE)
        assert (too_large.message_id, too_large.size, too_large.limit) == fields
        copied = pickle.loads(pickle.dumps(too_large))  # e.g. a process pool's result
        assert type(copied) is MessageTooLargeError and str(copied) == str(too_large)
        assert (copied.message_id, copied.size, copied.limit) == fields
        ok = await publisher.send("", "q", b"small", Properties(message_id="small"))
        source.writer.flush()
        assert source.connection.channels[-1].published == ["small"]  # tag 1 is the small one
        source.demux.sinks[source.connection.channels[-1].number].on_confirm(1, False, True)
        assert await ok == "small"
        await publisher.close(0)

    asyncio.run(scenario())


def test_a_new_channel_writing_before_the_old_ones_loss_is_handled_mixes_no_tags() -> None:
    """Each channel has its own confirm tracker: a channel set up before the loss of the one
    before it is handled (an order another module decides) still settles every message by its
    own channel's tags, and the old channel's messages are resent, none forgotten (#20)."""

    async def scenario() -> None:
        from aio_workq._wire.seams import Wire

        source = FakeSource()
        publisher = ConfirmPublisher(source, window=Window(10), timeout=3600, resend=True)
        await publisher.start()
        first = source.connection.channels[-1]
        m1 = await publisher.send("", "q", b"1", Properties(message_id="m1"))
        m2 = await publisher.send("", "q", b"2", Properties(message_id="m2"))
        source.writer.flush()
        assert first.published == ["m1", "m2"]  # tags 1 and 2 on the first channel
        # The second channel is set up while the first one's loss is not handled yet.
        second = await source.connection.channel()
        await publisher._lanes._on_channel(second, Wire(source.demux, source.writer))  # type: ignore[arg-type]
        m3 = await publisher.send("", "q", b"3", Properties(message_id="m3"))
        source.writer.flush()
        assert second.published == ["m3"]  # tag 1 on the second channel
        source.demux.sinks[second.number].on_confirm(1, True, True)
        assert await m3 == "m3" and not m1.done() and not m2.done()
        # Now the first channel's loss: what it did not confirm goes out on the second.
        first.connection.is_closed = False
        publisher._lanes._on_lost(first, ConnectionError("connection lost"))  # type: ignore[arg-type]
        source.writer.flush()
        assert second.published == ["m3", "m1", "m2"]
        source.demux.sinks[second.number].on_confirm(3, True, True)
        async with asyncio.timeout(5):
            assert [await m1, await m2] == ["m1", "m2"]
        assert publisher.in_flight == 0
        await publisher.close(0)

    asyncio.run(scenario())
