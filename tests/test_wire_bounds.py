"""What the fast path's writer holds while the broker takes nothing, against a real node (#20).

- Finding 10: the transport's buffer is filled only up to the writer's high-water mark.
- Finding 5: under a memory alarm the publisher's window bounds the bytes the writer holds
  (a timed-out message keeps its slot until its frames have left), and a message whose `send()`
  timed out (nothing was sent) never reaches the queue after the alarm clears.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiormq
import pytest

from aio_workq import Connection, Producer, PublishTimeoutError, Queue
from aio_workq._wire.seams import Wire
from aio_workq._wire.writer import HIGH_WATER
from aio_workq.testing import LocalBroker

pytestmark = pytest.mark.broker

BODY = b"x" * 2**16
FRAMES = len(BODY) + 1024  # one message's frames: the body and the method and header around it


def _most(path: str) -> int:
    with open(path) as settings:
        return int(settings.read().split()[-1])


# What the transport and both kernel socket buffers can hold at most, on this machine.
SOCKET_BUFFERS = (
    HIGH_WATER + _most("/proc/sys/net/ipv4/tcp_wmem") + _most("/proc/sys/net/ipv4/tcp_rmem")
)


async def wire_of(connection: Connection) -> Wire:
    wire = (await connection.link()).wire
    assert wire is not None  # fast_path=True
    return wire


async def message_ids(url: str, queue: str) -> list[str]:
    """The message ids in `queue`, taken off it in order."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        ids: list[str] = []
        while True:
            message = await channel.basic_get(queue, no_ack=True)
            if message.delivery_tag is None:  # Basic.GetEmpty
                return ids
            ids.append(message.header.properties.message_id or "")
    finally:
        await connection.close()


@pytest.mark.timeout(240)
async def test_the_socket_buffer_stays_at_the_high_water_mark_while_the_broker_reads_nothing(
    local_broker: LocalBroker, queue_name: str
) -> None:
    queue = Queue(queue_name, type="classic")
    async with Connection(local_broker.url, fast_path=True) as connection:
        writer = (await wire_of(connection)).writer
        async with Producer(connection=connection, timeout=120) as producer:
            await producer.declare(queue)
            local_broker.pause()  # SIGSTOP: the node reads nothing, the kernel's buffers fill
            try:
                peak, confirms = 0, []
                for _ in range(600):  # 38 MiB: far past the kernel's buffers and the mark
                    confirms.append(await producer.send(BODY, queue))
                    peak = max(peak, writer.socket_buffered)
                async with asyncio.timeout(60):  # until the writer holds back what doesn't fit
                    while not writer.buffered_bytes:
                        await asyncio.sleep(0.01)
                        peak = max(peak, writer.socket_buffered)
                peak = max(peak, writer.socket_buffered)
            finally:
                local_broker.resume()
            assert writer.buffered_bytes > 0
            assert peak <= HIGH_WATER + FRAMES, f"the transport held {peak:,} bytes"
            async with asyncio.timeout(120):
                results = await asyncio.gather(*confirms)
    assert len(results) == 600  # every one confirmed once the node reads again
    assert len(await message_ids(local_broker.url, queue_name)) == 600


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "plain"])
async def test_under_a_memory_alarm_the_window_bounds_what_is_held_and_nothing_unsent_arrives(
    local_broker: LocalBroker, queue_name: str, fast_path: bool
) -> None:
    window = 50
    queue = Queue(queue_name, type="classic")
    outcomes: dict[str, str] = {}  # message id -> "unsent" | "maybe" | "confirmed"
    held = 0

    async def one(message_id: str) -> None:
        try:
            confirm = await producer.send(BODY, queue, message_id=message_id, timeout=0.5)
        except PublishTimeoutError as exc:
            assert "nothing was sent" in str(exc)
            outcomes[message_id] = "unsent"
            return
        try:
            await confirm
        except PublishTimeoutError as exc:
            assert "may or may not have reached the queue" in str(exc)
            outcomes[message_id] = "maybe"
        else:
            outcomes[message_id] = "confirmed"

    async with Connection(local_broker.url, fast_path=fast_path) as connection:
        wire = (await connection.link()).wire
        async with Producer(connection=connection, window=window, timeout=60) as producer:
            await producer.declare(queue)
            local_broker.ctl("set_vm_memory_high_watermark", "0")
            try:
                for batch in range(20):  # 1000 messages, 62.5 MiB, over about 10 s
                    tasks: set[asyncio.Task[Any]] = {
                        asyncio.create_task(one(f"{batch}-{i}")) for i in range(window)
                    }
                    async with asyncio.timeout(60):
                        while tasks:  # sampling what the writer holds meanwhile
                            done, tasks = await asyncio.wait(tasks, timeout=0.02)
                            for task in done:
                                task.result()
                            if wire is not None:
                                held = max(held, wire.writer.buffered_bytes)
            finally:
                local_broker.ctl("set_vm_memory_high_watermark", "0.4")
            # Once this one is confirmed, every message written before it is in the queue.
            await producer.publish(b"last", queue, message_id="last", timeout=120)
    assert held <= (window + 1) * FRAMES, f"the writer held {held:,} bytes"
    counts = Counter(outcomes.values())
    assert len(outcomes) == 1000, counts
    # What can have left before the alarm held the rest back: the window, the transport's
    # buffer and the kernel's (both ends are on this machine); all 1000 did before the fix.
    assert counts.get("maybe", 0) <= window + SOCKET_BUFFERS // len(BODY) + 1, counts
    arrived = set(await message_ids(local_broker.url, queue_name)) - {"last"}
    unsent_arrived = sorted(m for m in arrived if outcomes[m] == "unsent")
    assert not unsent_arrived, f"{len(unsent_arrived)} told 'nothing was sent' arrived ({counts})"
    assert arrived >= {m for m, v in outcomes.items() if v == "confirmed"}
