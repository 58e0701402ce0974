"""Large bodies: what a publish holds besides the body itself (#22).

A 16 MiB body on the fast path was handed to the transport whole: asyncio's selector transport
(3.11) copies into its own buffer whatever the socket does not take at once, so most of the body
was held twice until the socket had sent it. The writer now hands a large body to the transport
one frame at a time while the transport's buffer is under its high-water mark, and the rest once
it drains: the copy is at most a frame or two.
"""

from __future__ import annotations

import asyncio
import ssl
import tracemalloc

import aiormq
import pytest
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.commands import Basic

from aio_workq import Connection, MessageTooLargeError, Producer, Queue, SerializationError
from aio_workq._wire.frames import Chunked, Properties, ack_frame, encode_properties, publish_write
from aio_workq._wire.writer import FrameWriter
from aio_workq.testing import LocalBroker
from scripts.tls import PKI

MiB = 2**20
SIZE = 16 * MiB
SLACK = MiB // 2  # the frames' headers, asyncio's and the library's own objects


async def bodies_in(url: str, queue: str) -> list[bytes]:
    """The bodies in `queue`, taken off it in order."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        bodies: list[bytes] = []
        while True:
            message = await channel.basic_get(queue, no_ack=True)
            if message.delivery_tag is None:  # Basic.GetEmpty
                return bodies
            bodies.append(message.body)
    finally:
        await connection.close()


@pytest.mark.broker
@pytest.mark.timeout(120)
async def test_publishing_a_16_mib_body_holds_little_more_than_the_body(
    local_broker: LocalBroker, queue_name: str
) -> None:
    template = bytearray(range(256)) * (SIZE // 256)
    queue = Queue(queue_name, type="classic")
    async with Connection(local_broker.url, fast_path=True) as connection:
        async with Producer(connection=connection, timeout=60) as producer:
            await producer.declare(queue)
            await producer.publish(b"warm-up", queue)  # the channel and its caches exist
            tracemalloc.start()
            try:
                body = bytes(template)  # the application's body, counted in the peak
                async with asyncio.timeout(60):
                    await producer.publish(body, queue)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    assert peak <= 1.2 * SIZE + SLACK, f"publishing held {peak / SIZE:.2f} bodies"
    bodies = await bodies_in(local_broker.url, queue_name)
    assert bodies[0] == b"warm-up"
    assert bodies[1] == template  # framed from views of the body: the same bytes arrive


@pytest.mark.broker
@pytest.mark.timeout(120)
async def test_a_16_mib_body_over_tls_arrives_whole_and_is_held_once(
    tls_broker: LocalBroker, tls_pki: PKI, queue_name: str
) -> None:
    context = ssl.create_default_context(cafile=str(tls_pki.ca_cert))
    template = bytearray(range(256)) * (SIZE // 256)
    connection = Connection(tls_broker.tls_url, ssl_context=context, fast_path=True)
    async with connection, Producer(connection=connection, timeout=60) as producer:
        await producer.declare(Queue(queue_name, type="classic"))
        await producer.publish(b"warm-up", queue_name)
        tracemalloc.start()
        try:
            body = bytes(template)
            async with asyncio.timeout(60):
                await producer.publish(body, queue_name)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak <= 1.2 * SIZE + SLACK, f"publishing held {peak / SIZE:.2f} bodies"
    assert (await bodies_in(tls_broker.url, queue_name))[1] == template


@pytest.mark.broker
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "plain"])
async def test_a_bytearray_changed_after_send_arrives_as_it_was_sent(
    local_broker: LocalBroker, queue_name: str, fast_path: bool
) -> None:
    body = bytearray(b"a" * (4 * MiB))
    queue = Queue(queue_name, type="classic")
    async with Connection(local_broker.url, fast_path=fast_path) as connection:
        async with Producer(connection=connection, timeout=60) as producer:
            await producer.declare(queue)
            confirm = await producer.send(body, queue)
            body[:] = b"b" * len(body)  # before its frames have left (the confirm is pending)
            async with asyncio.timeout(60):
                await confirm
    assert await bodies_in(local_broker.url, queue_name) == [b"a" * (4 * MiB)]


@pytest.mark.broker
@pytest.mark.timeout(240)
async def test_a_producer_closed_while_a_large_body_is_half_written_keeps_the_connection(
    local_broker: LocalBroker, queue_name: str
) -> None:
    """The producer's channel is closed while the broker reads nothing and only part of a
    large body has left: the rest goes before the `Channel.Close`, which would otherwise come
    between the message's frames and make the broker close the whole connection."""
    size = 64 * MiB  # past both kernel socket buffers (the node's may grow to 32 MiB)
    queue = Queue(queue_name, type="classic")
    async with Connection(local_broker.url, fast_path=True) as connection:
        wire = (await connection.link()).wire
        assert wire is not None
        async with Producer(connection=connection, timeout=60) as other:
            await other.declare(queue)
            await other.publish(b"before", queue)
            producer = Producer(connection=connection, timeout=60)
            await producer.start()
            await producer.declare(queue)
            local_broker.pause()  # SIGSTOP: the node reads nothing, the kernel's buffers fill
            try:
                confirm = await producer.send(bytes(size), queue)
                async with asyncio.timeout(60):  # until the writer holds the rest of the body
                    while not (wire.writer.buffered and wire.writer.socket_buffered):  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                await producer.close(timeout=0.1)  # its channel's close waits, then closes
            finally:
                local_broker.resume()
            with pytest.raises(Exception, match="may or may not have reached the queue"):
                await confirm
            async with asyncio.timeout(60):
                await other.publish(b"after", queue)
        assert (await connection.link()).wire is wire  # the same connection all along
    bodies = await bodies_in(local_broker.url, queue_name)
    small = [body for body in bodies if len(body) < size]
    assert small == [b"before", b"after"]
    # Two channels: their messages reach the queue in any order. The large one was confirmed
    # by nobody (its channel closed first) but was written whole: it may have arrived.
    assert all(body == bytes(size) for body in bodies if len(body) >= size)
    assert len(bodies) in (2, 3)


