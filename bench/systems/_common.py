"""What every system module shares: command line, READY/GO protocol, timing and the result line.

A system module defines one `System` subclass and ends with `main(ThatSystem)`. The runner starts it
as `python -m bench.systems.<name> --url … --workload … --queue … --n … --prefetch … --queue-type …`
and talks to it over stdin/stdout, one line at a time:

1. the system connects and declares its queues its own way (`setup`), then prints `READY` — or,
   instead, a JSON result line with `"status": "n/a"` (the system cannot do the workload) or
   `"status": "error"`;
2. the runner prepares the queue (pre-loads it, untimed) and writes `GO`;
3. the system runs the timed phase and prints one JSON result line, then closes and exits.

For the `latency` and `rss` workloads the consumer is started before `READY` (the runner feeds the
queue while it runs); for `consume` and `chain` it starts on `GO`, on a queue already holding N,
and the clock runs from its first finished handler to its N-th (N - 1 messages): the steady
rate, without each system's start-up.

`--workload feed` turns the module into a feeder: a raw aiormq publisher (1,000 confirms in flight,
or paced with `--rate`) that sends N messages in the system's own wire format (`System.wire`), so
that the runner can pre-load the queues of frameworks with message envelopes of their own.

Library output goes to stderr: stdout carries nothing but the protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, ClassVar, Literal

import aiormq
from pamqp.commands import Basic

WORKLOADS = ("publish", "consume", "chain", "latency", "rss")
QUEUE_TYPES = ("classic", "quorum")
PAYLOAD_SIZE = 100
STAMP_DIGITS = 20
BATCH = 1_000
"""Messages in flight for gathered publishes (the systems that publish by gathering, the feeder)."""
CONCURRENCY = 100
"""Handlers running at once, where a system has that knob (always equal to the prefetch)."""
PERSISTENT = 2

READY = "READY"
GO = "GO"
STOP = "STOP"
"""Sent after GO to one of several processes sharing a queue (`--shared`) once the queue is
empty: report what was handled so far (the others took the rest)."""

Payload = bytes | str
Hook = Callable[[Payload], None]
"""Called by a system's handler once per message it has finished with (`Tally.hit`)."""


def payload(stamp_ns: int = 0) -> bytes:
    """A 100-byte ASCII body: a send time (monotonic ns, 20 digits) padded with dots."""
    return f"{stamp_ns:0{STAMP_DIGITS}d}".encode().ljust(PAYLOAD_SIZE, b".")


def stamp_of(body: Payload) -> int:
    """The send time written by `payload`, from the body as bytes or as str (JSON frameworks)."""
    return int(body[:STAMP_DIGITS])


def queue_arguments(queue_type: str) -> dict[str, Any]:
    """Declare arguments for a durable queue of this type (classic: none)."""
    return {"x-queue-type": "quorum"} if queue_type == "quorum" else {}


def persistent_properties(**kwargs: Any) -> Basic.Properties:
    return Basic.Properties(delivery_mode=PERSISTENT, **kwargs)


@dataclass(frozen=True, slots=True)
class Wire:
    """A message as a system's own publisher would put it on the wire."""

    body: bytes
    properties: Basic.Properties


@dataclass(frozen=True, slots=True)
class Settings:
    url: str
    workload: str
    queue: str
    forward_queue: str
    n: int
    prefetch: int
    queue_type: Literal["classic", "quorum"]
    rate: float | None
    shared: bool = False
    """One of several processes on the queue: consume until N or STOP; times are absolute."""

    @property
    def chain(self) -> bool:
        return self.workload == "chain"


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description="One system under test (see bench/__main__.py).")
    parser.add_argument("--url", required=True, help="AMQP URL of the broker")
    parser.add_argument("--workload", required=True, choices=[*WORKLOADS, "feed"])
    parser.add_argument("--queue", required=True, help="a fresh queue name")
    parser.add_argument("--forward-queue", help="chain: the downstream queue (default QUEUE.out)")
    parser.add_argument("--n", type=int, required=True, help="messages")
    parser.add_argument("--prefetch", type=int, default=CONCURRENCY)
    parser.add_argument("--queue-type", choices=QUEUE_TYPES, default="classic")
    parser.add_argument("--rate", type=float, help="feed: offered msg/s (default: flat out)")
    parser.add_argument(
        "--shared", action="store_true", help="one of several processes on the queue (STOP)"
    )
    args = parser.parse_args(argv)
    return Settings(
        url=args.url,
        workload=args.workload,
        queue=args.queue,
        forward_queue=args.forward_queue or f"{args.queue}.out",
        n=args.n,
        prefetch=args.prefetch,
        queue_type=args.queue_type,
        rate=args.rate,
        shared=args.shared,
    )


