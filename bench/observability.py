"""`python -m bench.observability`: the consume rate with the metrics and tracing hooks on and off.

Each run, in a fresh process of its own, fills a queue with N persistent messages, then
times a `Worker` (concurrency and prefetch 100, no retries, a handler that does nothing, or
spins `--work` microseconds of CPU) from the first message it handles to the last (connecting
and declaring are left out). The modes:

- "off": no hooks;
- "metrics", "tracing": `PrometheusHook`, or `TracingHook` with the OpenTelemetry SDK (a
  `BatchSpanProcessor` into an exporter that drops the spans, so the cost measured is
  aio-workq's and the SDK's, not an export's), every span recorded;
- "on": both;
- "sampled": both, with the sampler OpenTelemetry recommends for a busy service,
  `ParentBased(TraceIdRatioBased(0.1))`: one trace in ten recorded (a message whose producer
  traced it follows the producer's decision).

The modes take turns; the ratio of a mode is its median rate over the median "off" rate (the
goal for both hooks on: >= 0.85). The CPU time per message is printed too, with its ratio (off
over on) and the hooks' cost per message (on minus off): on a busy machine those are the
steadier figures.

`--hooks-only --child MODE --n N [--parent unsampled]`: no broker, the consumer's hooks alone
for N messages, called as the worker calls them (`Hooks.begin`/`end` around a do-nothing
handler), each message a root (its producer did not trace) or, with `--parent unsampled`, one
whose `traceparent` says its producer did not sample it. Made for `valgrind --tool=callgrind`
(the ids are seeded: which messages are recorded is the same from run to run): instructions per
message = (I(N2) - I(N1)) / (N2 - N1), against `--child off`.

Starts a RabbitMQ node of its own unless `--url` is given. `--quick`: N=5,000, 3 runs each.
Writes docs/img/bench_observability.json and .png and its section of docs/benchmarks.md
(bench/harness.py) unless `--no-docs`.
Needs the bench's and the hooks' packages: `pip install -e '.[prometheus,otel]' --group bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import harness

REPO_ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = b"." * 100


def _hooks(mode: str) -> list[Any]:
    if mode == "off":
        return []
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
    from prometheus_client import CollectorRegistry

    from aio_workq.metrics import PrometheusHook
    from aio_workq.tracing import TracingHook

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    sampled = mode in ("sampled", "tracing-sampled")
    sampler = ParentBased(TraceIdRatioBased(0.1)) if sampled else ALWAYS_ON
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    hooks: list[Any] = []
    if mode in ("on", "sampled", "metrics"):
        hooks.append(PrometheusHook(registry=CollectorRegistry()))
    if mode in ("on", "sampled", "tracing", "tracing-sampled"):
        hooks.append(TracingHook(tracer_provider=provider))
    return hooks


def _spin(microseconds: float) -> None:
    """Use `microseconds` of CPU, as a handler doing some work would."""
    end = time.process_time() + microseconds / 1e6
    while time.process_time() < end:
        pass


async def _one_run(url: str, mode: str, n: int, work: float = 0) -> tuple[float, float]:
    """Messages handled per second by one worker, for `n` messages already queued, and the
    process's CPU time per message (microseconds: steadier than the rate on a busy machine)."""
    from aio_workq import Job, Producer, Queue, QueueType, Worker

    queue = Queue(f"bench-obs-{uuid.uuid4().hex[:8]}", type=QueueType.CLASSIC)
    async with Producer(url) as producer:
        await producer.declare(queue)
        await producer.publish_many([PAYLOAD] * n, queue=queue)
        done = asyncio.Event()
        handled = 0
        first = last = first_cpu = last_cpu = 0.0

        async def handle(job: Job) -> None:
            nonlocal handled, first, last, first_cpu, last_cpu
            if work:
                _spin(work)
            handled += 1
            if handled == 1:
                first, first_cpu = time.perf_counter(), time.process_time()
            elif handled == n:
                last, last_cpu = time.perf_counter(), time.process_time()
                done.set()

        worker = Worker(
            url, queue=queue, handler=handle, concurrency=100, prefetch=100, retry=None,
            hooks=_hooks(mode),
        )  # fmt: skip
        async with worker:
            await asyncio.wait_for(done.wait(), timeout=600)
    await _delete(url, queue.name)
    return (n - 1) / (last - first), (last_cpu - first_cpu) / (n - 1) * 1e6


