"""Groups on a real broker with the SQLite store: fan-out, fan-in with a callback that runs
exactly once with every member's outcome, failures, redeliveries, and the crash between the
claim and the callback's publish."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from aio_workq import (
    ConfigurationError,
    HandleInfo,
    Hook,
    IntegrationError,
    Producer,
    RetryPolicy,
)
from aio_workq.jobs import (
    GroupHandle,
    GroupResult,
    JobNotFoundError,
    JobState,
    Signature,
    SQLiteStore,
    TaskArgumentError,
    Tasks,
    Write,
    group,
)
from aio_workq.jobs._groups import GROUP_HEADER, INDEX_HEADER
from aio_workq.jobs._handle import TASK_HEADER
from tests.test_cli import cli
from tests.test_jobs import running

pytestmark = pytest.mark.broker


class App:
    """A registry with a member task and a callback task on queues of their own."""

    def __init__(self, tmp_path: Path, producer: Producer) -> None:
        self.store = SQLiteStore(tmp_path / "jobs.db")
        self.tasks = Tasks(producer=producer, store=self.store)
        self.calls: list[list[GroupResult]] = []
        self.runs: Counter[str] = Counter()
        self.done = asyncio.Event()
        suffix = uuid.uuid4().hex[:8]

        @self.tasks.task(queue=f"g-members-{suffix}", name="t.square")
        async def square(n: int) -> int:
            self.runs[f"square {n}"] += 1
            if n < 0:
                raise ValueError(f"negative: {n}")
            return n * n

        @self.tasks.task(queue=f"g-reports-{suffix}", name="t.report")
        async def report(results: list[GroupResult], title: str = "") -> str:
            self.calls.append(results)
            self.done.set()
            ok = sum(r.value for r in results if r.ok)
            return f"{title}{ok}/{len(results)}"

        self.square = square
        self.report = report


class Handled(Hook):
    """Counts the deliveries the workers settled."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = asyncio.Event()

    def after_handle(self, info: HandleInfo) -> None:
        self.count += 1
        self.changed.set()

    async def reach(self, n: int) -> None:
        async with asyncio.timeout(30):
            while self.count < n:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
def app(tmp_path: Path, producer: Producer) -> App:
    return App(tmp_path, producer)


async def test_twenty_members_then_one_callback_with_twenty_results(
    app: App, amqp_url: str
) -> None:
    async with running(app.tasks, amqp_url, concurrency=8):
        handle = await group(
            [app.square.s(n) for n in range(20)], then=app.report.partial(title="sum ")
        ).enqueue()
        assert await handle.result(timeout=60) == f"sum {sum(n * n for n in range(20))}/20"
        assert len(app.calls) == 1
        assert [r.value for r in app.calls[0]] == [n * n for n in range(20)]
        assert [r.job_id for r in app.calls[0]] == [h.job_id for h in handle.members]
        statuses = [await h.status() for h in handle.members]
        assert {s.state for s in statuses} == {JobState.SUCCEEDED}
        assert handle.callback is not None
        assert handle.callback.job_id == f"{handle.group_id}.callback"


async def test_a_failed_member_is_in_the_results_and_the_callback_runs_once(
    app: App, amqp_url: str
) -> None:
    async with running(app.tasks, amqp_url, concurrency=4, retry=RetryPolicy(max_attempts=2)):
        members = [app.square.s(3), app.square.s(-1), app.square.s(4)]
        handle = await group(members, then=app.report).enqueue()
        assert await handle.result(timeout=60) == "25/3"
        assert len(app.calls) == 1
        failed = app.calls[0][1]
        assert (failed.ok, failed.state) == (False, "failed")
        assert failed.error_type == "builtins.ValueError"
        assert failed.error_message == "negative: -1"
        assert app.runs["square -1"] == 2  # retried, then failed for good: counted once
        status = await handle.members[1].status()
        assert status.state is JobState.FAILED


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("a bug in __str__")


