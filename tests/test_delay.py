"""Delayed publish: held on the broker in the TTL ladder, never early, late by little, no
head-of-line blocking, across a broker restart."""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

import aio_workq
from aio_workq import ConfigurationError, Job, Producer
from aio_workq._link.delay import LEVELS, MAX_DELAY, DelayLadder, delay_ticks, routing_key
from scripts.broker import LocalBroker
from tests.helpers import Counter

pytestmark = pytest.mark.broker


# --- offline ---


def test_delays_are_whole_ticks_rounded_up() -> None:
    assert delay_ticks(0) == 0
    assert delay_ticks(0.001) == 1
    assert delay_ticks(0.1) == 1
    assert delay_ticks(0.3) == 3  # 0.3 / 0.1 is 2.9999999999999996 in floats
    assert delay_ticks(0.7) == 7
    assert delay_ticks(timedelta(seconds=2.05)) == 21
    assert delay_ticks(MAX_DELAY) == 2**LEVELS - 1


@pytest.mark.parametrize("bad", [-1, "5", True, float("nan"), MAX_DELAY + 1])
def test_a_bad_delay_is_a_configuration_error(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="delay"):
        delay_ticks(bad)


def test_the_routing_key_is_the_bits_then_the_queue() -> None:
    key = routing_key(5, "tasks.a")
    bits, _, queue = key.partition(".tasks")
    assert bits.split(".")[-3:] == ["1", "0", "1"] and len(bits.split(".")) == LEVELS
    assert key.endswith(".tasks.a")
    with pytest.raises(ConfigurationError, match="shorter name"):
        routing_key(5, "q" * 200)


# --- on the broker ---


