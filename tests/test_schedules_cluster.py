"""Schedules on a local 3-node cluster: the node of the active scheduler killed -9.

`make schedules-ledger-cluster` is the long run (3 processes, 3 minutes, a node killed every
20 s); these tests pin one scenario each, in-process, with each scheduler on its own node.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import timedelta

import pytest

import aio_workq
from aio_workq.schedules import Schedule, Scheduler
from scripts.cluster import LocalCluster
from scripts.schedules_cluster import lease_holder
from tests.helpers import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

SECOND = timedelta(seconds=1)


class Terms:
    """Which schedulers say they are active; every moment two of them did at once."""

    def __init__(self) -> None:
        self.active: set[str] = set()
        self.overlaps: list[set[str]] = []
        self.changed = asyncio.Event()

    def watch(self, scheduler: Scheduler) -> None:
        def on_active(active: bool) -> None:
            if active:
                self.active.add(scheduler.identity)
                if len(self.active) > 1:
                    self.overlaps.append(set(self.active))
            else:
                self.active.discard(scheduler.identity)
            self.changed.set()

        scheduler.on_active = on_active


async def candidates(cluster: LocalCluster, lease: str, count: int) -> None:
    """Wait until the broker lists `count` consumers on the lease queue."""

    def listed() -> bool:
        node = next(n for n in cluster.nodes if n.running())
        out = node.ctl("list_consumers", "-q", "--no-table-headers", "queue_name", timeout=20)
        return sum(1 for line in out.splitlines() if line.strip() == lease) >= count

    await wait_until(lambda: asyncio.to_thread(listed), timeout=60)


async def test_killing_the_node_of_the_active_scheduler_and_lease_leader_makes_one_active(
    cluster: LocalCluster,
) -> None:
    group = f"test-schedcl-{uuid.uuid4().hex[:8]}"
    queue = f"{group}.poll"
    names = [n.name for n in cluster.nodes]
    seen: Counter[str] = Counter()
    terms = Terms()

    async def record(job: aio_workq.Job) -> None:
        seen[job.message_id or ""] += 1

    def make(node: str) -> Scheduler:
        scheduler = Scheduler(
            cluster.url(node), [Schedule("poll", every=SECOND, queue=queue)],
            group=group, identity=node, retry_delay=0.5,
        )  # fmt: skip
        terms.watch(scheduler)
        return scheduler

    rounds = 3
    runs: list[asyncio.Task[None]] = []
    schedulers: list[Scheduler] = []
    async with aio_workq.Worker(cluster.urls, queue=queue, handler=record):
        try:
            for victim_index in range(rounds):
                victim = names[victim_index % len(names)]
                # The victim's scheduler stands first: its connection declares the group's
                # queues (their leaders on its node) and it becomes the active one.
                first = make(victim)
                schedulers.append(first)
                runs.append(asyncio.create_task(first.run()))
                async with asyncio.timeout(60):
                    while not first.active:
                        terms.changed.clear()
                        await terms.changed.wait()
                others = [make(n) for n in names if n != victim]
                schedulers.extend(others)
                runs.extend(asyncio.create_task(s.run()) for s in others)
                await candidates(cluster, f"{group}.lease", 3)
                holder = await asyncio.to_thread(lease_holder, cluster, f"{group}.lease")
                leader = (await asyncio.to_thread(cluster.leader, f"{group}.lease")).name
                assert holder == leader == victim, (holder, leader, victim)
                await asyncio.to_thread(cluster.kill, victim)
                async with asyncio.timeout(60):
                    while not any(s.active for s in others):
                        terms.changed.clear()
                        await terms.changed.wait()
                count = len(seen)

                async def three_more(count: int = count) -> bool:
                    return len(seen) >= count + 3

                await wait_until(three_more, timeout=60)
                for scheduler in [first, *others]:
                    await scheduler.stop()
                await asyncio.gather(*runs[-3:])
                await asyncio.to_thread(cluster.restart, victim)
                group = f"test-schedcl-{uuid.uuid4().hex[:8]}"  # a fresh group per round
        finally:
            for scheduler in schedulers:
                await scheduler.stop()
            await asyncio.gather(*runs, return_exceptions=True)
    assert terms.overlaps == [], terms.overlaps