async def test_a_member_failing_with_an_unprintable_error_is_failed_in_the_callbacks_results(
    app: App, amqp_url: str
) -> None:
    """A member whose exception's `str()` raises, or holds a lone surrogate (a file name
    decoded with `surrogateescape`): it is counted failed, with a readable error text, and the
    callback runs exactly once (the group must not wait for it forever, nor the store's batch
    fail on it)."""

    @app.tasks.task(queue=app.square.queue.name, name="t.broken")
    async def broken(kind: str) -> None:
        if kind == "unprintable":
            raise _Unprintable()
        raise FileNotFoundError("no file " + b"caf\xe9".decode("utf-8", "surrogateescape"))

    async with running(app.tasks, amqp_url, concurrency=4, retry=None):
        members: list[Signature[Any]] = [
            app.square.s(3), broken.s("unprintable"), broken.s("surrogate"),
        ]  # fmt: skip
        handle = await group(members, then=app.report).enqueue()
        assert await handle.result(timeout=60) == "9/3"
        assert len(app.calls) == 1
        unprintable, surrogate = app.calls[0][1:]
        assert (unprintable.ok, unprintable.state) == (False, "failed")
        assert unprintable.error_type == "tests.test_jobs_groups._Unprintable"
        assert unprintable.error_message == "<tests.test_jobs_groups._Unprintable: str() failed>"
        assert (surrogate.ok, surrogate.state) == (False, "failed")
        assert surrogate.error_type == "builtins.FileNotFoundError"
        assert surrogate.error_message == "no file caf\\udce9"
        assert surrogate.error_message.encode("utf-8")  # readable: UTF-8 can carry it
        statuses = [await h.status() for h in handle.members]
        assert [s.state for s in statuses] == [JobState.SUCCEEDED, JobState.FAILED, JobState.FAILED]
        assert handle.callback is not None
        assert (await handle.callback.status()).state is JobState.SUCCEEDED
        assert len(app.calls) == 1


async def test_a_member_whose_task_this_worker_does_not_know_counts_as_failed(
    app: App, amqp_url: str, tmp_path: Path
) -> None:
    """The workers of the members' queue run an older release without the members' task: each
    member is dead-lettered (failed for good, as any member whose failure routing ends it), and
    the group counts it, so the callback runs with it failed (before: the group waited for it
    forever, its status `failed` and its callback never published)."""
    old = Tasks(store=SQLiteStore(tmp_path / "jobs.db"))

    @old.task(queue=app.square.queue, name="t.other")
    async def other(n: int) -> int:
        return n

    @old.task(queue=app.report.queue, name="t.report")
    async def report(results: list[GroupResult], title: str = "") -> str:
        return ",".join(f"{r.state}:{r.error_type}" for r in results)

    async with running(old, amqp_url, concurrency=4):
        handle = await group([app.square.s(1), app.square.s(2)], then=app.report).enqueue()
        assert await handle.result(timeout=30) == "failed:aio_workq.Reject,failed:aio_workq.Reject"
        status = await handle.members[0].status()
        assert status.state is JobState.FAILED and "no task 't.square'" in (
            status.error_message or ""
        )
    await app.store.close()


async def test_a_member_delivered_again_after_it_finished_does_not_run_the_callback_again(
    app: App, amqp_url: str, producer: Producer
) -> None:
    handled = Handled()
    async with running(app.tasks, amqp_url, concurrency=4, hooks=[handled]):
        handle = await group([app.square.s(n) for n in range(3)], then=app.report).enqueue()
        await handle.result(timeout=60)
        # The broker delivers member 1 again (as after a lost ack): the same message.
        for index in (1, 1, 2):
            await producer.publish(
                {"n": index}, app.square.queue, message_id=f"{handle.group_id}.{index}",
                headers={TASK_HEADER: "t.square", GROUP_HEADER: handle.group_id,
                         INDEX_HEADER: index},
            )  # fmt: skip
        await handled.reach(3 + 1 + 3)  # the members, the callback, the three redeliveries
        assert app.runs["square 1"] == 1  # skipped at delivery: it succeeded already
        assert len(app.calls) == 1
        assert (await handle.callback.status()).state is JobState.SUCCEEDED  # type: ignore[union-attr]


