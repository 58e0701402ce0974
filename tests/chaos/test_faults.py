"""A steady flow through faults: a paused broker, a bad network, resource alarms, a full queue.

Each scenario publishes at a fixed rate while a worker consumes, injects its fault part-way, and
then checks the ledger: every confirmed message processed (0 lost), only typed errors, and every
publish returned or raised within its timeout (plus scheduling slack) while the fault lasted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from aio_workq import Producer, PublishNackedError, Queue, Worker
from scripts.broker import LocalBroker
from tests.chaos.flow import ids, publish_all, recording_handler
from tests.chaos.ledger import Ledger
from tests.faultproxy import FaultProxy
from tests.helpers import queue_depth, wait_until

pytestmark = [pytest.mark.broker]

SLACK = 10.0  # seconds past a timeout that still count as bounded (a loaded 2-core machine)


async def steady_flow(
    ledger: Ledger,
    *,
    producer_url: str,
    worker_url: str,
    queue: Queue,
    total: int,
    rate: float,
    faults: Callable[[], Awaitable[None]],
    timeout: float,
) -> None:
    """Publish `total` messages at `rate`/s while `faults()` runs; wait until all settle."""
    worker = Worker(worker_url, queue=queue, handler=recording_handler(ledger), concurrency=20)
    async with Producer(producer_url, timeout=timeout) as producer:
        await producer.declare(queue)
        await worker.start()
        try:
            await asyncio.gather(
                publish_all(producer, ledger, ids(queue.name, total), queue, rate=rate),
                faults(),
            )
            await ledger.settle(producer.dead_letters(queue))
        finally:
            await worker.stop(timeout=5)
            ledger.report()


def check(ledger: Ledger, total: int, timeout: float) -> None:
    row = ledger.row()
    assert row.confirmed == total, row.line()
    assert row.lost == 0, row.line()
    assert not row.untyped_errors, row.line()
    assert row.longest_s <= timeout + SLACK, row.line()


# -- a paused broker -------------------------------------------------------------------------


@pytest.mark.chaos
@pytest.mark.timeout(300)
async def test_sigstop_20s_with_heartbeat_5s(local_broker: LocalBroker, queue_name: str) -> None:
    ledger = Ledger("broker SIGSTOP 20 s, heartbeat 5 s")
    url = f"{local_broker.url}?heartbeat=5"

    async def pause() -> None:
        await ledger.wait_confirmed(1000)
        local_broker.pause()
        try:
            await asyncio.sleep(20)  # the fault's length
        finally:
            local_broker.resume()
        ledger.cleared()

    async with asyncio.timeout(240):
        await steady_flow(
            ledger, producer_url=url, worker_url=url, queue=Queue(queue_name),
            total=4000, rate=100, faults=pause, timeout=10,
        )  # fmt: skip
    check(ledger, 4000, 10)


# -- a bad network (the fault proxy) ---------------------------------------------------------


@pytest.fixture
async def proxy(local_broker: LocalBroker) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(upstream_port=local_broker.amqp_port) as proxy:
        yield proxy


def network_faults(
    proxy: FaultProxy, ledger: Ledger, *, cut_for: float, every: float, hole: float, slow: float
) -> Callable[[], Awaitable[None]]:
    async def faults() -> None:
        await ledger.wait_confirmed(100)
        async with proxy.cutting(every=every):
            await asyncio.sleep(cut_for)
        ledger.cleared()
        async with proxy.black_holed_for(hole):
            await asyncio.sleep(hole)
        ledger.cleared()
        proxy.latency = 0.05
        await asyncio.sleep(slow)
        proxy.latency = 0.0

    return faults


@pytest.mark.chaos
@pytest.mark.timeout(400)
async def test_network_cuts_black_hole_and_latency_for_a_minute(
    local_broker: LocalBroker, proxy: FaultProxy, queue_name: str
) -> None:
    ledger = Ledger("proxy: cut every 3 s (20 s), black hole 15 s, +50 ms (20 s)")
    url = proxy.url(f"{local_broker.url}?heartbeat=5")
    faults = network_faults(proxy, ledger, cut_for=20, every=3, hole=15, slow=20)
    async with asyncio.timeout(300):
        await steady_flow(
            ledger, producer_url=url, worker_url=url, queue=Queue(queue_name),
            total=6000, rate=100, faults=faults, timeout=10,
        )  # fmt: skip
    check(ledger, 6000, 10)
    assert proxy.cuts >= 2 * 6  # both clients, every 3 s for 20 s


@pytest.mark.timeout(200)
async def test_network_faults_short(
    local_broker: LocalBroker, proxy: FaultProxy, queue_name: str
) -> None:
    """The default run's short version: cuts for 4 s, a 4 s black hole, 3 s of latency."""
    ledger = Ledger("proxy: cut every 1 s (4 s), black hole 4 s, +50 ms (3 s) (default run)")
    url = proxy.url(f"{local_broker.url}?heartbeat=5")
    faults = network_faults(proxy, ledger, cut_for=4, every=1, hole=4, slow=3)
    async with asyncio.timeout(150):
        await steady_flow(
            ledger, producer_url=url, worker_url=url, queue=Queue(queue_name),
            total=1500, rate=100, faults=faults, timeout=5,
        )  # fmt: skip
    check(ledger, 1500, 5)
    assert proxy.cuts >= 2


