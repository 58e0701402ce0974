"""Publish outcomes on a real broker, the fast and the plain path side by side (issue #20).

Each test takes `path`: a `Producer` on an aio-workq `Connection` with the fast path (own
frames, demux) and one with `fast_path=False` (aiormq's public API for every frame, as with
`AIO_WORKQ_FAST_PATH=0`), so one run of the file covers both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

import aio_workq
from aio_workq import (
    ConfigurationError,
    Connection,
    ConnectionLostError,
    Hook,
    Producer,
    PublishNackedError,
    PublishTimeoutError,
    Queue,
    SerializationError,
    UnroutableError,
)
from aio_workq._publish import channels
from tests.faultproxy import FaultProxy
from tests.helpers import header_room, negotiated_frame_max, queue_depth

pytestmark = pytest.mark.broker


class Losses(Hook):
    def __init__(self) -> None:
        self.lost: list[str] = []

    def on_connection_lost(self, url: str) -> None:
        self.lost.append(url)


@dataclass
class Path:
    name: str
    connection: Connection
    producer: Producer
    losses: Losses

    def assert_never_lost(self) -> None:
        assert self.losses.lost == [] and self.connection.reconnects == 0
        assert self.producer.connected


@pytest.fixture(params=["fast", "plain"])
async def path(request: pytest.FixtureRequest, amqp_url: str) -> AsyncIterator[Path]:
    losses = Losses()
    connection = Connection(
        amqp_url, fast_path=request.param == "fast", hooks=[losses], name=request.node.nodeid
    )
    await connection.open()
    try:
        async with Producer(connection=connection, timeout=20) as producer:
            yield Path(request.param, connection, producer, losses)
    finally:
        await connection.close()


@dataclass
class Proxied:
    fast: bool
    proxy: FaultProxy
    connection: Connection


@pytest.fixture(params=["fast", "plain"])
async def proxied(request: pytest.FixtureRequest, amqp_url: str) -> AsyncIterator[Proxied]:
    """An open `Connection`, fast path or plain, through a `FaultProxy` to the broker."""
    fast = request.param == "fast"
    async with FaultProxy.to(amqp_url) as proxy:
        connection = Connection(proxy.url(amqp_url), fast_path=fast, name=request.node.nodeid)
        await connection.open()
        try:
            yield Proxied(fast, proxy, connection)
        finally:
            await connection.close()


async def outcome(confirm: asyncio.Future[str]) -> str:
    try:
        await confirm
    except PublishNackedError:
        return "nacked"
    except UnroutableError:
        return "unroutable"
    except PublishTimeoutError:
        return "timeout"
    return "confirmed"


# --- finding 1: a content header larger than frame_max ----------------------------------------


async def test_a_header_table_over_frame_max_is_refused_and_nothing_else_changes(
    path: Path, queue_name: str, amqp_url: str
) -> None:
    producer = path.producer
    await producer.declare(queue_name)
    frame_max = await negotiated_frame_max(amqp_url)
    confirms = [await producer.send(f"before {n}", queue=queue_name) for n in range(3)]
    async with asyncio.timeout(1):  # at once: nothing waits for the broker
        with pytest.raises(SerializationError, match=r"headers.*'big'.*frame_max") as info:
            await producer.send("big", queue=queue_name, headers={"big": "x" * 200_000})
    assert f"{frame_max:,}" in str(info.value)
    confirms += [await producer.send(f"after {n}", queue=queue_name) for n in range(3)]
    # The largest header that fits is sent and confirmed: the limit is the broker's.
    room = header_room(frame_max, "edge")
    confirms.append(
        await producer.send(b"edge", queue=queue_name, message_id="edge", headers={"h": "x" * room})
    )
    with pytest.raises(SerializationError, match="frame_max"):
        await producer.send(b"edge", queue=queue_name, headers={"h": "x" * (room + 1)})
    assert [await outcome(c) for c in confirms] == ["confirmed"] * 7
    path.assert_never_lost()


# --- the outcome matrix: every outcome on both paths, each message its own ---------------------

NOWHERE = {"exchange": "amq.direct", "routing_key": "no-queue-is-bound-to-this-key"}


@pytest.mark.parametrize(
    "case",
    [
        "confirmed",
        "nacked",
        "returned",
        "returned, then a routable one with its id",
        "routable, then a returned one with its id",
        "timeout",
    ],
)
async def test_every_outcome_is_the_messages_own(
    path: Path, case: str, queue_name: str, amqp_url: str, request: pytest.FixtureRequest
) -> None:
    producer = path.producer
    await producer.declare(queue_name)
    sent: list[tuple[str, asyncio.Future[str]]] = []  # (expected outcome, confirm)

    async def send(expected: str, body: str, **options: object) -> None:
        if "exchange" not in options:
            options.setdefault("queue", queue_name)
        sent.append((expected, await producer.send(body, **options)))  # type: ignore[arg-type]

    for n in range(5):
        await send("confirmed", f"before {n}")
    if case == "confirmed":
        await send("confirmed", "it")
    elif case == "nacked":
        # A full queue nacks; the acks of the 20 after it may come as one multiple ack.
        full = Queue(
            f"{queue_name}-full",
            type="classic",
            arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
        )
        await producer.publish("fills it", queue=full)
        await send("nacked", "it", queue=full)
        await send("nacked", "it again", queue=full)
    elif case == "returned":
        await send("unroutable", "it", **NOWHERE)
    elif case == "returned, then a routable one with its id":
        await send("unroutable", "returned", message_id="same", **NOWHERE)
        await send("confirmed", "routable", message_id="same", mandatory=False)
    elif case == "routable, then a returned one with its id":
        await send("confirmed", "routable", message_id="same", mandatory=False)
        await send("unroutable", "returned", message_id="same", **NOWHERE)
    else:
        broker = request.getfixturevalue("local_broker")
        broker.ctl("set_vm_memory_high_watermark", "0")  # the broker blocks publishers
        try:
            await send("timeout", "it", timeout=2)
            async with asyncio.timeout(30):  # a hang guard: its 2 s timeout fails it first
                assert await outcome(sent[-1][1]) == "timeout"
        finally:
            broker.ctl("set_vm_memory_high_watermark", "0.4")
    for n in range(20):
        await send("confirmed", f"after {n}")
    async with asyncio.timeout(60):
        outcomes = [await outcome(confirm) for _, confirm in sent]
    assert outcomes == [expected for expected, _ in sent], str(outcomes)
    depth = await queue_depth(amqp_url, queue_name)
    routed = sum(1 for expected, _ in sent if expected == "confirmed")
    assert depth == routed or (case == "timeout" and depth == routed + 1)  # "may or may not"
    path.assert_never_lost()


# --- #20 side road 3: float headers arrive exactly as sent ------------------------------------


async def test_a_float_header_arrives_exactly_as_sent(path: Path, queue_name: str) -> None:
    # 16777217.0 is the first integer a 32-bit float can't hold: sent as one, it would arrive
    # as 16777216.0, silently. Nested tables and arrays too.
    headers = {
        "f": 16777217.0,
        "third": 1 / 3,
        "big": 1e300,
        "nested": {"g": 0.1, "list": [2.5e-310, -0.0, 16777217.0]},
    }
    got: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()

    async def handle(job: aio_workq.Job) -> None:
        if not got.done():
            got.set_result(dict(job.headers))

    await path.producer.publish("x", queue=queue_name, headers=headers)
    async with aio_workq.Worker(connection=path.connection, queue=queue_name, handler=handle):
        async with asyncio.timeout(30):
            received = await got
    assert received == headers
    nested = received["nested"]
    assert isinstance(nested, dict)
    assert repr(nested["list"]) == "[2.5e-310, -0.0, 16777217.0]"  # -0.0 and subnormals too
    path.assert_never_lost()


# --- a message that was never sent says so -----------------------------------------------------


async def test_a_timed_out_message_that_was_never_sent_says_it_did_not_reach_the_queue(
    proxied: Proxied, queue_name: str
) -> None:
    # Behind a black hole nothing is confirmed. The mandatory publish goes out; on the plain
    # path the second one, with the same message id, waits in the lane for the first one's
    # outcome (aiormq matches a return by id), so it never reaches aiormq: its timeout must not
    # say that it may have reached the queue. On the fast path both are written at once.
    async with Producer(connection=proxied.connection, timeout=20) as producer:
        await producer.publish("declare", queue=queue_name)
        proxied.proxy.black_hole()
        first = await producer.send("a", queue=queue_name, message_id="same", timeout=1)
        second = await producer.send(
            "b", queue=queue_name, message_id="same", mandatory=False, timeout=1
        )
        with pytest.raises(PublishTimeoutError, match="may or may not have reached"):
            await first
        with pytest.raises(PublishTimeoutError) as timed_out:
            await second
        proxied.proxy.heal()
    if proxied.fast:
        assert "may or may not have reached the queue" in str(timed_out.value)
    else:
        assert "did not reach the queue" in str(timed_out.value)
        assert "may or may not" not in str(timed_out.value)


# --- sideroads4: values the broker refuses are refused before they are sent --------------------

BROKER_REFUSES = {
    # RabbitMQ closes the whole connection (541 INTERNAL_ERROR) on a non-finite double in a
    # header table; re-sent after the reconnect, it closed it again until its timeout.
    "a NaN header": {"headers": {"ok": 1, "score": float("nan")}},
    "an infinite header in a list": {"headers": {"scores": [1.0, float("inf")]}},
    "a -inf header in a nested table": {"headers": {"t": {"low": float("-inf")}}},
    # A raw ValueError / OverflowError from the conversion to milliseconds.
    "a NaN expiration": {"expiration": float("nan")},
    "an infinite expiration": {"expiration": float("inf")},
    # Over RabbitMQ's limit (10 years): the broker closes the channel (406 PRECONDITION_FAILED).
    "an expiration over 10 years": {"expiration": 315_360_000.001},
}


@pytest.mark.parametrize("case", list(BROKER_REFUSES))
async def test_a_value_the_broker_refuses_is_a_serialization_error_and_nothing_else_changes(
    path: Path, case: str, queue_name: str
) -> None:
    producer = path.producer
    await producer.declare(queue_name)
    confirms = [await producer.send(f"before {n}", queue=queue_name) for n in range(3)]
    async with asyncio.timeout(1):  # at once: nothing waits for the broker
        with pytest.raises(SerializationError) as info:
            await producer.send("bad", queue=queue_name, **BROKER_REFUSES[case])  # type: ignore[arg-type]
    what = "header" if "header" in case else "expiration"
    assert what in str(info.value)
    confirms += [await producer.send(f"after {n}", queue=queue_name) for n in range(3)]
    async with asyncio.timeout(30):
        assert [await outcome(c) for c in confirms] == ["confirmed"] * 6
    path.assert_never_lost()
    assert await producer.publish("the limit", queue=queue_name, expiration=315_360_000)


async def test_a_queue_that_is_not_a_name_is_a_configuration_error(path: Path) -> None:
    for queue in (5, b"tasks", ["tasks"]):
        with pytest.raises(ConfigurationError, match="queue name must be a str"):
            await path.producer.send("x", queue=queue)  # type: ignore[arg-type]
    path.assert_never_lost()


# --- roads5: a nack of a quorum queue declared a moment before, sent again ---------------------


def _full(name: str) -> Queue:
    """A quorum queue that nacks every publish once full (a new one: its nacks are sent again,
    as the nacks of a queue still starting are)."""
    return Queue(name, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})


async def _fill(producer: Producer, queue: Queue) -> None:
    for n in range(3):  # a quorum queue takes one past its length (it checks as it applies)
        try:
            await producer.publish(n, queue)
        except PublishNackedError:
            return
    raise AssertionError(f"{queue.name} never nacked")


def assert_refused(error: PublishNackedError, why: str) -> None:
    """`error` says that each try was nacked, why there is no next one, and nothing "maybe"."""
    text = str(error)
    assert "nacked by the broker on each of its" in text, text
    assert f"not sent again {why}" in text, text
    assert "may or may not" not in text, text


async def _resting(
    producer: Producer, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> asyncio.Future[str]:
    """A message nacked by a new full quorum queue, waiting (at 0.4 s) for its next try.

    Its first next try comes 2 s after its nack (0.05 s by default), so that a test acting
    while the message waits is not raced by that try on a loaded machine (CI once saw the try
    in flight at the cut, and `ConnectionLostError`, rightly, for a message on the wire). The
    queue is filled first at the usual pace: the queue's 5 s of "starting" must still cover
    the message's tries."""
    queue = _full(queue_name)
    await _fill(producer, queue)
    monkeypatch.setattr(channels, "NACK_BACKOFF", 2.0)
    confirm = await producer.send("waits", queue)
    # Nacked within milliseconds: at 0.4 s it is still unsettled, waiting for its next try.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(confirm), 0.4)
    return confirm


