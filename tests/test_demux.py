"""The delivery demux, offline: real AMQP bytes in, aiormq's own frame receiver on top.

The demux takes the deliveries of attached channels and passes every other frame to aiormq; these
tests cut one byte stream at every possible point and check that the deliveries and the frames
aiormq sees are the same either way.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import aiormq
import pytest
from aiormq.connection import FrameReceiver
from pamqp import frame
from pamqp.body import ContentBody
from pamqp.commands import Basic, Channel
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from aio_workq._consume.delivery import Delivery
from aio_workq._wire.demux import FrameDemux, OnDelivery
from aio_workq._wire.frames import decode_header
from aio_workq._wire.seams import ALIVE_FRAME

TAPPED, OTHER = 1, 2
PROPS = Basic.Properties(
    content_type="application/json",
    headers={"x-workq-attempt": 2, "trace": "abc"},
    delivery_mode=2,
    message_id="m-1",
    correlation_id="c-1",
    timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
)


class Pieces:
    """A socket read in fixed-size pieces: the part of a StreamReader the demux uses."""

    def __init__(self, data: bytes, size: int) -> None:
        self._pieces = [data[i : i + size] for i in range(0, len(data), size)]

    @classmethod
    def of(cls, *pieces: bytes) -> Pieces:
        reader = cls(b"", 1)
        reader._pieces = list(pieces)
        return reader

    async def read(self, n: int) -> bytes:
        return self._pieces.pop(0) if self._pieces else b""

    def at_eof(self) -> bool:
        return not self._pieces


class FakeChannel:
    """What the demux reads of an aiormq channel."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.closing: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.is_closed = False


def content(channel: int, method: Any, body: bytes, props: Basic.Properties = PROPS) -> bytes:
    header = ContentHeader(body_size=len(body), properties=props)
    frames = [frame.marshal(method, channel), frame.marshal(header, channel)]
    frames += [frame.marshal(ContentBody(body[i : i + 7]), channel) for i in range(0, len(body), 7)]
    return b"".join(frames)


def deliver(tag: int, **kwargs: Any) -> Basic.Deliver:
    return Basic.Deliver(
        consumer_tag="ctag", delivery_tag=tag, exchange="ex", routing_key="rk", **kwargs
    )


STREAM = [
    # (bytes, taken by the demux?)
    (frame.marshal(Basic.QosOk(), TAPPED), False),
    (content(TAPPED, deliver(1), b"first"), True),
    (content(OTHER, deliver(1), b"not tapped"), False),
    (content(TAPPED, deliver(2, redelivered=True), b"x" * 20), True),  # three body frames
    (content(TAPPED, Basic.Return(reply_code=312, exchange="", routing_key="q"), b"back"), False),
    (content(TAPPED, deliver(3), b""), True),  # no body frame at all
    (frame.marshal(Channel.Flow(active=True), TAPPED), False),
]


def collect(into: list[Delivery]) -> OnDelivery:
    """An `on_delivery` that makes the consuming layer's `Delivery` of each and keeps it."""

    def take(*fields: Any) -> None:
        into.append(Delivery(*fields))

    return take