async def _delete(url: str, name: str) -> None:
    from aio_workq import Connection

    async with Connection(url) as connection:
        channel = await connection.channel()
        for queue in (name, f"{name}.dlq"):
            await channel.queue_delete(queue)
        await channel.close()


def _child(url: str, mode: str, n: int, work: float) -> None:
    rate, cpu_us = asyncio.run(_one_run(url, mode, n, work))
    print(json.dumps({"mode": mode, "n": n, "rate": rate, "cpu_us": cpu_us}))


MODES = ("off", "metrics", "tracing", "tracing-sampled", "on", "sampled")
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


class _Message:
    """What the hooks read of a delivery (a `JobView`), for `--hooks-only`."""

    def __init__(self, tag: int, headers: dict[str, Any]) -> None:
        self.delivery_tag = tag
        self.headers = headers

    body = data = PAYLOAD
    message_id: str | None = "m-1"
    content_type: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    redelivered = False
    routing_key = exchange = ""
    attempt = 1


def _hooks_only(mode: str, n: int, parent: str) -> None:
    """N messages through the consumer's hooks of `mode`, as the worker calls them."""
    import random

    from aio_workq import Outcome
    from aio_workq._hooks import Hooks

    random.seed(22)  # the SDK's ids: the same messages recorded in every run
    hooks = Hooks.of(_hooks(mode))
    headers = {"traceparent": UNSAMPLED} if parent == "unsampled" else {}
    settled = (Outcome.OK, None, None)
    for tag in range(1, n + 1):
        job = _Message(tag, headers)
        if hooks is not None:
            entered = hooks.begin(job, "bench")
            hooks.end(job, "bench", entered, settled, None)


