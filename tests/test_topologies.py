"""Exchanges, subscribers, RPC and ordered processing (issue 6), against a real broker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aio_pika
import pytest

from aio_workq import (
    ConnectionLostError,
    Exchange,
    Job,
    Producer,
    Queue,
    RPCError,
    RPCTimeoutError,
    TopologyError,
    Worker,
)
from scripts.broker import LocalBroker
from tests.helpers import Counter, queue_depth, wait_until

pytestmark = pytest.mark.broker


async def test_topic_bindings_receive_exactly_the_matching_messages(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str
) -> None:
    logs = Exchange(f"{queue_name}-logs", "topic")
    kern, critical = Counter(), Counter()

    async def on_kern(job: Job) -> None:
        kern.add(job.routing_key)

    async def on_critical(job: Job) -> None:
        critical.add(job.routing_key)

    await make_worker(
        queue=Queue(""), handler=on_kern, exchange=logs, binding_keys=["kern.*"]
    ).start()
    await make_worker(
        queue=Queue(""), handler=on_critical, exchange=logs, binding_keys=["*.critical"]
    ).start()
    keys = ["kern.info", "kern.critical", "app.critical", "app.info", "kern.disk.full"]
    for key in keys:
        await producer.publish(key, exchange=logs, routing_key=key, mandatory=False)
    assert sorted(await kern.wait_for(2)) == ["kern.critical", "kern.info"]
    assert sorted(await critical.wait_for(2)) == ["app.critical", "kern.critical"]
    await producer.publish("end", exchange=logs, routing_key="kern.end")
    await kern.wait_for(3)
    assert len(critical.items) == 2


async def test_fanout_reaches_every_subscriber_and_their_queues_go_away(
    producer: Producer, local_broker: LocalBroker, queue_name: str
) -> None:
    fanout = Exchange(f"{queue_name}-news", "fanout")
    counters = [Counter() for _ in range(3)]
    workers = []
    for counter in counters:

        async def handler(job: Job, counter: Counter = counter) -> None:
            counter.add(job.data)

        worker = Worker(local_broker.url, queue=Queue(""), handler=handler, exchange=fanout)
        await worker.start()
        workers.append(worker)
    names = {w.queue_name for w in workers}
    assert all(name.startswith("amq.gen-") for name in names)
    await producer.publish_many(["a", "b", "c"], exchange=fanout)
    for counter in counters:
        assert await counter.wait_for(3) == ["a", "b", "c"]
    for worker in workers:
        await worker.stop()
    assert not names & {q["name"] for q in local_broker.queues()}


async def test_a_subscriber_drop_is_logged_with_the_queue_the_broker_named(
    producer: Producer,
    make_worker: Callable[..., Worker],
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failure on a server-named queue drops the message; the ERROR names that queue
    (`amq.gen-...`, as the worker's own lines do), not `''`."""
    news = Exchange(f"{queue_name}-news", "fanout")
    failed = Counter()

    async def handler(job: Job) -> None:
        failed.add(job.data)
        raise RuntimeError("boom")

    worker = make_worker(queue=Queue(""), handler=handler, exchange=news)
    await worker.start()
    with caplog.at_level(logging.ERROR, logger="aio_workq"):
        await producer.publish("x", exchange=news)
        await failed.wait_for(1)

        async def dropped() -> bool:  # logged just after the handler raised
            return any("dropping" in r.getMessage() for r in caplog.records)

        await wait_until(dropped)
    [record] = [r for r in caplog.records if "dropping" in r.getMessage()]
    assert worker.queue_name.startswith("amq.gen-")
    assert f"from {worker.queue_name!r}" in record.getMessage(), record.getMessage()
    assert record.queue == worker.queue_name  # type: ignore[attr-defined]


async def test_rpc_calls_get_their_own_replies(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str
) -> None:
    async def square(job: Job) -> int:
        await asyncio.sleep(0.01)
        return int(job.data) ** 2

    await make_worker(queue=queue_name, handler=square, concurrency=20).start()
    results = await asyncio.gather(*(producer.call(i, queue=queue_name) for i in range(100)))
    assert results == [i * i for i in range(100)]