# --- the writer, offline ---

FRAME_MAX = 131072
LOW, HIGH = 16384, 65536  # asyncio's default write buffer limits


class Transport:
    def __init__(self) -> None:
        self.size = 0
        self.most = 0  # the most it held

    def get_write_buffer_size(self) -> int:
        return self.size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return LOW, HIGH


class Stream:
    """A StreamWriter whose transport keeps all that is written until drained (the socket
    takes nothing at once), as asyncio's copies what the socket does not take."""

    def __init__(self) -> None:
        self.transport = Transport()
        self.written: list[bytes] = []
        self.drained = asyncio.Event()

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes | memoryview) -> None:
        self.written.append(bytes(data))
        self.transport.size += len(data)
        self.transport.most = max(self.transport.most, self.transport.size)

    async def drain(self) -> None:
        await self.drained.wait()
        self.drained.clear()
        self.transport.size = 0


class Gate:
    def __init__(self) -> None:
        self.open = True


def frames_of(data: bytes) -> list[tuple[int, object]]:
    """`data` as whole frames (channel, value); fails on a partial frame."""
    out: list[tuple[int, object]] = []
    while data:
        size, channel, value = pamqp_frame.unmarshal(data)
        data = data[size:]
        out.append((channel, value))
    return out


def large(channel: int, size: int) -> tuple[bytes, Chunked]:
    body = bytes(range(256)) * (size // 256)
    frames = publish_write(
        channel, "", "q", True, encode_properties(Properties(message_id="m")), body, FRAME_MAX
    )
    assert isinstance(frames, Chunked)
    return body, frames


async def drain(writer: FrameWriter, stream: Stream) -> None:
    """Let the fake transport drain until the writer holds nothing more."""
    async with asyncio.timeout(5):
        while writer.buffered:
            stream.drained.set()
            await asyncio.sleep(0)


async def test_a_large_body_goes_to_the_transport_a_frame_at_a_time_as_it_drains() -> None:
    stream = Stream()
    writer = FrameWriter(stream)  # type: ignore[arg-type]
    gate, other = Gate(), Gate()
    body, frames = large(1, 2 * 2**20)
    writer.write(gate, frames)
    writer.write(other, ack_frame(2, 1, False))  # after the body: it waits for all of it
    writer.flush()
    assert stream.transport.size <= HIGH + FRAME_MAX  # not the whole body (was 2 MiB)
    written = frames_of(b"".join(stream.written))  # stopped between two frames
    assert all(channel == 1 for channel, _ in written)
    assert writer.buffered == 2
    await drain(writer, stream)
    assert stream.transport.most <= HIGH + FRAME_MAX
    written = frames_of(b"".join(stream.written))
    assert isinstance(written[0][1], Basic.Publish)
    parts = [value for _, value in written if isinstance(value, ContentBody)]
    assert b"".join(part.value for part in parts) == body
    assert len(parts) == -(-len(body) // (FRAME_MAX - 8))
    channel, ack = written[-1]
    assert channel == 2 and isinstance(ack, Basic.Ack) and ack.delivery_tag == 1


async def test_a_body_whose_channel_the_broker_closes_midway_stops_at_a_frame_boundary() -> None:
    stream = Stream()
    writer = FrameWriter(stream)  # type: ignore[arg-type]
    gate, other = Gate(), Gate()
    _, frames = large(1, 2 * 2**20)
    writer.write(gate, frames)
    writer.write(other, ack_frame(2, 1, False))
    writer.flush()
    before = len(frames_of(b"".join(stream.written)))
    gate.open = False  # the broker's Channel.Close: it drops the rest, none may follow Close-Ok
    await drain(writer, stream)
    written = frames_of(b"".join(stream.written))
    assert len(written) == before + 1
    channel, ack = written[-1]
    assert channel == 2 and isinstance(ack, Basic.Ack) and ack.delivery_tag == 1


async def test_complete_hands_over_the_rest_of_a_body_before_its_channel_is_closed() -> None:
    stream = Stream()
    writer = FrameWriter(stream)  # type: ignore[arg-type]
    gate, other = Gate(), Gate()
    body, frames = large(1, 2 * 2**20)
    writer.write(gate, frames)
    writer.write(gate, ack_frame(1, 7, False))
    writer.flush()
    writer.complete(other)  # not its channel: nothing changes
    assert writer.buffered == 2
    writer.complete(gate)  # the transport is full, but the message must not be cut
    gate.open = False  # then closed: what was buffered after the body is dropped
    assert writer.buffered == 1
    written = frames_of(b"".join(stream.written))
    parts = [value for _, value in written if isinstance(value, ContentBody)]
    assert b"".join(part.value for part in parts) == body
    await drain(writer, stream)
    assert len(frames_of(b"".join(stream.written))) == len(written)


@pytest.mark.broker
async def test_a_body_over_the_brokers_max_message_size_is_a_serialization_error(
    small_messages: int, amqp_url: str, queue_name: str
) -> None:
    """A broker whose `max_message_size` is under the body: RabbitMQ closes the channel (406
    PRECONDITION_FAILED). The publish was a `ConnectionLostError` saying nothing of the size;
    it is a `SerializationError` naming the size, the limit and the fix, the messages in
    flight beside it keep their outcome (each confirmed), and the producer, having
    learned the limit, refuses the next large body before sending it."""
    big = b"x" * (small_messages + 1)
    async with Producer(amqp_url) as producer:
        await producer.declare(queue_name)
        small = [await producer.send(f"m{i}".encode(), queue_name) for i in range(50)]
        refusal = await producer.send(big, queue_name)
        behind = [await producer.send(f"k{i}".encode(), queue_name) for i in range(50)]
        with pytest.raises(MessageTooLargeError) as refused:
            await refusal
        assert (refused.value.size, refused.value.limit) == (len(big), small_messages)
        text = str(refused.value)
        assert f"{len(big):,} bytes" in text and f"{small_messages:,}" in text, text
        assert "max_message_size" in text and "reference" in text, text
        after = [await producer.send(f"n{i}".encode(), queue_name) for i in range(50)]
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(*small, *behind, *after, return_exceptions=True)
        assert [o for o in outcomes if isinstance(o, BaseException)] == []
        started = asyncio.get_running_loop().time()
        with pytest.raises(MessageTooLargeError, match="max_message_size") as known:
            await producer.publish(big, queue_name)  # known now: refused before it is sent
        assert isinstance(known.value, SerializationError)
        assert (known.value.size, known.value.limit) == (len(big), small_messages)
        assert asyncio.get_running_loop().time() - started < 0.05
        await producer.publish(b"last", queue_name)
    bodies = await bodies_in(amqp_url, queue_name)
    before = {f"m{i}".encode() for i in range(50)}
    after_ = [f"{c}{i}".encode() for c in "kn" for i in range(50)]
    assert set(bodies) == {*before, *after_, b"last"}  # none lost
    # The ones written before it were read by the broker, their confirms lost with the
    # channel: resent (at-least-once, the same message id), a copy at most; those sent after
    # it went once (the ones written behind it, dropped unread by the broker, resent: no copy).
    assert sorted(b for b in bodies if b not in before) == sorted([*after_, b"last"])
    assert all(bodies.count(b) <= 2 for b in before)
