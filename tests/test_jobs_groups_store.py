"""The group and rate-limit rules every store follows (memory, SQLite here; PostgreSQL in
test_jobs_groups_postgres.py): concurrent last members claim the callback exactly once, a
member counts once, a claimed but unpublished callback is handed out again to a redelivered
member; concurrent token takes get distinct, evenly spaced slots."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from aio_workq import ConfigurationError
from aio_workq.jobs import GroupStore, JobState, MemoryStore, RateStore, SQLiteStore, Write
from aio_workq.jobs._groupstore import CallbackDue, GroupSpec

MEMBERS = 16


def _spec(group_id: str, n: int = MEMBERS) -> GroupSpec:
    return GroupSpec(
        group_id=group_id, member_ids=tuple(f"{group_id}.{i}" for i in range(n)),
        callback_task="t.report", callback_queue="reports", callback_param="results",
        callback_body=b'{"title":"x"}',
    )  # fmt: skip


def _terminal(job_id: str, i: int) -> Write:
    if i % 5 == 3:
        return Write(
            job_id=job_id, task="t.m", queue="q", state=JobState.FAILED, at=time.time(),
            error_type="builtins.ValueError", error_message=f"bad {i}",
        )  # fmt: skip
    return Write(
        job_id=job_id, task="t.m", queue="q", state=JobState.SUCCEEDED, at=time.time(),
        result=str(i).encode(), content_type="application/json",
    )  # fmt: skip


async def check_group_claims(stores: Sequence[Any]) -> None:
    """`stores`: several handles on one store (own connections/threads), used concurrently.

    Every member is finished twice (a redelivery), all at once from all the stores: exactly
    one finish claims the callback, with every member's outcome in order.
    """
    first = stores[0]
    group_id = uuid.uuid4().hex
    spec = _spec(group_id)
    queued = [
        Write(job_id=j, task="t.m", queue="q", state=JobState.QUEUED, at=time.time())
        for j in spec.member_ids
    ]
    await first.create_group(spec, queued)
    await first.create_group(spec, queued)  # idempotent: enqueue again after an error

    calls = [
        stores[(i + round_) % len(stores)].finish_member(
            _terminal(spec.member_ids[i], i), group_id=group_id, index=i
        )
        for round_ in range(2)
        for i in range(MEMBERS)
    ]
    results: list[CallbackDue | None] = await asyncio.gather(*calls)
    claims = [due for due in results if due is not None and due.claimed_now]
    assert len(claims) == 1, results
    due = claims[0]
    assert (due.task, due.queue, due.param, due.body) == (
        "t.report", "reports", "results", b'{"title":"x"}',
    )  # fmt: skip
    assert [m.index for m in due.members] == list(range(MEMBERS))
    assert [m.job_id for m in due.members] == list(spec.member_ids)
    for i, m in enumerate(due.members):
        if i % 5 == 3:
            assert (m.state, m.error_message) == ("failed", f"bad {i}")
        else:
            assert (m.state, m.result) == ("succeeded", str(i).encode())

    # Claimed, not published: a member delivered again gets it again (not as the claim).
    again = await first.finish_member(_terminal(spec.member_ids[0], 0), group_id=group_id, index=0)
    assert again is not None and not again.claimed_now
    await first.callback_published(group_id)
    for i in range(MEMBERS):
        assert (
            await stores[-1].finish_member(
                _terminal(spec.member_ids[i], i), group_id=group_id, index=i
            )
            is None
        )
    # The members' job rows were written in the same transactions.
    record = await first.get(spec.member_ids[1])
    assert record is not None and record.status.state is JobState.SUCCEEDED

    # Unknown group (expired, never recorded): nothing to claim, no error.
    assert await first.finish_member(_terminal("x.0", 0), group_id="nope", index=0) is None


async def check_token_takes(stores: Sequence[Any], *, slack: float = 1e-6) -> None:
    """Concurrent takes from all the stores get distinct slots, one interval apart; a slot
    beyond `max_wait` is not reserved. `slack`: for a store that reckons the slots by its own
    clock (`PostgresStore`), each wait is from the time its statement ran, not the caller's
    `now`: the waits are one interval apart give or take the time between the statements."""
    key = uuid.uuid4().hex
    now = time.time()
    interval = 1.0  # reserved, not waited for: long enough that `slack` is a small part of it
    takes = [
        s.take_token(key, interval=interval, tau=0.0, max_wait=100.0, now=now)
        for s in stores
        for _ in range(10)
    ]
    waits = sorted(await asyncio.gather(*takes))
    n = len(waits)
    assert waits[0] == pytest.approx(0.0, abs=1e-6)
    for a, b in zip(waits, waits[1:], strict=False):
        assert b - a == pytest.approx(interval, abs=slack)
    first: RateStore = stores[0]
    # The next slot is n intervals away: with max_wait below it, nothing is reserved.
    far = await first.take_token(key, interval=interval, tau=0.0, max_wait=0.001, now=now)
    assert far == pytest.approx(n * interval, abs=slack)
    again = await first.take_token(key, interval=interval, tau=0.0, max_wait=100.0, now=now)
    assert again == pytest.approx(n * interval, abs=slack)  # the same slot: it was not taken
    # A burst: after an idle time, `tau` lets burst-1 more start at once.
    other = uuid.uuid4().hex
    burst = [
        await first.take_token(other, interval=1.0, tau=2.0, max_wait=10.0, now=now)
        for _ in range(4)
    ]
    assert [w <= 0 for w in burst] == [True, True, True, False]
    assert burst[3] == pytest.approx(1.0, abs=slack)


async def check_group_id_reused(store: Any) -> None:
    """A group id recorded already, enqueued again as *another* group (other members, another
    callback), is refused, and nothing of it is recorded (before: the first group's row was
    kept and the new members added to it, so its callback was claimed before the added member
    finished, with that member's outcome missing, or never, for a member left out)."""
    group_id = uuid.uuid4().hex

    def queued(spec: GroupSpec) -> list[Write]:
        return [
            Write(job_id=j, task="t.m", queue="q", state=JobState.QUEUED, at=time.time())
            for j in spec.member_ids
        ]

    first = _spec(group_id, 2)
    await store.create_group(first, queued(first))
    await store.create_group(first, queued(first))  # the same group again: fine
    more = _spec(group_id, 3)
    with pytest.raises(ConfigurationError, match=f"{group_id}.*2 members.*3"):
        await store.create_group(more, queued(more))
    assert await store.get(f"{group_id}.2") is None  # nothing of it was recorded
    other = GroupSpec(
        group_id=group_id, member_ids=first.member_ids, callback_task="t.other",
        callback_queue="reports", callback_param="results", callback_body=None,
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="callback"):
        await store.create_group(other, queued(other))
    # The group is the first one: its two members complete it, with their two outcomes.
    zero = await store.finish_member(_terminal(f"{group_id}.0", 0), group_id=group_id, index=0)
    assert zero is None
    due = await store.finish_member(_terminal(f"{group_id}.1", 1), group_id=group_id, index=1)
    assert due is not None and due.claimed_now and due.task == "t.report"
    assert [m.job_id for m in due.members] == list(first.member_ids)


async def test_memory_store_groups_and_rates() -> None:
    store = MemoryStore()
    assert isinstance(store, GroupStore) and isinstance(store, RateStore)
    await check_group_claims([store])
    await check_token_takes([store])
    await check_group_id_reused(store)


@pytest.fixture
def sqlite_stores(tmp_path: Path) -> Callable[[int], list[SQLiteStore]]:
    made: list[SQLiteStore] = []

    def make(n: int) -> list[SQLiteStore]:
        made.extend(SQLiteStore(tmp_path / "jobs.db", busy_timeout=30) for _ in range(n))
        return made[-n:]

    return make


async def test_sqlite_store_groups_from_several_connections(
    sqlite_stores: Callable[[int], list[SQLiteStore]],
) -> None:
    """Four stores on one file: four threads and connections writing at once."""
    stores = sqlite_stores(4)
    try:
        assert isinstance(stores[0], GroupStore) and isinstance(stores[0], RateStore)
        await check_group_claims(stores)
        await check_token_takes(stores)
        await check_group_id_reused(stores[0])
    finally:
        for store in stores:
            await store.close()


def _finish_in_process(path: str, group_id: str, indexes: list[int]) -> int:
    """In a process of its own: finish these members (each twice); how many claims it got."""

    async def run() -> int:
        store = SQLiteStore(path, busy_timeout=30)
        try:
            claims = 0
            for i in indexes * 2:
                due = await store.finish_member(
                    _terminal(f"{group_id}.{i}", i), group_id=group_id, index=i
                )
                claims += due is not None and due.claimed_now
            return claims
        finally:
            await store.close()

    return asyncio.run(run())


async def test_sqlite_store_last_members_in_four_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.db")
    store = SQLiteStore(path)
    group_id = uuid.uuid4().hex
    try:
        await store.create_group(_spec(group_id), [])
    finally:
        await store.close()
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=context) as pool:
        claims = await asyncio.gather(
            *(
                loop.run_in_executor(
                    pool, _finish_in_process, path, group_id, list(range(k, MEMBERS, 4))
                )
                for k in range(4)
            )
        )
    assert sum(claims) == 1, claims


async def test_expired_groups_are_purged(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "jobs.db", ttl=0.05)
    try:
        group_id = uuid.uuid4().hex
        await store.create_group(_spec(group_id, 2), [])
        await asyncio.sleep(0.1)  # the TTL passing is what is tested
        await store.purge()
        assert await store.finish_member(_terminal("a", 0), group_id=group_id, index=0) is None
        assert await store.finish_member(_terminal("b", 1), group_id=group_id, index=1) is None
    finally:
        await store.close()
