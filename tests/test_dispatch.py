"""Every delivery is settled, whatever the handler does; every failed attempt is logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from aio_workq import ConfigurationError, Defer, Job, Producer, Queue, RetryPolicy, Worker
from tests.helpers import Counter, queue_depth, wait_until

pytestmark = pytest.mark.broker

FAST = RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0)


class Boom(BaseException):
    """A BaseException that is not an Exception (like KeyboardInterrupt or SystemExit)."""


@pytest.mark.parametrize(
    "escape",
    [asyncio.CancelledError, KeyboardInterrupt, SystemExit, Boom],
    ids=["CancelledError", "KeyboardInterrupt", "SystemExit", "BaseException"],
)
async def test_a_base_exception_from_the_handler_is_a_failure_and_the_worker_goes_on(
    escape: type[BaseException],
    producer: Producer,
    make_worker: Callable[..., Worker],
    queue_name: str,
    counter: Counter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(job: Job) -> None:
        if job.data == "escape" and job.attempt == 1:
            raise escape()
        counter.add((job.data, job.attempt))

    worker = make_worker(queue=queue_name, handler=handler, concurrency=1, retry=FAST)
    await worker.start()
    with caplog.at_level(logging.WARNING, logger="aio_workq"):
        await producer.publish("escape", queue=queue_name)
        await producer.publish("next", queue=queue_name)
        items = await counter.wait_for(2)
    assert sorted(items) == [("escape", 2), ("next", 1)]  # retried, and the next one ran
    assert worker.state.consuming and worker.state.retried == 1
    assert any(escape.__name__ in r.getMessage() for r in caplog.records)


async def test_a_handler_that_swallows_the_stop_is_requeued(
    amqp_url: str, producer: Producer, queue_name: str, counter: Counter
) -> None:
    started = asyncio.Event()

    async def handler(job: Job) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return  # swallows the cancellation and returns "successfully"

    worker = Worker(amqp_url, queue=queue_name, handler=handler, shutdown_timeout=0)
    await worker.start()
    await producer.publish("stuck", queue=queue_name)
    async with asyncio.timeout(10):
        await started.wait()
    await worker.stop()
    await wait_until(lambda: _depth_is(amqp_url, queue_name, 1))  # back in the queue

    async def again(job: Job) -> None:
        counter.add(job.redelivered)

    async with Worker(amqp_url, queue=queue_name, handler=again):
        assert await counter.wait_for(1) == [True]


async def test_one_warning_per_failed_attempt_with_the_attempt_and_the_exception(
    producer: Producer,
    make_worker: Callable[..., Worker],
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(job: Job) -> None:
        raise KeyError("width")

    worker = make_worker(queue=queue_name, handler=handler, retry=FAST)
    with caplog.at_level(logging.WARNING, logger="aio_workq"):
        await worker.start()
        await producer.publish({"w": 1}, queue=queue_name)
        await wait_until(lambda: _true(worker.state.dead_lettered == 1))
    failures = [r for r in caplog.records if "failed on message" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING] * 3
    assert [getattr(r, "attempt", None) for r in failures] == [1, 2, 3]
    assert all("KeyError('width')" in r.getMessage() for r in failures)
    assert "dead-lettering" in failures[-1].getMessage()
    assert all(getattr(r, "queue", None) == queue_name for r in failures)
    assert failures[0].exc_info is None  # the traceback only at DEBUG


async def test_throws_dead_letters_at_once_and_defer_keeps_the_attempt(
    amqp_url: str,
    producer: Producer,
    make_worker: Callable[..., Worker],
    queue_name: str,
    counter: Counter,
) -> None:
    async def handler(job: Job) -> None:
        if job.data == "missing":
            raise KeyError("width")
        if job.headers.get("x-deferred") is None and job.data == "later":
            counter.add(("deferred", job.attempt))
            raise Defer(0.2)
        counter.add((job.data, job.attempt))

    policy = RetryPolicy(max_attempts=1, throws=(KeyError,))
    worker = make_worker(queue=queue_name, handler=handler, retry=policy)
    await worker.start()
    await producer.publish("missing", queue=queue_name)
    await wait_until(lambda: _depth_is(amqp_url, f"{queue_name}.dlq", 1))
    await producer.publish("later", queue=queue_name)
    # Deferred twice or more: never dead-lettered although max_attempts=1, attempt stays 1.
    await counter.wait_for(3, timeout=15)
    assert set(counter.items[:3]) == {("deferred", 1)}
    assert worker.state.deferred >= 2 and worker.state.dead_lettered == 1


async def test_forward_needs_one_await_and_returns_the_confirmed_id(
    amqp_url: str,
    producer: Producer,
    make_worker: Callable[..., Worker],
    queue_name: str,
    counter: Counter,
) -> None:
    down = f"{queue_name}-down"
    await producer.declare(down)

    async def handler(job: Job) -> None:
        counter.add(await job.forward(job.data, queue=down, message_id=f"{job.message_id}-d"))

    worker = make_worker(queue=queue_name, handler=handler)
    await worker.start()
    upstream = await producer.publish("x", queue=queue_name)
    assert await counter.wait_for(1) == [f"{upstream}-d"]
    await wait_until(lambda: _depth_is(amqp_url, down, 1))


def test_queue_type_conflicting_with_a_queue_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="conflicts"):
        Worker("amqp://h/", queue=Queue("q", type="classic"), queue_type="quorum", handler=_noop)
    assert Worker("amqp://h/", queue=Queue("q", type="classic"), handler=_noop)


def _noop(job: Any) -> None:
    pass


async def _depth_is(amqp_url: str, name: str, depth: int) -> bool:
    return await queue_depth(amqp_url, name) == depth


async def _true(value: bool) -> bool:
    return value
