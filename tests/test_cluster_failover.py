"""Failover on a local 3-node cluster: crashes and partitions lose no confirmed message.

Every scenario keeps a `Ledger`: message ids the broker confirmed against the ids the handler
processed plus those found in the dead-letter queue (every 1000th message is rejected on purpose,
so the dead-letter path runs through the failover too). Figures go to
`.broker/failover-results.jsonl` (one JSON object per scenario run). `make cluster-test` runs them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import aio_workq
from scripts.cluster import LocalCluster
from tests.ledger import Ledger, drain_ids, produce

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

RESULTS = Path(__file__).resolve().parent.parent / ".broker" / "failover-results.jsonl"
MESSAGES = 20_000
PREFETCH = 500
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


async def run_scenario(
    cluster: LocalCluster,
    *,
    client_url: str,
    queue: str,
    fault: Callable[[], Awaitable[None]],
    messages: int = MESSAGES,
    fault_after: int | None = None,
) -> Ledger:
    """Producer + worker on client_url; fault() once fault_after messages are confirmed."""
    ledger = Ledger()
    ids = [f"{queue}-{i}" for i in range(messages)]
    worker = aio_workq.Worker(
        client_url,
        queue=queue,
        handler=make_handler(ledger),
        concurrency=50,
        prefetch=PREFETCH,
        name=f"worker {queue}",
    )
    await worker.start()
    try:
        async with aio_workq.Producer(client_url, name=f"producer {queue}") as producer:
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
            await faulted.wait()
            ledger.mark_fault()
            await fault()
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

    ledger = await run_scenario(cluster, client_url=others[0].url, queue=queue, fault=kill_leader)
    ledger.dead = await drain_ids(others[0].url, f"{queue}.dlq")
    new_leader = await asyncio.to_thread(cluster.leader, queue)
    row = record("kill quorum leader, clients elsewhere", ledger, new_leader=new_leader.name)
    check(ledger, bound=PREFETCH)
    assert new_leader.name != leader.name
    assert row["failed"] == {} or set(row["failed"]) <= {"PublishNackedError"}
