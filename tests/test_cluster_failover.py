"""Failover on a local 3-node cluster: crashes and partitions lose no confirmed message.

Every scenario keeps a `Ledger`: message ids the broker confirmed against the ids the handler
processed plus those found in the dead-letter queue (every 1000th message is rejected on purpose,
so the dead-letter path runs through the failover too). Figures go to
`.broker/failover-results.jsonl` (one JSON object per scenario run). `make cluster-test` runs them.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import aio_workq
from scripts.cluster import LocalCluster
from tests.helpers import wait_until
from tests.ledger import Ledger, drain_ids, produce

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

RESULTS = Path(__file__).resolve().parent.parent / ".broker" / "failover-results.jsonl"
MESSAGES = 20_000
PREFETCH = 500
WINDOW = 10_000  # the producer's default window: the most a reconnect can re-send
REJECT_EVERY = 1000


def record(scenario: str, ledger: Ledger, **extra: Any) -> dict[str, Any]:
    """Append the scenario's figures to RESULTS and return them."""
    row = {"scenario": scenario, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    row.update(ledger.summary())
    row.update(extra)
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as out:
        out.write(json.dumps(row) + "\n")
    return row


def make_handler(ledger: Ledger) -> Callable[[aio_workq.Job], Awaitable[None]]:
    async def handle(job: aio_workq.Job) -> None:
        assert job.message_id is not None
        if int(job.message_id.rsplit("-", 1)[1]) % REJECT_EVERY == REJECT_EVERY - 1:
            ledger.on_rejected(job)
            raise aio_workq.Reject("rejected on purpose (dead-letter path)")
        ledger.on_processed(job)

    return handle


async def declare_on(url: str, queue: str) -> None:
    """Declare queue through url, so that its quorum leader is that node (client-local)."""
    async with aio_workq.Producer(url) as producer:
        await producer.declare(queue)


def check(ledger: Ledger, *, bound: int) -> None:
    """Nothing confirmed is lost, rejected ids are dead-lettered, duplicates stay bounded."""
    assert ledger.lost() == set(), f"{len(ledger.lost())} confirmed messages lost"
    assert ledger.rejected <= ledger.dead
    assert ledger.duplicates() <= bound, ledger.summary()
    assert len(ledger.confirmed) > 0


async def sits_on(cluster: LocalCluster, name: str) -> str:
    """The node the client connection called name is connected to (waits until it is listed)."""
    found: list[str] = []

    async def listed() -> bool:
        rows = await asyncio.to_thread(cluster.connections)
        found[:] = [r["node"] for r in rows if r["name"] == name and r["node"]]
        return bool(found)

    await wait_until(listed, timeout=30)
    return found[0]


async def client_connections(cluster: LocalCluster) -> list[tuple[str, str]]:
    """(node, connection name) of every client connection in the cluster."""
    rows = await asyncio.to_thread(cluster.connections)
    return sorted((str(r["node"]), str(r["name"])) for r in rows)


async def no_fault() -> None:
    """A scenario's fault that does nothing (a run on a healthy cluster)."""


async def run_scenario(
    *,
    queue: str,
    fault: Callable[[], Awaitable[None]],
    url: str | list[str] | None = None,
    connection: Any = None,
    messages: int = MESSAGES,
    fault_after: int | None = None,
) -> Ledger:
    """Producer + worker (on url, or sharing connection); fault() once a quarter is confirmed."""
    ledger = Ledger()
    ids = [f"{queue}-{i}" for i in range(messages)]
    name = None if connection is not None else f"clients {queue}"
    worker = aio_workq.Worker(
        url,
        connection=connection,
        queue=queue,
        handler=make_handler(ledger),
        concurrency=50,
        prefetch=PREFETCH,
        name=name,
    )
    await worker.start()
    try:
        async with aio_workq.Producer(url, connection=connection, name=name) as producer:
            faulted = asyncio.Event()
            sending = asyncio.create_task(
                produce(
                    producer,
                    queue,
                    ledger,
                    ids,
                    fault_after=fault_after or messages // 4,
                    fault=faulted,
                )
            )
            # Until a share is confirmed (or, if none ever is, until everything was sent).
            await asyncio.wait(
                [asyncio.ensure_future(faulted.wait()), sending],
                return_when=asyncio.FIRST_COMPLETED,
            )
            await fault()
            ledger.mark_fault()  # after the fault: "sent after it" went to the new node
            await sending
            await ledger.wait_settled(messages, timeout=300)
        await ledger.wait_all_handled(timeout=300)
    finally:
        await worker.stop(timeout=10)
    return ledger


async def test_killing_the_quorum_leader_under_clients_on_other_nodes_loses_nothing(
    cluster: LocalCluster,
) -> None:
    leader, others = cluster.nodes[0], cluster.nodes[1:]
    queue = f"failover-leader-{uuid.uuid4().hex[:6]}"
    await declare_on(leader.url, queue)
    assert (await asyncio.to_thread(cluster.leader, queue)).name == leader.name

    async def kill_leader() -> None:
        await asyncio.to_thread(cluster.kill, leader.name)

    ledger = await run_scenario(url=[n.url for n in others], queue=queue, fault=kill_leader)
    ledger.dead = await drain_ids(others[0].url, f"{queue}.dlq")
    new_leader = await asyncio.to_thread(cluster.leader, queue)
    row = record("kill quorum leader, clients elsewhere", ledger, new_leader=new_leader.name)
    check(ledger, bound=PREFETCH)
    assert new_leader.name != leader.name
    assert set(row["failed"]) <= {"PublishNackedError"}


async def test_killing_the_node_under_producer_and_worker_loses_nothing(
    cluster: LocalCluster,
) -> None:
    """kill -9 the node under both clients (and the queue's leader)."""
    queue = f"failover-kill-{uuid.uuid4().hex[:6]}"
    name = f"clients {queue}"
    conn = await aio_workq.connect(cluster.urls, name=name)
    try:
        node = await sits_on(cluster, name)
        await declare_on(cluster.url(node), queue)  # the leader dies with the clients' node

        async def kill_node() -> None:
            await asyncio.to_thread(cluster.kill, node)

        ledger = await run_scenario(connection=conn, queue=queue, fault=kill_node)
        moved_to = await sits_on(cluster, name)
        ledger.dead = await drain_ids(cluster.url(moved_to), f"{queue}.dlq")
        row = record("kill -9 the clients' node", ledger, killed=node, moved_to=moved_to)
    finally:
        await conn.close()
    check(ledger, bound=WINDOW + PREFETCH)
    assert moved_to != node
    assert row["first_redelivery_processed_s"] is not None or ledger.duplicates() == 0
    # Publishes that were not confirmed were reported, never dropped: each one settled.
    assert len(ledger.confirmed) + len(ledger.failed) == MESSAGES


async def test_a_restarted_node_rejoins_and_the_clients_stay_put(cluster: LocalCluster) -> None:
    """Kill and restart a node the clients are not on: no reconnects, the queue regains it."""
    queue = f"failover-rejoin-{uuid.uuid4().hex[:6]}"
    name = f"clients {queue}"
    conn = await aio_workq.connect(cluster.urls, name=name)
    try:
        node = await sits_on(cluster, name)
        victim = next(n.name for n in cluster.nodes if n.name != node)
        await declare_on(cluster.url(victim), queue)  # its leader goes down and comes back

        async def kill_and_restart() -> None:
            await asyncio.to_thread(cluster.kill, victim)
            await asyncio.to_thread(cluster.restart, victim)

        before = await client_connections(cluster)
        ledger = await run_scenario(
            connection=conn, queue=queue, fault=kill_and_restart, messages=5_000
        )
        after = await client_connections(cluster)
        ledger.dead = await drain_ids(cluster.url(node), f"{queue}.dlq")
        row = record("kill + restart a node the clients are not on", ledger, restarted=victim)
        members = {q["name"]: q for q in await asyncio.to_thread(cluster.queues)}[queue]
    finally:
        await conn.close()
    check(ledger, bound=PREFETCH)
    assert conn.reconnects == 0  # no reconnect at all, let alone a storm
    assert after == before
    assert cluster.node(victim).node in members["online"]
    assert set(row["failed"]) <= {"PublishNackedError"}


async def test_a_partitioned_node_sheds_its_clients_to_the_majority(cluster: LocalCluster) -> None:
    queue = f"failover-partition-{uuid.uuid4().hex[:6]}"
    name = f"clients {queue}"
    conn = await aio_workq.connect(cluster.urls, name=name)
    try:
        node = await sits_on(cluster, name)
        other = next(n for n in cluster.nodes if n.name != node)
        await declare_on(other.url, queue)  # the leader is on the majority side

        async def cut() -> None:
            await asyncio.to_thread(cluster.partition, node)

        ledger = await run_scenario(connection=conn, queue=queue, fault=cut)
        moved_to = await sits_on(cluster, name)
        ledger.dead = await drain_ids(other.url, f"{queue}.dlq")
        record("partition the clients' node (pause_minority)", ledger, cut=node, moved_to=moved_to)
        check(ledger, bound=WINDOW + PREFETCH)
        assert moved_to != node
    finally:
        await conn.close()


async def kill_clients_node_once(cluster: LocalCluster, round_no: int) -> dict[str, Any]:
    """One kill -9 of the node under a producer + worker; returns the recorded figures."""
    queue = f"failover-timing-{round_no}-{uuid.uuid4().hex[:6]}"
    name = f"clients {queue}"
    conn = await aio_workq.connect(cluster.urls, name=name)
    try:
        node = await sits_on(cluster, name)
        await declare_on(cluster.url(node), queue)

        async def kill_node() -> None:
            await asyncio.to_thread(cluster.kill, node)

        ledger = await run_scenario(connection=conn, queue=queue, fault=kill_node)
        moved_to = await sits_on(cluster, name)
        ledger.dead = await drain_ids(cluster.url(moved_to), f"{queue}.dlq")
        row = record(f"timing round {round_no}", ledger, killed=node, moved_to=moved_to)
        check(ledger, bound=WINDOW + PREFETCH)
    finally:
        await conn.close()
    await asyncio.to_thread(cluster.restart, node)
    return row


async def test_failover_times_median_of_five_kills(cluster: LocalCluster) -> None:
    rows = [await kill_clients_node_once(cluster, i) for i in range(1, 6)]
    keys = (
        "first_confirm_after_fault_s",
        "first_redelivery_processed_s",
        "first_new_message_processed_s",
    )
    medians = {
        key: statistics.median(r[key] for r in rows if r[key] is not None)
        for key in keys
        if any(r[key] is not None for r in rows)
    }
    summary = {
        "scenario": "median of 5 kills",
        "lost": sum(r["lost"] for r in rows),
        "duplicates": [r["duplicates"] for r in rows],
        **{f"median_{k}": round(v, 2) for k, v in medians.items()},
        **{f"all_{k}": [r[k] for r in rows] for k in keys},
    }
    with RESULTS.open("a") as out:
        out.write(json.dumps(summary) + "\n")
    assert summary["lost"] == 0
    assert "first_confirm_after_fault_s" in medians
