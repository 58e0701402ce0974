"""`python -m bench.tracking`: what job tracking costs, enqueue and consume, with a job store
(PostgreSQL, SQLite) against none, measured in the same run on the same broker.

- **enqueue**: N jobs of a task (`async def noop(i: int) -> int`) through `Task.enqueue()`,
  `--inflight` at once; each returns once the broker confirmed it and, with a store, once the
  store recorded it `queued` (concurrent enqueues share a store transaction). Timed from the
  first call to the last return.
- **consume**: a worker from `tasks.workers(concurrency=--concurrency)` draining those N jobs
  (enqueued beforehand with the same store). With a store each delivery is claimed when it
  arrives (the check at delivery, `running`; the worker prefetches 4x its concurrency, so the
  claims overlap the handlers running) and its outcome written in batches (`succeeded` with
  the result). Timed from the first job settled to the last one settled and,
  with a store, every `succeeded` recorded in it (the batched writes included).

Beside each rate, the CPU time one job cost each process on this machine (`psutil`: the bench's
own process, its broker's, its PostgreSQL's with the backends: the nodes listening on the ports
of `--url` and `--dsn`, not every `beam.smp` or `postgres` of a shared machine; a node on
another host counts 0; for enqueue over the whole phase, for consume from the
first job handled to the last, so neither the worker's start nor the bench's polling of the
store counts), so the store's own cost can be told from a machine where the three share two
cores: the sum says how many jobs a second the machine's cores could serve at most.

The kinds take turns (none, SQLite, PostgreSQL, again), a fresh queue and schema each run; the
figure of a kind is its median rate, its ratio that over the median without a store. Starts a
RabbitMQ node and a PostgreSQL node of its own unless `--url` / `--dsn` are given. Writes
docs/img/bench_tracking.json and its section of docs/benchmarks.md (bench/harness.py) unless
`--no-docs`. `--quick`: N=1,000, 1 run each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from aio_workq import HandleInfo, Hook, Producer, Worker
from aio_workq.jobs import JobStore, SQLiteStore, Tasks
from aio_workq.jobs.postgres import PostgresStore, migrate
from bench import harness

KINDS = ("none", "sqlite", "postgres")
PARTS = harness.CPU_PARTS


def per_job(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """CPU µs per job of each part between two `harness.cpu_seconds()`."""
    return {part: 1e6 * (after[part] - before[part]) / n for part in PARTS}


LABELS = {"none": "no store", "sqlite": "SQLiteStore", "postgres": "PostgresStore"}


class Settled(Hook):
    """Times the first and the last settled delivery."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.cpu_first: dict[str, float] = {}
        self.cpu_last: dict[str, float] = {}
        self.done = asyncio.Event()

    def after_handle(self, info: HandleInfo) -> None:
        self.count += 1
        now = time.perf_counter()
        if self.count == 1:
            self.first = now
            self.cpu_first = harness.cpu_seconds()
        if self.count >= self.n:
            self.last = now
            self.cpu_last = harness.cpu_seconds()
            self.done.set()


class Run:
    """One kind's store for one run (a fresh SQLite file / PostgreSQL schema), and a way to
    count the jobs it has recorded `succeeded`."""

    def __init__(self, kind: str, dsn: str, tmp: Path) -> None:
        self.kind = kind
        self.dsn = dsn
        self.schema = f"bt_{uuid.uuid4().hex[:10]}"
        self.path = tmp / f"{self.schema}.db"
        self.store: JobStore | None = None

    async def __aenter__(self) -> Run:
        if self.kind == "sqlite":
            self.store = SQLiteStore(self.path)
        elif self.kind == "postgres":
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                await migrate(conn, schema=self.schema)
            self.store = PostgresStore(self.dsn, schema=self.schema)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.store is not None:
            await self.store.close()
        if self.kind == "postgres":
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                await conn.execute(f'DROP SCHEMA "{self.schema}" CASCADE')
        self.path.unlink(missing_ok=True)

    async def succeeded(self) -> int:
        sql = "SELECT count(*) FROM {}workq_jobs WHERE state = 'succeeded'"
        if self.kind == "postgres":
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                cursor = await conn.execute(sql.format(f'"{self.schema}".'))
                row = await cursor.fetchone()
                return int(row[0]) if row else 0

        def read() -> int:
            with sqlite3.connect(self.path, timeout=30) as conn:
                return int(conn.execute(sql.format("")).fetchone()[0])

        return await asyncio.to_thread(read)


