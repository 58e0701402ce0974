"""Offline micro-benchmarks of the client's per-message CPU: a fake broker, no RabbitMQ.

`python -m bench.micro publish|consume|chain|large|workers N [--size S] [--uvloop]` runs one
workload (`large`: 64 MiB of S-byte bodies in flight, peak RSS growth over them; `workers`: N
Workers started one after the other on one connection) against a minimal
in-process AMQP 0-9-1 server (`FakeBroker`, pamqp on a loopback socket) that answers every
declaration, confirms every publish at once (one multiple ack per read; `--confirm-every K`: an
ack every K publishes, as a quorum queue confirms) and, for consume, delivers
N recorded messages. The client is the library's public API (`Producer.publish_many`, `Worker`),
so the same driver runs on any commit: `PYTHONPATH=.bench-ref/<rev>/tree python -m bench.micro`.

It is made for `valgrind --tool=callgrind` (deterministic instruction counts): the fake broker
runs in a child process (`--toggle-collect` or `--trace-children=no` measures the client only),
and the warm-up round is excluded by diffing two runs of different N: instructions per message
= (I(N2) - I(N1)) / (N2 - N1). Wall-clock figures from a loaded machine are not its purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import struct
import sys
import time
from typing import Any

from pamqp import commands, frame, header, heartbeat
from pamqp.body import ContentBody

BODY = b"x" * 64
_FRAME = struct.Struct(">BHI")


class _Session(asyncio.Protocol):
    def __init__(self, deliver: int, confirm_every: int = 0) -> None:
        self.buf = bytearray()
        # 0: one multiple ack per read for everything read (a classic queue's large batches);
        # K: an ack every K publishes as they are read, then one for the rest of the read (a
        # quorum queue confirms about every 128; K=1 is a single, non-multiple ack each).
        self.confirm_every = confirm_every
        self.transport: Any = None
        self.published: dict[int, int] = {}
        self.confirming: set[int] = set()
        self.deliver = deliver
        self.consumers = 0
        self.prefetch = 0
        self.sent = 0  # deliveries sent
        self.acked = 0  # highest delivery tag settled (the client acks in order here)
        self.consuming: tuple[int, str, str] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self, channel: int, *values: Any) -> None:
        self.transport.write(b"".join(frame.marshal(v, channel) for v in values))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        acks: dict[int, int] = {}
        while self.buf:
            if self.buf[:4] == b"AMQP":
                del self.buf[:8]
                self.send(
                    0,
                    commands.Connection.Start(
                        server_properties={
                            "capabilities": {
                                "publisher_confirms": True,
                                "basic.nack": True,
                                "consumer_cancel_notify": True,
                                "connection.blocked": True,
                                "per_consumer_qos": True,
                                "authentication_failure_close": True,
                                "exchange_exchange_bindings": True,
                            },
                            "product": "fake",
                            "version": "3.13.0",
                        },
                        mechanisms="PLAIN",
                        locales="en_US",
                    ),
                )
                continue
            if len(self.buf) < 7:
                break
            kind, channel, size = _FRAME.unpack_from(self.buf)
            if len(self.buf) < size + 8:
                break  # incomplete
            if kind == 3:  # a body frame: nothing to read in it
                del self.buf[: size + 8]
                continue
            used, channel, value = frame.unmarshal(bytes(self.buf[: size + 8]))
            del self.buf[:used]
            self.handle(channel, value, acks)
        for channel, tag in acks.items():
            self.send(
                channel, commands.Basic.Ack(delivery_tag=tag, multiple=self.confirm_every != 1)
            )

    def handle(self, channel: int, value: Any, acks: dict[int, int]) -> None:
        name = value.name
        if name == "Basic.Publish":
            if channel in self.confirming:
                tag = self.published[channel] = self.published.get(channel, 0) + 1
                acks[channel] = tag
                every = self.confirm_every
                if every and tag % every == 0:
                    del acks[channel]
                    self.send(channel, commands.Basic.Ack(delivery_tag=tag, multiple=every > 1))
        elif isinstance(value, header.ContentHeader | ContentBody | heartbeat.Heartbeat):
            pass
        elif name == "Connection.StartOk":
            self.send(0, commands.Connection.Tune(channel_max=2047, frame_max=131072, heartbeat=0))
        elif name == "Connection.TuneOk":
            pass
        elif name == "Connection.Open":
            self.send(0, commands.Connection.OpenOk())
        elif name == "Connection.Close":
            self.send(0, commands.Connection.CloseOk())
        elif name == "Channel.Open":
            self.send(channel, commands.Channel.OpenOk())
        elif name == "Channel.Close":
            self.send(channel, commands.Channel.CloseOk())
        elif name == "Confirm.Select":
            self.confirming.add(channel)
            if not value.nowait:
                self.send(channel, commands.Confirm.SelectOk())
        elif name == "Queue.Declare":
            self.send(channel, commands.Queue.DeclareOk(value.queue or "amq.gen-x", 0, 0))
        elif name == "Exchange.Declare":
            self.send(channel, commands.Exchange.DeclareOk())
        elif name == "Queue.Bind":
            self.send(channel, commands.Queue.BindOk())
        elif name == "Exchange.Bind":
            self.send(channel, commands.Exchange.BindOk())
        elif name == "Basic.Qos":
            self.prefetch = value.prefetch_count
            self.send(channel, commands.Basic.QosOk())
        elif name == "Basic.Consume":
            self.consumers += 1
            ctag = value.consumer_tag or f"ctag{self.consumers}"
            self.send(channel, commands.Basic.ConsumeOk(ctag))
            if self.consumers == 1 and self.deliver:
                self.consuming = (channel, ctag, value.queue)
                self.deliver_more()
        elif name == "Basic.Cancel":
            self.send(channel, commands.Basic.CancelOk(value.consumer_tag))
        elif name in ("Basic.Ack", "Basic.Nack", "Basic.Reject"):
            if self.consuming is not None and channel == self.consuming[0]:
                self.acked = max(self.acked, value.delivery_tag)
                self.deliver_more()
        elif name == "Connection.CloseOk":
            pass
        elif name == "Channel.CloseOk":
            pass

    def deliver_more(self) -> None:
        """Deliver up to the prefetch (unacked), as the broker does."""
        assert self.consuming is not None
        channel, tag, queue = self.consuming
        limit = self.acked + (self.prefetch or self.deliver)
        first, last = self.sent + 1, min(self.deliver, limit)
        if first > last:
            return
        self.sent = last
        props = commands.Basic.Properties(delivery_mode=2, message_id="m", content_type=None)
        chunk: list[bytes] = []
        for n in range(first, last + 1):
            props.message_id = f"m{n:016x}"
            chunk.append(frame.marshal(commands.Basic.Deliver(tag, n, False, "", queue), channel))
            chunk.append(frame.marshal(header.ContentHeader(0, len(BODY), props), channel))
            chunk.append(frame.marshal(ContentBody(BODY), channel))
        self.transport.write(b"".join(chunk))


def _serve(port_out: Any, deliver: int, confirm_every: int) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Session(deliver, confirm_every), "127.0.0.1", 0)
        port_out.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def start_fake_broker(
    deliver: int = 0, confirm_every: int = 0
) -> tuple[multiprocessing.process.BaseProcess, str]:
    """A fake broker in a child process; returns it and its URL. `confirm_every`: see
    `_Session` (0, the default: one multiple ack per read)."""
    ours, theirs = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(
        target=_serve, args=(theirs, deliver, confirm_every), daemon=True
    )
    proc.start()
    port = ours.recv()
    return proc, f"amqp://guest:guest@127.0.0.1:{port}/"


async def _publish(url: str, n: int) -> None:
    from aio_workq import Producer

    # A timeout far beyond the run: under callgrind on a loaded machine a batch is slow.
    async with Producer(url, timeout=3600) as producer:
        await producer.publish_many([BODY] * 10, queue="micro")  # declared, warmed
        t0 = time.process_time()
        await producer.publish_many([BODY] * n, queue="micro")
        t1 = time.process_time()
    print(f"publish {n}: {(t1 - t0) / n * 1e6:.1f} us CPU/message", file=sys.stderr)


def _hooks(kind: str) -> list[Any]:
    """The worker's hooks for `--hooks`: none; `noop`, a hook whose `after_handle` does
    nothing (what installing any hook costs); `tracing-sampled`, `TracingHook` under a 1-in-10
    ratio sampler (the observability group's OpenTelemetry SDK); `tracing-all`, `TracingHook`
    recording every span (`ALWAYS_ON`) into a `BatchSpanProcessor` whose exporter drops them
    (what a recorded span costs, its export's thread included)."""
    from aio_workq import HandleInfo, Hook

    if kind == "none":
        return []
    if kind == "noop":

        class Noop(Hook):
            def after_handle(self, info: HandleInfo) -> None:
                pass

        return [Noop()]
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    from aio_workq.tracing import TracingHook

    if kind == "tracing-all":

        class Drop(SpanExporter):
            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider(sampler=ALWAYS_ON)
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        return [TracingHook(tracer_provider=provider)]
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)))
    return [TracingHook(tracer_provider=provider)]


