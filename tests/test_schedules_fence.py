"""The fence: two schedulers the lease made active at once still fire each tick once.

RabbitMQ's single active consumer on a quorum queue once made two standbys active 11 ms apart
after a node failure (the cluster ledger, RabbitMQ 3.10.8). These tests make that happen on one
node at will: a `GhostLease` is granted at once, so every scheduler standing with one believes
it is active; only the guard (`{group}.active`, exclusive to one connection) keeps one of them
firing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiormq
import pytest

from aio_workq import BrokerConnectionError
from aio_workq._link.connection import Connection
from aio_workq.schedules import Scheduler
from aio_workq.schedules._broker import Names
from aio_workq.schedules._guard import Guard
from aio_workq.schedules._lease import Lease
from tests.test_schedules import Ticks, assert_contiguous, group, poll, start, ticks

__all__ = ("group", "ticks")  # fixtures

pytestmark = pytest.mark.broker


class GhostLease(Lease):
    """A lease granted at once: the broker's view of who is active is not asked."""

    async def granted(self, stopping: asyncio.Event) -> bool:
        return not stopping.is_set()


class Ghost(Scheduler):
    """A scheduler that believes it is active as soon as it stands."""

    _lease_type = GhostLease


async def test_two_schedulers_both_made_active_fire_each_tick_once(
    amqp_url: str, group: str, ticks: Ticks
) -> None:
    first = Ghost(amqp_url, [poll(group)], group=group, identity="first")
    second = Ghost(amqp_url, [poll(group)], group=group, identity="second")
    runs = [await start(first), await start(second)]
    await ticks.wait_for(4)
    assert max(ticks.seen.values()) == 1, f"a tick fired twice: {ticks.seen}"
    assert first.active != second.active
    assert 0 in (first.fired, second.fired)
    active, standby = (first, second) if first.active else (second, first)
    # The holder hands over: the one that stood by takes the guard and goes on.
    await active.stop()
    async with asyncio.timeout(30):
        await standby.wait_active()
    count = len(ticks.seen)
    await ticks.wait_for(count + 3)
    await standby.stop()
    await asyncio.gather(*runs)
    assert max(ticks.seen.values()) == 1, f"a tick fired twice: {ticks.seen}"
    assert_contiguous(ticks.due_times())


class NoGuard(Guard):
    """No fence: held at once, by anyone."""

    async def acquire(self, stopping: asyncio.Event, lease_lost: asyncio.Event) -> bool:
        return not stopping.is_set()

    async def confirm_held(self) -> None:
        return None


class Unfenced(Ghost):
    _guard_type = NoGuard


async def test_without_the_guard_two_schedulers_both_made_active_fire_the_same_ticks(
    amqp_url: str, group: str, ticks: Ticks
) -> None:
    """The control: the ghost leases do make two schedulers fire, so the test above shows the
    guard at work, not a harness that never doubled."""
    first = Unfenced(amqp_url, [poll(group)], group=group, identity="first")
    second = Unfenced(amqp_url, [poll(group)], group=group, identity="second")
    runs = [await start(first), await start(second)]
    async with asyncio.timeout(30):
        while max(ticks.seen.values(), default=0) < 2:
            ticks.changed.clear()
            await ticks.changed.wait()
    assert first.active and second.active
    await first.stop()
    await second.stop()
    await asyncio.gather(*runs)


@pytest.fixture
async def connections(amqp_url: str) -> AsyncIterator[list[Connection]]:
    opened = [Connection(amqp_url, name=f"guard test {i}") for i in range(2)]
    for connection in opened:
        await connection.open()
    yield opened
    for connection in opened:
        await connection.close()


async def test_the_guard_is_held_by_one_connection_until_it_ends_or_releases(
    group: str, connections: list[Connection]
) -> None:
    names = Names.of(group)
    stopping, lease_lost = asyncio.Event(), asyncio.Event()
    first, second = (Guard(c, names, open_timeout=10) for c in connections)
    assert await first.acquire(stopping, lease_lost)
    taking = asyncio.ensure_future(second.acquire(stopping, lease_lost))
    done, _ = await asyncio.wait({taking}, timeout=1.0)
    assert not done, "a second connection took a guard that another one holds"
    await first.confirm_held()
    # Only the owner's connection passes the check a holder makes before each round.
    other = await connections[1].channel()
    with pytest.raises(aiormq.exceptions.ChannelLockedResource):
        await other.queue_declare(names.active, passive=True)
    # The holder's connection ends (as with kill -9): the broker frees the guard.
    await connections[0].close(0)
    async with asyncio.timeout(10):
        assert await taking
    assert second.held
    await second.confirm_held()
    # A handover: the holder releases it, and another connection takes it at once.
    third = Guard(connections[1], names, open_timeout=10)
    await second.release()
    assert not second.held
    async with asyncio.timeout(10):
        assert await third.acquire(stopping, lease_lost)
    await third.release()


async def test_a_standby_waiting_for_the_guard_gives_up_when_it_stops_or_loses_the_lease(
    group: str, connections: list[Connection]
) -> None:
    names = Names.of(group)
    never = asyncio.Event()
    holder = Guard(connections[0], names, open_timeout=10)
    assert await holder.acquire(never, never)
    stopping, lease_lost = asyncio.Event(), asyncio.Event()
    waiting = asyncio.ensure_future(
        Guard(connections[1], names, open_timeout=10).acquire(stopping, never)
    )
    stopping.set()
    async with asyncio.timeout(10):
        assert not await waiting
    lease_lost.set()
    with pytest.raises(BrokerConnectionError):
        async with asyncio.timeout(10):
            await Guard(connections[1], names, open_timeout=10).acquire(never, lease_lost)
    await holder.release()