async def test_a_crash_between_the_claim_and_the_publish_is_recovered_by_the_redelivery(
    app: App, amqp_url: str, producer: Producer
) -> None:
    """The worker that claimed the callback died before publishing it (simulated: the
    members' terminal writes are made straight in the store, and nobody publishes); the
    member it was running comes back from the broker and publishes the callback."""
    g = group([app.square.s(n) for n in range(3)], then=app.report)
    spec_members = [f"{g.group_id}.{i}" for i in range(3)]
    from aio_workq.jobs._groupstore import GroupSpec

    await app.store.create_group(
        GroupSpec(
            group_id=g.group_id, member_ids=tuple(spec_members), callback_task="t.report",
            callback_queue=app.report.queue.name, callback_param="results", callback_body=b"{}",
        ),
        [],
    )  # fmt: skip
    dues = []
    for i, job_id in enumerate(spec_members):
        write = Write(
            job_id=job_id, task="t.square", queue=app.square.queue.name,
            state=JobState.SUCCEEDED, at=time.time(),
            result=str(i * i).encode(), content_type="application/json",
        )  # fmt: skip
        dues.append(await app.store.finish_member(write, group_id=g.group_id, index=i))
    assert dues[-1] is not None and dues[-1].claimed_now  # claimed; never published
    async with running(app.tasks, amqp_url, concurrency=2):
        await producer.publish(
            {"n": 2}, app.square.queue, message_id=spec_members[2],
            headers={TASK_HEADER: "t.square", GROUP_HEADER: g.group_id, INDEX_HEADER: 2},
        )  # fmt: skip
        async with asyncio.timeout(30):
            await app.done.wait()
        result = await app.tasks.job(f"{g.group_id}.callback").result(timeout=30)
        assert result == "5/3"
        assert app.runs["square 2"] == 0  # it had succeeded: skipped, the callback published
        assert len(app.calls) == 1


async def test_group_arguments_are_checked_before_anything_is_sent(
    app: App, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match="at least one"):
        group([], then=app.report)
    with pytest.raises(ConfigurationError, match="signatures"):
        group([app.square], then=app.report)  # type: ignore[list-item]
    with pytest.raises(TaskArgumentError, match="t.square"):
        await group([app.square.s("x")], then=app.report).enqueue()  # type: ignore[arg-type]
    with pytest.raises(TaskArgumentError, match="t.report"):
        await group([app.square.s(1)], then=app.report.partial(nope=1)).enqueue()
    bare = Tasks(producer=app.tasks.publisher)

    @bare.task(queue="unused", name="t.bare")
    async def bare_task(n: int) -> int:
        return n

    with pytest.raises(IntegrationError, match="store"):
        await group([bare_task.s(1)]).enqueue()
    await app.store.close()


async def test_a_callback_that_cannot_take_the_results_or_its_arguments_is_refused_at_enqueue(
    app: App,
) -> None:
    """A callback that would fail only after every member ran (maybe hours later): refused by
    enqueue(), naming the callback and the parameter, before anything is recorded or sent."""

    @app.tasks.task(queue="unused-callbacks", name="t.wrong_first")
    async def wrong_first(count: int) -> None: ...

    @app.tasks.task(queue="unused-callbacks", name="t.album")
    async def album(results: list[GroupResult], album: str, size: int = 0) -> None: ...

    cases = [
        (wrong_first, "'count'.*list\\[GroupResult\\]"),
        (album, "missing a required argument: 'album'"),  # not given with partial()
        (album.partial(album="x", size="big"), "'size'|size"),
    ]
    for n, (then, match) in enumerate(cases):
        gid = f"refused-{n}-{uuid.uuid4().hex[:6]}"
        with pytest.raises(TaskArgumentError, match="t\\.(wrong_first|album)") as caught:
            await group([app.square.s(1)], then=then, group_id=gid).enqueue()  # type: ignore[arg-type]
        assert caught.match(match), str(caught.value)
        assert await app.store.get(f"{gid}.0") is None  # nothing recorded, nothing sent
    await app.store.close()