async def test_rpc_timeout_and_remote_error_are_typed(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str
) -> None:
    async def handler(job: Job) -> str:
        if job.data == "boom":
            raise KeyError("missing thing")
        await asyncio.Event().wait()
        return "never"

    await make_worker(queue=queue_name, handler=handler, concurrency=2).start()
    with pytest.raises(RPCError) as info:
        await producer.call("boom", queue=queue_name, timeout=10)
    assert info.value.remote_type == "builtins.KeyError"
    assert "missing thing" in str(info.value)
    assert "Traceback" not in str(info.value)
    with pytest.raises(RPCTimeoutError, match="no reply within 0.5 s"):
        await producer.call("hang", queue=queue_name, timeout=0.5)
    with pytest.raises(RPCError):  # the producer stays usable after a timeout
        await producer.call("boom", queue=queue_name, timeout=10)


async def test_single_active_consumer_keeps_order_across_a_takeover(
    amqp_url: str, producer: Producer, queue_name: str
) -> None:
    # Classic: a quorum queue (RabbitMQ 3.10) puts a returned message behind the others.
    spec = Queue(queue_name, type="classic", single_active_consumer=True)
    seen: list[int] = []
    who: list[str] = []
    first_half = asyncio.Event()
    done = Counter()

    def handler_for(name: str) -> Callable[[Job], object]:
        async def handler(job: Job) -> None:
            seen.append(int(job.data))
            who.append(name)
            if name == "second":
                done.add(job.data)
            if len(seen) == 50:
                first_half.set()
                await asyncio.Event().wait()  # the active consumer "dies" mid-message

        return handler

    first = Worker(amqp_url, queue=spec, handler=handler_for("first"), shutdown_timeout=0)
    second = Worker(amqp_url, queue=spec, handler=handler_for("second"))
    await first.start()
    await second.start()
    await producer.publish_many(range(100), queue=spec)
    async with asyncio.timeout(15):
        await first_half.wait()
    await first.stop(0)  # its unfinished message goes back to the queue
    await done.wait_for(51, timeout=15)  # 50 by the first, then 49 again and 50-99: 51 more
    await second.stop()
    assert who[:50] == ["first"] * 50 and set(who[50:]) == {"second"}
    assert seen == list(range(50)) + list(range(49, 100))  # message 49 redelivered, in order


