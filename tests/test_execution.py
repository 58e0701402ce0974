"""The handler runner, offline: where a handler runs, its timeout, and bad handlers refused."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

from aio_workq import ConfigurationError, JobData
from aio_workq._consume.execution import HandlerRunner


class FakeJob:
    """Just what the runner touches of a `Job`."""

    def snapshot(self) -> JobData:
        return JobData(b"x", None, {}, "m", 1, False, "q", "")


def job_pid(job: JobData) -> int:  # module level: picklable for the process pool
    return os.getpid()


async def test_async_handlers_run_on_the_loop_and_plain_ones_in_threads() -> None:
    loop_thread = threading.get_ident()

    async def on_loop(job: Any) -> int:
        return threading.get_ident()

    def in_thread(job: Any) -> int:
        return threading.get_ident()

    runner = HandlerRunner(on_loop, executor="thread", concurrency=2, timeout=None, name="t")
    assert runner.is_async and await runner.run(FakeJob()) == loop_thread  # type: ignore[arg-type]
    runner = HandlerRunner(in_thread, executor="thread", concurrency=2, timeout=None, name="t")
    assert not runner.is_async
    assert await runner.run(FakeJob()) != loop_thread  # type: ignore[arg-type]
    runner.close()


async def test_process_handlers_get_a_job_data_in_another_process() -> None:
    runner = HandlerRunner(job_pid, executor="process", concurrency=1, timeout=None, name="p")
    try:
        assert await runner.run(FakeJob()) != os.getpid()  # type: ignore[arg-type]
    finally:
        runner.close()


async def test_a_handler_over_its_timeout_fails_with_timeout_error() -> None:
    async def slow(job: Any) -> None:
        await asyncio.Event().wait()  # never set: only the timeout ends it

    runner = HandlerRunner(slow, executor="thread", concurrency=1, timeout=0.05, name="t")
    with pytest.raises(TimeoutError):
        await runner.run(FakeJob())  # type: ignore[arg-type]


async def test_the_timeout_error_says_it_was_the_handler_timeout() -> None:
    """A bare `TimeoutError()` left a job's status with an empty error message (and the log
    line with `TimeoutError()`): say which limit it ran over. A TimeoutError the handler
    raises itself (an HTTP client's) is left as it is."""

    async def slow(job: Any) -> None:
        await asyncio.Event().wait()

    def slow_sync(job: Any) -> None:
        time.sleep(0.3)

    async def own(job: Any) -> None:
        raise TimeoutError("the upstream API did not answer")

    for handler in (slow, slow_sync):
        runner = HandlerRunner(handler, executor="thread", concurrency=1, timeout=0.05, name="t")
        with pytest.raises(TimeoutError, match=r"ran over its handler_timeout of 0\.05 s"):
            await runner.run(FakeJob())  # type: ignore[arg-type]
    runner = HandlerRunner(own, executor="thread", concurrency=1, timeout=5, name="t")
    with pytest.raises(TimeoutError, match="^the upstream API did not answer$"):
        await runner.run(FakeJob())  # type: ignore[arg-type]


class NamedJob(FakeJob):
    def __init__(self, name: str) -> None:
        self.name = name


async def test_the_timeout_of_a_plain_handler_starts_when_it_starts_not_when_it_is_queued() -> None:
    # One thread; the first handler runs 1.5 s and times out at 0.5 s, but its thread can't be
    # stopped: the next handlers wait for the thread, and that wait is not their time (#20).
    ran: list[str] = []

    def handler(job: Any) -> str:
        ran.append(job.name)
        if job.name == "slow":
            threading.Event().wait(1.5)  # a 1.5 s handler (the event is never set)
        return str(job.name)

    runner = HandlerRunner(handler, executor="thread", concurrency=1, timeout=0.5, name="t")
    outcomes: list[object] = []
    try:
        for name in ("slow", "fast-1", "fast-2", "fast-3"):
            try:
                outcomes.append(await runner.run(NamedJob(name)))  # type: ignore[arg-type]
            except TimeoutError as exc:
                outcomes.append(type(exc))
    finally:
        runner.close()
    assert outcomes == [TimeoutError, "fast-1", "fast-2", "fast-3"]
    assert ran == ["slow", "fast-1", "fast-2", "fast-3"]


@pytest.mark.parametrize(
    ("handler", "executor", "match"),
    [
        ("not callable", "thread", "callable"),
        (job_pid, "fork", "executor"),
        (lambda job: None, "process", "picklable"),
    ],
)
def test_bad_handlers_and_executors_are_refused(handler: Any, executor: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        HandlerRunner(handler, executor=executor, concurrency=1, timeout=None, name="t")


def test_an_async_handler_is_refused_for_the_process_pool() -> None:
    async def handler(job: Any) -> None:
        pass

    with pytest.raises(ConfigurationError, match="async"):
        HandlerRunner(handler, executor="process", concurrency=1, timeout=None, name="t")