# -- resource alarms -------------------------------------------------------------------------


def alarm(
    broker: LocalBroker, ledger: Ledger, *, raise_args: tuple[str, ...],
    clear_args: tuple[str, ...], seconds: float, after: int,
) -> Callable[[], Awaitable[None]]:  # fmt: skip
    async def faults() -> None:
        await ledger.wait_confirmed(after)
        await asyncio.to_thread(broker.ctl, *raise_args)
        try:
            await asyncio.sleep(seconds)  # the fault's length
        finally:
            await asyncio.to_thread(broker.ctl, *clear_args)
        ledger.cleared()

    return faults


MEMORY_ALARM = ("set_vm_memory_high_watermark", "0.0000001")
MEMORY_CLEAR = ("set_vm_memory_high_watermark", "0.4")
DISK_ALARM = ("set_disk_free_limit", "1000000000000000")  # 1 PB free needed
DISK_CLEAR = ("set_disk_free_limit", "100MB")


@pytest.mark.timeout(200)
async def test_memory_alarm_bounded_typed_errors_then_flow_resumes(
    local_broker: LocalBroker, queue_name: str
) -> None:
    ledger = Ledger("memory alarm 8 s during publish")
    faults = alarm(local_broker, ledger, raise_args=MEMORY_ALARM, clear_args=MEMORY_CLEAR,
                   seconds=8, after=300)  # fmt: skip
    async with asyncio.timeout(150):
        await steady_flow(
            ledger, producer_url=local_broker.url, worker_url=local_broker.url,
            queue=Queue(queue_name), total=1500, rate=150, faults=faults, timeout=3,
        )  # fmt: skip
    check(ledger, 1500, 3)
    assert ledger.errors["PublishTimeoutError"] >= 1, ledger.row().line()


@pytest.mark.chaos
@pytest.mark.timeout(200)
async def test_disk_alarm_bounded_typed_errors_then_flow_resumes(
    local_broker: LocalBroker, queue_name: str
) -> None:
    ledger = Ledger("disk alarm 10 s during publish")
    faults = alarm(local_broker, ledger, raise_args=DISK_ALARM, clear_args=DISK_CLEAR,
                   seconds=10, after=300)  # fmt: skip
    async with asyncio.timeout(150):
        await steady_flow(
            ledger, producer_url=local_broker.url, worker_url=local_broker.url,
            queue=Queue(queue_name), total=2000, rate=150, faults=faults, timeout=3,
        )  # fmt: skip
    check(ledger, 2000, 3)
    assert ledger.errors["PublishTimeoutError"] >= 1, ledger.row().line()


# -- a full queue ----------------------------------------------------------------------------


async def queue_empty(url: str, name: str) -> bool:
    return await queue_depth(url, name) == 0


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_reject_publish_nacks_are_reported_never_counted_as_sent(
    amqp_url: str, queue_name: str, queue_type: str
) -> None:
    ledger = Ledger(f"x-overflow reject-publish, max-length 100, {queue_type}")
    queue = Queue(
        queue_name, type=queue_type,  # type: ignore[arg-type]
        arguments={"x-max-length": 100, "x-overflow": "reject-publish"},
    )  # fmt: skip
    message_ids = ids(queue_name, 300)
    async with Producer(amqp_url, timeout=10) as producer:
        await producer.declare(queue)
        confirms = [await producer.send(m, queue, message_id=m) for m in message_ids]
        outcomes = await asyncio.gather(*confirms, return_exceptions=True)
        for message_id, outcome in zip(message_ids, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                ledger.error(outcome)
            else:
                assert outcome == message_id
                ledger.confirm(message_id)
        async with Worker(amqp_url, queue=queue, handler=recording_handler(ledger)):
            async with asyncio.timeout(30):
                await ledger.settle(producer.dead_letters(queue))
                await wait_until(lambda: queue_empty(amqp_url, queue_name))
    row = ledger.report()
    # A classic queue refuses exactly past max-length; a quorum queue checks the length as its
    # log applies, so a burst can overshoot it. Either way each publish is confirmed or nacked.
    assert row.confirmed + row.errors.get("PublishNackedError", 0) == 300, row.line()
    assert row.errors.keys() <= {"PublishNackedError"}, row.line()
    assert row.confirmed == 100 if queue_type == "classic" else row.confirmed >= 100
    assert set(ledger.processed) == ledger.confirmed, "a nacked message was delivered"
    assert row.lost == 0 and row.duplicates == 0, row.line()
    assert all(isinstance(o, (str, PublishNackedError)) for o in outcomes)
