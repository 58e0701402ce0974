"""A task renamed between deploys (moved to another module, say: its default name is
`module.function`): the jobs of its old name still on the queue run with `aliases=`."""

from __future__ import annotations

import pytest

from aio_workq import ConfigurationError, Producer
from aio_workq.jobs import JobState, MemoryStore, Tasks, group


async def test_jobs_of_the_old_name_run_on_the_renamed_task(
    amqp_url: str, producer: Producer, queue_name: str
) -> None:
    store = MemoryStore()
    old = Tasks(producer=producer, store=store)  # the release that enqueued them

    @old.task(queue=queue_name, name="app.tasks.resize")
    async def resize(path: str, width: int = 800) -> str:
        raise AssertionError("the old release never runs")

    @old.task(queue=queue_name, name="app.tasks.report")
    async def report(results: list[object]) -> int:
        raise AssertionError("the old release never runs")

    queued = await resize.enqueue("cat.png", width=400)
    batch = await group([resize.s("a.png"), resize.s("b.png")], then=report).enqueue()

    new = Tasks(producer=producer, store=store)  # the next release, renamed

    @new.task(queue=queue_name, name="thumbs.resize", aliases=["app.tasks.resize"])
    async def make_thumbnail(path: str, width: int = 800) -> str:
        return f"{path}@{width}"

    @new.task(queue=queue_name, name="thumbs.report", aliases=("app.tasks.report",))
    async def summarize(results: list[object]) -> int:
        return len(results)

    workers = new.workers(amqp_url, retry=None)
    try:
        for worker in workers:
            await worker.start()
        assert await new.job(queued.job_id).result(timeout=20) == "cat.png@400"
        assert await new.job(batch.group_id + ".callback").result(timeout=20) == 2
        for member in batch.members:
            assert (await member.status()).state is JobState.SUCCEEDED
    finally:
        for worker in workers:
            await worker.stop(timeout=1)


def test_an_alias_is_one_name_more_of_the_registry() -> None:
    tasks = Tasks()

    @tasks.task(queue="q-alias", name="b.task", aliases=["a.task"])
    async def task_b() -> None: ...

    with pytest.raises(ConfigurationError, match="'a.task' is declared already"):

        @tasks.task(queue="q-alias", name="a.task")
        async def task_a() -> None: ...

    with pytest.raises(ConfigurationError, match="'b.task' is declared already"):

        @tasks.task(queue="q-alias", name="c.task", aliases=["b.task"])
        async def task_c() -> None: ...

    with pytest.raises(ConfigurationError, match="aliases"):
        tasks.task(queue="q-alias", aliases="a.task")  # a string, not a list of them
    with pytest.raises(ConfigurationError, match="task name must be"):
        tasks.task(queue="q-alias", aliases=["bad name"])
