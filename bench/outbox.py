"""`python -m bench.outbox`: what exactly-once costs, as ratios measured in the same run.

- **outbox / direct**: messages inserted through `Outbox.publish()` (in transactions of
  `--per-tx` messages, by `--apps` concurrent app connections) and relayed to a confirm by one
  `OutboxRelay`, against `Producer.publish_many()` of the same bodies to the same broker. The
  clock runs from the first insert to the last row deleted after its confirm.
- **idempotent / plain consume**: a Worker draining a pre-filled queue with an `idempotent()`
  handler (a transaction per message: the processed id + one effect row), against the same
  Worker with a no-op handler, and against one that writes the effect row without dedup.

Starts a RabbitMQ node and a PostgreSQL node of its own (scripts/broker.py, scripts/postgres.py)
unless `--url` / `--dsn` are given; kinds alternate, best of `--repeats`. Writes
`bench/results/outbox-latest.json` and prints a Markdown table. `--quick` is a small smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from aio_workq import Job, Producer, Queue, Worker
from aio_workq.outbox import Outbox, OutboxRelay, idempotent, migrate
from scripts.broker import LocalBroker, ensure_installed
from scripts.postgres import LocalPostgres

RESULTS = Path(__file__).resolve().parent / "results"
BODY = {"order": 0, "payload": "x" * 200}


async def direct(url: str, dsn: str, schema: str, n: int, args: argparse.Namespace) -> float:
    queue = Queue(f"bench.outbox.direct.{uuid.uuid4().hex[:6]}", type=args.queue_type)
    async with Producer(url) as producer:
        await producer.declare(queue)
        t0 = time.perf_counter()
        await producer.publish_many([BODY] * n, queue=queue)
        seconds = time.perf_counter() - t0
    await _drop_queue(url, queue)
    return seconds


async def outbox(url: str, dsn: str, schema: str, n: int, args: argparse.Namespace) -> float:
    queue = Queue(f"bench.outbox.relay.{uuid.uuid4().hex[:6]}", type=args.queue_type)
    box = Outbox(schema=schema)
    apps: int = args.apps
    per_app = n // apps

    async def app() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            for _ in range(0, per_app, args.per_tx):
                async with conn.transaction():
                    for _ in range(args.per_tx):
                        await box.publish(conn, BODY, queue=queue.name)

    async with OutboxRelay(dsn, url=url, schema=schema, queues=[queue]) as relay:
        await relay.drain()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watch:
            t0 = time.perf_counter()
            await asyncio.gather(*(app() for _ in range(apps)))
            while relay.published < per_app * apps:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.005)
            seconds = time.perf_counter() - t0
            left = await (
                await watch.execute(f"SELECT count(*) FROM {schema}.workq_outbox")
            ).fetchone()
            assert left == (0,), left
    await _drop_queue(url, queue)
    return seconds * n / (per_app * apps)


async def _consume(
    url: str,
    dsn: str,
    schema: str,
    n: int,
    args: argparse.Namespace,
    make: Callable[[AsyncConnectionPool[Any]], Callable[[Job], Awaitable[Any]]],
) -> float:
    queue = Queue(f"bench.outbox.consume.{uuid.uuid4().hex[:6]}", type=args.queue_type)
    async with Producer(url) as producer:
        await producer.publish_many([BODY] * n, queue=queue)
    done = asyncio.Event()
    count = 0
    first = 0.0
    async with AsyncConnectionPool(
        dsn, min_size=args.concurrency, max_size=args.concurrency
    ) as pool:
        inner = make(pool)

        async def handler(job: Job) -> None:
            nonlocal count, first
            await inner(job)
            count += 1
            if count == 1:
                first = time.perf_counter()
            if count == n:
                done.set()

        async with Worker(url, queue=queue, handler=handler, concurrency=args.concurrency):
            await done.wait()
            seconds = time.perf_counter() - first
    await _drop_queue(url, queue)
    return seconds * n / max(n - 1, 1)  # first to N-th finished handler: N - 1 intervals


async def plain(url: str, dsn: str, schema: str, n: int, args: argparse.Namespace) -> float:
    async def noop(job: Job) -> None:
        return None

    return await _consume(url, dsn, schema, n, args, lambda pool: noop)


async def db_write(url: str, dsn: str, schema: str, n: int, args: argparse.Namespace) -> float:
    def make(pool: AsyncConnectionPool[Any]) -> Callable[[Job], Awaitable[Any]]:
        async def write(job: Job) -> None:
            async with pool.connection() as conn:
                await conn.execute(
                    f"INSERT INTO {schema}.effects (message_id) VALUES (%s)", (job.message_id,)
                )

        return write

    return await _consume(url, dsn, schema, n, args, make)


async def exactly_once(url: str, dsn: str, schema: str, n: int, args: argparse.Namespace) -> float:
    def make(pool: AsyncConnectionPool[Any]) -> Callable[[Job], Awaitable[Any]]:
        @idempotent(pool, name=f"bench-{uuid.uuid4().hex[:6]}", schema=schema)
        async def write(job: Job, conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                f"INSERT INTO {schema}.effects (message_id) VALUES (%s)", (job.message_id,)
            )

        return write

    return await _consume(url, dsn, schema, n, args, make)


KINDS: dict[str, Callable[[str, str, str, int, argparse.Namespace], Awaitable[float]]] = {
    "direct publish_many": direct,
    "outbox insert + relay": outbox,
    "plain consume": plain,
    "consume + DB write": db_write,
    "idempotent consume": exactly_once,
}


async def _drop_queue(url: str, queue: Queue) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in (queue.name, f"{queue.name}.dlq"):
            await channel.queue_delete(name)


async def measure(url: str, dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
        await conn.execute(f"CREATE TABLE {schema}.effects (message_id text)")
        try:
            best: dict[str, float] = {}
            for repeat in range(args.repeats):
                for kind, run in KINDS.items():
                    seconds = await run(url, dsn, schema, args.n, args)
                    rate = args.n / seconds
                    best[kind] = max(best.get(kind, 0.0), rate)
                    print(f"  repeat {repeat + 1}: {kind:<24} {rate:>9,.0f} msg/s", flush=True)
        finally:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return {
        "n": args.n,
        "per_tx": args.per_tx,
        "apps": args.apps,
        "concurrency": args.concurrency,
        "queue_type": args.queue_type,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "rates": best,
        "ratios": {
            "outbox / direct publish_many": best["outbox insert + relay"]
            / best["direct publish_many"],
            "idempotent / plain consume": best["idempotent consume"] / best["plain consume"],
            "idempotent / consume + DB write": best["idempotent consume"]
            / best["consume + DB write"],
        },
    }


def table(result: dict[str, Any]) -> str:
    lines = ["| kind | msg/s (best) |", "| --- | ---: |"]
    lines += [f"| {kind} | {rate:,.0f} |" for kind, rate in result["rates"].items()]
    lines += ["", "| ratio | value |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.2f} |" for name, value in result["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outbox", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2,000 messages, one repeat")
    parser.add_argument("--n", type=int, default=None, help="messages per run (20,000)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per kind (3)")
    parser.add_argument("--per-tx", type=int, default=1, help="outbox messages per transaction")
    parser.add_argument("--apps", type=int, default=4, help="concurrent app connections")
    parser.add_argument("--concurrency", type=int, default=16, help="worker concurrency")
    parser.add_argument("--queue-type", choices=["quorum", "classic"], default="quorum")
    parser.add_argument("--url", default=None, help="broker URL (default: a node of its own)")
    parser.add_argument("--dsn", default=None, help="PostgreSQL DSN (default: a node of its own)")
    args = parser.parse_args(argv)
    args.n = args.n or (2_000 if args.quick else 20_000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.n % (args.apps * args.per_tx):
        parser.error("--n must be a multiple of --apps x --per-tx")

    broker = postgres = None
    base = Path(tempfile.mkdtemp(prefix="aio-workq-bench-outbox-"))
    try:
        if args.url is None:
            ensure_installed()
            broker = LocalBroker(base / "broker", name="benchoutbox")
            broker.start()
        if args.dsn is None:
            # Its own directory: the server runs as `postgres`, who cannot enter `base` (0700).
            postgres = LocalPostgres(Path(tempfile.mkdtemp(prefix="aio-workq-bench-pg-")))
            postgres.start()
        url = args.url or (broker.url if broker else "")
        dsn = args.dsn or (postgres.dsn if postgres else "")
        result = asyncio.run(measure(url, dsn, args))
    finally:
        if broker is not None:
            broker.close()
        if postgres is not None:
            postgres.close()
            shutil.rmtree(postgres.base_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "outbox-latest.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
