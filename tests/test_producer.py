"""Producer against a real broker: confirms, returns, nacks, timeouts, bad input."""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from aio_workq import (
    AuthenticationError,
    BrokerConnectionError,
    ConfigurationError,
    ConnectionLostError,
    Exchange,
    IntegrationError,
    Job,
    Producer,
    PublishNackedError,
    PublishTimeoutError,
    Queue,
    SerializationError,
    TopologyError,
    UnroutableError,
    Worker,
    WorkqError,
)
from scripts.broker import LocalBroker, free_port
from tests.helpers import Counter, queue_depth, wait_until

pytestmark = pytest.mark.broker


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_publish_and_consume_bytes_text_and_json(
    producer: Producer,
    make_worker: Callable[..., Worker],
    queue_name: str,
    counter: Counter,
) -> None:
    for body in (b"\x00raw", "héllo", {"n": 1, "tags": ["a"]}):
        await producer.publish(body, queue=queue_name, headers={"k": "v"})

    async def handler(job: Job) -> None:
        assert job.message.message_id == job.message_id  # the aio-pika message, read-only
        counter.add((job.data, job.content_type, dict(job.headers), job.redelivered, job.attempt))

    await make_worker(queue=queue_name, handler=handler).start()
    received = await counter.wait_for(3)
    assert received == [
        (b"\x00raw", None, {"k": "v"}, False, 1),
        ("héllo", "text/plain; charset=utf-8", {"k": "v"}, False, 1),
        ({"n": 1, "tags": ["a"]}, "application/json", {"k": "v"}, False, 1),
    ]


async def test_messages_are_persistent_in_a_durable_quorum_queue(
    producer: Producer, local_broker: LocalBroker, queue_name: str, amqp_url: str
) -> None:
    await producer.publish("x", queue=queue_name)
    [info] = [q for q in local_broker.queues() if q["name"] == queue_name]
    assert dict_from_props(info["arguments"])["x-queue-type"] == "quorum"
    assert await queue_depth(amqp_url, queue_name) == 1


async def test_unroutable_publish_raises_and_producer_stays_usable(
    producer: Producer, queue_name: str, amqp_url: str
) -> None:
    with pytest.raises(UnroutableError, match="unroutable") as info:
        await producer.publish("lost?", exchange="amq.direct", routing_key="nobody-home")
    assert info.value.routing_key == "nobody-home"
    assert info.value.message_id
    await producer.publish("fine", queue=queue_name)
    assert await queue_depth(amqp_url, queue_name) == 1


async def test_unserialisable_body_raises_before_sending(
    producer: Producer, queue_name: str, amqp_url: str
) -> None:
    await producer.declare(queue_name)
    with pytest.raises(SerializationError, match="object"):
        await producer.publish({"when": object()}, queue=queue_name)
    await producer.publish({"ok": True}, queue=queue_name)
    assert await queue_depth(amqp_url, queue_name) == 1


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), True], ids=repr)
async def test_a_publish_timeout_that_bounds_nothing_is_refused(
    producer: Producer, queue_name: str, amqp_url: str, timeout: float
) -> None:
    # A NaN (or infinite) timeout never fired: a publish to a broker that blocks publishers
    # waited forever; True was taken as 1 s.
    await producer.declare(queue_name)
    for publish in (
        lambda: producer.publish("x", queue=queue_name, timeout=timeout),
        lambda: producer.send("x", queue=queue_name, timeout=timeout),
        lambda: producer.publish_many(["x", "y"], queue=queue_name, timeout=timeout),
    ):
        with pytest.raises(ConfigurationError, match=r"timeout must be > 0 seconds.*finite"):
            await publish()
    await producer.publish({"ok": True}, queue=queue_name)
    assert await queue_depth(amqp_url, queue_name) == 1


