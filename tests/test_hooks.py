"""Hooks (issue 14, part 2) and the log fields of lines about a message (part 5)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest

from aio_workq import (
    ConfigurationError,
    Connection,
    HandleInfo,
    Hook,
    Job,
    JobView,
    MessageFields,
    Outcome,
    Producer,
    PublishInfo,
    Reject,
    Retry,
    RetryPolicy,
    UnroutableError,
    Worker,
)
from aio_workq._hooks import Hooks
from scripts.broker import LocalBroker
from tests.helpers import Counter, queue_depth, wait_until


class Recorder(Hook):
    """Records what it sees; adds a header to every publish."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str, Any]] = []
        self.confirmed: list[tuple[str, BaseException | None, Any]] = []
        self.handled: list[HandleInfo] = []
        self.events: list[str] = []
        self.handled_counter = Counter()
        self.lost: list[str] = []
        self.reconnected = Counter()

    def before_publish(self, message: PublishInfo) -> Any:
        message.headers["x-recorded"] = "yes"
        self.published.append((message.message_id, message.destination, message.window))
        return f"state-{message.message_id}"

    def after_publish(self, message: PublishInfo, state: Any) -> None:
        assert message.seconds >= 0
        self.confirmed.append((message.message_id, message.error, state))

    @contextmanager
    def _around(self, job: JobView) -> Iterator[None]:
        self.events.append(f"enter {job.message_id}")
        try:
            yield
        except BaseException as exc:
            self.events.append(f"exit {job.message_id} {type(exc).__name__}")
            raise
        self.events.append(f"exit {job.message_id}")

    def handling(self, job: JobView, queue: str) -> Any:
        return self._around(job)

    def after_handle(self, info: HandleInfo) -> None:
        self.events.append(f"after {info.job.message_id}")
        self.handled.append(info)
        self.handled_counter.add(info)

    def on_connection_lost(self, url: str) -> None:
        self.lost.append(url)

    def on_reconnect(self, url: str) -> None:
        self.reconnected.add(url)


class Broken(Hook):
    """Fails in every method."""

    def before_publish(self, message: PublishInfo) -> Any:
        raise RuntimeError("before_publish broke")

    def after_publish(self, message: PublishInfo, state: Any) -> None:
        raise RuntimeError("after_publish broke")

    def handling(self, job: JobView, queue: str) -> Any:
        raise RuntimeError("handling broke")

    def after_handle(self, info: HandleInfo) -> None:
        raise RuntimeError("after_handle broke")


class BrokenExit(Hook):
    @contextmanager
    def _around(self) -> Iterator[None]:
        yield
        raise RuntimeError("exit broke")

    def handling(self, job: JobView, queue: str) -> Any:
        return self._around()


def test_hooks_are_checked_and_none_means_no_calls() -> None:
    assert Hooks.of([]) is None
    assert Hooks.of(None) is None
    assert Hooks.of([Hook()]) is not None
    with pytest.raises(ConfigurationError, match=r"hooks=\[hook\]"):
        Hooks.of(Hook())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="subclass aio_workq.Hook"):
        Worker("amqp://localhost/", queue="q", handler=print, hooks=[object()])  # type: ignore[list-item]


@pytest.mark.broker
async def test_publish_hooks_see_the_message_the_header_they_add_and_the_confirm(
    amqp_url: str, queue_name: str
) -> None:
    recorder = Recorder()
    async with Producer(amqp_url, hooks=[recorder]) as producer:
        await producer.declare(queue_name)
        message_id = await producer.publish(b"x", queue=queue_name, headers={"mine": 1})
        with pytest.raises(UnroutableError):
            await producer.publish(b"y", exchange="amq.direct", routing_key=queue_name)
    assert recorder.published[0] == (message_id, queue_name, 10_000)
    assert recorder.confirmed[0] == (message_id, None, f"state-{message_id}")
    assert isinstance(recorder.confirmed[1][1], UnroutableError)
    assert recorder.confirmed[1][2] == f"state-{recorder.published[1][0]}"
    assert recorder.published[1][1] == "amq.direct"