class System(ABC):
    """One system under test, driven by `main`.

    The methods are coroutines run on the driver's event loop; systems built on threads derive
    from `ThreadedSystem` instead and write plain methods.
    """

    name: ClassVar[str]
    not_applicable: ClassVar[Mapping[str, str]] = {}
    """workload -> why this system cannot run it (reported as "n/a" with the reason)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def wire(self, body: bytes) -> Wire:
        """How this system's publisher encodes `body`; the feeder sends exactly this."""
        return Wire(body, persistent_properties())

    @abstractmethod
    async def setup(self) -> None:
        """Connect and declare the queue (and, for chain, the forward queue) the system's way."""

    @abstractmethod
    async def publish(self, n: int) -> None:
        """Publish n `payload()` messages to the queue; return once the broker confirmed all."""

    @abstractmethod
    async def start_consumer(self, hook: Hook) -> None:
        """Start consuming with a no-op handler that calls hook(body) and then gets acked.

        In chain mode the handler first publishes the body to the forward queue and waits for
        its confirm; the upstream message is acked only after that (and hook comes after the
        confirm too). Returns once the consumer runs; the driver waits for the hooks.
        """

    @abstractmethod
    async def close(self) -> None:
        """Stop consuming, settle what is in flight and disconnect."""


class ThreadedSystem(System):
    """A system whose client blocks (pika, py-amqp): its methods run in one thread of their own.

    One thread for all of them, because these clients keep a connection per thread.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)

    async def _call(self, fn: Callable[..., None], *args: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    @abstractmethod
    def setup_sync(self) -> None: ...

    @abstractmethod
    def publish_sync(self, n: int) -> None: ...

    @abstractmethod
    def start_consumer_sync(self, hook: Hook) -> None: ...

    @abstractmethod
    def close_sync(self) -> None: ...

    async def setup(self) -> None:
        await self._call(self.setup_sync)

    async def publish(self, n: int) -> None:
        await self._call(self.publish_sync, n)

    async def start_consumer(self, hook: Hook) -> None:
        await self._call(self.start_consumer_sync, hook)

    async def close(self) -> None:
        await self._call(self.close_sync)


class Tally:
    """Counts finished messages from any thread and notes when the n-th one finished."""

    def __init__(self, n: int, *, latency: bool, track_last: bool = False) -> None:
        self.n = n
        self.count = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        """When the latest finished (kept only with `track_last`: a run shared by processes)."""
        self.done_at: float | None = None
        self.latencies_ns: list[int] = []
        self.on_done: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self.hit: Hook = self._hit_latency if latency else self._hit
        if track_last:
            self.hit = self._hit_last

    def _hit_last(self, body: Payload) -> None:
        self.last_at = time.perf_counter()
        self._hit(body)

    def _hit_latency(self, body: Payload) -> None:
        self.latencies_ns.append(time.monotonic_ns() - stamp_of(body))
        self._hit(body)

    def _hit(self, body: Payload) -> None:
        with self._lock:
            self.count += 1
            if self.count == 1:
                self.first_at = time.perf_counter()
            if self.count != self.n:
                return
        self.done_at = time.perf_counter()
        self.on_done()


class Settled:
    """Counts acked deliveries, so that `close` can wait for the acks still in flight.

    The clock stops at the N-th finished handler; a few acks may still be on their way then.
    Systems whose own shutdown does not wait for them (raw aiormq, raw aio-pika) wait here.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self._all = asyncio.Event()

    def add(self) -> None:
        self.count += 1
        if self.count >= self.n:
            self._all.set()

    async def wait(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all.wait(), timeout)