@pytest.mark.parametrize(
    ("option", "value"), [("persistent", "no"), ("mandatory", "no"), ("persistent", 0)], ids=repr
)
async def test_a_publish_flag_that_is_not_a_bool_is_refused(
    producer: Producer, queue_name: str, amqp_url: str, option: str, value: object
) -> None:
    # `persistent="no"` was taken as True (a persistent message), `mandatory="no"` too.
    await producer.declare(queue_name)
    options: dict[str, Any] = {option: value}
    for publish in (
        lambda: producer.publish("x", queue=queue_name, **options),
        lambda: producer.send("x", queue=queue_name, **options),
        lambda: producer.publish_many(["x", "y"], queue=queue_name, **options),
    ):
        with pytest.raises(ConfigurationError) as info:
            await publish()
        assert f"{option}=" in str(info.value)
        assert repr(value) in str(info.value)
    assert await queue_depth(amqp_url, queue_name) == 0
    await producer.publish("x", queue=queue_name, persistent=False, mandatory=False)
    assert await queue_depth(amqp_url, queue_name) == 1


async def test_queue_with_other_arguments_is_a_topology_error_and_nothing_is_deleted(
    amqp_url: str, queue_name: str
) -> None:
    async with Producer(amqp_url, queue_type="classic") as classic:
        await classic.publish("keep me", queue=queue_name)
    async with Producer(amqp_url) as quorum:
        with pytest.raises(TopologyError) as info:
            await quorum.publish("x", queue=queue_name)
        text = str(info.value)
        assert queue_name in text
        assert "x-queue-type" in text or "x-overflow" in text or "x-dead-letter" in text
        assert "delete_queue" in text  # says how to migrate
        # the producer is still usable for other queues
        await quorum.publish("y", queue=queue_name + "-other")
    assert await queue_depth(amqp_url, queue_name) == 1


async def test_missing_exchange_is_a_topology_error(producer: Producer, queue_name: str) -> None:
    with pytest.raises(TopologyError, match="does not exist"):
        await producer.publish("x", exchange="no-such-exchange", routing_key="k")
    await producer.publish("still works", queue=queue_name)