async def test_the_callbacks_arguments_are_validated_as_its_parameters_at_enqueue(
    app: App,
) -> None:
    """A callback's other arguments are checked as a member's are, before anything is sent:
    one missing, or of the wrong type (before: only unknown names were refused; the group
    ran, and its callback failed for good with a PayloadError once every member had run)."""

    @app.tasks.task(queue=app.report.queue, name="t.titled")
    async def titled(results: list[GroupResult], title: str) -> str:
        return title

    for then in (titled, titled.partial(title=["x"])):
        made = group([app.square.s(1)], then=then)
        with pytest.raises(TaskArgumentError, match="t.titled.*title"):
            await made.enqueue()
        assert await app.store.get(f"{made.group_id}.0") is None  # nothing recorded or sent
    fine = await group([app.square.s(2)], then=titled.partial(title="t")).enqueue()
    assert fine.callback is not None and (await fine.callback.status()).state is JobState.QUEUED
    await app.store.close()


async def test_a_worker_killed_right_after_claiming_the_callback_still_gets_it_run_once(
    amqp_url: str, tmp_path: Path
) -> None:
    """kill -9 of the process that claimed the callback, before it published it and acked the
    member: the member is redelivered (to the other process, or the restarted one), finds the
    callback claimed and unpublished, publishes it; it runs exactly once."""
    queue = f"g-kill-{uuid.uuid4().hex[:8]}"
    db, marker = tmp_path / "jobs.db", tmp_path / "die.mark"
    env = {
        **os.environ, "AMQP_URL": amqp_url, "PYTHONUNBUFFERED": "1",
        "WORKQ_GROUPS_DB": str(db), "WORKQ_GROUPS_DIE": str(marker), "WORKQ_GROUPS_QUEUE": queue,
    }  # fmt: skip
    args = ["worker", "tests.jobs_groups_app:workers", "--processes", "2"]
    async with cli(*args, env=env) as sup:
        await sup.wait_for(
            lambda: len(sup.lines(r"worker consuming", "err")) >= 6, timeout=60,
            what="the workers consuming",
        )  # fmt: skip
        store = SQLiteStore(db)
        try:
            async with Producer(amqp_url) as producer:
                tasks = Tasks(producer=producer, store=store)

                @tasks.task(queue=queue, name="g.square")
                async def square(n: int) -> int:
                    return n * n  # runs in the worker processes (tests/jobs_groups_app.py)

                @tasks.task(queue=f"{queue}-report", name="g.report")
                async def report(results: list[GroupResult]) -> int:
                    return 0

                handle = await group([square.s(n) for n in range(10)], then=report).enqueue()
                assert await handle.result(timeout=90) == sum(n * n for n in range(10))
        finally:
            await store.close()
        assert len(sup.lines(r"^DYING ")) == 1, sup.out
        callbacks = sup.lines(r"^CALLBACK (\d+) (\d+)")
        assert [m[2] for m in callbacks] == ["10"], sup.out
        sup.proc.terminate()
        await sup.exit_code()


async def test_a_group_id_too_long_for_its_members_ids_is_refused_before_anything_is_recorded(
    app: App,
) -> None:
    # Its members' ids (`<group id>.<i>`, message ids: 255 bytes at most) could not be sent:
    # the group and its members were recorded first, then every publish failed, and their
    # handles read `queued` for a day (the store's TTL) although nothing was ever sent.
    with pytest.raises(ConfigurationError, match="255 bytes"):
        group([app.square.s(1)], then=app.report, group_id="é" * 124)  # `.callback`: 257
    with pytest.raises(ConfigurationError, match="255 bytes"):
        group([app.square.s(n) for n in range(10)], group_id="g" * 254)  # `.9`: 256
    with pytest.raises(ConfigurationError, match="str"):
        group([app.square.s(1)], group_id=7)  # type: ignore[arg-type]
    for job_id in ("é" * 124 + ".0", "g" * 254 + ".0"):
        with pytest.raises(JobNotFoundError):
            await app.tasks.job(job_id).status()
    members = [app.square.s(n) for n in range(10)]
    fits: GroupHandle[Any] = await group(members, group_id="g" * 253).enqueue()
    assert [m.job_id for m in fits.members][-1] == "g" * 253 + ".9"
    await app.store.close()
