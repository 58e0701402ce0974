"""`python -m bench.channels`: where one process's publishing to a quorum queue stops.

One `Producer` publishes on one channel. This runs `publish_many` of N 100-byte persistent
messages to one quorum queue in four layouts, taking turns, and prints the rate and the
broker's CPU per message (`psutil`, the local node's `beam.smp`):

- `1 channel`: one Producer (one connection, one channel), as the main bench's `aio_workq`;
- `2 channels`: two Producers on one shared `aio_workq.connect()` connection, N/2 each;
- `2 connections`: two Producers in this process, a connection each, N/2 each;
- `2 processes`: two processes, a Producer each, N/2 each (the main bench's `aio_workq.x2`).

If one process with two channels on one connection reaches what two processes reach, the limit
is neither the client's CPU nor its connection but the broker's work for one channel (a channel
is one Erlang process: every publish on it, its routing, its quorum queue command and its
confirm go through that one process). Starts a RabbitMQ node of its own unless `--url` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
import uuid
from typing import Any

import aiormq

import aio_workq
from aio_workq import Producer
from bench import harness

LAYOUTS = ("1 channel", "2 channels", "2 connections", "2 processes")
BODY = b"x" * 100


def broker_cpu() -> float | None:
    """CPU seconds of the local broker's processes so far (0 for a broker elsewhere; None
    without psutil, which `make bench-deps` installs)."""
    try:
        return harness.cpu_seconds()["broker"]
    except ImportError:
        return None


async def publish(url: str, queue: str, n: int, *, connection: Any = None, go: Any = None) -> None:
    producer = (
        Producer(connection=connection, queue_type="quorum")
        if connection is not None
        else Producer(url, queue_type="quorum")
    )
    async with producer:
        if go is not None:
            go.wait()
        await producer.publish_many([BODY] * n, queue=queue)


def _child(url: str, queue: str, n: int, go: Any) -> None:
    asyncio.run(publish(url, queue, n, go=go))


async def layout(url: str, name: str, n: int) -> tuple[float, float | None]:
    """One run of layout `name`: messages a second, broker CPU µs per message (None
    without psutil)."""
    queue = f"bench.channels.{uuid.uuid4().hex[:8]}"
    async with Producer(url, queue_type="quorum") as admin:
        await admin.declare(queue)
        half = n // 2
        if name == "2 processes":
            go = multiprocessing.Event()
            children = [
                multiprocessing.Process(target=_child, args=(url, queue, half, go))
                for _ in range(2)
            ]
            for child in children:
                child.start()
            await asyncio.sleep(1.0)  # both connected and waiting
            cpu, start = broker_cpu(), time.perf_counter()
            go.set()
            loop = asyncio.get_running_loop()
            for child in children:
                await loop.run_in_executor(None, child.join)
        elif name == "2 channels":
            connection = await aio_workq.connect(url)
            try:
                cpu, start = broker_cpu(), time.perf_counter()
                await asyncio.gather(
                    *(publish(url, queue, half, connection=connection) for _ in range(2))
                )
            finally:
                elapsed = time.perf_counter() - start
                await connection.close()
            start = time.perf_counter() - elapsed
        else:
            k = 1 if name == "1 channel" else 2
            cpu, start = broker_cpu(), time.perf_counter()
            await asyncio.gather(*(publish(url, queue, n // k) for _ in range(k)))
        wall = time.perf_counter() - start
        after = broker_cpu()
    raw = await aiormq.connect(url)  # the queue goes: it holds n messages
    try:
        channel = await raw.channel()
        await channel.queue_delete(queue)
    finally:
        await raw.close()
    sent = n if name == "1 channel" else 2 * half
    used = None if after is None or cpu is None else 1e6 * (after - cpu) / sent
    return sent / wall, used


async def measure(url: str, n: int, repeats: int) -> dict[str, list[tuple[float, float | None]]]:
    runs: dict[str, list[tuple[float, float | None]]] = {name: [] for name in LAYOUTS}
    for _ in range(repeats):
        for name in LAYOUTS:
            runs[name].append(await layout(url, name, n))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.channels", description=__doc__)
    parser.add_argument("--n", type=int, default=40_000, help="messages per run (40,000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per layout (3)")
    parser.add_argument("--url", default=None, help="broker URL (default: a node of its own)")
    args = parser.parse_args(argv)
    runs = harness.on_broker(
        args.url, lambda url: asyncio.run(measure(url, args.n, args.repeats)), "workqbenchch"
    )
    best = max(statistics.median(r for r, _ in v) for v in runs.values())
    print(f"{args.n:,} messages to one quorum queue, median of {args.repeats} runs:")
    for name, values in runs.items():
        rate = statistics.median(r for r, _ in values)
        cpus = [c for _, c in values if c is not None]
        cpu = f"{statistics.median(cpus):.1f} µs/msg" if cpus else "n/a (no psutil)"
        print(f"  {name:<14} {rate:>8,.0f} msg/s ({rate / best:.2f} of the best)  broker CPU {cpu}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
