"""`python -m bench.queues`: 1,000 queues consumed by one process over one connection.

The systems, each consuming Q queues (default 1,000) with a prefetch of 10 per consumer and a
handler that does nothing (ack each):

- `aio_workq`: Q `Worker`s (concurrency 10) on one shared `Connection` (a channel each: that is
  how a Worker consumes); each declares its queue and its `.dlq`, as it does on start;
- `aiormq_raw/shared`, `aiopika/shared`: one channel, `basic_qos(10)` (per consumer) and Q
  consumers on it;
- `aiormq_raw/per-queue`, `aiopika/per-queue`: a channel per queue.

aio-pika declares each queue (`declare_queue`, as its docs do, to get a queue object to consume);
raw aiormq only consumes. A load process (untimed) declares the queues the system's way and
fills each with M persistent 100-byte messages. Then a fresh consumer process measures:

- start-up: from before connecting until every consumer runs (sequentially started);
- RSS: before connecting, once started (every consumer then holds its prefetch: the handlers
  of deliveries that arrive during start-up wait until every consumer runs), and the peak;
- deliveries/s: the messages delivered after start-up (all of them but those held), over the
  time from the end of start-up to the last one handled ("overall": all of them, from before
  connecting).

Starts a RabbitMQ node of its own unless `--url` is given. `--quick`: 20 messages per queue
instead of 50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import harness

SYSTEMS = (
    "aio_workq",
    "aiormq_raw/shared",
    "aiormq_raw/per-queue",
    "aiopika/shared",
    "aiopika/per-queue",
)
PREFETCH = 10
BODY = b"." * 100


def names(prefix: str, q: int) -> list[str]:
    return [f"{prefix}.{i:04d}" for i in range(q)]


# --- in the child --------------------------------------------------------------------------------


async def _declare(system: str, url: str, queues: list[str]) -> None:
    if system == "aio_workq":
        from aio_workq import Producer

        async with Producer(url, queue_type="classic") as producer:
            for queue in queues:
                await producer.declare(queue)
        return
    import aiormq

    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_declare(queue, durable=True)
    finally:
        await connection.close()


async def _load(system: str, url: str, queues: list[str], m: int) -> dict[str, Any]:
    import aiormq
    from pamqp.commands import Basic

    await _declare(system, url, queues)
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        room = asyncio.Semaphore(1_000)

        async def one(queue: str) -> None:
            async with room:
                properties = Basic.Properties(delivery_mode=2, message_id=uuid.uuid4().hex)
                await channel.basic_publish(BODY, routing_key=queue, properties=properties)

        await asyncio.gather(*(one(queue) for _ in range(m) for queue in queues))
    finally:
        await connection.close()
    return {"status": "ok", "loaded": m * len(queues)}


async def _start(
    system: str,
    url: str,
    queues: list[str],
    gate: Callable[[], Awaitable[None]],
    hit: Callable[[], None],
    stack: Any,
) -> None:
    """Start Q consumers of `system` (entering what needs closing into stack).

    Each handler awaits gate(), then calls hit() once its message is acked (or, for a Worker,
    once the handler returns: the worker's close waits for its acks).
    """
    family, _, mode = system.partition("/")
    if family == "aio_workq":
        from aio_workq import Connection, Job, Worker

        connection = await stack.enter_async_context(Connection(url))

        async def handle(job: Job) -> None:
            await gate()
            hit()  # the worker's close waits for the acks of the jobs it ran

        for queue in queues:
            worker = Worker(
                connection=connection, queue=queue, handler=handle, queue_type="classic",
                concurrency=PREFETCH, prefetch=PREFETCH,
            )  # fmt: skip
            await stack.enter_async_context(worker)
    elif family == "aiormq_raw":
        import aiormq
        from aiormq.abc import AbstractChannel, DeliveredMessage

        raw = await aiormq.connect(url)
        stack.push_async_callback(raw.close)

        def on_message(channel: AbstractChannel) -> Any:
            async def callback(message: DeliveredMessage) -> None:
                await gate()
                await channel.basic_ack(message.delivery_tag)  # type: ignore[arg-type]
                hit()

            return callback

        shared = await raw.channel() if mode == "shared" else None
        if shared is not None:
            await shared.basic_qos(prefetch_count=PREFETCH)
        for queue in queues:
            channel = shared
            if channel is None:
                channel = await raw.channel()
                await channel.basic_qos(prefetch_count=PREFETCH)
            await channel.basic_consume(queue, on_message(channel))
    else:
        import aio_pika
        from aio_pika.abc import AbstractIncomingMessage

        connection = await aio_pika.connect_robust(url)
        stack.push_async_callback(connection.close)

        async def on_pika(message: AbstractIncomingMessage) -> None:
            async with message.process():
                await gate()
            hit()

        one = await connection.channel() if mode == "shared" else None
        if one is not None:
            await one.set_qos(prefetch_count=PREFETCH)
        for queue in queues:
            pika_channel = one if one is not None else await connection.channel()
            if one is None:
                await pika_channel.set_qos(prefetch_count=PREFETCH)
            declared = await pika_channel.declare_queue(queue, durable=True)
            await declared.consume(on_pika)


async def _consume(system: str, url: str, queues: list[str], m: int) -> dict[str, Any]:
    total = m * len(queues)
    done = asyncio.Event()
    started = asyncio.Event()
    count = held = 0
    last = 0.0

    async def gate() -> None:
        nonlocal held
        if not started.is_set():  # deliveries during start-up wait until every consumer runs
            held += 1
            await started.wait()

    def hit() -> None:
        nonlocal count, last
        count += 1
        if count == total:
            last = time.perf_counter()
            done.set()

    rss_idle = harness.rss_mb()
    harness.reset_peak_rss()
    cpu0 = time.process_time()
    async with contextlib.AsyncExitStack() as stack:
        t0 = time.perf_counter()
        await _start(system, url, queues, gate, hit, stack)
        t1 = time.perf_counter()
        rss_started = harness.rss_mb()
        held_at_start = held
        cpu1 = time.process_time()
        started.set()
        await asyncio.wait_for(done.wait(), timeout=1800)
        cpu = time.process_time() - cpu1
        peak = harness.peak_rss_mb()
        t_close = time.perf_counter()
    return {
        "system": system,
        "queues": len(queues),
        "per_queue": m,
        "startup_s": round(t1 - t0, 3),
        "rss_idle_mb": round(rss_idle, 1),
        "rss_started_mb": round(rss_started, 1),
        "rss_peak_mb": round(peak, 1),
        "held_at_start": held_at_start,
        "rate": round((total - held_at_start) / (last - t1), 1),
        "rate_overall": round(total / (last - t0), 1),
        "startup_cpu_s": round(cpu1 - cpu0, 3),
        "cpu_us_per_msg": round(cpu / total * 1e6, 1),
        "close_s": round(time.perf_counter() - t_close, 3),
    }


# --- the runner ----------------------------------------------------------------------------------


def measure(url: str, q: int, m: int, systems: tuple[str, ...]) -> list[dict[str, Any]]:
    runs = []
    for system in systems:
        prefix = f"bench.queues.{system.replace('/', '-')}.{secrets.token_hex(3)}"
        args = ["--system", system, "--url", url, "--prefix", prefix, "--q", str(q), "--m", str(m)]
        try:
            harness.child("bench.queues", [*args, "--phase", "load"])
            record = harness.child("bench.queues", [*args, "--phase", "consume"])
            left = asyncio.run(_cleanup(url, names(prefix, q)))
            if left:
                record["error"] = f"{left} messages left in the queues"
        except RuntimeError as exc:
            record = {"system": system, "error": str(exc)}
            asyncio.run(_cleanup(url, names(prefix, q)))
        runs.append(record)
        _progress(record)
    return runs


async def _cleanup(url: str, queues: list[str]) -> int:
    """Delete the queues (and aio-workq's .dlq); the messages they still held."""
    import aiormq

    left = 0
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        for queue in queues:
            ok = await channel.queue_delete(queue)
            left += int(ok.message_count or 0)
            await channel.queue_delete(f"{queue}.dlq")
    finally:
        await connection.close()
    return left


def _progress(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{r['system']:<21} error: {r['error']}", file=sys.stderr, flush=True)
        return
    print(
        f"{r['system']:<21} start-up {r['startup_s']:.2f} s, RSS {r['rss_idle_mb']:.0f} -> "
        f"{r['rss_started_mb']:.0f} MB (peak {r['rss_peak_mb']:.0f}), "
        f"{r['rate']:,.0f} msg/s after start-up, "
        f"{r['rate_overall']:,.0f} overall",
        file=sys.stderr,
        flush=True,
    )


# --- report --------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def section(result: dict[str, Any], image: str) -> list[str]:
    plan = result["plan"]
    q = plan["queues"]
    lines = []
    per_queue: list[str] = []
    memory: list[str] = []
    for r in result["runs"]:
        name = f"**{r['system']}**" if r["system"] == "aio_workq" else r["system"]
        if "error" in r:
            lines.append([name, "error", "", "", "", "", "", ""])
            continue
        lines.append([
            name,
            _fmt(r["startup_s"], 2),
            _fmt(r.get("startup_cpu_s"), 2),
            _fmt(r["rss_started_mb"] - r["rss_idle_mb"], 1),
            _fmt(r["rss_peak_mb"] - r["rss_idle_mb"], 1),
            _fmt(r["rate"]),
            _fmt(r["rate_overall"]),
            _fmt(r["cpu_us_per_msg"], 0),
        ])  # fmt: skip
        per_queue.append(f"{r['system']} {r['startup_s'] / q * 1e3:.1f} ms")
        memory.append(f"{r['system']} {(r['rss_started_mb'] - r['rss_idle_mb']) * 1024 / q:.0f} KB")
    header = ["system", "start-up s", "start-up CPU s", "RSS once started MB", "peak RSS MB",
              "deliveries/s after start-up", "deliveries/s overall",
              "CPU µs/msg after start-up"]  # fmt: skip
    return [
        f"### {q:,} queues in one process",
        "",
        harness.measured_on(result),
        "",
        f"{q:,} classic queues, each holding {plan['per_queue']} persistent "
        f"100-byte messages, consumed by one process over one connection, prefetch "
        f"{PREFETCH} per consumer, a handler that does nothing. RSS figures are over the "
        "process's RSS before connecting (interpreter and imports); start-up runs from before "
        "connecting until every consumer is started, one after the other. Deliveries that "
        "arrive during start-up wait in their handlers until every consumer runs, so the "
        "RSS once started includes every consumer's full prefetch; deliveries/s are the messages "
        "delivered after start-up over the time from then to the last.",
        "",
        f"![{q} queues]({image})",
        "",
        *harness.table(header, lines),
        "",
        " ".join(
            [
                "Start-up per queue: " + ", ".join(per_queue) + ".",
                "Raw aiormq on one channel needs one round trip per queue (consume); a channel",
                "per queue adds the channel's opening and its prefetch; aio-pika adds a declare.",
                "An aio-workq Worker opens a channel, declares its queue and its dead-letter",
                "queue, sets its prefetch and consumes: a handful of round trips, so where its",
                "start-up per queue is well above a few times raw aiormq's (and its start-up CPU",
                "with it), the time goes into the client's own work per Worker, not the broker.",
                "Memory per queue once started, each consumer holding its prefetch of",
                f"{PREFETCH} messages: " + ", ".join(memory) + ".",
            ]
        ),
    ]


def chart(result: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    runs = [r for r in result["runs"] if "error" not in r]
    labels = [r["system"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), dpi=110)
    panels = (
        ("start-up (s)", [r["startup_s"] for r in runs]),
        (
            "RSS once started, over idle (MB)",
            [r["rss_started_mb"] - r["rss_idle_mb"] for r in runs],
        ),
        ("deliveries/s after start-up", [r["rate"] for r in runs]),
    )
    for ax, (title, values) in zip(axes, panels, strict=True):
        bars = ax.bar(range(len(runs)), values, color=[f"C{i}" for i in range(len(runs))])
        ax.bar_label(bars, fmt="%.1f" if max(values, default=0) < 100 else "%.0f", fontsize=7)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{result['plan']['queues']:,} queues, one process, one connection (loaded machine)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queues", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 messages per queue")
    parser.add_argument("--q", type=int, default=1_000, help="queues (default 1,000)")
    parser.add_argument("--m", type=int, help="messages per queue (default 50)")
    parser.add_argument("--systems", type=lambda t: tuple(t.split(",")), default=SYSTEMS)
    parser.add_argument("--url", help="use this broker instead of starting a node of our own")
    parser.add_argument("--no-docs", action="store_true", help="print the JSON, write nothing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("load", "consume"), help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    m = args.m or (20 if args.quick else 50)
    if args.child:
        queues = names(args.prefix, args.q)
        work = _load if args.phase == "load" else _consume
        harness.print_json(asyncio.run(work(args.system, args.url, queues, m)))
        return 0
    return harness.workload(
        "queues",
        argv,
        url=args.url,
        measure=lambda url: measure(url, args.q, m, args.systems),
        plan={
            "queues": args.q,
            "per_queue": m,
            "prefetch": PREFETCH,
            "systems": list(args.systems),
        },
        chart=chart,
        no_docs=args.no_docs,
    )


if __name__ == "__main__":
    sys.exit(main())