async def _consume(url: str, n: int, chain: bool, hooks: str = "none") -> None:
    from aio_workq import Job, Producer, Worker

    done = asyncio.Event()
    count = 0
    send = getattr(Job, "send" if "send" in vars(Job) else "forward")

    def hit() -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    async def handle(job: Job) -> None:
        hit()

    async def handle_chain(job: Job) -> None:
        confirm = await send(job, job.body, queue="micro-out")
        confirm.add_done_callback(lambda f: hit())

    worker = Worker(
        url,
        queue="micro",
        handler=handle_chain if chain else handle,
        concurrency=100,
        prefetch=100,
        hooks=_hooks(hooks),
    )
    t0 = time.process_time()
    async with worker:
        await asyncio.wait_for(done.wait(), 600)
        t1 = time.process_time()
    what = "chain" if chain else "consume"
    print(f"{what} {n}: {(t1 - t0) / n * 1e6:.1f} us CPU/message", file=sys.stderr)
    del Producer


async def _large(url: str, size: int, inflight: int, total: int) -> None:
    """`inflight` publishers of fresh `size`-byte bodies; peak RSS growth over bytes in flight."""
    from aio_workq import Producer

    template = os.urandom(size)
    async with Producer(url) as producer:
        await producer.publish(b"warm", queue="micro")
        base = _rss()
        _reset_peak()
        each = total // inflight

        async def one() -> None:
            for _ in range(each):
                await producer.publish(bytes(memoryview(template)), queue="micro")

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(inflight)))
        elapsed = time.perf_counter() - t0
        peak = _peak()
    ratio = (peak - base) / (inflight * size)
    print(
        f"large {size} x {inflight}: RSS / in flight {ratio:.2f}, "
        f"{each * inflight * size / elapsed / 2**20:.0f} MB/s",
        file=sys.stderr,
    )