@pytest.mark.broker
async def test_handle_hooks_see_each_outcome_wrap_the_settlement_and_forwards_carry_headers(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, amqp_url: str
) -> None:
    recorder = Recorder()
    seen_headers = Counter()
    downstream = f"{queue_name}-down"
    await producer.declare(downstream)

    async def handle(job: Job) -> None:
        kind = job.data
        if kind == "retry" and job.attempt == 1:
            raise Retry(delay=0)
        if kind == "reject":
            raise Reject("no")
        if kind == "forward":
            await job.forward("next", queue=downstream)

    async def collect(job: Job) -> None:
        seen_headers.add(dict(job.headers))

    worker = make_worker(queue=queue_name, handler=handle, hooks=[recorder])
    await worker.start()
    await make_worker(queue=downstream, handler=collect).start()
    ids = {kind: await producer.publish(kind, queue=queue_name) for kind in
           ("ok", "retry", "reject", "forward")}  # fmt: skip
    infos = await recorder.handled_counter.wait_for(5)
    outcomes = sorted((i.job.message_id, i.outcome, i.job.attempt) for i in infos)
    assert outcomes == sorted(
        [
            (ids["ok"], Outcome.OK, 1),
            (ids["retry"], Outcome.RETRY, 1),
            (ids["retry"], Outcome.OK, 2),
            (ids["reject"], Outcome.DEAD_LETTERED, 1),
            (ids["forward"], Outcome.OK, 1),
        ]
    )
    by_outcome = {(i.job.message_id, i.outcome): i for i in infos}
    assert isinstance(by_outcome[ids["reject"], Outcome.DEAD_LETTERED].error, Reject)
    assert isinstance(by_outcome[ids["retry"], Outcome.RETRY].error, Retry)
    assert all(i.seconds is not None and i.seconds >= 0 for i in infos)
    # The context manager is exited after after_handle, for every delivery.
    for info in infos:
        mid = info.job.message_id
        assert [e for e in recorder.events if e.endswith(str(mid))][-2:] == [
            f"after {mid}",
            f"exit {mid}",
        ]
    # The worker's hooks saw the forward, and the header they added went with it.
    headers = (await seen_headers.wait_for(1))[0]
    assert headers["x-recorded"] == "yes"
    assert [p for p in recorder.published if p[1] == downstream]