async def one(url: str, dsn: str, kind: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Enqueue N jobs then consume them, with this kind's store; the two rates, and the CPU
    µs per job of each part in each phase."""
    n: int = args.n
    queue = f"bench.tracking.{kind}.{uuid.uuid4().hex[:6]}"
    async with Run(kind, dsn, tmp) as run, Producer(url) as producer:
        tasks = Tasks(producer=producer, store=run.store)

        @tasks.task(queue=queue, name="bench.noop")
        async def noop(i: int) -> int:
            return i

        await producer.declare(noop.queue)
        gate = asyncio.Semaphore(args.inflight)

        async def enqueue(i: int) -> None:
            async with gate:
                await noop.enqueue(i)

        cpu0 = harness.cpu_seconds()
        t0 = time.perf_counter()
        await asyncio.gather(*(enqueue(i) for i in range(n)))
        enqueue_s = time.perf_counter() - t0
        cpu1 = harness.cpu_seconds()

        settled = Settled(n)
        extra = {"prefetch": args.prefetch} if args.prefetch else {}
        workers: list[Worker] = tasks.workers(
            url, concurrency=args.concurrency, retry=None, hooks=[settled], **extra
        )
        for worker in workers:
            await worker.start()
        try:
            async with asyncio.timeout(600):
                await settled.done.wait()
                if run.store is not None:
                    while await run.succeeded() < n:  # noqa: ASYNC110 - the store is elsewhere
                        await asyncio.sleep(0.02)
            end = time.perf_counter() if run.store is not None else settled.last
        finally:
            for worker in workers:
                await worker.stop(timeout=10)
        consume_s = end - settled.first
    return {
        "enqueue": n / enqueue_s,
        "consume": (n - 1) / consume_s,
        "cpu": {
            "enqueue": per_job(cpu0, cpu1, n),
            "consume": per_job(settled.cpu_first, settled.cpu_last, n - 1),
        },
    }


async def measure(url: str, dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    # only this run's broker and PostgreSQL count, not others' on a shared machine
    harness.watch_nodes(broker=local_port(url, 5672), postgres=local_port(dsn, 5432))
    rates: dict[str, dict[str, list[float]]] = {k: {"enqueue": [], "consume": []} for k in KINDS}
    cpu: dict[str, dict[str, list[dict[str, float]]]] = {
        k: {"enqueue": [], "consume": []} for k in KINDS
    }
    with tempfile.TemporaryDirectory(prefix="aio-workq-bench-tracking-") as tmp:
        await one(url, dsn, "none", argparse.Namespace(**{**vars(args), "n": 200}), Path(tmp))
        for r in range(args.repeats):
            for kind in KINDS:
                got = await one(url, dsn, kind, args, Path(tmp))
                for side in ("enqueue", "consume"):
                    rates[kind][side].append(got[side])
                    cpu[kind][side].append(got["cpu"][side])
                print(
                    f"run {r + 1}/{args.repeats} {kind:<9} enqueue {got['enqueue']:>7,.0f}/s  "
                    f"consume {got['consume']:>7,.0f}/s  CPU µs/job consume "
                    + " ".join(f"{p} {got['cpu']['consume'][p]:.0f}" for p in PARTS),
                    file=sys.stderr,
                    flush=True,
                )
    medians = {k: {s: statistics.median(v) for s, v in sides.items()} for k, sides in rates.items()}
    ratios = {
        k: {s: medians[k][s] / medians["none"][s] for s in ("enqueue", "consume")}
        for k in KINDS
        if k != "none"
    }
    cpu_medians = {
        k: {
            side: {p: statistics.median(run[p] for run in runs) for p in PARTS}
            for side, runs in sides.items()
        }
        for k, sides in cpu.items()
    }
    return {
        "n": args.n,
        "repeats": args.repeats,
        "cpu": cpu_medians,
        "inflight": args.inflight,
        "concurrency": args.concurrency,
        "rates": rates,
        "medians": medians,
        "ratios": ratios,
    }


def local_port(url: str, default: int) -> int | None:
    """The port of a node at `url` on this machine (`cpu_seconds` counts it), None if the
    node is elsewhere (it counts 0)."""
    parsed = urlsplit(url) if "://" in url else None
    if parsed is None or (parsed.hostname or "localhost") not in ("localhost", "127.0.0.1", "::1"):
        return None
    return parsed.port or default


def section(result: dict[str, Any], image: str) -> list[str]:
    """The docs section (bench/harness.py renders it from docs/img/bench_tracking.json)."""
    med, ratios = result["medians"], result["ratios"]
    lines = []
    for kind in KINDS:
        r = ratios.get(kind, {"enqueue": 1.0, "consume": 1.0})
        lines.append([
            LABELS[kind], f"{med[kind]['enqueue']:,.0f}", f"{r['enqueue']:.2f}",
            f"{med[kind]['consume']:,.0f}", f"{r['consume']:.2f}",
        ])  # fmt: skip
    return [
        "### Job tracking: a job store vs none",
        "",
        harness.measured_on(result),
        "",
        f"{result['n']:,} jobs of a task that does nothing, enqueued through `Task.enqueue()` "
        f"({result['inflight']} at once) and consumed by `tasks.workers(concurrency="
        f"{result['concurrency']})`, with each store and without one, the kinds taking turns on "
        f"the same broker, the median of {result['repeats']} runs (`python -m bench.tracking`). "
        "With a store an enqueue also records the job `queued` (concurrent enqueues share a "
        "transaction, up to two in flight; each returns once its record is committed); a "
        "delivery is claimed when it arrives (a task worker with a store prefetches four times its "
        "concurrency, so the claims of the deliveries waiting for a handler overlap the "
        "handlers running; without a store the prefetch is the concurrency) and its outcome "
        "written in batches (on PostgreSQL one statement per batch, up to two batches in "
        "flight); the consume clock stops once the store holds every `succeeded`.",
        "",
        *harness.table(["store", "enqueue jobs/s", "× none", "consume jobs/s", "× none"], lines),
        "",
        "On this loaded machine the rates swing from run to run; read the ratios, measured in "
        "the same run. The PostgreSQL server ran on the same 2 cores as the broker and the bench.",
        *cpu_section(result),
        "",
        goal(ratios["postgres"], result),
    ]


def cpu_section(result: dict[str, Any]) -> list[str]:
    """The CPU each job cost each process (older results carry none)."""
    cpu = result.get("cpu")
    if cpu is None:
        return []
    lines = [
        [LABELS[kind], side, *(f"{cpu[kind][side][p]:.0f}" for p in PARTS),
         f"{sum(cpu[kind][side].values()):.0f}"]
        for side in ("enqueue", "consume") for kind in KINDS
    ]  # fmt: skip
    return [
        "",
        "CPU time per job in each process over each phase (µs, the median of the runs; "
        "`client` is the bench's process, the library's side):",
        "",
        *harness.table(["store", "phase", "client", "broker", "PostgreSQL", "sum"], lines),
    ]


def goal(postgres: dict[str, float], result: dict[str, Any]) -> str:
    """Whether the 0.8× aimed for on PostgreSQL was reached, and if not, where it goes."""
    figures = f"{postgres['enqueue']:.2f}× enqueue, {postgres['consume']:.2f}× consume"
    if min(postgres.values()) >= 0.8:
        return f"The goal for PostgreSQL, 0.8× of untracked, is met here ({figures})."
    text = (
        f"The goal for PostgreSQL, 0.8× of untracked, is not met here ({figures}). What is "
        "left is the store's own work for each job: three writes (`queued`, `running`, "
        "`succeeded`), CPU in the client and in the server, here on the same 2 cores as the "
        "broker; and the claim's round trip before the task runs (a job cancelled while "
        "queued must not run), hidden only while deliveries wait for a handler."
    )
    cpu = result.get("cpu")
    if cpu is None:
        return text
    cores = result.get("meta", {}).get("machine", {}).get("cpus") or os.cpu_count() or 1
    none, pg = cpu["none"]["consume"], cpu["postgres"]["consume"]
    ceiling = cores * 1e6 / sum(pg.values())
    untracked = result["medians"]["none"]["consume"]
    return text + (
        f" On consume, a tracked job cost {sum(pg.values()):.0f} µs of CPU in all (client "
        f"{pg['client']:.0f}, broker {pg['broker']:.0f}, PostgreSQL {pg['postgres']:.0f}) "
        f"against {sum(none.values()):.0f} untracked: {cores} cores could serve at most "
        f"{ceiling:,.0f} tracked jobs/s, {ceiling / untracked:.2f}× the untracked rate "
        f"measured here, and the client alone, one Python thread, at most "
        f"{1e6 / pg['client']:,.0f}/s."
    )


def chart(result: dict[str, Any], path: Path) -> None:
    try:
        plt = harness.pyplot()
    except ImportError:
        return  # matplotlib is in the bench group; the JSON and the table do without it
    med = result["medians"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
    for ax, side in zip(axes, ("enqueue", "consume"), strict=True):
        ax.bar([LABELS[k] for k in KINDS], [med[k][side] for k in KINDS], color="#4a7ebb")
        ax.set_title(f"{side} jobs/s (median)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracking", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="N=1,000, 1 run each")
    parser.add_argument("--n", type=int, default=None, help="jobs per run (5,000)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per kind (3)")
    parser.add_argument("--inflight", type=int, default=200, help="enqueues at once")
    parser.add_argument("--concurrency", type=int, default=50, help="the worker's concurrency")
    parser.add_argument(
        "--prefetch", type=int, default=0, help="the worker's prefetch (default: the library's)"
    )
    parser.add_argument("--url", default=None, help="broker URL (default: a node of its own)")
    parser.add_argument("--dsn", default=None, help="PostgreSQL DSN (default: a node of its own)")
    parser.add_argument("--no-docs", action="store_true", help="don't write docs/")
    args = parser.parse_args(argv)
    try:
        import psutil  # noqa: F401 - the CPU per job of each process
    except ImportError:
        parser.error("needs psutil, in the bench group: make bench-deps")
    args.n = args.n or (1_000 if args.quick else 5_000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    meta = harness.meta(["python", "-m", "bench.tracking", *(argv or sys.argv[1:])])
    postgres = None
    try:
        if args.dsn is None:
            from scripts.postgres import LocalPostgres

            postgres = LocalPostgres(Path(tempfile.mkdtemp(prefix="aio-workq-bench-pg-")))
            postgres.start()
        dsn = args.dsn or (postgres.dsn if postgres else "")
        result = harness.on_broker(
            args.url, lambda url: asyncio.run(measure(url, dsn, args)), "workqbenchtrk"
        )
    finally:
        if postgres is not None:
            postgres.close()
            shutil.rmtree(postgres.base_dir, ignore_errors=True)
    med, ratios = result["medians"], result["ratios"]
    print(f"{args.n:,} jobs, median of {args.repeats} runs (load {os.getloadavg()[0]:.1f}):")
    for kind in KINDS:
        r = ratios.get(kind, {"enqueue": 1.0, "consume": 1.0})
        print(
            f"  {LABELS[kind]:<14} enqueue {med[kind]['enqueue']:>7,.0f}/s ({r['enqueue']:.2f})"
            f"  consume {med[kind]['consume']:>7,.0f}/s ({r['consume']:.2f})"
        )
    print(json.dumps(result["ratios"]))
    if not args.no_docs:
        harness.save("tracking", {"meta": meta, **result}, chart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