async def test_a_nacked_message_waiting_to_be_sent_again_fails_with_its_channel_without_resend(
    proxied: Proxied, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`on_reconnect="fail"` (and a worker's publisher, whose delivery is redelivered instead):
    the connection drops while a nacked message waits to be sent again. It must fail at once
    like every other unconfirmed message of that connection; before, it was sent on the next
    connection (a worker's copy next to its redelivered original)."""
    async with Producer(connection=proxied.connection, timeout=20, on_reconnect="fail") as p:
        confirm = await _resting(p, queue_name, monkeypatch)
        proxied.proxy.cut()
        async with asyncio.timeout(1):  # at once: not after the next connection
            # leftovers2: refused, not "maybe" (it was ConnectionLostError, which said it may
            # have reached the queue): the broker nacked every try
            with pytest.raises(PublishNackedError) as info:
                await confirm
        assert_refused(info.value, "before the channel closed")


async def test_a_nacked_message_waiting_to_be_sent_again_fails_with_a_channel_the_broker_closed(
    path: Path, queue_name: str, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """leftovers2: the broker closes the channel for an error (a 403, a publish to an internal
    exchange) while a nacked message waits for its next try. The messages on the channel fail
    (any may be the cause; the next channel would close again), and so does the waiting one:
    nacked on that channel, it shares its fate, as it does after a lost connection. Before, it
    was sent again on the next channel while the others failed. It was refused every time, so
    its error says so (`PublishNackedError`), never "may or may not have reached the queue"."""
    internal = f"{queue_name}-internal"
    async with await aio_workq.connect(amqp_url) as admin:
        channel = await admin.channel()
        await channel.exchange_declare(internal, exchange_type="direct", internal=True)
        try:
            confirm = await _resting(path.producer, queue_name, monkeypatch)
            culprit = await path.producer.send("x", exchange=internal, routing_key="k")
            async with asyncio.timeout(1):  # at once: before its next try (2 s)
                with pytest.raises(PublishNackedError) as info:
                    await confirm
            assert_refused(info.value, "before the channel closed")
            assert "ACCESS_REFUSED" in str(info.value) or "403" in str(info.value)
            with pytest.raises(ConnectionLostError, match="may or may not"):
                await culprit
        finally:
            await channel.exchange_delete(internal)
    # The next channel takes messages as before.
    assert await path.producer.publish("after", queue=f"{queue_name}-after")


async def test_a_nacked_message_waiting_to_be_sent_again_fails_at_close_as_refused(
    path: Path, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """leftovers2: `close()` ends the tries of a message every one of whose tries was nacked.
    It said "not confirmed before close; it may or may not have reached the queue"
    (`ConnectionLostError`); the broker refused it each time: `PublishNackedError`."""
    producer = Producer(connection=path.connection, timeout=20)
    await producer.start()
    confirm = await _resting(producer, queue_name, monkeypatch)
    await producer.close(timeout=0)
    async with asyncio.timeout(1):
        with pytest.raises(PublishNackedError) as info:
            await confirm
    assert_refused(info.value, "before close")
