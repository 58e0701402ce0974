"""How fast producers recover once the broker is back (issue #21, item 3).

For each outage length, a few rounds: `clients` producers (each on a connection of its own)
publish in a loop; the node is killed (SIGKILL), kept down for the outage, and started again on
the same port. Each producer's recovery is the time from the node answering AMQP again to that
producer's first confirmed publish. Prints a Markdown table of the median and the longest.

    python -m scripts.recovery [--outages 5 30 120] [--rounds 3] [--clients 10]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aio_workq import Producer, WorkqError
from aio_workq.testing import LocalBroker
from aio_workq.testing._broker import amqp_answers

__all__ = ("Round", "main", "recover_once")


@dataclass
class Round:
    """One outage: how long the node was unreachable, and each client's recovery in seconds."""

    outage: float
    down: float = 0.0  # from the kill to the node answering AMQP again
    recoveries: list[float] = field(default_factory=list)


def _answers_at(port: int, stop: threading.Event) -> float | None:
    """Poll the port until it answers AMQP; the monotonic time it first did (None if stopped)."""
    while not stop.is_set():
        if amqp_answers(port, timeout=0.2):
            return time.monotonic()
        time.sleep(0.02)
    return None


async def _publish_until_confirmed(producer: Producer, queue: str, after: asyncio.Event) -> float:
    """Publish in a loop; the monotonic time of the first confirm of a publish made after
    `after` was set (the node was killed by then: its confirm is the new node's)."""
    while True:
        fresh = after.is_set()
        try:
            await producer.publish(b"probe", queue=queue, timeout=1)
        except WorkqError:
            continue
        if fresh:
            return time.monotonic()
        await asyncio.sleep(0.05)


async def recover_once(
    broker: LocalBroker, *, outage: float, clients: int, queue: str = "recovery-probe"
) -> Round:
    """Kill the node for `outage` seconds under `clients` publishing producers; measure each
    producer's recovery from the node answering AMQP to its first confirmed publish."""
    result = Round(outage)
    producers = [Producer(broker.url, queue_type="classic", timeout=10) for _ in range(clients)]
    for producer in producers:
        await producer.start()
    try:
        await producers[0].declare(queue)
        killed = asyncio.Event()
        tasks = [
            asyncio.ensure_future(_publish_until_confirmed(p, queue, killed)) for p in producers
        ]
        down_at = time.monotonic()
        await asyncio.to_thread(broker.kill)
        killed.set()
        await asyncio.sleep(outage)  # the outage itself: nothing to wait for
        stop = threading.Event()
        watch = asyncio.ensure_future(asyncio.to_thread(_answers_at, broker.amqp_port, stop))
        try:
            await asyncio.to_thread(broker.start)
            async with asyncio.timeout(120):
                ready = await watch
                confirmed = await asyncio.gather(*tasks)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(watch, *tasks, return_exceptions=True)
        assert ready is not None
        result.down = ready - down_at
        result.recoveries = [max(0.0, at - ready) for at in confirmed]
        return result
    finally:
        for producer in producers:
            await producer.close(timeout=1)


def table(rounds: list[Round]) -> str:
    lines = [
        "| outage (s) | rounds × clients | unreachable (s, mean) | median recovery (s) "
        "| longest recovery (s) |",
        "|--:|--:|--:|--:|--:|",
    ]
    for outage in sorted({r.outage for r in rounds}):
        these = [r for r in rounds if r.outage == outage]
        samples = [s for r in these for s in r.recoveries]
        down = statistics.mean(r.down for r in these)
        lines.append(
            f"| {outage:g} | {len(these)} × {len(these[0].recoveries)} | {down:.1f} "
            f"| {statistics.median(samples):.2f} | {max(samples):.2f} |"
        )
    return "\n".join(lines)


async def _run(outages: list[float], rounds: int, clients: int, base: Path) -> list[Round]:
    results: list[Round] = []
    broker = LocalBroker(base, name="workqrecovery")
    await asyncio.to_thread(broker.start)
    try:
        for outage in outages:
            for n in range(rounds):
                result = await recover_once(broker, outage=outage, clients=clients)
                results.append(result)
                print(
                    f"outage {outage:g} s, round {n + 1}: unreachable {result.down:.1f} s, "
                    f"recovery median {statistics.median(result.recoveries):.2f} s, "
                    f"max {max(result.recoveries):.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await asyncio.to_thread(broker.close)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.recovery", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--outages", type=float, nargs="+", default=[5.0, 30.0, 120.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="aio-workq-recovery-") as base:
        results = asyncio.run(_run(args.outages, args.rounds, args.clients, Path(base)))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
