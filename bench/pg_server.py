"""`python -m bench.pg_server --dsn URL --url AMQP_URL --pgdata DIR N`: what PostgreSQL itself
does for N tracked jobs (bench/where_the_time_goes.md, "What PostgreSQL does for a tracked job").

A task that does nothing, N jobs through `Task.enqueue()` (200 at once), then consumed by
`tasks.workers(concurrency=50)`, with a `PostgresStore` on a fresh schema. For each phase: the
CPU seconds of the PostgreSQL node whose data directory is `--pgdata` (the postmaster and all
its processes, from /proc: a node on this machine, of your own: every connection to it counts)
and its WAL bytes; with `--stats`, the statements of `pg_stat_statements` (which the node must
preload) and the batches (one statement each, in autocommit: one commit each). Prints one JSON
line. A job's cost is the difference of two runs (say 15,000 and 5,000 jobs) over the
difference of their N, which takes out what a run costs once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import psycopg

from aio_workq import HandleInfo, Hook, Producer
from aio_workq.jobs import Tasks
from aio_workq.jobs.postgres import PostgresStore, migrate

TICK = os.sysconf("SC_CLK_TCK")


def server_cpu(pgdata: Path) -> float:
    """CPU seconds of the node so far: the postmaster, its children alive, and (cutime,
    cstime) those it has reaped (a backend whose connection closed)."""
    pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / TICK


class Settled(Hook):
    def __init__(self, n: int) -> None:
        self.n, self.count, self.done = n, 0, asyncio.Event()

    def after_handle(self, info: HandleInfo) -> None:
        self.count += 1
        if self.count >= self.n:
            self.done.set()


async def wal(conn: Any) -> int:
    cursor = await conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
    row = await cursor.fetchone()
    return int(row[0])


async def statements(conn: Any) -> list[list[str]]:
    cursor = await conn.execute(
        "SELECT calls, plans, round(total_exec_time::numeric, 1), rows, wal_bytes, "
        "left(regexp_replace(query, '\\s+', ' ', 'g'), 60) FROM pg_stat_statements "
        "WHERE query LIKE '%workq_jobs%' ORDER BY total_exec_time DESC LIMIT 8"
    )
    return [list(map(str, row)) for row in await cursor.fetchall()]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    n: int = args.n
    schema, queue = f"pgs_{uuid.uuid4().hex[:8]}", f"bench.pg_server.{uuid.uuid4().hex[:6]}"
    out: dict[str, Any] = {"n": n}
    async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
        await conn.execute("CHECKPOINT")
        store = PostgresStore(args.dsn, schema=schema)
        try:
            async with Producer(args.url) as producer:
                tasks = Tasks(producer=producer, store=store)

                @tasks.task(queue=queue, name="bench.pg_server.noop")
                async def noop(i: int) -> int:
                    return i

                await producer.declare(noop.queue)
                gate = asyncio.Semaphore(200)

                async def enqueue(i: int) -> None:
                    async with gate:
                        await noop.enqueue(i)

                await enqueue(-1)  # the store's pool opened
                for phase in ("enqueue", "consume"):
                    if args.stats:
                        await conn.execute("SELECT pg_stat_statements_reset()")
                    wal0 = await wal(conn)
                    cpu0 = server_cpu(args.pgdata)
                    if phase == "enqueue":
                        await asyncio.gather(*(enqueue(i) for i in range(n)))
                    else:
                        settled = Settled(n + 1)
                        workers = tasks.workers(
                            args.url, concurrency=50, retry=None, hooks=[settled]
                        )
                        for worker in workers:
                            await worker.start()
                        async with asyncio.timeout(600):
                            await settled.done.wait()
                        for worker in workers:  # the last outcomes written
                            await worker.stop(timeout=30)
                    cpu1 = server_cpu(args.pgdata)
                    wal1 = await wal(conn)
                    out[phase] = {
                        "cpu_us": 1e6 * (cpu1 - cpu0) / n,
                        "wal_bytes": (wal1 - wal0) / n,
                    }
                    if args.stats:
                        found = await statements(conn)
                        out[phase]["statements"] = found  # one a batch, in autocommit: a commit
                        out[phase]["batches"] = sum(int(row[0]) for row in found)
        finally:
            await store.close()
        cursor = await conn.execute(
            "SELECT n_tup_upd, n_tup_hot_upd, n_dead_tup, pg_total_relation_size(relid) "
            "FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'workq_jobs'",
            (schema,),
        )
        out["table"] = dict(
            zip(("upd", "hot_upd", "dead", "bytes"), await cursor.fetchone() or (), strict=False)
        )
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", type=int, help="jobs")
    parser.add_argument("--dsn", required=True, help="PostgreSQL DSN (a node on this machine)")
    parser.add_argument("--pgdata", type=Path, required=True, help="that node's data directory")
    parser.add_argument("--url", default=os.environ.get("AMQP_URL"), help="broker URL")
    parser.add_argument("--stats", action="store_true", help="pg_stat_statements per phase")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