async def read_all(demux: FrameDemux) -> list[Any]:
    """Every frame aiormq's receiver gets from the demux, until the stream ends."""
    receiver = FrameReceiver(demux)  # type: ignore[arg-type]
    frames = []
    with contextlib.suppress(aiormq.exceptions.AMQPConnectionError):  # the stream ends
        async for _, number, value in receiver:
            frames.append((number, value))
    return frames


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 8, 13, 64, 10_000])
async def test_deliveries_are_taken_and_every_other_frame_reaches_aiormq_in_order(
    piece: int,
) -> None:
    data = b"".join(chunk for chunk, _ in STREAM)
    demux = FrameDemux(Pieces(data, piece), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
    channel = FakeChannel(TAPPED)
    deliveries: list[Delivery] = []
    demux.attach(channel, on_delivery=collect(deliveries))  # type: ignore[arg-type]

    frames = await read_all(demux)

    expected_frames: list[Any] = []
    for chunk, taken in STREAM:
        while chunk and not taken:
            used, number, value = frame.unmarshal(chunk)
            expected_frames.append((number, value))
            chunk = chunk[used:]
    assert len(expected_frames) == 9  # qos-ok, 4 of the other channel, 3 of the return, flow
    passed = [(number, value) for number, value in frames if not isinstance(value, Heartbeat)]
    assert [(n, type(v).__name__, v.__dict__) for n, v in passed] == [
        (n, type(v).__name__, v.__dict__) for n, v in expected_frames
    ]
    assert any(isinstance(value, Heartbeat) for _, value in frames)  # aiormq saw a sign of life

    assert [(d.delivery_tag, d.body, d.redelivered) for d in deliveries] == [
        (1, b"first", False),
        (2, b"x" * 20, True),
        (3, b"", False),
    ]
    first = deliveries[0]
    assert (first.consumer_tag, first.exchange, first.routing_key) == ("ctag", "ex", "rk")
    assert first.channel is channel  # type: ignore[comparison-overlap]
    assert first.properties.headers == {"x-workq-attempt": 2, "trace": "abc"}
    assert first.properties.message_id == "m-1"
    assert first.properties.timestamp == PROPS.timestamp
    assert first.reply_to is None


async def test_reply_to_is_read_without_decoding_only_when_absent() -> None:
    with_reply = Basic.Properties(reply_to="amq.rabbitmq.reply-to", correlation_id="c")
    data = content(TAPPED, deliver(1), b"a") + content(TAPPED, deliver(2), b"b", with_reply)
    demux = FrameDemux(Pieces(data, 5), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
    deliveries: list[Delivery] = []
    demux.attach(FakeChannel(TAPPED), on_delivery=collect(deliveries))  # type: ignore[arg-type]
    await read_all(demux)
    assert [d.reply_to for d in deliveries] == [None, "amq.rabbitmq.reply-to"]
    message = deliveries[1].message()  # as aiormq would have delivered it
    assert message.delivery_tag == 2 and message.body == b"b"
    assert message.header.properties.correlation_id == "c"


async def test_a_closed_channel_is_no_longer_tapped() -> None:
    channel = FakeChannel(TAPPED)
    data = content(TAPPED, deliver(1), b"a")
    demux = FrameDemux(Pieces(data, 100), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
    deliveries: list[Delivery] = []
    demux.attach(channel, on_delivery=collect(deliveries))  # type: ignore[arg-type]
    channel.closing.set_result(None)
    await asyncio.sleep(0)  # the closing callbacks run
    frames = await read_all(demux)
    assert deliveries == []
    assert [type(value).__name__ for _, value in frames] == [
        "Deliver",
        "ContentHeader",
        "ContentBody",
    ]


async def test_a_delivery_under_way_when_the_channel_closes_is_taken_whole() -> None:
    # aiormq must not get the content frames of a delivery whose method frame it never saw.
    channel = FakeChannel(TAPPED)
    first = content(TAPPED, deliver(1), b"x" * 20)
    method_end = len(frame.marshal(deliver(1), TAPPED))
    second = content(TAPPED, deliver(2), b"y")

    class ClosingMidway(Pieces):
        async def read(self, n: int) -> bytes:
            piece = await super().read(n)
            if piece == first[method_end:]:
                channel.closing.set_result(None)  # after the method frame, before the content
            return piece

    reader = ClosingMidway.of(first[:method_end], first[method_end:], second)
    demux = FrameDemux(reader, alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
    deliveries: list[Delivery] = []
    demux.attach(channel, on_delivery=collect(deliveries))  # type: ignore[arg-type]
    frames = await read_all(demux)
    assert [d.delivery_tag for d in deliveries] == [1]
    passed = [type(value).__name__ for _, value in frames if not isinstance(value, Heartbeat)]
    assert passed == ["Deliver", "ContentHeader", "ContentBody"]  # the second, whole


async def test_a_failing_consumer_callback_does_not_stop_the_reader(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = content(TAPPED, deliver(1), b"a") + content(TAPPED, deliver(2), b"b")
    data += frame.marshal(Basic.QosOk(), TAPPED)
    demux = FrameDemux(Pieces(data, 1000), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
    taken: list[int] = []

    def on_delivery(*fields: Any) -> None:
        delivery = Delivery(*fields)
        if delivery.delivery_tag == 1:
            raise RuntimeError("boom")
        taken.append(delivery.delivery_tag)

    demux.attach(FakeChannel(TAPPED), on_delivery=on_delivery)  # type: ignore[arg-type]
    frames = await read_all(demux)
    assert taken == [2]
    assert [type(v).__name__ for _, v in frames if not isinstance(v, Heartbeat)] == ["QosOk"]
    assert "failed to take a delivery" in caplog.text


def whole(channel: int, method: Any, body: bytes, props: Basic.Properties = PROPS) -> bytes:
    """A message as the broker writes a small one: its body in one frame (none if empty)."""
    frames = [method, ContentHeader(body_size=len(body), properties=props)]
    return b"".join(
        frame.marshal(value, channel) for value in [*frames, ContentBody(body)][: 3 if body else 2]
    )


def run_of(tag: int, **kwargs: Any) -> Basic.Deliver:
    fields = {"consumer_tag": "ctag", "exchange": "ex", "routing_key": "rk", **kwargs}
    return Basic.Deliver(delivery_tag=tag, **fields)


LONGER = Basic.Properties(message_id="m-22", delivery_mode=2)  # another content header length
# Deliveries whose method frames repeat but for the tag (a run, taken in one step of the tap),
# broken by every kind of frame that must not be taken as one of them: (bytes, taken?).
RUN = [
    (whole(TAPPED, run_of(1), b"a" * 64), True),
    (whole(TAPPED, run_of(2), b"b" * 64), True),
    (whole(TAPPED, run_of(3, redelivered=True), b"c"), True),
    (whole(TAPPED, run_of(4, routing_key="rq"), b"d"), True),  # same size, other key
    (whole(TAPPED, run_of(5, routing_key="rq"), b""), True),  # no body frame
    (whole(TAPPED, run_of(6, consumer_tag="ctah", routing_key="rq"), b"e"), True),
    (whole(OTHER, run_of(1, consumer_tag="ctah", routing_key="rq"), b"f"), False),
    (whole(TAPPED, run_of(7, consumer_tag="ctah", routing_key="rq"), b"g"), True),
    (frame.marshal(Heartbeat(), 0), False),
    (whole(TAPPED, run_of(8, consumer_tag="ctah", routing_key="rq"), b"h"), True),
    (content(TAPPED, run_of(9, consumer_tag="ctah", routing_key="rq"), b"i" * 20), True),
    (whole(TAPPED, run_of(10, consumer_tag="ctah", routing_key="rq"), b"j"), True),
    (whole(TAPPED, Basic.Return(reply_code=312, exchange="ex", routing_key="rq"), b"k"), False),
    (whole(TAPPED, run_of(11, consumer_tag="ctah", routing_key="rq"), b"l"), True),
    (whole(TAPPED, run_of(12, exchange="", routing_key="rq"), b"m"), True),
    (whole(TAPPED, run_of(13, exchange="", routing_key="rq"), b"n"), True),
    (frame.marshal(Basic.QosOk(), TAPPED), False),
    (whole(TAPPED, run_of(14, exchange="", routing_key="rq"), b"o"), True),
    (whole(TAPPED, run_of(15, exchange="", routing_key="rq"), b"p", LONGER), True),
    (whole(TAPPED, run_of(16, exchange="", routing_key="rq"), b"q"), True),
    (whole(TAPPED, run_of(17, exchange="", routing_key="rq"), b"r" * 9, LONGER), True),
    (whole(TAPPED, run_of(18, exchange="", routing_key="rq"), b"", LONGER), True),
]


@pytest.mark.parametrize("piece", [1, 7, 8, 29, 30, 31, 64, 100, 10_000])
async def test_a_run_of_like_deliveries_is_taken_as_each_would_be_alone(piece: int) -> None:
    """The tap takes the deliveries that follow one whole in a read while their method frames
    are its own but for the tag and bits (#22 round 10); whatever differs — another channel,
    consumer tag, exchange or routing key of the same length, a heartbeat, a return, a body in
    several frames or none, a content header of another length, a read's end — is read as it
    was, in order."""
    data = b"".join(chunk for chunk, _ in RUN)
    demux = FrameDemux(Pieces(data, piece), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
    deliveries: list[Delivery] = []
    demux.attach(FakeChannel(TAPPED), on_delivery=collect(deliveries))  # type: ignore[arg-type]
    frames = await read_all(demux)
    expected: list[tuple[Any, ...]] = []
    for chunk, taken in RUN:
        while chunk:
            used, number, value = frame.unmarshal(chunk)
            chunk = chunk[used:]
            if isinstance(value, Basic.Deliver) and taken:
                fields = (value.consumer_tag, value.exchange, value.routing_key)
                expected.append(("delivery", value.delivery_tag, value.redelivered, *fields))
            elif not taken and not isinstance(value, Heartbeat):
                expected.append((number, type(value).__name__, value.__dict__))
    bodies = [b"a" * 64, b"b" * 64, *(bytes([c]) for c in b"cd"), b"", *(bytes([c]) for c in b"eg")]
    bodies += [b"h", b"i" * 20, *(bytes([c]) for c in b"jlmnopq"), b"r" * 9, b""]
    got = [
        ("delivery", d.delivery_tag, d.redelivered, d.consumer_tag, d.exchange, d.routing_key)
        for d in deliveries
    ]
    passed = [(n, type(v).__name__, v.__dict__) for n, v in frames if not isinstance(v, Heartbeat)]
    assert got == [row for row in expected if row[0] == "delivery"]
    assert passed == [row for row in expected if row[0] != "delivery"]
    assert len(passed) == 3 + 3 + 1  # the other channel's message, the return, the qos-ok
    assert [d.body for d in deliveries] == bodies
    ids = ["m-1"] * 14 + ["m-22", "m-1", "m-22", "m-22"]
    assert [d.properties.message_id for d in deliveries] == ids


async def test_a_run_stops_at_a_delivery_once_the_channel_is_closing() -> None:
    """A consumer that closes the channel while a run is taken: the deliveries after it in
    the read reach aiormq, as every frame of a closing channel does."""
    channel = FakeChannel(TAPPED)
    data = b"".join(whole(TAPPED, run_of(tag), b"x") for tag in (1, 2, 3))
    demux = FrameDemux(Pieces(data, len(data)), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
    taken: list[int] = []

    def on_delivery(*fields: Any) -> None:
        taken.append(fields[2])
        if fields[2] == 2:
            channel.closing.set_result(None)

    demux.attach(channel, on_delivery=on_delivery)  # type: ignore[arg-type]
    frames = await read_all(demux)
    assert taken == [1, 2]
    passed = [type(v).__name__ for _, v in frames if not isinstance(v, Heartbeat)]
    assert passed == ["Deliver", "ContentHeader", "ContentBody"]


class RecordingConfirms:
    """A `Confirms` sink that records what the demux hands it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_confirm(self, delivery_tag: int, multiple: bool, ack: bool) -> None:
        self.calls.append(("ack" if ack else "nack", delivery_tag, multiple))

    def on_return(self, reply_code: int, reply_text: str, header: bytes) -> None:
        message_id = decode_header(header).properties.message_id
        self.calls.append(("return", reply_code, reply_text, message_id))


@pytest.mark.parametrize("piece", [1, 5, 10_000])
async def test_confirms_and_returns_go_to_the_publisher_and_deliveries_to_the_worker(
    piece: int,
) -> None:
    returned = Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key="q")
    data = b"".join(
        [
            frame.marshal(Basic.Ack(delivery_tag=3, multiple=True), TAPPED),
            content(TAPPED, returned, b"back"),
            frame.marshal(Basic.Ack(delivery_tag=4), TAPPED),
            content(TAPPED, deliver(1), b"work"),
            frame.marshal(Basic.Nack(delivery_tag=5, requeue=False), TAPPED),
            frame.marshal(Basic.Ack(delivery_tag=1), OTHER),  # not this channel's
        ]
    )
    demux = FrameDemux(Pieces(data, piece), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
    confirms = RecordingConfirms()
    deliveries: list[Delivery] = []
    channel = FakeChannel(TAPPED)
    demux.attach(channel, confirms=confirms)  # type: ignore[arg-type]
    demux.attach(channel, on_delivery=collect(deliveries))  # type: ignore[arg-type]
    frames = await read_all(demux)
    assert confirms.calls == [
        ("ack", 3, True),
        ("return", 312, "NO_ROUTE", "m-1"),
        ("ack", 4, False),
        ("nack", 5, False),
    ]
    assert [d.body for d in deliveries] == [b"work"]
    passed = [(n, type(v).__name__) for n, v in frames if not isinstance(v, Heartbeat)]
    assert passed == [(OTHER, "Ack")]


async def test_without_a_confirms_sink_confirms_and_returns_reach_aiormq() -> None:
    returned = Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key="q")
    data = frame.marshal(Basic.Ack(delivery_tag=1), TAPPED) + content(TAPPED, returned, b"x")
    demux = FrameDemux(Pieces(data, 3), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
    demux.attach(FakeChannel(TAPPED), on_delivery=lambda *fields: None)  # type: ignore[arg-type]
    frames = await read_all(demux)
    assert [type(v).__name__ for _, v in frames] == [
        "Ack",
        "Return",
        "ContentHeader",
        "ContentBody",
    ]


async def test_tap_looks_a_channel_up_without_attaching_it() -> None:
    demux = FrameDemux(Pieces(b"", 1), alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
    channel = FakeChannel(TAPPED)
    assert demux.tap(channel) is None  # type: ignore[arg-type]
    assert demux.tap(channel) is None  # type: ignore[arg-type]  # still not attached
    tap = demux.attach(channel)  # type: ignore[arg-type]
    assert demux.tap(channel) is tap  # type: ignore[arg-type]
    assert demux.tap(FakeChannel(TAPPED)) is None  # type: ignore[arg-type]  # same number, other
    channel.closing.set_result(None)
    await asyncio.sleep(0)  # the closing callbacks run
    assert demux.tap(channel) is None and not tap.open  # type: ignore[arg-type]


async def test_a_delivery_frame_longer_than_its_fields_is_read_and_the_next_taken() -> None:
    """A `Basic.Deliver` whose payload runs past its routing key (no broker writes one) is no
    layout for the deliveries after it: they are read as each would be alone, and no unpack
    reads past the read's end."""
    method = frame.marshal(run_of(1), TAPPED)
    size = int.from_bytes(method[3:7], "big")
    padded = method[:3] + (size + 5).to_bytes(4, "big") + method[7:-1] + b"\0" * 5 + method[-1:]
    first = padded + whole(TAPPED, run_of(1), b"x")[len(method) :]
    data = first + b"".join(whole(TAPPED, run_of(tag), b"y") for tag in (2, 3, 4))
    for cut in range(len(first), len(data) + 1):  # the first read ends anywhere after it
        reader = Pieces.of(data[:cut], data[cut:]) if cut < len(data) else Pieces.of(data)
        demux = FrameDemux(reader, alive_frame=ALIVE_FRAME)  # type: ignore[arg-type]
        deliveries: list[Delivery] = []
        demux.attach(FakeChannel(TAPPED), on_delivery=collect(deliveries))  # type: ignore[arg-type]
        frames = await read_all(demux)
        assert [(d.delivery_tag, d.body) for d in deliveries] == [
            (1, b"x"), (2, b"y"), (3, b"y"), (4, b"y"),
        ]  # fmt: skip
        assert not [v for _, v in frames if not isinstance(v, Heartbeat)]