async def test_passive_missing_exchange_is_a_topology_error_and_others_go_on(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    async def handler(job: Job) -> None:
        counter.add(job.data)

    good = make_worker(queue=queue_name, handler=handler)
    await good.start()
    bad = make_worker(
        queue=f"{queue_name}-b", handler=handler, exchange="no-such-exchange", binding_keys=["k"]
    )
    with pytest.raises(TopologyError, match="no-such-exchange"):
        await bad.start()
    await producer.publish("still here", queue=queue_name)
    assert await counter.wait_for(1) == ["still here"]


async def test_a_subscriber_queue_is_restored_after_a_broker_restart(
    amqp_url: str,
    local_broker: LocalBroker,
    queue_name: str,
    counter: Counter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="aio_workq")
    fanout = Exchange(f"{queue_name}-events", "fanout")

    async def handler(job: Job) -> None:
        counter.add(job.data)

    async with Worker(amqp_url, queue=Queue(""), handler=handler, exchange=fanout) as worker:
        async with Producer(amqp_url) as producer:
            await producer.publish("before", exchange=fanout)
            await counter.wait_for(1)
        await asyncio.to_thread(local_broker.stop)
        await asyncio.to_thread(local_broker.start)

        async def consuming() -> bool:
            return worker.state.consuming

        await wait_until(consuming, timeout=30)
        async with Producer(amqp_url) as producer:
            await producer.publish("after", exchange=fanout)
        assert await counter.wait_for(2, timeout=20) == ["before", "after"]
    # Its log lines name it by its exchange: a server-named queue's name is '' in its spec
    # (they said "worker '' has a channel again", for a task worker's cancel listener too).
    again = [r.getMessage() for r in caplog.records if "channel again" in r.getMessage()]
    assert again, [r.getMessage() for r in caplog.records]
    assert all(f"bound to exchange '{fanout.name}'" in line for line in again), again
    assert not any("worker ''" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("prefetch", [1, 5])
async def test_graceful_handover_mid_stream_keeps_order(
    amqp_url: str, producer: Producer, queue_name: str, prefetch: int
) -> None:
    spec = Queue(queue_name, type="classic", single_active_consumer=True)
    seen: list[int] = []
    done = Counter()
    stopping: list[asyncio.Task[None]] = []

    async def first_handler(job: Job) -> None:
        seen.append(int(job.data))
        done.add(job.data)
        if len(seen) == 30:
            stopping.append(asyncio.ensure_future(first.stop()))  # graceful, mid-stream

    async def second_handler(job: Job) -> None:
        seen.append(int(job.data))
        done.add(job.data)

    first = Worker(amqp_url, queue=spec, handler=first_handler, prefetch=prefetch)
    second = Worker(amqp_url, queue=spec, handler=second_handler, prefetch=prefetch)
    await first.start()
    await second.start()
    await producer.publish_many(range(100), queue=spec)
    await done.wait_for(100, timeout=20)
    await second.stop()
    await asyncio.wait_for(stopping[0], 10)
    assert seen == list(range(100))


async def test_headers_exchange_routes_by_matching_headers(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    exchange = Exchange(f"{queue_name}-h", "headers")

    async def handler(job: Job) -> None:
        counter.add(job.data)

    await make_worker(
        queue=queue_name, handler=handler, exchange=exchange,
        binding_arguments={"x-match": "all", "format": "pdf", "type": "report"},
    ).start()  # fmt: skip
    await producer.publish("match", exchange=exchange, headers={"format": "pdf", "type": "report"})
    await producer.publish(
        "half", exchange=exchange, headers={"format": "pdf", "type": "log"}, mandatory=False
    )
    await producer.publish("also", exchange=exchange, headers={"format": "pdf", "type": "report"})
    assert await counter.wait_for(2) == ["match", "also"]


async def test_a_dead_letter_queue_declared_otherwise_names_a_fix_a_worker_can_apply(
    amqp_url: str, queue_name: str
) -> None:
    # A classic queue where the worker's (quorum) dead-letter queue goes: a Worker takes no
    # passive=True for its .dlq, so the advice must be one the user can follow.
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            f"{queue_name}.dlq", durable=True, arguments={"x-queue-type": "classic"}
        )

    async def handler(job: Job) -> None:
        pass

    worker = Worker(amqp_url, queue=queue_name, handler=handler)
    try:
        with pytest.raises(TopologyError) as info:
            await worker.start()
    finally:
        await worker.stop()
    text = str(info.value)
    assert f"'{queue_name}.dlq'" in text and "passive" not in text
    assert f"dead-letter queue of Queue('{queue_name}')" in text
    assert f"aio-workq queues delete {queue_name}" in text
    assert "queue_type" in text


async def test_a_call_waiting_when_its_producer_closes_raises_a_typed_error(
    amqp_url: str, queue_name: str
) -> None:
    # It ended in CancelledError: the caller's task looked cancelled (a TaskGroup or a web
    # framework takes that for its own cancel) and `except WorkqError` missed it.
    producer = Producer(amqp_url)
    await producer.start()
    await producer.declare(queue_name)  # no worker: the call waits for its reply
    call = asyncio.create_task(producer.call("x", queue_name, timeout=30))

    async def request_queued() -> bool:  # confirmed: the call now waits for its reply
        return await queue_depth(amqp_url, queue_name) == 1

    await wait_until(request_queued)
    await producer.close()
    async with asyncio.timeout(5):
        with pytest.raises(ConnectionLostError, match="closed"):
            await call
    assert not call.cancelled()