@pytest.mark.broker
async def test_failing_hooks_are_logged_and_lose_no_message(
    producer: Producer,
    make_worker: Callable[..., Worker],
    queue_name: str,
    amqp_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handled = Counter()

    async def handle(job: Job) -> None:
        handled.add(job.message_id)

    hooks = [Broken(), BrokenExit(), Recorder()]
    worker = make_worker(queue=queue_name, handler=handle, hooks=hooks, concurrency=4)
    await worker.start()
    async with Producer(amqp_url, hooks=[Broken()]) as hooked:
        ids = await hooked.publish_many([f"m{i}" for i in range(20)], queue=queue_name)
    await handled.wait_for(20)
    await wait_until(lambda: _settled(worker, 20))
    assert sorted(handled.items) == sorted(ids)  # each once
    assert worker.state.failed == 0
    assert await queue_depth(amqp_url, queue_name) == 0
    failures = [r for r in caplog.records if "hook" in r.getMessage() and "failed in" in r.msg]
    places = {r.args[1] for r in failures if isinstance(r.args, tuple)}
    assert places == {"before_publish", "after_publish", "handling", "after_handle",
                      "handling (exit)"}  # fmt: skip
    handling = [r for r in failures if r.args and r.args[1] == "handling"]  # type: ignore[index]
    assert all(r.__dict__["queue"] == queue_name and r.__dict__["attempt"] == 1 for r in handling)


async def _settled(worker: Worker, count: int) -> bool:
    return worker.state.processed == count and worker.state.in_flight == 0


@pytest.mark.broker
async def test_message_lines_carry_queue_message_id_and_attempt(
    producer: Producer,
    make_worker: Callable[..., Worker],
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app_log = logging.getLogger("tests.app")
    done = Counter()
    fields = MessageFields()

    async def handle(job: Job) -> None:
        app_log.info("working on it")
        logging.getLogger("aio_workq").info("a library line without extra=")
        if job.attempt == 1:
            raise ValueError("first attempt fails")
        done.add(job.message_id)

    library: list[dict[str, Any]] = []  # as the aio_workq logger hands them to its handlers

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "a library line without extra=":
                library.append(dict(record.__dict__))

    keep = Keep()
    logging.getLogger("aio_workq").addHandler(keep)
    caplog.handler.addFilter(fields)
    try:
        with caplog.at_level(logging.INFO):
            policy = RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0)
            await make_worker(queue=queue_name, handler=handle, retry=policy).start()
            message_id = await producer.publish("x", queue=queue_name)
            await done.wait_for(1)
            outside = "not about a message"
            app_log.info(outside)
    finally:
        caplog.handler.removeFilter(fields)
        logging.getLogger("aio_workq").removeHandler(keep)
    about = [r for r in caplog.records if r.getMessage() == "working on it"]
    fields_of = [(r.__dict__["queue"], r.__dict__["message_id"], r.__dict__["attempt"])
                 for r in about]  # fmt: skip
    assert fields_of == [(queue_name, message_id, 1), (queue_name, message_id, 2)]
    warning = next(
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "first attempt fails" in r.getMessage()
    )
    assert warning.__dict__["message_id"] == message_id
    assert warning.__dict__["attempt"] == 1
    assert [r["attempt"] for r in library] == [1, 2]  # from the aio_workq logger's own filter
    assert {r["message_id"] for r in library} == {message_id}
    line = next(r for r in caplog.records if r.getMessage() == outside)
    assert "message_id" not in line.__dict__


@pytest.mark.broker
async def test_connection_hooks_see_a_lost_connection_and_the_reconnect(
    local_broker: LocalBroker, queue_name: str
) -> None:
    recorder = Recorder()
    name = f"hooks-{uuid.uuid4().hex[:8]}"
    async with Connection(local_broker.url, name=name, hooks=[recorder]) as connection:
        await _close_connection(local_broker, name)
        await recorder.reconnected.wait_for(1, timeout=30)
        assert connection.is_connected
    assert len(recorder.lost) == 1
    assert "***" in recorder.lost[0] and "guest:guest" not in recorder.lost[0]
    assert recorder.reconnected.items == recorder.lost


async def _close_connection(broker: LocalBroker, name: str) -> None:
    listed = await asyncio.to_thread(
        broker.ctl, "list_connections", "pid", "client_properties", "-q"
    )
    pids = [line.split("\t")[0] for line in listed.splitlines() if name in line]
    assert len(pids) == 1, listed
    await asyncio.to_thread(broker.ctl, "close_connection", pids[0], "test")


@pytest.mark.broker
async def test_a_delivery_cut_short_by_the_stop_is_reported_requeued(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, amqp_url: str
) -> None:
    recorder = Recorder()
    started = Counter()

    async def handle(job: Job) -> None:
        started.add(job.message_id)
        await asyncio.Event().wait()  # until the stop cancels it

    worker = make_worker(queue=queue_name, handler=handle, hooks=[recorder])
    await worker.start()
    message_id = await producer.publish("x", queue=queue_name)
    await started.wait_for(1)
    await worker.stop(timeout=0)
    (info,) = recorder.handled
    assert (info.job.message_id, info.outcome) == (message_id, Outcome.REQUEUED)
    assert info.seconds is not None  # the handler ran, until cancelled
    assert recorder.events[-1] == f"exit {message_id} CancelledError"  # passed to __exit__

    async def back_in_the_queue() -> bool:
        return await queue_depth(amqp_url, queue_name) == 1

    await wait_until(back_in_the_queue)


@pytest.mark.broker
async def test_a_plain_def_handler_in_a_thread_logs_with_the_message_fields(
    producer: Producer,
    make_worker: Callable[..., Worker],
    queue_name: str,
) -> None:
    seen: list[dict[str, Any]] = []
    done = Counter()
    fields = MessageFields()

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fields.filter(record)
            seen.append(dict(record.__dict__))
            done.add(record.getMessage())

    log = logging.getLogger("tests.thread_handler")
    keep = Keep()
    log.addHandler(keep)
    log.setLevel(logging.INFO)

    def handle(job: Job) -> None:  # runs in the worker's thread pool
        log.info("in a thread")

    try:
        await make_worker(queue=queue_name, handler=handle).start()
        message_id = await producer.publish("x", queue=queue_name)
        await done.wait_for(1)
    finally:
        log.removeHandler(keep)
    assert seen[0]["message_id"] == message_id and seen[0]["queue"] == queue_name


def test_handle_info_stays_a_frozen_dataclass() -> None:
    """`HandleInfo` is built per message by its own `__init__`: still frozen, equal by value."""
    info = HandleInfo(cast(Any, "job"), "q", Outcome.RETRY, None, 0.5)
    assert info.delay is None and info.seconds == 0.5 and info.outcome is Outcome.RETRY
    assert info == HandleInfo(cast(Any, "job"), "q", Outcome.RETRY, None, 0.5, None)
    assert hash(info) == hash(dataclasses.replace(info))
    assert dataclasses.replace(info, delay=2.0).delay == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.queue = "other"  # type: ignore[misc]
