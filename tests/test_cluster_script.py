"""The local-cluster script (scripts/cluster.py): forming, crashing, restarting and partitioning."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import aio_pika
import pytest

from scripts.broker import amqp_answers
from scripts.cluster import ClusterError, LocalCluster
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_node_lookup_names_the_nodes_there_are(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, size=3, prefix="wqoffline")
    with pytest.raises(ClusterError, match="none \\(start the cluster first\\)"):
        cluster.node("a")
    with pytest.raises(ClusterError, match="at least 1 node"):
        LocalCluster(tmp_path, size=0)
    with pytest.raises(ClusterError, match="start one first"):
        LocalCluster.from_dir(tmp_path)


async def declare_quorum(url: str, name: str, messages: int = 0) -> None:
    """Declare a quorum queue through url and publish messages to it, each one confirmed."""
    async with await aio_pika.connect(url) as conn:
        channel = await conn.channel(on_return_raises=True)
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        for i in range(messages):
            await channel.default_exchange.publish(
                aio_pika.Message(str(i).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=name,
            )


async def drain(url: str, name: str) -> list[bytes]:
    """Every message left in the queue (got with acks), through url; the queue is deleted."""
    got: list[bytes] = []
    async with await aio_pika.connect(url) as conn:
        channel = await conn.channel()
        queue = await channel.declare_queue(name, passive=True)
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            got.append(message.body)
        await queue.delete(if_unused=False, if_empty=False)
    return got


def cli(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.cluster", *args, "--dir", str(cluster.base_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.cluster
def test_three_nodes_form_one_cluster(cluster: LocalCluster) -> None:
    assert cluster.running_nodes() == sorted(n.node for n in cluster.nodes)
    assert len(cluster.nodes) == 3
    ports = {n.amqp_port for n in cluster.nodes} | {n.dist_port for n in cluster.nodes}
    assert len(ports) == 6
    assert cluster.host_list == ",".join(cluster.urls)
    assert all(url.startswith("amqp://guest:guest@127.0.0.1:") for url in cluster.urls)
    assert len({n.gid for n in cluster.nodes}) == 3


@pytest.mark.cluster
def test_cli_status_urls_and_a_wrong_node_name(cluster: LocalCluster) -> None:
    status = cli(cluster, "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.count(": running,") == 3
    urls = cli(cluster, "urls")
    assert urls.stdout.strip() == cluster.host_list
    wrong = cli(cluster, "kill", "zz")
    assert wrong.returncode == 1
    assert "no node 'zz'" in wrong.stderr and "wqtest-a" in wrong.stderr
    assert cluster.running_nodes() == sorted(n.node for n in cluster.nodes)


@pytest.mark.cluster
async def test_killing_the_quorum_leader_elects_another_and_keeps_confirmed_messages(
    cluster: LocalCluster,
) -> None:
    name = f"test-cluster-{uuid.uuid4().hex[:8]}"
    async with asyncio.timeout(120):
        await declare_quorum(cluster.urls[0], name, messages=100)
        leader = (await asyncio.to_thread(cluster.leader, name)).name
        await asyncio.to_thread(cluster.kill, leader)
        assert not amqp_answers(cluster.node(leader).amqp_port)
        new_leader = await asyncio.to_thread(cluster.wait_leader, name, not_on=leader)
        assert new_leader != leader

        await asyncio.to_thread(cluster.restart, leader)
        assert cluster.node(leader).node in await asyncio.to_thread(cluster.running_nodes)
        # The restarted node is a member again and serves the queue's messages.
        got = await drain(cluster.url(leader), name)
    assert sorted(got, key=int) == [str(i).encode() for i in range(100)]


@pytest.mark.cluster
async def test_a_partitioned_node_pauses_and_rejoins_when_healed(cluster: LocalCluster) -> None:
    cut = cluster.nodes[2]
    others = cluster.nodes[:2]
    name = f"test-partition-{uuid.uuid4().hex[:8]}"
    async with asyncio.timeout(150):
        await declare_quorum(others[0].url, name)
        await asyncio.to_thread(cluster.partition, cut.name)

        async def paused() -> bool:  # pause_minority: the cut-off node stops serving AMQP
            return not await asyncio.to_thread(amqp_answers, cut.amqp_port)

        await wait_until(paused, timeout=60)
        # The majority goes on: it confirms publishes to the quorum queue.
        await declare_quorum(others[1].url, name, messages=10)
        status = await asyncio.to_thread(others[0].ctl, "cluster_status", "--formatter", "json")
        assert cut.node not in json.loads(status)["running_nodes"]

        await asyncio.to_thread(cluster.heal)

        async def back() -> bool:
            return await asyncio.to_thread(amqp_answers, cut.amqp_port)

        await wait_until(back, timeout=60)
        await asyncio.to_thread(cluster.wait_running, None, 60)
        got = await drain(cut.url, name)
    assert sorted(got, key=int) == [str(i).encode() for i in range(10)]
