"""A group whose callback the broker never confirms (here: its queue is full and refuses
every publish): the member that completed the group is deferred to publish it again, and
once its deferrals are used up it is dead-lettered, not lost; the callback is recorded
`failed` with the reason and the fix, and that is logged at ERROR with the group's id (before:
the callback stayed `queued`, and its handle waited forever)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from aio_workq import Producer, Queue
from aio_workq.jobs import GroupResult, JobFailedError, JobState, SQLiteStore, Tasks, group
from tests.helpers import wait_until
from tests.test_jobs import running

pytestmark = pytest.mark.broker


async def test_a_callback_never_confirmed_is_failed_when_its_member_is_dead_lettered(
    amqp_url: str, tmp_path: Path, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[list[GroupResult]] = []
    caplog.set_level(logging.INFO, logger="aio_workq")
    async with Producer(amqp_url) as producer:
        tasks = Tasks(producer=producer, store=SQLiteStore(tmp_path / "jobs.db"))

        @tasks.task(queue=f"{queue_name}-m", name="t.one")
        async def one(n: int) -> int:
            return n

        # Room for no message, and every publish refused: the broker nacks the callback.
        full = Queue(
            f"{queue_name}-r", type="classic",
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )  # fmt: skip

        @tasks.task(queue=full, name="t.report")
        async def report(results: list[GroupResult]) -> int:
            calls.append(results)
            return len(results)

        # No worker consumes the callback's queue (a waiting consumer would take the message).
        async with running(tasks, amqp_url, concurrency=2, max_defers=1, queues=[one.queue.name]):
            handle = await group([one.s(1), one.s(2)], then=report).enqueue()
            with pytest.raises(JobFailedError) as failed:
                await handle.result(timeout=30)
            assert failed.value.error_type == "aio_workq.PublishNackedError"
            message = failed.value.error_message
            assert handle.group_id in message and "was not published" in message, message
            assert "dead-lettered" in message and "aio-workq dlq replay" in message, message
            errors = [
                r.getMessage() for r in caplog.records
                if r.levelno == logging.ERROR and handle.group_id in r.getMessage()
            ]  # fmt: skip
            assert any("recorded failed" in text for text in errors), errors
            # The member that completed the group is in its dead-letter queue, not lost.
            dead = producer.dead_letters(one.queue)

            async def one_dead_letter() -> bool:
                return await dead.count() == 1

            await wait_until(one_dead_letter, timeout=15)
            [letter] = await dead.read()
            assert letter.message_id in {h.job_id for h in handle.members}
            assert [(await h.status()).state for h in handle.members] == [JobState.SUCCEEDED] * 2
            assert calls == []
