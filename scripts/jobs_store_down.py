"""What a job store outage does to the queue, measured (issue #23, item 2).

`python -m scripts.jobs_store_down` (`make jobs-store-down`, about a minute) starts a RabbitMQ
node and a PostgreSQL node of its own, then enqueues `--jobs` jobs of a small task through
`Task.enqueue()` at `--rate` a second while task workers (`--concurrency` handlers) run them.
`--down-at` seconds in, PostgreSQL is killed with SIGKILL (a crash: every connection drops);
`--down-for` seconds later it is started again on the same port and data. Measured:

- every job ran (each run is noted in this process, with its time), how many ran while the
  store was down, and how many ran more than once;
- each `enqueue()`'s duration, during the outage and outside it, and whether any raised (none
  should: an enqueue sends the job whatever the store does);
- how long after PostgreSQL answers again every job reads `succeeded` in the store (the
  states the workers kept while it was down, written once it is back: the status catches up),
  and the final state of every job.

It prints `STOREDOWN` lines and a Markdown table and exits 1 if a check failed.
`tests/test_jobs_store_down.py` runs a small plan.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg

from aio_workq import Producer
from aio_workq.jobs import Tasks
from aio_workq.jobs.postgres import PostgresStore, migrate
from scripts.postgres import LocalPostgres


@dataclass(frozen=True)
class Plan:
    jobs: int = 4_000
    rate: float = 200.0  # enqueues a second
    down_at: float = 5.0  # seconds after the first enqueue
    down_for: float = 10.0
    work: float = 0.002  # seconds a job takes
    concurrency: int = 20
    timeout: float = 180.0  # for the whole run
    store_timeout: float = 5.0  # PostgresStore(timeout=): the longest an enqueue waits for it


@dataclass
class Result:
    plan: Plan
    jobs: int = 0
    ran: int = 0
    ran_twice: int = 0
    ran_while_down: int = 0
    enqueue_errors: int = 0
    enqueued_while_down: int = 0
    enqueue_ms_p50: float = 0.0  # outside the outage
    enqueue_ms_max: float = 0.0
    enqueue_ms_p50_down: float = 0.0
    enqueue_ms_max_down: float = 0.0
    down_seconds: float = 0.0
    caught_up_after: float = 0.0  # seconds from PostgreSQL accepting connections again
    final_states: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"STOREDOWN jobs={self.jobs} ran={self.ran} ran_twice={self.ran_twice} "
            f"ran_while_down={self.ran_while_down}",
            f"STOREDOWN enqueue: errors={self.enqueue_errors} while_down={self.enqueued_while_down}"
            f" ms_p50={self.enqueue_ms_p50} ms_max={self.enqueue_ms_max}"
            f" ms_p50_down={self.enqueue_ms_p50_down} ms_max_down={self.enqueue_ms_max_down}",
            f"STOREDOWN store: down_s={self.down_seconds} caught_up_after_s={self.caught_up_after}"
            f" final={self.final_states}",
            f"STOREDOWN problems: {'; '.join(self.problems) or 'none'}",
        ]

    def table(self) -> str:
        p = self.plan
        rows = [
            ("jobs enqueued / ran (ran twice)", f"{self.jobs:,} / {self.ran:,} ({self.ran_twice})"),
            (f"PostgreSQL killed at {p.down_at:g} s, down for", f"{self.down_seconds:.1f} s"),
            ("jobs enqueued / ran while it was down",
             f"{self.enqueued_while_down:,} / {self.ran_while_down:,}"),
            ("enqueue() errors", f"{self.enqueue_errors}"),
            ("enqueue() p50 / max, store up",
             f"{self.enqueue_ms_p50} / {self.enqueue_ms_max} ms"),
            ("enqueue() p50 / max, store down",
             f"{self.enqueue_ms_p50_down} / {self.enqueue_ms_max_down} ms"),
            ("every job `succeeded` in the store, after PostgreSQL was back",
             f"{self.caught_up_after:.1f} s"),
            ("final states", ", ".join(f"{k} {v:,}" for k, v in sorted(self.final_states.items()))),
        ]  # fmt: skip
        return "\n".join(["| | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


async def _count_states(dsn: str, schema: str) -> Counter[str]:
    try:
        async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=2) as db:
            cursor = await db.execute(
                f"SELECT state, count(*) FROM {schema}.workq_jobs GROUP BY state"
            )
            return Counter(dict(await cursor.fetchall()))
    except psycopg.OperationalError:
        return Counter()


def _ms(values: list[float], q: Callable[[list[float]], float]) -> float:
    return round(q(values) * 1000, 1) if values else 0.0


async def run(
    url: str, postgres: LocalPostgres, plan: Plan, say: Callable[[str], None] = print
) -> Result:
    """One run of `plan` on the broker at `url` and the PostgreSQL node `postgres` (which it
    kills and starts again)."""
    result = Result(plan=plan, jobs=plan.jobs)
    dsn = postgres.dsn
    schema = f"storedown_{uuid.uuid4().hex[:10]}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        await migrate(db, schema=schema)
    store = PostgresStore(dsn, schema=schema, max_size=4, timeout=plan.store_timeout)
    producer = Producer(url)
    tasks = Tasks(producer=producer, store=store)
    queue = f"storedown-{uuid.uuid4().hex[:8]}"
    runs: dict[int, list[float]] = {}
    all_ran = asyncio.Event()

    @tasks.task(queue=queue, name="storedown.work")
    async def work(i: int) -> int:
        runs.setdefault(i, []).append(time.monotonic())
        if len(runs) == plan.jobs:
            all_ran.set()
        await asyncio.sleep(plan.work)
        return i

    outage: dict[str, float] = {}

    async def crash_and_restart(first: float) -> None:
        await asyncio.sleep(max(0.0, first + plan.down_at - time.monotonic()))
        await asyncio.to_thread(postgres.kill)
        outage["down"] = time.monotonic()
        say(f"PostgreSQL killed {outage['down'] - first:.1f} s in")
        await asyncio.sleep(plan.down_for)
        port = postgres.port
        await asyncio.to_thread(postgres.start)
        outage["up"] = time.monotonic()
        if postgres.port != port:
            raise RuntimeError(f"PostgreSQL came back on port {postgres.port}, not {port}")
        say(f"PostgreSQL back after {outage['up'] - outage['down']:.1f} s")

    def down_at(t: float) -> bool:
        return "down" in outage and t >= outage["down"] and ("up" not in outage or t < outage["up"])

    workers = tasks.workers(url, concurrency=plan.concurrency)
    took: list[tuple[float, float]] = []  # (start, seconds)
    try:
        await producer.start()
        for worker in workers:
            await worker.start()
        first = time.monotonic()
        chaos = asyncio.create_task(crash_and_restart(first))
        async with asyncio.timeout(plan.timeout):
            for i in range(plan.jobs):
                await asyncio.sleep(max(0.0, first + i / plan.rate - time.monotonic()))
                t0 = time.monotonic()
                try:
                    await work.enqueue(i)
                except Exception as e:  # counted: an enqueue must not fail for the store
                    result.enqueue_errors += 1
                    say(f"enqueue {i} raised {type(e).__name__}: {e}")
                    continue
                took.append((t0, time.monotonic() - t0))
            await chaos
            await all_ran.wait()
            up = outage["up"]
            while True:
                states = await _count_states(dsn, schema)
                if states.get("succeeded", 0) >= plan.jobs:
                    result.caught_up_after = round(time.monotonic() - up, 2)
                    break
                await asyncio.sleep(0.05)
    finally:
        for worker in workers:
            await worker.stop(timeout=5)
        await producer.close()
        await store.close()
    result.final_states = dict(await _count_states(dsn, schema))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        await db.execute(f'DROP SCHEMA "{schema}" CASCADE')
    result.down_seconds = round(outage["up"] - outage["down"], 1)
    result.ran = len(runs)
    result.ran_twice = sum(1 for times in runs.values() if len(times) > 1)
    result.ran_while_down = sum(1 for times in runs.values() if down_at(times[0]))
    up_took = [s for t, s in took if not down_at(t)]
    down_took = [s for t, s in took if down_at(t)]
    result.enqueued_while_down = len(down_took)
    result.enqueue_ms_p50, result.enqueue_ms_max = (
        _ms(up_took, statistics.median),
        _ms(up_took, max),
    )
    result.enqueue_ms_p50_down = _ms(down_took, statistics.median)
    result.enqueue_ms_max_down = _ms(down_took, max)
    if result.ran != plan.jobs:
        result.problems.append(f"{plan.jobs - result.ran} jobs never ran")
    if result.enqueue_errors:
        result.problems.append(f"{result.enqueue_errors} enqueues raised")
    if result.final_states != {"succeeded": plan.jobs}:
        result.problems.append(f"final states {result.final_states}")
    if not result.ran_while_down or not result.enqueued_while_down:
        result.problems.append("no job was enqueued and run while the store was down")
    return result


def main(argv: list[str] | None = None) -> int:
    from scripts.broker import LocalBroker, ensure_installed

    parser = argparse.ArgumentParser(
        prog="python -m scripts.jobs_store_down",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Plan()
    parser.add_argument("--jobs", type=int, default=d.jobs)
    parser.add_argument("--rate", type=float, default=d.rate, help="enqueues a second")
    parser.add_argument("--down-at", type=float, default=d.down_at)
    parser.add_argument("--down-for", type=float, default=d.down_for)
    parser.add_argument("--work", type=float, default=d.work, help="seconds a job takes")
    parser.add_argument("--concurrency", type=int, default=d.concurrency)
    parser.add_argument("--url", default=None, help="broker URL (default: a node of its own)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.down_at + args.down_for >= args.jobs / args.rate:
        parser.error("the outage must end before the last enqueue (--jobs / --rate seconds)")
    plan = Plan(
        jobs=args.jobs, rate=args.rate, down_at=args.down_at, down_for=args.down_for,
        work=args.work, concurrency=args.concurrency,
    )  # fmt: skip
    broker = None
    base = Path(tempfile.mkdtemp(prefix="aio-workq-store-down-"))
    postgres = LocalPostgres(Path(tempfile.mkdtemp(prefix="aio-workq-store-down-pg-")))
    try:
        if args.url is None:
            ensure_installed()
            broker = LocalBroker(base / "broker", name="storedown")
            broker.start()
        postgres.start()
        url = args.url or (broker.url if broker else "")
        result = asyncio.run(run(url, postgres, plan))
    finally:
        if broker is not None:
            broker.close()
        postgres.close()
        shutil.rmtree(postgres.base_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    print("\n".join(result.lines()))
    print(result.table())
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=1) + "\n")
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