def percentiles_ms(samples_ns: Iterable[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6, 3)

    return {
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": round(ordered[-1] / 1e6, 3),
        "mean": round(statistics.fmean(ordered) / 1e6, 3),
    }


async def gather_batches(n: int, send: Callable[[], Awaitable[object]]) -> None:
    """Await n sends, `BATCH` at a time (each batch gathered: up to 1,000 unconfirmed)."""
    for start in range(0, n, BATCH):
        await asyncio.gather(*(send() for _ in range(min(BATCH, n - start))))


async def feed(settings: Settings, wire: Callable[[bytes], Wire]) -> None:
    """Publish n messages in the system's wire format with raw aiormq, confirms on.

    Flat out: `BATCH` in flight. With a rate: paced, each body stamped at its publish call.
    """
    connection = await aiormq.connect(settings.url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = settings.queue

        def send(stamp_ns: int = 0) -> Awaitable[object]:
            message = wire(payload(stamp_ns))
            return channel.basic_publish(
                message.body, routing_key=queue, properties=message.properties
            )

        if settings.rate is None:
            await gather_batches(settings.n, send)
            return
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Future[object]] = set()
        start = loop.time()
        sent = 0
        while sent < settings.n:
            due = min(settings.n, int((loop.time() - start) * settings.rate) + 1)
            for _ in range(due - sent):
                task = asyncio.ensure_future(send(time.monotonic_ns()))
                pending.add(task)
                task.add_done_callback(pending.discard)
            sent = due
            await asyncio.sleep(1 / settings.rate)
        await asyncio.gather(*pending)
    finally:
        await connection.close()


class Protocol:
    """The runner's line channel: the real stdout; fd 1 itself is pointed at stderr."""

    def __init__(self) -> None:
        self._out: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
        sys.stdout.flush()
        os.dup2(2, 1)

    def line(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()

    def result(self, settings: Settings, system: str, **fields: Any) -> None:
        head = {"system": system, "workload": settings.workload, "queue_type": settings.queue_type}
        self.line(json.dumps({**head, **fields}))


async def _drive(system: System, settings: Settings, protocol: Protocol) -> None:
    workload = settings.workload
    if workload in system.not_applicable:
        protocol.result(settings, system.name, status="n/a", reason=system.not_applicable[workload])
        return
    if workload == "feed":
        await feed(settings, system.wire)
        protocol.result(settings, system.name, status="ok", n=settings.n)
        return

    tally = Tally(settings.n, latency=workload == "latency", track_last=settings.shared)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def on_done() -> None:
        loop.call_soon_threadsafe(done.set)

    tally.on_done = on_done

    await system.setup()
    consumer_first = workload in ("latency", "rss")
    if consumer_first:
        await system.start_consumer(tally.hit)
    protocol.line(READY)
    answer = await asyncio.to_thread(sys.stdin.readline)
    if answer.strip() != GO:
        raise RuntimeError(f"expected {GO!r} from the runner, got {answer!r}")

    cpu_start = time.process_time()
    start = time.perf_counter()
    if workload == "publish":
        await system.publish(settings.n)
        end = time.perf_counter()
        count = timed = settings.n
    else:
        if not consumer_first:
            await system.start_consumer(tally.hit)
        if settings.shared:
            await _until_done_or_stopped(done)
        else:
            await done.wait()
        # Steady state: from the first finished handler to the N-th (or, when stopped, the
        # last), so that start-up (connecting, declaring queues, the first prefetch) is not
        # part of the rate.
        start = tally.first_at if tally.first_at is not None else start
        end = tally.done_at or tally.last_at or start
        count = tally.count
        timed = max(count - 1, 0)  # the first message only starts the clock
    cpu = time.process_time() - cpu_start
    seconds = end - start
    fields: dict[str, Any] = {
        "status": "ok",
        "n": count,
        "seconds": round(seconds, 4),
        "rate": round(timed / seconds, 1) if seconds > 0 else 0.0,
        "cpu_seconds": round(cpu, 3),
        "cpu_us_per_msg": round(cpu / count * 1e6, 1) if count else 0.0,
    }
    if settings.shared:  # the runner adds the processes up on one clock (perf_counter: monotonic)
        fields.update(start_at=start, end_at=end)
    if workload == "latency":
        fields["latency_ms"] = percentiles_ms(tally.latencies_ns)
    protocol.result(settings, system.name, **fields)
    try:
        await system.close()
    except Exception:  # the result stands; the runner's queue check catches unsettled messages
        traceback.print_exc()


async def _until_done_or_stopped(done: asyncio.Event) -> None:
    """Wait for the N-th message, or for the runner's STOP (the other processes took the rest)."""
    stopped = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))
    finished = asyncio.ensure_future(done.wait())
    await asyncio.wait((stopped, finished), return_when=asyncio.FIRST_COMPLETED)
    finished.cancel()  # the reader thread ends with stdin (the process exits with os._exit)


def main(system_cls: type[System], argv: list[str] | None = None) -> None:
    """Entry point of every `bench.systems.<name>` module."""
    settings = parse_args(argv)
    protocol = Protocol()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        asyncio.run(_drive(system_cls(settings), settings, protocol))
    except Exception as exc:
        traceback.print_exc()
        protocol.result(
            settings, system_cls.name, status="error", error=f"{type(exc).__name__}: {exc}"
        )
    sys.stderr.flush()
    # Some frameworks leave non-daemon threads behind; the runner has everything it needs.
    os._exit(0)
