"""A loop of the bench's two-process chain on a quorum queue, counting the duplicates that a
worker's stop may leave downstream (docs/guarantees.md, "When duplicates happen").

Each run is `bench.runner.run_one` of `aio_workq.x2` on the chain workload: two processes
relay N messages from one queue to another, and the first to reach its share stops (a graceful
`Worker.stop`) while the other still consumes. The runner's check fails a run whose downstream
queue holds more than N; this loop reads how many more, and prints the runs, the runs with
duplicates and the duplicates in all::

    python -m bench.chain_stop [--url amqp://...] [--runs 100] [--n 4000] [--logs DIR]

(`make bench-chain-stop`; a node of its own unless `--url` is given.) Before the fix of
rabbitmq-server#10327's trigger (`Dispatcher._requeue`) about 1 run in 90 showed 22 to 31 at
N = 20,000; `tests/test_chain_stop.py` shows the mechanism in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
from pathlib import Path

from bench.harness import on_broker
from bench.runner import PAIR, Run, run_one

_HOLDS = re.compile(r"holds (\d+), expected (\d+)")


async def loop(url: str, runs: int, n: int, logs: Path, queue_type: str) -> tuple[int, int, int]:
    """(runs done, runs with duplicates, duplicates); a run that failed otherwise raises."""
    hit = extra = 0
    for i in range(runs):
        record = await run_one(url, Run(PAIR, "chain", queue_type, i, n), logs)
        status, error = record["status"], str(record.get("error", ""))
        match = _HOLDS.search(error)
        if status == "ok":
            print(f"run {i}: ok", flush=True)
            continue
        if match is None or int(match[1]) < int(match[2]):
            raise SystemExit(f"run {i} failed otherwise: {error}")
        more = int(match[1]) - int(match[2])
        hit += 1
        extra += more
        print(f"run {i}: {more} duplicates downstream", flush=True)
    return runs, hit, extra


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="use this broker instead of starting a node of our own")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--n", type=int, default=4_000)
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    parser.add_argument("--logs", type=Path, help="the processes' stderr (default: a temp dir)")
    args = parser.parse_args(argv)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="chain-stop-"))
    logs.mkdir(parents=True, exist_ok=True)
    runs, hit, extra = on_broker(
        args.url,
        lambda url: asyncio.run(loop(url, args.runs, args.n, logs, args.queue_type)),
        "workqbenchstop",
    )
    print(f"{runs} runs, {hit} with duplicates, {extra} duplicates (logs: {logs})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