async def test_declared_exchange_routes_by_key(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    exchange = Exchange(f"{queue_name}-x", "direct")

    async def handler(job: Job) -> None:
        counter.add(job.data)

    await make_worker(
        queue=queue_name, handler=handler, exchange=exchange, binding_keys=["k"]
    ).start()
    await producer.publish("routed", exchange=exchange, routing_key="k")
    assert await counter.wait_for(1) == ["routed"]


async def test_wrong_password_is_an_authentication_error_fast_and_secret(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = with_password(amqp_url, "s3cret-pw")
    with pytest.raises(AuthenticationError) as info:  # at once: a timeout would not be this
        async with Producer(url, connect_timeout=10):
            pass
    assert "credentials" in str(info.value) or "password" in str(info.value)
    assert_secret_absent("s3cret-pw", info.value, caplog)


async def test_unreachable_port_is_a_connection_error_within_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"amqp://guest:p4ssw0rd-x@127.0.0.1:{free_port()}/"
    with pytest.raises(BrokerConnectionError) as info:
        async with asyncio.timeout(30), Producer(url, connect_timeout=3):  # a hang guard only
            pass
    assert "127.0.0.1" in str(info.value)
    assert_secret_absent("p4ssw0rd-x", info.value, caplog)


def assert_secret_absent(
    secret: str, error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    assert secret not in "".join(traceback.format_exception(error))
    assert secret not in repr(error)
    for record in caplog.records:
        assert secret not in record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            assert secret not in "".join(traceback.format_exception(record.exc_info[1]))


# --- pipelined confirms (issue 4) -----------------------------------------------------------


async def test_ten_thousand_pipelined_messages_all_confirmed_and_consumed(
    amqp_url: str, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    async with Producer(amqp_url, window=500) as producer:
        ids = await producer.publish_many((json.dumps(i) for i in range(10_000)), queue_name)
        assert producer.in_flight == 0
    assert len(set(ids)) == 10_000

    async def handler(job: Job) -> None:
        counter.add(job.message_id)

    await make_worker(queue=queue_name, handler=handler, concurrency=50).start()
    received = await counter.wait_for(10_000, timeout=120)  # a hang guard, not a speed bound
    assert sorted(received) == sorted(ids)


async def test_one_unroutable_message_in_a_batch_fails_alone(
    producer: Producer, queue_name: str
) -> None:
    await producer.declare(queue_name)
    confirms = []
    for i in range(200):
        if i == 100:
            confirms.append(await producer.send(i, exchange="amq.direct", routing_key="void"))
        else:
            confirms.append(await producer.send(i, queue=queue_name))
    results = await asyncio.gather(*confirms, return_exceptions=True)
    failures = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert [(i, type(r)) for i, r in failures] == [(100, UnroutableError)]


async def test_broker_nacks_surface_as_typed_errors(
    producer: Producer, queue_name: str, amqp_url: str
) -> None:
    full = Queue(
        queue_name, type="classic", arguments={"x-max-length": 5, "x-overflow": "reject-publish"}
    )
    results = await producer.publish_many(range(12), queue=full, return_exceptions=True)
    sent = [r for r in results if isinstance(r, str)]
    nacked = [r for r in results if isinstance(r, PublishNackedError)]
    assert len(sent) == 5 and len(nacked) == 7
    assert await queue_depth(amqp_url, queue_name) == len(sent)
    with pytest.raises(PublishNackedError, match="nacked"):
        await producer.publish_many(range(2), queue=full)


async def test_two_producers_publishing_at_once_to_a_new_quorum_queue_both_get_confirms(
    amqp_url: str, queue_name: str
) -> None:
    """Two processes publish to one new quorum queue at the same moment (two producers: two
    connections). The second declare-ok comes back while the first declarer's queue is still
    starting, and the broker nacks what arrives meanwhile. Each message must be confirmed:
    before, about one pair in eight had a `PublishNackedError` (CI, stop 32)."""
    names = [f"{queue_name}-{n}" for n in range(24)]
    async with Producer(amqp_url) as first, Producer(amqp_url) as second:
        for name in names:
            outcomes = await asyncio.gather(
                first.publish(b"a", name), second.publish(b"b", name), return_exceptions=True
            )
            assert [type(o) for o in outcomes] == [str, str], (name, outcomes)
    for name in names[:3]:
        assert await queue_depth(amqp_url, name) == 2


async def test_a_producer_that_never_declares_publishing_as_another_declares_gets_confirms(
    amqp_url: str, queue_name: str
) -> None:
    """A worker (here a producer) declares a new quorum queue while a `declare="never"`
    producer of another process publishes to it as soon as its check finds it: the check's
    declare-ok can come back while the queue is still starting, and the broker nacks what
    arrives meanwhile. Each message must be confirmed: before, about one in five had a
    `PublishNackedError` (its nacks were sent again only after a declare, not a check)."""
    names = [f"{queue_name}-{n}" for n in range(30)]
    async with Producer(amqp_url) as declarer, Producer(amqp_url, declare="never") as checker:

        async def as_soon_as_it_exists(name: str) -> str:
            while True:
                try:
                    return await checker.publish(b"b", name)
                except TopologyError:  # not declared yet
                    await asyncio.sleep(0)

        for name in names:
            outcomes = await asyncio.gather(
                declarer.declare(name), as_soon_as_it_exists(name), return_exceptions=True
            )
            assert [type(o) for o in outcomes] == [str, str], (name, outcomes)
    assert await queue_depth(amqp_url, names[0]) == 1


async def test_a_new_full_quorum_queue_still_nacks_after_its_few_sends_again(
    producer: Producer, queue_name: str
) -> None:
    """The nacks of a quorum queue just declared are sent again a few times (it may still be
    starting): a queue that is full keeps nacking, and the publish still fails, typed, within
    those few tries and far within its timeout; the next message's outcome is its own."""
    full = Queue(queue_name, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    outcomes: list[str | BaseException] = []
    async with asyncio.timeout(20):  # a hang guard: 5 tries take 1.55 s
        for n in range(3):  # a quorum queue takes one past its length (it checks as it applies)
            try:
                outcomes.append(await producer.publish(n, full, timeout=30))
            except PublishNackedError as exc:
                outcomes.append(exc)
    assert isinstance(outcomes[-1], PublishNackedError), outcomes
    assert await producer.publish(b"elsewhere", f"{queue_name}-other")


async def test_memory_alarm_times_out_then_recovers(
    amqp_url: str, local_broker: LocalBroker, queue_name: str, counter: Counter
) -> None:
    consumed = f"{queue_name}-consumed"

    async def handler(job: Job) -> None:
        counter.add(job.data)

    async with Producer(amqp_url, timeout=2) as producer:
        await producer.publish("before", queue=queue_name)
        await producer.publish("for the worker", queue=consumed)
        local_broker.ctl("set_vm_memory_high_watermark", "0")
        try:
            with pytest.raises(PublishTimeoutError, match="within its timeout"):
                async with asyncio.timeout(30):  # a hang guard: the 2 s timeout fails it first
                    await producer.publish("during", queue=queue_name)
            # A worker on its own connection keeps consuming while publishers are blocked.
            async with Worker(amqp_url, queue=consumed, handler=handler):
                assert await counter.wait_for(1) == ["for the worker"]
        finally:
            local_broker.ctl("set_vm_memory_high_watermark", "0.4")
        await producer.publish("after", queue=queue_name, timeout=15)
    depth = await queue_depth(amqp_url, queue_name)
    # "during" timed out: it may or may not have been written once the alarm cleared.
    assert depth in (2, 3)


def connection_names(broker: LocalBroker, client_name: str) -> list[str]:
    """Broker pids (for close_connection) of the connections named `client_name`."""
    out = broker.ctl("list_connections", "-q", "--no-table-headers", "pid", "client_properties")
    rows = [line.split("\t", 1) for line in out.splitlines() if "\t" in line]
    return [pid for pid, props in rows if f'"{client_name}"' in props]


def dict_from_props(props: Any) -> dict[str, Any]:
    if isinstance(props, dict):
        return props
    return {item[0]: item[2] for item in props if isinstance(item, list) and len(item) == 3}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("policy", ["resend", "fail"])
async def test_connection_closed_with_messages_in_flight_settles_every_future(
    amqp_url: str, local_broker: LocalBroker, queue_name: str, policy: str
) -> None:
    # Timeouts sized for a loaded machine: the broker's restart is not what is tested here.
    # A classic queue: a quorum queue written at a kill -9 of a single node may never elect its
    # leader again on RabbitMQ 3.10 (docs/guarantees.md), and this tests the client's promise.
    queue = Queue(queue_name, type="classic")
    async with Producer(amqp_url, on_reconnect=policy, timeout=240) as producer:  # type: ignore[arg-type]
        await producer.declare(queue)
        # A memory alarm holds every confirm back, so all 1000 are unconfirmed when the broker
        # dies (kill -9); it comes back without the alarm.
        local_broker.ctl("set_vm_memory_high_watermark", "0")
        confirms = [await producer.send(b"x" * 100, queue=queue) for _ in range(1000)]
        # The queue's record must outlive the kill -9: Mnesia's transaction log (disk_log)
        # keeps a write cache in the broker's memory, and a declaration it still held was lost
        # (after the restart every re-sent message came back unroutable). This tests the
        # client, so the broker's metadata is put on disk first.
        local_broker.ctl("eval", "mnesia:dump_log().")
        local_broker.kill()
        await wait_until(lambda: _true(not producer.connected))
        local_broker.start()
        async with asyncio.timeout(240):
            results = await asyncio.gather(*confirms, return_exceptions=True)
    confirmed = [r for r in results if isinstance(r, str)]
    lost = [r for r in results if isinstance(r, BaseException)]
    if policy == "resend":
        assert len(confirmed) == 1000, {type(r).__name__ for r in lost}  # re-sent
    else:
        assert len(lost) == 1000 and all(isinstance(r, ConnectionLostError) for r in lost)
    depth = await queue_depth(amqp_url, queue_name)
    assert depth >= len(confirmed)  # at-least-once: duplicates possible, nothing confirmed lost


def test_every_error_is_a_workq_error() -> None:
    for cls in (AuthenticationError, BrokerConnectionError, TopologyError, UnroutableError):
        assert issubclass(cls, WorkqError)
    assert issubclass(PublishTimeoutError, TimeoutError)


async def test_a_producer_used_before_it_started_raises_a_typed_error() -> None:
    producer = Producer("amqp://guest:guest@127.0.0.1:1/")
    with pytest.raises(IntegrationError, match="not started"):
        await producer.publish({"a": 1}, queue="q")
    with pytest.raises(IntegrationError, match="not started"):
        producer.dead_letters("q")


async def test_a_closed_producer_says_it_is_closed_not_unstarted(
    amqp_url: str, queue_name: str
) -> None:
    async with Producer(amqp_url) as producer:
        await producer.publish(b"x", queue_name)
    with pytest.raises(IntegrationError, match="the producer is closed .* make a new Producer"):
        await producer.publish(b"x", queue_name)
    with pytest.raises(IntegrationError, match="the producer is closed"):
        await producer.start()
    await producer.close()  # closing again is harmless


async def test_a_worker_started_after_the_publish_takes_what_waits(
    producer: Producer, amqp_url: str, queue_name: str, counter: Counter
) -> None:
    await producer.publish_many(["a", "b"], queue=queue_name)

    async def depth_is(n: int) -> bool:
        return await queue_depth(amqp_url, queue_name) == n

    await wait_until(lambda: depth_is(2))

    async def handler(job: Job) -> None:
        counter.add(job.data)

    async with Worker(amqp_url, queue=queue_name, handler=handler):
        assert sorted(await counter.wait_for(2)) == ["a", "b"]
    await wait_until(lambda: depth_is(0))


async def test_publish_many_reports_an_unserialisable_body_in_its_slot(
    producer: Producer, queue_name: str, amqp_url: str
) -> None:
    results = await producer.publish_many(["a", object(), "c"], queue_name, return_exceptions=True)
    assert isinstance(results[0], str) and isinstance(results[2], str)
    assert isinstance(results[1], SerializationError)
    with pytest.raises(SerializationError):
        await producer.publish_many(["d", object()], queue_name)
    assert await queue_depth(amqp_url, queue_name) == 3  # a, c and d: all confirmed


async def test_the_window_bounds_unconfirmed_messages(amqp_url: str, queue_name: str) -> None:
    async with Producer(amqp_url, window=10) as producer:
        await producer.declare(queue_name)
        confirms = []
        most = 0
        for i in range(300):
            confirms.append(await producer.send(i, queue=queue_name))
            most = max(most, producer.in_flight)
        assert len(set(await asyncio.gather(*confirms))) == 300
    assert most == 10  # filled, never exceeded
    assert await queue_depth(amqp_url, queue_name) == 300


@pytest.mark.parametrize(("window_bytes", "expected"), [(1000, 4), (10, 1)])
async def test_window_bytes_bounds_the_bodies_in_flight(
    amqp_url: str, queue_name: str, window_bytes: int, expected: int
) -> None:
    # 300-byte bodies: three (900 bytes) leave room, the fourth fills 1,000 bytes; with a
    # 10-byte window each message is larger than the window and goes alone.
    async with Producer(amqp_url, window_bytes=window_bytes) as producer:
        await producer.declare(queue_name)
        confirms = []
        most = 0
        for _ in range(40):
            confirms.append(await producer.send(b"x" * 300, queue=queue_name))
            most = max(most, producer.in_flight)
        assert len(set(await asyncio.gather(*confirms))) == 40
    assert most == expected
    assert await queue_depth(amqp_url, queue_name) == 40


async def _true(value: bool) -> bool:
    return value


async def test_wait_connected_returns_while_connected_and_bounds_a_reconnect(
    amqp_url: str,
) -> None:
    producer = Producer(amqp_url)
    with pytest.raises(IntegrationError, match="not started"):
        await producer.wait_connected(1)
    async with producer:
        await producer.wait_connected(0.5)  # connected: at once
    with pytest.raises(IntegrationError, match="closed"):
        await producer.wait_connected(0.5)
