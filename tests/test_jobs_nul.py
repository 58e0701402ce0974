"""A NUL character, which PostgreSQL's text can't hold, in what a job records (the message of
a task's exception, a job id from a request) must not stop the store recording the other jobs."""

from __future__ import annotations

import pytest

from aio_workq import ConfigurationError, Producer
from aio_workq.jobs import JobNotFoundError, JobState, Tasks, group
from aio_workq.jobs.postgres import PostgresStore
from tests.helpers import running
from tests.test_jobs_postgres import schema, store  # noqa: F401 - the fixtures

pytestmark = [pytest.mark.postgres, pytest.mark.broker]


@pytest.fixture
def tasks(producer: Producer, store: PostgresStore) -> Tasks:  # noqa: F811 - the fixture
    """A registry recording in a fresh PostgreSQL schema."""
    return Tasks(producer=producer, store=store)


async def test_an_error_message_with_a_nul_is_recorded_and_the_next_jobs_too(
    amqp_url: str, producer: Producer, tasks: Tasks, queue_name: str
) -> None:
    @tasks.task(queue=queue_name)
    async def parse(data: str) -> int:
        if "\x00" in data:
            raise ValueError(f"not a number: {data!s}")  # the raw input, NUL and all
        return int(data)

    async with running(tasks.workers(amqp_url, retry=None)):
        bad = await parse.enqueue("4\x002")
        status = await bad.wait(timeout=20)
        assert status.state is JobState.FAILED
        assert status.error_message == "not a number: 4\\x002"
        # A message no task enqueued: an id and a task header with a NUL (dead-lettered).
        headers = {"x-workq-task": "no\x00such"}
        await producer.publish({}, queue=queue_name, message_id="raw\x00", headers=headers)
        await producer.publish({}, queue=queue_name, headers=headers)
        good = await parse.enqueue("42")
        assert await good.result(timeout=20) == 42  # the store still records this worker's jobs


async def test_a_job_id_with_a_nul_is_refused_and_never_found(
    tasks: Tasks, queue_name: str
) -> None:
    @tasks.task(queue=queue_name)
    async def noop() -> None: ...

    with pytest.raises(ConfigurationError, match="NUL"):
        noop.options(job_id="order-1\x00")
    with pytest.raises(ConfigurationError, match="NUL"):
        group([noop.s()], group_id="batch\x00")
    # A status route given such an id (`GET /jobs/%00`) answers "no such job", not "the store
    # is down" (a StoreError, a 503).
    for handle in (tasks.job("a\x00b"), noop.job("\x00")):
        with pytest.raises(JobNotFoundError):
            await handle.status()
        with pytest.raises(JobNotFoundError):
            await handle.cancel()
        with pytest.raises(JobNotFoundError):
            await handle.result(timeout=1)
