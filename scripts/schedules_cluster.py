"""The schedules ledger on a local 3-node cluster: the active scheduler's node killed -9.

    python -m scripts.schedules_ledger --cluster [--cluster-dir DIR] [--replicas 3]
        [--duration 180] [--kill-every 20] [--json PATH]

`--replicas` scheduler processes (those of `scripts.schedules_ledger`) get the cluster's URL
list, each connection starting at a random node. Every `--kill-every` seconds one node is killed
with SIGKILL, then restarted: in turn the node the active scheduler's lease consumer sits on
(read from `rabbitmqctl list_consumers`) and the node leading the lease queue (often the same).
The replicas are never killed: they reconnect to another node and stand again.

The ticks are counted from the queues themselves after the run (every message drained and
counted by id), not by a consumer during it: a consumer whose node dies gets its unacked
messages again, which would count as doubles that no scheduler published. Takeover is the
time from the node's SIGKILL to the start of the first active term that lasts (1 s or more;
a replica made active while the state queue's leader is still being re-elected fails its first
read and stands again: such brief terms are counted apart); a kill of the lease
queue's leader that the active scheduler outlives (its connection is on another node) is
counted as kept, not as a takeover.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from scripts.cluster import LocalCluster
from scripts.schedules_ledger import LedgerResult, Replica, count_ticks

__all__ = ("lease_holder", "run_cluster_ledger")

SCHEDULES = ("interval", "minutely")
_LASTING = 1.0  # seconds an active term lasts to count as a takeover
_PID_NODE = re.compile(r"<([^.<>]+@[^.<>]+)\.")


class Fleet:
    """The replicas' ACTIVE / PASSIVE events, and which replica is active."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[tuple[str, float, Replica]] = asyncio.Queue()
        self.active: Replica | None = None
        self.log: list[tuple[float, str, Replica]] = []

    def _apply(self, word: str, at: float, who: Replica) -> None:
        self.log.append((at, word, who))
        if word == "ACTIVE":
            self.active = who
        elif who is self.active:
            self.active = None

    def terms(self) -> list[tuple[float, float, Replica]]:
        """Each replica's active terms: (ACTIVE at, PASSIVE at or +inf, replica), by start."""
        terms: list[tuple[float, float, Replica]] = []
        began: dict[int, tuple[float, Replica]] = {}
        for at, word, who in sorted(self.log, key=lambda e: e[0]):
            if word == "ACTIVE":
                began.setdefault(id(who), (at, who))
            elif id(who) in began:
                terms.append((began.pop(id(who))[0], at, who))
        terms += [(at, float("inf"), who) for at, who in began.values()]
        return sorted(terms, key=lambda t: t[0])

    def settled(self, after: float, lasting: float) -> float | None:
        """When the first term that began after `after` and lasted `lasting` s began: a
        replica that failed at once (its first read of the state on a queue whose leader had
        just died) is not a takeover yet."""
        for start, end, _ in self.terms():
            if start >= after and end - start >= lasting:
                return start
        return None

    def overlaps(self, until: float) -> list[float]:
        """How long each two replicas both said they were active (by their own clocks: one
        machine), for the terms that began before `until`."""
        terms = [t for t in self.terms() if t[0] < until]
        found = []
        for i, (a1, p1, r1) in enumerate(terms):
            for a2, p2, r2 in terms[i + 1 :]:
                both = min(p1, p2) - max(a1, a2)
                if r1 is not r2 and both > 0:
                    found.append(both)
        return found

    def drain(self) -> None:
        while not self.events.empty():
            word, at, who = self.events.get_nowait()
            self._apply(word, at, who)

    async def next_event(
        self, word: str, timeout: float, who: Replica | None = None
    ) -> float | None:
        """The time of the next `word` event (of `who`, if given); None after `timeout` s."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    seen, at, by = await self.events.get()
            except TimeoutError:
                return None
            self._apply(seen, at, by)
            if seen == word and (who is None or by is who):
                return at
        return None


def lease_holder(cluster: LocalCluster, lease: str) -> str | None:
    """The node (short name) the active consumer of `lease` is connected to, as the broker says;
    None when it lists none."""
    for node in cluster.nodes:
        if not node.running():
            continue
        out = node.ctl("list_consumers", "-q", "--no-table-headers", "queue_name", "channel_pid",
                       "active", timeout=20)  # fmt: skip
        for line in out.splitlines():
            fields = line.split("\t")
            if len(fields) == 3 and fields[0] == lease and fields[2].strip() == "true":
                found = _PID_NODE.search(fields[1])
                return None if found is None else cluster.node(found.group(1)).name
        return None
    return None


def queue_types(cluster: LocalCluster, names: list[str]) -> dict[str, str]:
    """Each queue's type, as the cluster lists it."""
    listed = {q["name"]: str(q.get("type")) for q in cluster.queues()}
    return {name: listed.get(name, "missing") for name in names}


