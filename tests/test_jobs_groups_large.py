"""A group whose callback message is too large to publish (its body carries the members'
results): the group ends, the callback job is recorded `failed` with an error naming the size
and the fix, and the member that completed the group is acked, not dead-lettered for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from aio_workq import Producer, RetryPolicy
from aio_workq.jobs import GroupResult, JobFailedError, JobState, SQLiteStore, Tasks, group
from aio_workq.jobs import _members as members_module
from aio_workq.jobs._groups import GROUP_HEADER, INDEX_HEADER
from aio_workq.jobs._handle import TASK_HEADER
from tests.test_jobs import running
from tests.test_jobs_groups import Handled

pytestmark = pytest.mark.broker


class BigResults:
    """The tasks of these tests: `t.big` returns a result of `n` bytes, `t.report` is the
    group's callback (its calls kept in `calls`: none is expected)."""

    def __init__(self, tasks: Tasks, queue_name: str) -> None:
        self.tasks = tasks
        self.calls: list[list[GroupResult]] = []

        @tasks.task(queue=f"{queue_name}-m", name="t.big")
        async def big(n: int) -> str:
            return "x" * n

        @tasks.task(queue=f"{queue_name}-r", name="t.report")
        async def report(results: list[GroupResult]) -> int:
            self.calls.append(results)
            return len(results)

        self.big, self.report = big, report


async def test_a_callback_too_large_for_the_broker_is_failed_and_the_group_ends(
    small_messages: int, amqp_url: str, tmp_path: Path, queue_name: str
) -> None:
    handled = Handled()
    async with Producer(amqp_url) as producer:
        app = BigResults(
            Tasks(producer=producer, store=SQLiteStore(tmp_path / "jobs.db")), queue_name
        )
        tasks, big, report, calls = app.tasks, app.big, app.report, app.calls
        retry = RetryPolicy(max_attempts=2, initial_delay=0.1)
        async with running(tasks, amqp_url, concurrency=4, retry=retry, max_defers=3,
                           hooks=[handled]):  # fmt: skip
            handle = await group(
                [big.s(10), big.s(small_messages), big.s(small_messages // 2)], then=report
            ).enqueue()
            with pytest.raises(JobFailedError) as failed:
                await handle.result(timeout=30)
            await handled.reach(3)
            assert handle.callback is not None
            status = await handle.callback.status()
            assert status.state is JobState.FAILED
            assert failed.value.error_type == "aio_workq.SerializationError"
            message = failed.value.error_message or ""
            assert "too large" in message and "max_message_size (262,144 bytes)" in message, message
            assert "reference" in message, message  # the fix: results small, a reference
            assert [(await h.status()).state for h in handle.members] == [JobState.SUCCEEDED] * 3
            assert calls == []
            assert await producer.dead_letters(big.queue).count() == 0


async def test_a_callback_over_the_librarys_own_limit_is_failed_once_and_never_sent(
    monkeypatch: pytest.MonkeyPatch, amqp_url: str, tmp_path: Path, queue_name: str
) -> None:
    """Over what the publisher refuses to send (128 MiB; lowered here): nothing is sent, the
    callback is recorded failed, and a member delivered again afterwards changes nothing."""
    monkeypatch.setattr(members_module, "MAX_CALLBACK_SIZE", 50_000)
    handled = Handled()
    async with Producer(amqp_url) as producer:
        app = BigResults(
            Tasks(producer=producer, store=SQLiteStore(tmp_path / "jobs.db")), queue_name
        )
        tasks, big, report, calls = app.tasks, app.big, app.report, app.calls
        async with running(tasks, amqp_url, concurrency=4, max_defers=3, hooks=[handled]):
            handle = await group([big.s(30_000), big.s(30_000)], then=report).enqueue()
            with pytest.raises(JobFailedError) as failed:
                await handle.result(timeout=30)
            message = failed.value.error_message or ""
            assert "too large to send" in message and "50,000 bytes aio-workq sends" in message
            await handled.reach(2)
            # Both members delivered again (as after a lost ack): nothing is sent, nor run.
            for index in (0, 1):
                await producer.publish(
                    {"n": 30_000}, big.queue, message_id=f"{handle.group_id}.{index}",
                    headers={TASK_HEADER: "t.big", GROUP_HEADER: handle.group_id,
                             INDEX_HEADER: index},
                )  # fmt: skip
            await handled.reach(4)
            assert handled.count == 4  # no callback delivery, no deferral
            assert calls == []
            assert handle.callback is not None
            assert (await handle.callback.status()).state is JobState.FAILED
            assert [(await h.status()).state for h in handle.members] == [JobState.SUCCEEDED] * 2
            assert await producer.dead_letters(big.queue).count() == 0