async def _workers(url: str, n: int) -> None:
    """`n` Workers started one after the other on one shared connection (bench.queues)."""
    import contextlib

    from aio_workq import Connection, Job, Worker

    async def handle(job: Job) -> None:
        pass

    async with contextlib.AsyncExitStack() as stack:
        connection = await stack.enter_async_context(Connection(url))
        t0 = time.process_time()
        for i in range(n):
            worker = Worker(
                connection=connection, queue=f"q{i}", handler=handle, queue_type="classic",
                concurrency=10, prefetch=10,
            )  # fmt: skip
            await stack.enter_async_context(worker)
        t1 = time.process_time()
    print(f"workers {n}: {(t1 - t0) / n * 1e3:.2f} ms CPU/start", file=sys.stderr)


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    return _status("VmRSS:")


def _peak() -> int:
    return _status("VmHWM:")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro")
    parser.add_argument("workload", choices=("publish", "consume", "chain", "large", "workers"))
    parser.add_argument("--size", type=int, default=2**20)
    parser.add_argument("n", type=int)
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    parser.add_argument(
        "--hooks", choices=("none", "noop", "tracing-sampled", "tracing-all"), default="none",
        help="the worker's hooks (consume, chain)",
    )  # fmt: skip
    parser.add_argument(
        "--confirm-every", type=int, default=0, metavar="K",
        help="publish: the fake broker acks every K publishes (as a quorum queue does, about "
        "128; 1: a single ack each) instead of once per read",
    )  # fmt: skip
    args = parser.parse_args()
    if args.uvloop:
        import uvloop  # type: ignore[import-not-found, unused-ignore]

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.workload == "large":
        proc, url = start_fake_broker()
        try:
            inflight = max(1, 64 * 2**20 // args.size)
            asyncio.run(_large(url, args.size, inflight, max(args.n, inflight)))
        finally:
            proc.kill()
        os._exit(0)
    if args.workload == "workers":
        proc, url = start_fake_broker()
        try:
            asyncio.run(_workers(url, args.n))
        finally:
            proc.kill()
        os._exit(0)
    consume = args.workload != "publish"
    proc, url = start_fake_broker(
        deliver=args.n if consume else 0, confirm_every=args.confirm_every
    )
    try:
        if consume:
            asyncio.run(_consume(url, args.n, args.workload == "chain", args.hooks))
        else:
            asyncio.run(_publish(url, args.n))
    finally:
        proc.kill()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