async def drain(url: str, queues: list[str]) -> Counter[str]:
    """Every message left in `queues`, counted by message id (and removed)."""
    import aio_pika

    counted: Counter[str] = Counter()
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            queue = await channel.get_queue(name, ensure=True)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                counted[message.message_id or ""] += 1
    return counted


async def run_cluster_ledger(
    cluster: LocalCluster,
    *,
    replicas: int = 3,
    duration: float = 180.0,
    kill_every: float = 20.0,
    settle: float = 10.0,
) -> LedgerResult:
    """Run the scenario on the running `cluster` and count every tick."""
    import aio_workq

    group = f"ledger-{uuid.uuid4().hex[:8]}"
    prefix = group
    url = cluster.host_list
    tick_queues = [f"{prefix}.{name}" for name in SCHEDULES]
    async with aio_workq.Producer(url) as producer:  # quorum queues, as the replicas declare
        for queue in tick_queues:
            await producer.declare(queue)
    fleet = Fleet()
    members = [Replica(url, group, prefix) for _ in range(replicas)]
    result = LedgerResult(replicas=replicas, duration=duration, kills=0, outage=0, fault="node")
    lease = f"{group}.lease"
    try:
        for member in members:
            await member.start(fleet.events)
        if await fleet.next_event("ACTIVE", 60) is None:
            raise RuntimeError("no replica became active within 60 s")
        names = [lease, f"{group}.state", f"{group}.status", *tick_queues]
        result.queue_types = await asyncio.to_thread(queue_types, cluster, names)
        began = datetime.now(UTC)
        start = time.monotonic()
        next_kill = start + kill_every
        rounds = 0
        takeovers: list[float] = []  # the kills after which the active scheduler changed
        while time.monotonic() - start < duration:
            if time.monotonic() < next_kill:
                await asyncio.sleep(0.2)  # the orchestrator's own pace
                fleet.drain()
                continue
            holder = await asyncio.to_thread(lease_holder, cluster, lease)
            leader = (await asyncio.to_thread(cluster.leader, lease)).name
            fleet.drain()
            if holder is None or fleet.active is None:
                next_kill = time.monotonic() + 1.0  # between two owners: ask again shortly
                continue
            target = holder if rounds % 2 == 0 else leader
            kind = ("active's node and lease leader" if holder == leader
                    else "active's node" if target == holder else "lease leader")  # fmt: skip
            killed_at = time.time()
            await asyncio.to_thread(cluster.kill, target)
            next_kill = time.monotonic() + kill_every
            result.kills += 1
            rounds += 1
            result.kill_targets.append(kind)
            if target == holder:
                await fleet.next_event("ACTIVE", 60)
                takeovers.append(killed_at)
            elif await fleet.next_event("PASSIVE", 15, fleet.active) is None:
                result.kept += 1  # it kept the lease
            else:
                await fleet.next_event("ACTIVE", 60)
                takeovers.append(killed_at)
            await asyncio.to_thread(cluster.restart, target)
        ended = datetime.now(UTC)
        ended_at = time.time()
        await asyncio.sleep(settle)  # let the last ticks be published before counting
    finally:
        for member in members:
            await member.terminate()
        fleet.drain()
    deliveries = await drain(cluster.urls[0], tick_queues)
    count_ticks(result, deliveries, began, ended)
    for killed_at in takeovers:
        settled = fleet.settled(killed_at, _LASTING)
        if settled is not None:
            result.takeovers.append(settled - killed_at)
    result.brief_terms = sum(1 for a, p, _ in fleet.terms() if a < ended_at and p - a < _LASTING)
    overlaps = fleet.overlaps(ended_at)
    result.overlaps = len(overlaps)
    result.max_overlap = max(overlaps, default=0.0)
    return result


def start_cluster(base_dir: Path) -> LocalCluster:
    """A fresh 3-node cluster in `base_dir` (stopped by the caller with `close()`)."""
    from scripts.broker import ensure_installed

    ensure_installed()
    cluster = LocalCluster(base_dir, size=3, prefix="wqschedl")
    cluster.start()
    return cluster
