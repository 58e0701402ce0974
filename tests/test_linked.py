"""A chain step's delivery waits for its one forward's confirm without a task (#22): the
confirm's record settles it. Each side road settles every delivery exactly once: a stop while
the confirm is pending (it arrives within the timeout, or not), a connection lost while it is
pending, a nacked confirm; a user's `after_handle` keeps the wait in the delivery's task.

The confirm is held by a `FaultProxy` between the worker and the broker: the handler
black-holes it just before its forward, so the publish (and all else) waits in the proxy."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aio_workq import (
    HandleInfo,
    Hook,
    Job,
    JobView,
    Outcome,
    Producer,
    PublishNackedError,
    Queue,
    RetryPolicy,
    Worker,
)
from aio_workq._consume.dispatch import Dispatcher
from tests.faultproxy import FaultProxy
from tests.helpers import queue_depth, wait_until

pytestmark = pytest.mark.broker

FAST_RETRY = RetryPolicy(max_attempts=2, initial_delay=0.1, jitter=0)


class Told(Hook):
    """Told each delivery's outcome the way aio-workq's job recorder is (`_workq_settled`, no
    `HandleInfo`): a hook the worker may tell outside the delivery's task (`Hooks.anywhere`),
    so the chain steps below take the road without a task."""

    _workq_untimed = True

    def __init__(self) -> None:
        self.told: list[tuple[Job, Outcome, BaseException | None]] = []
        self.changed = asyncio.Event()

    def after_handle(self, info: HandleInfo) -> None:  # (as the recorder's: not called)
        self._workq_settled(info.job, info.outcome, info.error, info.delay)

    def _workq_settled(
        self, job: JobView, outcome: Outcome, error: BaseException | None, delay: float | None
    ) -> None:
        assert isinstance(job, Job)
        self.told.append((job, outcome, error))
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.told) < count:
                self.changed.clear()
                await self.changed.wait()

    def outcomes(self, job: Job) -> list[Outcome]:
        return [outcome for told, outcome, _ in self.told if told is job]


class Relay:
    """A handler that forwards each message with `job.send` (not awaited) to `down`. The first
    message declares `down` (a forward that waits for the declaration, awaited in the task);
    from the second on, with `hold` set, the proxy is black-holed just before the forward."""

    def __init__(self, proxy: FaultProxy, down: str) -> None:
        self.proxy, self.down = proxy, down
        self.hold = False
        self.jobs: list[Job] = []
        self.sent = asyncio.Event()

    async def __call__(self, job: Job) -> None:
        self.jobs.append(job)
        if self.hold:
            self.hold = False
            self.proxy.black_hole()
        await job.send(job.body, queue=self.down)
        self.sent.set()


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy.to(amqp_url) as proxy:
        yield proxy


@pytest.fixture
async def unretrieved() -> list[dict[str, Any]]:
    """What the event loop reports as it collects a future whose exception nobody retrieved
    (a confirm whose failure settled a delivery must count as observed, as an await is)."""
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    return reported


def _collected(reported: list[dict[str, Any]], *holders: list[Any]) -> list[str]:
    """The unretrieved exceptions reported once `holders` (of jobs, and so of their
    confirms) are emptied and collected."""
    for holder in holders:
        holder.clear()
    gc.collect()
    return [str(context.get("exception")) for context in reported if "never retrieved" in
            str(context.get("message"))]  # fmt: skip


def _dispatcher(worker: Worker) -> Dispatcher:
    dispatcher = worker._dispatcher
    assert dispatcher is not None
    return dispatcher


async def _a_step_waiting_for_its_confirm(
    producer: Producer, worker: Worker, relay: Relay, told: Told, queue: str | Queue
) -> Job:
    """Start `worker`, run one chain step through (declaring the destination), then one whose
    confirm the proxy holds: its job, waiting for the confirm without a task."""
    await worker.start()
    await producer.publish(b"warm", queue=queue)
    await told.wait_for(1)
    assert told.outcomes(relay.jobs[0]) == [Outcome.OK]
    relay.hold, relay.sent = True, asyncio.Event()
    await producer.publish(b"held", queue=queue)
    async with asyncio.timeout(10):
        await relay.sent.wait()
    dispatcher = _dispatcher(worker)
    async with asyncio.timeout(10):
        while dispatcher.tasks:  # its task ends as the handler returns
            await asyncio.wait(set(dispatcher.tasks))
    assert dispatcher.in_flight == 1  # the delivery waits for its confirm, without a task
    assert len(told.told) == 1
    return relay.jobs[1]


async def test_a_stop_waits_for_a_pending_confirm_then_acks_the_delivery_once(
    amqp_url: str, proxy: FaultProxy, producer: Producer, queue_name: str
) -> None:
    """The stop begins while the confirm is held (a single-active-consumer queue: the stop
    sends no cancel, so it is in its wait at once); the confirm arrives within its timeout:
    the delivery is acked, told once, before the channel closes."""
    queue = Queue(queue_name, single_active_consumer=True)
    told, relay = Told(), Relay(proxy, f"{queue_name}-down")
    worker = Worker(proxy.url(amqp_url), queue=queue, handler=relay, hooks=[told])
    try:
        held = await _a_step_waiting_for_its_confirm(producer, worker, relay, told, queue)
        stopping = asyncio.ensure_future(worker.stop(timeout=10))
        await asyncio.sleep(0)  # the stop's first step: it waits for the delivery now
        assert not stopping.done()
        proxy.heal()
        async with asyncio.timeout(15):
            await stopping
    finally:
        await worker.stop(timeout=0)
    assert told.outcomes(held) == [Outcome.OK]
    assert len(told.told) == 2 and worker.state.processed == 2
    assert await queue_depth(amqp_url, queue_name) == 0  # acked, not back in the queue
    assert await queue_depth(amqp_url, relay.down) == 2


async def test_a_stop_that_runs_out_of_time_requeues_a_pending_delivery_once(
    amqp_url: str,
    proxy: FaultProxy,
    producer: Producer,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
    unretrieved: list[dict[str, Any]],
) -> None:
    """The confirm is still held when the stop's timeout ends: the delivery goes back to the
    queue, told once (requeued); the confirm that arrives after (healed then) settles
    nothing, and no task is left behind."""
    queue = Queue(queue_name, single_active_consumer=True)
    told, relay = Told(), Relay(proxy, f"{queue_name}-down")
    worker = Worker(proxy.url(amqp_url), queue=queue, handler=relay, hooks=[told])
    try:
        held = await _a_step_waiting_for_its_confirm(producer, worker, relay, told, queue)
        dispatcher = _dispatcher(worker)
        stopping = asyncio.ensure_future(worker.stop(timeout=0.2))
        await told.wait_for(2)  # told at the end of the stop's wait, as it requeues
        assert told.outcomes(held) == [Outcome.REQUEUED]
        assert dispatcher.in_flight == 0
        proxy.heal()  # the held forward now reaches the broker, and its confirm comes back
        async with asyncio.timeout(15):
            await stopping
        if dispatcher.tasks:  # none expected: a late settlement would start one
            await asyncio.wait(set(dispatcher.tasks), timeout=5)
    finally:
        await worker.stop(timeout=0)
    assert told.outcomes(held) == [Outcome.REQUEUED]
    # (the requeued message may come back to this consumer before its channel closes: it is
    # then requeued unrun, a delivery of its own)
    later = [outcome for job, outcome, _ in told.told if job not in relay.jobs[:2]]
    assert set(later) <= {Outcome.REQUEUED}
    assert worker.state.processed == 1
    assert not dispatcher.tasks and dispatcher.in_flight == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    del held
    assert _collected(unretrieved, told.told, relay.jobs) == []

    async def back_in_the_queue() -> bool:
        return await queue_depth(amqp_url, queue_name) == 1

    await wait_until(back_in_the_queue)  # never lost


async def test_a_connection_lost_while_a_confirm_is_pending_settles_each_delivery_once(
    amqp_url: str,
    proxy: FaultProxy,
    producer: Producer,
    queue_name: str,
    unretrieved: list[dict[str, Any]],
) -> None:
    """The connection is cut while the confirm is held: the forward fails (a worker's
    publisher does not resend: the broker redelivers the upstream message instead), its
    delivery is told `requeued` (its channel is gone: no retry copy, which would run the
    message once more beside the redelivery), and the redelivery runs; every delivery
    handled is told exactly once, none is left."""
    told, relay = Told(), Relay(proxy, f"{queue_name}-down")
    worker = Worker(
        proxy.url(amqp_url), queue=queue_name, handler=relay, hooks=[told], retry=FAST_RETRY
    )
    try:
        held = await _a_step_waiting_for_its_confirm(producer, worker, relay, told, queue_name)
        proxy.cut()
        proxy.heal()
        await told.wait_for(2)
        assert told.outcomes(held) == [Outcome.REQUEUED]  # not confirmed; the broker has it

        async def all_settled() -> bool:
            return (
                len(told.told) == len(relay.jobs) >= 3  # warm, held, its redelivery
                and not _dispatcher(worker).in_flight
                and await queue_depth(amqp_url, queue_name) == 0
            )

        await wait_until(all_settled, timeout=20)
    finally:
        await worker.stop(timeout=5)
    jobs = [job for job, _, _ in told.told]
    assert len(jobs) == len({id(job) for job in jobs}) == len(relay.jobs)
    assert {id(job) for job in jobs} == {id(job) for job in relay.jobs}
    assert any(job.redelivered for job in relay.jobs[2:])  # the broker gave it back
    del held
    assert _collected(unretrieved, told.told, relay.jobs, jobs) == []


async def _full_queue(producer: Producer, name: str) -> Queue:
    """A classic queue that holds one message, full: the broker nacks every publish to it."""
    spec = Queue(
        name, type="classic", dead_letter=False, delivery_limit=None,
        arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )  # fmt: skip
    await producer.declare(spec)
    await producer.publish(b"first", queue=spec)
    return spec


async def test_a_nacked_confirm_takes_the_failure_path_once_per_attempt(
    amqp_url: str, producer: Producer, queue_name: str, unretrieved: list[dict[str, Any]]
) -> None:
    """Each forward is nacked: its delivery is retried, then dead-lettered, told once per
    attempt, never acked; the ones after the first forward (which declared the queue) waited
    for their confirm without a task."""
    down = await _full_queue(producer, f"{queue_name}-down")
    told = Told()
    jobs: list[Job] = []

    async def relay(job: Job) -> None:
        jobs.append(job)
        await job.send(job.body, queue=down)

    worker = Worker(amqp_url, queue=queue_name, handler=relay, hooks=[told], retry=FAST_RETRY)
    try:
        await worker.start()
        await producer.publish_many([b"a", b"b", b"c"], queue=queue_name)
        await told.wait_for(6)
        dead = producer.dead_letters(queue_name)

        async def all_dead() -> bool:
            return await dead.count() == 3

        await wait_until(all_dead)
    finally:
        await worker.stop(timeout=5)
    assert len(jobs) == len(told.told) == 6
    for job in jobs:
        expected = Outcome.RETRY if job.attempt == 1 else Outcome.DEAD_LETTERED
        assert told.outcomes(job) == [expected]
    assert all(isinstance(error, PublishNackedError) for _, _, error in told.told)
    assert worker.state.processed == 0 and worker.state.failed == 6
    assert _dispatcher(worker).in_flight == 0
    assert await queue_depth(amqp_url, queue_name) == 0
    assert await queue_depth(amqp_url, down.name) == 1  # only the one it held
    assert _collected(unretrieved, told.told, jobs) == []


async def test_a_user_s_after_handle_still_runs_in_the_delivery_s_task(
    amqp_url: str, producer: Producer, queue_name: str
) -> None:
    """`Hook` says its methods run in the task that handles: with a user's `after_handle`,
    a chain step still waits for its confirm in its task, and the hook is told there."""
    seen: list[tuple[Outcome, str | None]] = []
    done = asyncio.Event()

    class InTask(Hook):
        def after_handle(self, info: HandleInfo) -> None:
            task: Any = asyncio.current_task()
            seen.append((info.outcome, task.get_name() if task is not None else None))
            if len(seen) == 3:
                done.set()

    async def relay(job: Job) -> None:
        await job.send(job.body, queue=f"{queue_name}-down")

    worker = Worker(amqp_url, queue=queue_name, handler=relay, hooks=[InTask()])
    try:
        await worker.start()
        await producer.publish_many([b"a", b"b", b"c"], queue=queue_name)
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        await worker.stop(timeout=5)
    assert seen == [(Outcome.OK, f"aio-workq worker {queue_name!r}")] * 3