class Arrivals:
    """Records when each message arrives, against when it was due (both `time.monotonic()`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.counter = Counter()
        self.clock = clock

    async def handle(self, job: Job) -> None:
        self.counter.add((self.clock(), job.data))


async def test_bad_delayed_publishes_send_nothing(producer: Producer, queue_name: str) -> None:
    with pytest.raises(ConfigurationError, match="expiration"):
        await producer.publish(b"x", queue=queue_name, delay=1, expiration=5)
    with pytest.raises(ConfigurationError, match="through an exchange"):
        await producer.publish(b"x", exchange="amq.topic", routing_key="k", delay=1)
    with pytest.raises(ConfigurationError, match="delay must be"):
        await producer.publish(b"x", queue=queue_name, delay=-1)


async def test_200_random_delays_arrive_on_time(
    producer: Producer, make_worker: Callable[..., aio_workq.Worker], queue_name: str
) -> None:
    arrivals = Arrivals()
    worker = make_worker(queue=queue_name, handler=arrivals.handle, concurrency=20)
    await worker.start()
    # The first delayed publish on a connection declares the ladder: not part of the figures.
    started = time.monotonic()
    await producer.publish({"n": -1, "due": started}, queue=queue_name, delay=0.1)
    declared = time.monotonic() - started
    await arrivals.counter.wait_for(1)
    arrivals.counter.items.clear()
    rng = random.Random(13)
    delays = [rng.uniform(0, 20) for _ in range(200)]
    delays[0] = 20.0  # the longest first: nothing may wait behind it
    confirms = []
    for n, delay in enumerate(delays):
        due = time.monotonic() + delay
        confirms.append(await producer.send({"n": n, "due": due}, queue=queue_name, delay=delay))
    await asyncio.gather(*confirms)
    got = await arrivals.counter.wait_for(200, timeout=60)
    lateness = sorted(at - data["due"] for at, data in got)
    assert sorted(data["n"] for _, data in got) == list(range(200))
    report = (
        f"first delayed publish (declares the ladder) {declared:.2f} s; "
        f"lateness over 200 messages: min {lateness[0]:.3f} s, median "
        f"{statistics.median(lateness):.3f} s, p99 {lateness[197]:.3f} s, "
        f"max {lateness[-1]:.3f} s"
    )
    print(report)  # noqa: T201 - the figure the issue asks for (`pytest -s`)
    assert lateness[0] >= 0, report
    assert lateness[-1] <= 1.5, report


async def test_a_short_delay_does_not_wait_behind_a_long_one(
    producer: Producer, make_worker: Callable[..., aio_workq.Worker], queue_name: str
) -> None:
    arrivals = Arrivals()
    await make_worker(queue=queue_name, handler=arrivals.handle).start()
    await producer.publish({"n": "long"}, queue=queue_name, delay=3600)
    await producer.publish({"n": "short"}, queue=queue_name, delay=0.5)
    send = Producer.send  # every form of publish takes delay=
    await (await send(producer, {"n": "send"}, queue=queue_name, delay=timedelta(seconds=0.2)))
    await producer.publish_many([{"n": "many"}], queue=queue_name, delay=0.3)
    got = await arrivals.counter.wait_for(3, timeout=10)
    assert sorted(data["n"] for _, data in got) == ["many", "send", "short"]


async def test_a_job_forwards_with_a_delay(
    producer: Producer, make_worker: Callable[..., aio_workq.Worker], queue_name: str
) -> None:
    arrivals = Arrivals()
    downstream = f"{queue_name}-later"

    async def forward(job: Job) -> None:
        await job.forward({"due": time.monotonic() + 1.0}, queue=downstream, delay=1.0)

    await make_worker(queue=queue_name, handler=forward).start()
    await make_worker(queue=downstream, handler=arrivals.handle).start()
    await producer.publish(b"go", queue=queue_name)
    [(at, data)] = await arrivals.counter.wait_for(1, timeout=10)
    assert at >= data["due"]


@pytest.mark.slow
async def test_a_delay_survives_a_broker_restart(
    local_broker: LocalBroker, amqp_url: str, queue_name: str
) -> None:
    async with Producer(amqp_url) as producer:
        due = time.time() + 12
        await producer.publish({"due": due}, queue=queue_name, delay=12)
    await asyncio.to_thread(local_broker.stop)
    await asyncio.to_thread(local_broker.start)
    arrivals = Arrivals(time.time)
    async with aio_workq.Worker(amqp_url, queue=queue_name, handler=arrivals.handle):
        [(at, data)] = await arrivals.counter.wait_for(1, timeout=60)
    assert at >= data["due"]


async def test_a_delayed_publish_nacked_by_a_new_delay_queue_is_sent_again(
    amqp_url: str, queue_name: str, local_broker: LocalBroker
) -> None:
    """A delayed publish goes to the ladder's exchange of its delay's level, which routes it to
    that level's quorum queue, declared by the producer on its first delayed publish (two
    processes starting at once: the queue may still be starting, and the broker nacks). Such
    a nack is sent again, as one from a queue published to by name is: before, every nack
    through an exchange failed at once (`Router.starting` said no for any exchange). Here a
    policy makes the level's queue nack (full): the publish is sent again for 1.55 s first."""
    ticks = delay_ticks(60)  # its level holds it 51.2 s: full for the tries
    level = DelayLadder.exchange_for(ticks)
    name = f"{queue_name}-full-ladder"
    definition = '{"max-length": 0, "overflow": "reject-publish"}'
    local_broker.ctl(
        "set_policy", name, f"^{re.escape(level)}$", definition, "--apply-to", "queues",
        "--priority", "100",
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    try:
        async with Producer(amqp_url) as producer:  # declares the ladder: its queues are new
            async with asyncio.timeout(30):  # a hang guard: 5 tries take 1.55 s
                for n in range(3):  # a quorum queue takes one past its length (0)
                    began = loop.time()
                    try:
                        await producer.publish(n, queue=queue_name, delay=60, timeout=20)
                    except aio_workq.PublishNackedError:
                        took = loop.time() - began
                        break
                else:
                    raise AssertionError(f"{level} never nacked")
        assert took >= 1.4, took
    finally:
        local_broker.ctl("clear_policy", name)
