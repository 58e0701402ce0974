"""`python -m bench.rpc`: RPC round trips at 1, 10 and 100 concurrent callers.

For each system a server process answers on a queue (echoing a 100-byte body) and a client
process calls it: for each level of concurrency, after 50 warm-up calls, that many coroutines
make `--calls` calls in all, one after the other each, timing every call from the request to
its reply. The systems, each the way its documentation shows it (every request confirmed by
the broker before the reply counts: all four publish on a channel in confirm mode):

- `aio_workq`: `Producer.call(body, queue=…)` against a `Worker` (concurrency 100) whose
  handler returns the body; direct reply-to;
- `aiormq_raw`: by hand: the client consumes `amq.rabbitmq.reply-to` (no ack) and publishes
  with `reply_to` and a `correlation_id`; the server publishes the reply (on a channel in
  confirm mode, waiting for the confirm), then acks;
- `aiopika`: `aio_pika.patterns.RPC` on both sides (`register` / `call`, its pickle
  serializer, its own exclusive reply queue), prefetch 100;
- `faststream`: `RabbitBroker.request(…)` against a subscriber that returns the body; direct
  reply-to; prefetch 100.

Starts a RabbitMQ node of its own unless `--url` is given. `--quick`: 500 calls per level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import harness

SYSTEMS = ("aio_workq", "aiormq_raw", "aiopika", "faststream")
LEVELS = (1, 10, 100)
WARMUP = 50
BODY = b"." * 100
PREFETCH = 100

Call = Callable[[bytes], Awaitable[bytes]]


# --- servers -------------------------------------------------------------------------------------


async def _serve(system: str, url: str, queue: str, stack: contextlib.AsyncExitStack) -> None:
    if system == "aio_workq":
        from aio_workq import Job, Worker

        async def handle(job: Job) -> bytes:
            return job.body

        worker = Worker(url, queue=queue, handler=handle, queue_type="classic",
                        concurrency=PREFETCH, prefetch=PREFETCH)  # fmt: skip
        await stack.enter_async_context(worker)
    elif system == "aiormq_raw":
        import aiormq
        from aiormq.abc import DeliveredMessage
        from pamqp.commands import Basic

        connection = await aiormq.connect(url)
        stack.push_async_callback(connection.close)
        channel = await connection.channel(publisher_confirms=True)
        await channel.queue_declare(queue, durable=True)
        await channel.basic_qos(prefetch_count=PREFETCH)

        async def on_request(message: DeliveredMessage) -> None:
            props = message.header.properties
            reply = Basic.Properties(correlation_id=props.correlation_id)
            await channel.basic_publish(message.body, routing_key=props.reply_to or "",
                                        properties=reply)  # fmt: skip
            await channel.basic_ack(message.delivery_tag)  # type: ignore[arg-type]

        await channel.basic_consume(queue, on_request)
    elif system == "aiopika":
        import aio_pika
        from aio_pika.patterns import RPC

        pika = await aio_pika.connect_robust(url)
        stack.push_async_callback(pika.close)
        pchannel = await pika.channel()
        await pchannel.set_qos(prefetch_count=PREFETCH)
        rpc = await RPC.create(pchannel)

        async def echo(*, body: bytes) -> bytes:
            return body

        await rpc.register(queue, echo, auto_delete=True)
    else:
        from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

        broker = RabbitBroker(url, default_channel=Channel(prefetch_count=PREFETCH), logger=None)

        @broker.subscriber(RabbitQueue(queue, durable=True))
        async def reply(body: bytes) -> bytes:
            return body

        await broker.start()
        stack.push_async_callback(broker.stop)


async def _server(system: str, url: str, queue: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await _serve(system, url, queue, stack)
        print("READY", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # until the runner closes our stdin


# --- clients -------------------------------------------------------------------------------------


async def _client_call(system: str, url: str, queue: str, stack: contextlib.AsyncExitStack) -> Call:
    if system == "aio_workq":
        from aio_workq import Producer

        producer = await stack.enter_async_context(Producer(url, queue_type="classic"))

        async def call_workq(body: bytes) -> bytes:
            reply: bytes = await producer.call(body, queue=queue)
            return reply

        return call_workq
    if system == "aiormq_raw":
        import aiormq
        from aiormq.abc import DeliveredMessage
        from pamqp.commands import Basic

        connection = await aiormq.connect(url)
        stack.push_async_callback(connection.close)
        channel = await connection.channel(publisher_confirms=True)
        waiting: dict[str, asyncio.Future[bytes]] = {}

        async def on_reply(message: DeliveredMessage) -> None:
            future = waiting.pop(message.header.properties.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(message.body)

        await channel.basic_consume("amq.rabbitmq.reply-to", on_reply, no_ack=True)
        loop = asyncio.get_running_loop()

        async def call_raw(body: bytes) -> bytes:
            cid = uuid.uuid4().hex
            waiting[cid] = future = loop.create_future()
            props = Basic.Properties(reply_to="amq.rabbitmq.reply-to", correlation_id=cid)
            await channel.basic_publish(body, routing_key=queue, properties=props)
            reply: bytes = await future
            return reply

        return call_raw
    if system == "aiopika":
        import aio_pika
        from aio_pika.patterns import RPC

        pika = await aio_pika.connect_robust(url)
        stack.push_async_callback(pika.close)
        rpc = await RPC.create(await pika.channel())

        async def call_pika(body: bytes) -> bytes:
            reply: bytes = await rpc.call(queue, kwargs={"body": body})
            return reply

        return call_pika
    from faststream.rabbit import RabbitBroker

    broker = RabbitBroker(url, logger=None)
    await broker.connect()
    stack.push_async_callback(broker.stop)

    async def call_faststream(body: bytes) -> bytes:
        message = await broker.request(body, queue=queue, timeout=30)
        reply: bytes = message.body
        return reply

    return call_faststream


async def _client(
    system: str, url: str, queue: str, calls: int, levels: tuple[int, ...]
) -> dict[str, Any]:
    out: dict[str, Any] = {"system": system, "calls": calls, "levels": {}}
    async with contextlib.AsyncExitStack() as stack:
        call = await _client_call(system, url, queue, stack)
        for _ in range(WARMUP):
            if await call(BODY) != BODY:
                raise RuntimeError("the reply is not the request's body")
        for level in levels:
            out["levels"][str(level)] = await _level(call, calls, level)
    return out


async def _level(call: Call, calls: int, level: int) -> dict[str, float]:
    latencies: list[float] = []
    left = calls

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            start = time.perf_counter()
            await call(BODY)
            latencies.append(time.perf_counter() - start)

    cpu = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(level)))
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    return {
        "p50_ms": round(harness.percentile(latencies, 50) * 1e3, 3),
        "p99_ms": round(harness.percentile(latencies, 99) * 1e3, 3),
        "calls_per_s": round(calls / seconds, 1),
        "client_cpu_us_per_call": round(cpu / calls * 1e6, 1),
    }


# --- the runner ----------------------------------------------------------------------------------


def measure(url: str, calls: int, systems: tuple[str, ...]) -> list[dict[str, Any]]:
    runs = []
    for system in systems:
        queue = f"bench.rpc.{system}.{secrets.token_hex(3)}"
        args = ["--system", system, "--url", url, "--queue", queue]
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.rpc", "--child", "--role", "server", *args],
            cwd=harness.REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.stdin is not None and server.stdout is not None
        try:
            if server.stdout.readline().strip() != "READY":
                raise RuntimeError(f"the {system} server did not start (exit {server.wait()})")
            record = harness.child("bench.rpc", [*args, "--role", "client", "--calls", str(calls)])
        except RuntimeError as exc:
            record = {"system": system, "error": str(exc)}
        finally:
            server.stdin.close()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            server.stdout.close()
            asyncio.run(_delete(url, queue))
        runs.append(record)
        _progress(record)
    return runs


async def _delete(url: str, queue: str) -> None:
    import aiormq

    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        for name in (queue, f"{queue}.dlq"):
            await channel.queue_delete(name)
    finally:
        await connection.close()


def _progress(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{r['system']:<11} error: {r['error']}", file=sys.stderr, flush=True)
        return
    cells = ", ".join(
        f"{c}: p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} ms {v['calls_per_s']:,.0f}/s"
        for c, v in r["levels"].items()
    )
    print(f"{r['system']:<11} {cells}", file=sys.stderr, flush=True)


# --- report --------------------------------------------------------------------------------------


def section(result: dict[str, Any], image: str) -> list[str]:
    plan = result["plan"]
    lines = []
    for r in result["runs"]:
        name = f"**{r['system']}**" if r["system"] == "aio_workq" else r["system"]
        for level in plan["levels"]:
            v = r.get("levels", {}).get(str(level))
            if v is None:
                lines.append([name, str(level), "error", "", "", ""])
                continue
            lines.append([
                name, str(level), f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}",
                f"{v['calls_per_s']:,.0f}", f"{v['client_cpu_us_per_call']:.0f}",
            ])  # fmt: skip
    header = ["system", "callers", "p50 ms", "p99 ms", "calls/s", "client CPU µs/call"]
    return [
        "### RPC round trips",
        "",
        harness.measured_on(result),
        "",
        f"{plan['calls']:,} calls per level after {WARMUP} warm-up calls, a 100-byte body "
        "echoed by a server in another process, each caller making one call after the other. "
        "aio-workq, raw aiormq and FastStream use RabbitMQ's direct reply-to; aio-pika's "
        "`RPC` pattern declares a reply queue of its own and pickles the call's arguments.",
        "",
        f"![RPC]({image})",
        "",
        *harness.table(header, lines),
        "",
        "With one caller the round trip is the sum of two publishes, two deliveries and the "
        "server's turn, so the clients differ by their own per-message cost, twice; with 100 "
        "callers the calls queue behind each other in the client, the broker and the server, "
        "and the p99 follows the calls/s: whichever system spends less CPU per call "
        "(client and server on 2 shared cores) answers sooner.",
    ]


def chart(result: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    plan = result["plan"]
    runs = [r for r in result["runs"] if "levels" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, metric in zip(axes, ("p50_ms", "p99_ms"), strict=True):
        width = 0.8 / max(1, len(runs))
        for j, r in enumerate(runs):
            xs = [i - 0.4 + (j + 0.5) * width for i in range(len(plan["levels"]))]
            values = [r["levels"][str(c)][metric] for c in plan["levels"]]
            bars = ax.bar(xs, values, width, label=r["system"])
            ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax.set_xticks(range(len(plan["levels"])))
        ax.set_xticklabels([f"{c} caller{'s' if c > 1 else ''}" for c in plan["levels"]])
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title(f"RPC round trip, {metric[:3]}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("RPC round trips (loaded machine; log scale)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rpc", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="500 calls per level")
    parser.add_argument("--calls", type=int, help="calls per level (default 2,000)")
    parser.add_argument("--systems", type=lambda t: tuple(t.split(",")), default=SYSTEMS)
    parser.add_argument("--url", help="use this broker instead of starting a node of our own")
    parser.add_argument("--no-docs", action="store_true", help="print the JSON, write nothing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    calls = args.calls or (500 if args.quick else 2_000)
    if args.child:
        if args.role == "server":
            asyncio.run(_server(args.system, args.url, args.queue))
        else:
            harness.print_json(
                asyncio.run(_client(args.system, args.url, args.queue, calls, LEVELS))
            )
        return 0
    return harness.workload(
        "rpc",
        argv,
        url=args.url,
        measure=lambda url: measure(url, calls, args.systems),
        plan={"calls": calls, "levels": list(LEVELS), "systems": list(args.systems)},
        chart=chart,
        no_docs=args.no_docs,
    )


if __name__ == "__main__":
    sys.exit(main())
