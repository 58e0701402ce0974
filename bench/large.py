"""`python -m bench.large`: bodies of 64 KiB, 1 MiB and 16 MiB through aio-workq, raw aiormq and
aio-pika: throughput, and peak RSS per byte in flight.

aio-workq runs twice: as it is (`aio_workq`: its own frame writer and reader) and on its plain
path (`aio_workq_plain`: `AIO_WORKQ_FAST_PATH=0`, aiormq's public API for every frame).

For each body size, the same budget of bytes in flight (64 MiB: 1,024 bodies of 64 KiB, 64 of
1 MiB, 4 of 16 MiB) bounds every system:

- publish: that many coroutines, each making a fresh body (as an application would: one copy
  of a template) and publishing it persistent to a classic queue, waiting for its confirm
  before the next; so at most `inflight` bodies exist at once, each until its confirm.
- consume: a consumer with that prefetch (aio-workq: `concurrency` and `prefetch`) whose
  handler does nothing, acking each, on the queue the publish phase filled.

Each phase is a fresh process. Its peak RSS is the kernel's high-water mark (`VmHWM`, reset
once connected and ready, just before the timed phase); "RSS / in flight" is (peak - the RSS at
that moment) over the bytes in flight: 1.0 means one copy of every body in flight and nothing
else; the goal is <= 1.2. Rates run from the first message to the last.

Starts a RabbitMQ node of its own unless `--url` is given. `--quick`: 128 MiB per size and
system instead of 512 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import MiB

SYSTEMS = ("aio_workq", "aio_workq_plain", "aiormq_raw", "aiopika")
PLAIN = "aio_workq_plain"
"""aio-workq on its plain path (`AIO_WORKQ_FAST_PATH=0`: aiormq's public API for every frame)."""
SIZES = (64 * 1024, MiB, 16 * MiB)
INFLIGHT_BYTES = 64 * MiB


def inflight(size: int, budget: int = INFLIGHT_BYTES) -> int:
    """Bodies in flight for this body size: the budget's worth, at least 1."""
    return max(1, budget // size)


def label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // 1024} KiB"


# --- the systems (in the child) ------------------------------------------------------------------

Handler = Callable[[bytes], None]


class Side:
    """One system's publish and consume, the way its documentation shows them."""

    def __init__(self, url: str, queue: str, k: int) -> None:
        self.url, self.queue, self.k = url, queue, k
        self.stack = contextlib.AsyncExitStack()

    async def setup(self) -> None:
        raise NotImplementedError

    async def publish(self, body: bytes) -> None:
        raise NotImplementedError

    async def consume(self, handler: Handler) -> None:
        raise NotImplementedError


class AioWorkq(Side):
    async def setup(self) -> None:
        from aio_workq import Connection, Producer

        self.connection = await self.stack.enter_async_context(Connection(self.url))
        producer = Producer(connection=self.connection, queue_type="classic")
        self.producer = await self.stack.enter_async_context(producer)
        await self.producer.declare(self.queue)

    async def publish(self, body: bytes) -> None:
        await self.producer.publish(body, queue=self.queue)

    async def consume(self, handler: Handler) -> None:
        from aio_workq import Job, Worker

        async def handle(job: Job) -> None:
            handler(job.body)  # the worker's close waits for the acks

        worker = Worker(
            connection=self.connection, queue=self.queue, handler=handle,
            queue_type="classic", concurrency=self.k, prefetch=self.k,
        )  # fmt: skip
        await self.stack.enter_async_context(worker)


class AiormqRaw(Side):
    async def setup(self) -> None:
        import aiormq

        self.connection = await aiormq.connect(self.url)
        self.stack.push_async_callback(self.connection.close)
        self.channel = await self.connection.channel(publisher_confirms=True)
        await self.channel.queue_declare(self.queue, durable=True)

    async def publish(self, body: bytes) -> None:
        from pamqp.commands import Basic

        properties = Basic.Properties(delivery_mode=2, message_id=uuid.uuid4().hex)
        await self.channel.basic_publish(body, routing_key=self.queue, properties=properties)

    async def consume(self, handler: Handler) -> None:
        from aiormq.abc import DeliveredMessage

        channel = self.channel

        async def on_message(message: DeliveredMessage) -> None:
            body = message.body
            await channel.basic_ack(message.delivery_tag)  # type: ignore[arg-type]
            handler(body)  # counted once acked: the process may close right after the last

        await channel.basic_qos(prefetch_count=self.k)
        await channel.basic_consume(self.queue, on_message)


class AioPika(Side):
    async def setup(self) -> None:
        import aio_pika

        self.connection = await aio_pika.connect_robust(self.url)
        self.stack.push_async_callback(self.connection.close)
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.aqueue = await self.channel.declare_queue(self.queue, durable=True)

    async def publish(self, body: bytes) -> None:
        import aio_pika

        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await self.channel.default_exchange.publish(message, routing_key=self.queue)

    async def consume(self, handler: Handler) -> None:
        from aio_pika.abc import AbstractIncomingMessage

        async def on_message(message: AbstractIncomingMessage) -> None:
            async with message.process():
                body = message.body
            handler(body)  # counted once acked

        await self.channel.set_qos(prefetch_count=self.k)
        await self.aqueue.consume(on_message)


SIDES: dict[str, type[Side]] = {
    "aio_workq": AioWorkq,
    PLAIN: AioWorkq,
    "aiormq_raw": AiormqRaw,
    "aiopika": AioPika,
}


async def _child(
    system: str, phase: str, url: str, queue: str, size: int, n: int
) -> dict[str, Any]:
    if system == PLAIN:
        os.environ["AIO_WORKQ_FAST_PATH"] = "0"  # before aio_workq is imported (in setup)
    k = inflight(size)
    side = SIDES[system](url, queue, k)
    template = bytearray(secrets.token_bytes(64)) * (size // 64) + bytearray(size % 64)
    async with side.stack:
        await side.setup()
        base = harness.rss_mb()
        reset = harness.reset_peak_rss()
        cpu = time.process_time()
        if phase == "publish":
            start = time.perf_counter()
            await _publish_all(side.publish, template, n, k)
            end = time.perf_counter()
        else:
            start, end = await _consume_all(side, n)
        cpu = time.process_time() - cpu
        peak = harness.peak_rss_mb()
    seconds = end - start
    timed = n if phase == "publish" else n - 1
    return {
        "system": system,
        "phase": phase,
        "size": size,
        "n": n,
        "inflight": k,
        "seconds": round(seconds, 4),
        "rate": round(timed / seconds, 2),
        "mb_per_s": round(timed * size / MiB / seconds, 1),
        "cpu_us_per_msg": round(cpu / n * 1e6, 1),
        "rss_base_mb": round(base, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_over_inflight": round((peak - base) * MiB / (k * size), 3),
        "peak_reset": reset,
    }


async def _publish_all(
    publish: Callable[[bytes], Awaitable[None]], template: bytearray, n: int, k: int
) -> None:
    left = n

    async def lane() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await publish(bytes(template))  # a fresh body, alive until its confirm

    await asyncio.gather(*(lane() for _ in range(min(k, n))))


async def _consume_all(side: Side, n: int) -> tuple[float, float]:
    done = asyncio.Event()
    count = 0
    first = last = 0.0

    def handler(body: bytes) -> None:
        nonlocal count, first, last
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count == n:
            last = time.perf_counter()
            done.set()

    await side.consume(handler)
    await asyncio.wait_for(done.wait(), timeout=1800)
    return first, last


# --- the runner ----------------------------------------------------------------------------------


def n_for(size: int, total_mb: int) -> int:
    return max(4, total_mb * MiB // size)


def measure(
    url: str, sizes: tuple[int, ...], total_mb: int, systems: tuple[str, ...]
) -> list[dict[str, Any]]:
    import aiormq

    runs: list[dict[str, Any]] = []
    for i, size in enumerate(sizes):
        n = n_for(size, total_mb)
        for system in systems[i % len(systems) :] + systems[: i % len(systems)]:
            queue = f"bench.large.{system}.{size}.{secrets.token_hex(3)}"
            for phase in ("publish", "consume"):
                args = ["--system", system, "--phase", phase, "--url", url, "--queue", queue]
                args += ["--size", str(size), "--n", str(n)]
                try:
                    record = harness.child("bench.large", args)
                except RuntimeError as exc:
                    record = {"system": system, "phase": phase, "size": size, "error": str(exc)}
                runs.append(record)
                _progress(record)

            async def cleanup(queue: str = queue) -> int:
                connection = await aiormq.connect(url)
                try:
                    channel = await connection.channel()
                    ok = await channel.queue_delete(queue)
                    return int(ok.message_count or 0)
                finally:
                    await connection.close()

            left = asyncio.run(cleanup())
            if left:
                runs.append({"system": system, "phase": "check", "size": size,
                             "error": f"{left} messages left in {queue}"})  # fmt: skip
    return runs


def _progress(record: dict[str, Any]) -> None:
    head = f"{label(record['size']):>7} {record['system']:<11} {record['phase']:<8}"
    if "error" in record:
        print(f"{head} error: {record['error'].splitlines()[0]}", file=sys.stderr, flush=True)
        return
    print(
        f"{head} {record['rate']:>8,.1f} msg/s {record['mb_per_s']:>7,.1f} MB/s  "
        f"peak {record['rss_peak_mb']:.0f} MB (base {record['rss_base_mb']:.0f}), "
        f"RSS/in flight {record['rss_over_inflight']:.2f}",
        file=sys.stderr,
        flush=True,
    )


# --- report --------------------------------------------------------------------------------------


def _find(result: dict[str, Any], system: str, size: int, phase: str) -> dict[str, Any]:
    for run in result["runs"]:
        if (run["system"], run["size"], run["phase"]) == (system, size, phase):
            return dict(run)
    return {}


def section(result: dict[str, Any], image: str) -> list[str]:
    plan = result["plan"]
    lines = []
    for size in plan["sizes"]:
        for system in plan["systems"]:
            cells = [label(size), f"**{system}**" if system == "aio_workq" else system]
            for phase in ("publish", "consume"):
                run = _find(result, system, size, phase)
                if not run or "error" in run:
                    cells += ["error", "", ""]
                    continue
                cells += [
                    f"{run['rate']:,.1f}",
                    f"{run['mb_per_s']:,.0f}",
                    f"{run['rss_over_inflight']:.2f}",
                ]
            lines.append(cells)
    header = ["body", "system", "publish msg/s", "publish MB/s", "publish RSS / in flight",
              "consume msg/s", "consume MB/s", "consume RSS / in flight"]  # fmt: skip
    worst = {
        (system, phase): max(
            (
                _find(result, system, size, phase).get("rss_over_inflight", 0.0)
                for size in plan["sizes"]
            ),
            default=0.0,
        )
        for system in plan["systems"]
        for phase in ("publish", "consume")
    }
    publishing = ", ".join(f"{s} {worst[s, 'publish']:.2f}" for s in plan["systems"])
    receiving = ", ".join(f"{s} {worst[s, 'consume']:.2f}" for s in plan["systems"])
    ours = max(worst.get(("aio_workq", p), 0.0) for p in ("publish", "consume"))
    verdict = "within" if ours <= 1.2 else "over"
    plain = max(worst.get((PLAIN, p), 0.0) for p in ("publish", "consume"))
    plain_note = ""
    if (PLAIN, "publish") in worst and plain < ours:
        plain_note = (
            f" On its plain path (aiormq's writer) it is {plain:.2f}: the extra copies come with "
            "its own frame writer (the fast path)."
        )
    elif (PLAIN, "publish") in worst and plain > 1.2:
        plain_note = (
            f" On its plain path (`AIO_WORKQ_FAST_PATH=0`) it is {plain:.2f}: that is aiormq's "
            "own framing (the body sliced into frames, each marshalled, joined and handed to "
            "the transport whole), which aio-workq leaves as it is; its fast path frames a body "
            "as views of itself and hands the transport a frame at a time as the socket takes "
            "them."
        )
    return [
        "### Large bodies: 64 KiB, 1 MiB, 16 MiB",
        "",
        harness.measured_on(result),
        "",
        f"Per size and system {plan['total_mb']} MiB of persistent bodies to a classic queue "
        "and back, with the same bytes in flight for every system: "
        + ", ".join(f"{inflight(s)} × {label(s)}" for s in plan["sizes"])
        + " (64 MiB; the consumer's prefetch, or the publisher's coroutines each waiting for "
        "its confirm). RSS / in flight: the process's peak RSS (the kernel's high-water mark, "
        "reset when the timed phase starts) minus its RSS at that moment, over the bytes in "
        "flight; 1.0 is one copy of each body in flight and nothing more.",
        "",
        f"![large bodies]({image})",
        "",
        *harness.table(header, lines),
        "",
        " ".join(
            [
                "With large bodies the cost is per byte (copies, the socket, the broker's disk),",
                "not per message; read the rates as what this loaded machine gave, and the memory",
                "as how many copies of a body each client holds while it is in flight.",
                f"The worst RSS / in flight over the sizes, publishing: {publishing};",
                f"receiving: {receiving}.",
                f"aio-workq is {verdict} the goal of 1.2 ({ours:.2f}).{plain_note}",
                "Receiving, the prefetch is a bound the consumers rarely reach (they ack faster",
                "than the broker delivers), so the figure is low for all; each body is read as",
                "frames and then joined (two copies for a moment). Publishing, a client holds the",
                "application's body, the frames it is cut into and whatever of them the transport",
                "has not yet written; a figure well above the others' means more copies of each",
                "body while it waits for its confirm.",
            ]
        ),
    ]


def chart(result: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    plan = result["plan"]
    sizes, systems = plan["sizes"], plan["systems"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    width = 0.8 / (2 * len(systems))
    for ax, metric, title in (
        (axes[0], "mb_per_s", "Throughput (MB/s)"),
        (axes[1], "rss_over_inflight", "Peak RSS growth / bytes in flight"),
    ):
        bar = 0
        for system in systems:
            for phase, hatch in (("publish", ""), ("consume", "//")):
                xs, heights = [], []
                for i, size in enumerate(sizes):
                    run = _find(result, system, size, phase)
                    if metric in run:
                        xs.append(i - 0.4 + (bar + 0.5) * width)
                        heights.append(run[metric])
                bars = ax.bar(xs, heights, width, label=f"{system} {phase}", hatch=hatch,
                              color=f"C{systems.index(system)}",
                              alpha=1.0 if phase == "publish" else 0.6)  # fmt: skip
                ax.bar_label(bars, fmt="%.1f" if metric != "mb_per_s" else "%.0f", fontsize=6)
                bar += 1
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels([label(s) for s in sizes])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[1].axhline(1.2, color="grey", linewidth=0.8, linestyle="--", label="goal 1.2")
    axes[1].legend(fontsize=7)
    fig.suptitle("Large bodies, 64 MiB in flight (loaded machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.large", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="128 MiB per size and system")
    parser.add_argument("--total-mb", type=int, help="MiB per size and system (default 512)")
    parser.add_argument("--sizes", type=_sizes, default=SIZES, help="body sizes in bytes")
    parser.add_argument("--systems", type=lambda t: tuple(t.split(",")), default=SYSTEMS)
    parser.add_argument("--url", help="use this broker instead of starting a node of our own")
    parser.add_argument("--no-docs", action="store_true", help="print the JSON, write nothing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("publish", "consume"), help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        harness.print_json(
            asyncio.run(_child(args.system, args.phase, args.url, args.queue, args.size, args.n))
        )
        return 0
    total_mb = args.total_mb or (128 if args.quick else 512)
    return harness.workload(
        "large",
        argv,
        url=args.url,
        measure=lambda url: measure(url, args.sizes, total_mb, args.systems),
        plan={
            "sizes": list(args.sizes),
            "systems": list(args.systems),
            "total_mb": total_mb,
            "inflight_bytes": INFLIGHT_BYTES,
        },
        chart=chart,
        no_docs=args.no_docs,
    )


if __name__ == "__main__":
    sys.exit(main())