def _measure(url: str, n: int, repeats: int, work: float) -> dict[str, Any]:
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(repeats):
        shift = repeat % len(MODES)
        for mode in MODES[shift:] + MODES[:shift]:  # each mode first in turn
            out = subprocess.run(
                [sys.executable, "-m", "bench.observability", "--child", mode, "--url", url,
                 "--n", str(n), "--work", str(work)],
                cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=900,
            )  # fmt: skip
            run = json.loads(out.stdout.strip().splitlines()[-1])
            rates[mode].append(run["rate"])
            cpu[mode].append(run["cpu_us"])
            print(
                f"  {mode:>7}: {run['rate']:,.0f} msg/s, {run['cpu_us']:.0f} µs CPU/msg",
                file=sys.stderr, flush=True,
            )  # fmt: skip
    medians = {mode: statistics.median(rates[mode]) for mode in MODES}
    cpu_medians = {mode: statistics.median(cpu[mode]) for mode in MODES}
    return {
        "n": n,
        "repeats": repeats,
        "work_us": work,
        "rates": rates,
        "cpu_us": cpu,
        "medians": medians,
        "cpu_medians": cpu_medians,
        "ratios": {mode: medians[mode] / medians["off"] for mode in MODES[1:]},
        "cpu_ratios": {mode: cpu_medians["off"] / cpu_medians[mode] for mode in MODES[1:]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.observability", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="N=5,000, 3 runs per mode")
    parser.add_argument("--n", type=int, help="messages per run (default 20,000)")
    parser.add_argument("--repeats", type=int, help="runs per mode (default 5)")
    parser.add_argument("--url", help="use this broker instead of starting a node of our own")
    parser.add_argument(
        "--work", type=float, default=0, help="CPU microseconds the handler spins (default 0)"
    )
    parser.add_argument(
        "--no-docs", action="store_true", help="print only; do not write docs/img or the docs"
    )
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument(
        "--hooks-only", action="store_true", help="with --child: the hooks alone, no broker"
    )
    parser.add_argument(
        "--parent",
        choices=("none", "unsampled"),
        default="none",
        help="with --hooks-only: whether each message carries a traceparent that says not sampled",
    )
    args = parser.parse_args(argv)
    n = args.n or (5_000 if args.quick else 20_000)
    repeats = args.repeats or (3 if args.quick else 5)
    if args.child and args.hooks_only:
        _hooks_only(args.child, n, args.parent)
        return 0
    if args.child:
        _child(args.url, args.child, n, args.work)
        return 0
    meta = harness.meta(["python", "-m", "bench.observability", *(argv or sys.argv[1:])])
    result = harness.on_broker(
        args.url, lambda url: _measure(url, n, repeats, args.work), "workqbenchobs"
    )
    medians, ratios = result["medians"], result["ratios"]
    cpu, cpu_ratios = result["cpu_medians"], result["cpu_ratios"]
    handler = f"a handler spinning {args.work:g} µs" if args.work else "a handler doing nothing"
    print(f"consume, {n:,} messages, {handler}, median of {repeats} runs each:")
    print(
        f"  hooks off          {medians['off']:>9,.0f} msg/s         {cpu['off']:>5.0f} µs CPU/msg"
    )
    for mode, what in (("metrics", "PrometheusHook"), ("tracing", "TracingHook"),
                       ("tracing-sampled", "TracingHook 1/10"), ("on", "both"),
                       ("sampled", "both, 1 in 10")):  # fmt: skip
        print(
            f"  {what:<18} {medians[mode]:>9,.0f} msg/s ({ratios[mode]:.2f})  "
            f"{cpu[mode]:>5.0f} µs CPU/msg ({cpu_ratios[mode]:.2f}, "
            f"+{cpu[mode] - cpu['off']:.0f} µs)"
        )
    print(json.dumps(result))
    if not args.no_docs:
        harness.save("observability", {"meta": meta, **result}, chart)
    return 0


WHAT = (
    ("metrics", "`PrometheusHook`"),
    ("tracing", "`TracingHook`, every span recorded"),
    ("tracing-sampled", "`TracingHook`, 1 trace in 10 recorded"),
    ("on", "both, every span recorded"),
    ("sampled", "both, 1 trace in 10 recorded"),
)


def section(result: dict[str, Any], image: str) -> list[str]:
    """The docs section (bench/harness.py renders it from docs/img/bench_observability.json)."""
    medians, cpu = result["medians"], result["cpu_medians"]
    lines = [["none", f"{medians['off']:,.0f}", "1.00", f"{cpu['off']:.0f}", "—"]]
    for mode, what in WHAT:
        if mode not in medians:  # a result from before the mode was measured
            continue
        lines.append([
            what, f"{medians[mode]:,.0f}", f"{result['ratios'][mode]:.2f}",
            f"{cpu[mode]:.0f}", f"+{cpu[mode] - cpu['off']:.0f}",
        ])  # fmt: skip
    handler = (
        f"a handler spinning {result['work_us']:g} µs of CPU"
        if result["work_us"]
        else "a handler that does nothing"
    )
    return [
        "### The hooks: metrics and tracing on vs off",
        "",
        harness.measured_on(result),
        "",
        f"One worker (concurrency and prefetch 100) consuming {result['n']:,} persistent "
        f"messages with {handler}, each mode in a fresh process, the median of "
        f"{result['repeats']} runs per mode (`python -m bench.observability`; the tracing modes "
        "use the OpenTelemetry SDK with a `BatchSpanProcessor` into an exporter that drops the "
        "spans). The full discussion, with a 100 µs handler too, is in "
        "[Operations: what it costs](operations.md#what-it-costs).",
        "",
        f"![hooks]({image})",
        "",
        *harness.table(["hooks", "msg/s", "× off", "CPU µs/msg", "added µs/msg"], lines),
        "",
        " ".join(
            [
                "Against a handler that does nothing every microsecond the hooks add shows.",
                f"Here metrics added {cpu['metrics'] - cpu['off']:.0f} µs of CPU per message,",
                f"tracing every message {cpu['tracing'] - cpu['off']:.0f} µs (most of it in the",
                "OpenTelemetry SDK), both with 1 trace in 10 recorded",
                f"{cpu['sampled'] - cpu['off']:.0f} µs, against {cpu['off']:.0f} µs for the",
                "message itself. On a loaded machine the rates swing from run to run (a mode can",
                "come out faster than a lighter one); the CPU per message is the steadier figure.",
            ]
        ),
        *(["", result["note"]] if result.get("note") else []),  # added by hand to a result
    ]


def chart(result: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    labels = ["off", "metrics", "tracing", "tracing, 1 in 10", "both", "both, 1 in 10"]
    labels = [label for label, mode in zip(labels, MODES, strict=True) if mode in result["medians"]]
    modes = [mode for mode in MODES if mode in result["medians"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, key, title in (
        (axes[0], "medians", "consume msg/s (median)"),
        (axes[1], "cpu_medians", "CPU µs per message (median)"),
    ):
        values = [result[key][mode] for mode in modes]
        bars = ax.bar(range(len(modes)), values, color=[f"C{i}" for i in range(len(modes))])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Hooks on vs off, do-nothing handler (loaded machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
