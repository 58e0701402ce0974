"""`python -m bench.dashboard`: what 5 open dashboard tabs cost a consume benchmark.

Each run, in a fresh process of its own, fills a queue with N persistent messages, then times
a `Worker` (concurrency and prefetch 100, no retries, a handler that does nothing) from the
first message it handles to the last. The runs take turns:

- "off": nothing else runs;
- "dashboard": `aio-workq dashboard` runs in a process of its own (told the bench's queue by
  name, as it would be without the management API, which the bench's node has not enabled:
  every refresh is then a connection and passive declares), and a third process plays 5
  browser tabs, one per page (Overview, Dead letters, Schedules, Workers, Jobs): each loads its
  page once, then fetches the page's fragment every 3 s, as htmx does (the pages without a
  fragment are reloaded at that interval, which costs more than a tab would).

The figure is the median "dashboard" rate over the median "off" rate (the goal: >= 0.95). All
three processes share the machine (and its broker); on a machine shared with other work the
spread between runs is of the same order as the effect: look at both.

Starts a RabbitMQ node of its own unless `--url` is given. `--quick`: N=20,000, 3 runs each.
Prints a JSON line; writes docs/img/bench_dashboard.json unless `--no-docs`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = b"." * 100
PAGES = (
    ("/", "/fragments/queues"),
    ("/dead-letters", "/fragments/dead-letters"),
    ("/schedules", "/fragments/schedules"),
    ("/workers", "/workers"),
    ("/jobs", "/jobs"),
)
INTERVAL = 3.0
MODES = ("off", "dashboard")


async def _consume(url: str, queue_name: str, n: int) -> float:
    from aio_workq import Job, Producer, Queue, QueueType, Worker

    queue = Queue(queue_name, type=QueueType.CLASSIC)
    async with Producer(url) as producer:
        await producer.declare(queue)
        await producer.publish_many([PAYLOAD] * n, queue=queue)
        done = asyncio.Event()
        handled = 0
        first = last = 0.0

        async def handle(job: Job) -> None:
            nonlocal handled, first, last
            handled += 1
            if handled == 1:
                first = time.perf_counter()
            elif handled == n:
                last = time.perf_counter()
                done.set()

        worker = Worker(url, queue=queue, handler=handle, concurrency=100, prefetch=100,
                        retry=None)  # fmt: skip
        async with worker:
            await asyncio.wait_for(done.wait(), timeout=600)
        from aio_workq import Connection

        async with Connection(url) as connection:
            channel = await connection.channel()
            for name in (queue.name, f"{queue.name}.dlq"):
                await channel.queue_delete(name)
            await channel.close()
    return (n - 1) / (last - first)


async def _tabs(base: str, duration: float) -> dict[str, Any]:
    """5 tabs, one per page, each refreshing as htmx would; counts the requests."""
    import aiohttp

    counts = {"requests": 0, "errors": 0}

    async def tab(page: str, fragment: str) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(base + page) as response:
                await response.read()
                counts["requests"] += 1
                counts["errors"] += response.status >= 500
            end = time.monotonic() + duration
            while time.monotonic() < end:
                await asyncio.sleep(INTERVAL)  # htmx's `every 3s`
                async with session.get(base + fragment, headers={"HX-Request": "true"}) as r:
                    await r.read()
                    counts["requests"] += 1
                    counts["errors"] += r.status >= 500

    await asyncio.gather(*(tab(page, fragment) for page, fragment in PAGES))
    return counts


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the dashboard did not listen on port {port} within {timeout} s")


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run(url: str, mode: str, n: int) -> dict[str, Any]:
    queue = f"bench-dash-{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen[str]] = []
    started = time.monotonic()
    try:
        if mode == "dashboard":
            port = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "aio_workq", "dashboard", "--port", str(port), "--url", url,
                 "--queue", queue, "--no-management"], cwd=REPO_ROOT, text=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
            _wait_http(port)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.dashboard", "--tabs", f"http://127.0.0.1:{port}"],
                cwd=REPO_ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
            time.sleep(INTERVAL)  # the tabs are open and polling before the clock starts
        out = subprocess.run(
            [sys.executable, "-m", "bench.dashboard", "--child", "--url", url, "--queue", queue,
             "--n", str(n)],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=900,
        )  # fmt: skip
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        if procs:  # the share of a core the dashboard and the tabs used meanwhile
            elapsed = time.monotonic() - started
            result["dashboard_cpu"] = _cpu_seconds(procs[0].pid) / elapsed
            result["tabs_cpu"] = _cpu_seconds(procs[1].pid) / elapsed
        if len(procs) == 2:
            tabs = procs[1]
            tabs.terminate()
            tabs.wait(timeout=30)
        return result
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


def _measure(url: str, n: int, repeats: int) -> dict[str, Any]:
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {"dashboard": [], "tabs": []}
    for repeat in range(repeats):
        order = MODES if repeat % 2 == 0 else MODES[::-1]
        for mode in order:
            run = _run(url, mode, n)
            rates[mode].append(run["rate"])
            if mode == "dashboard":
                cpu["dashboard"].append(run["dashboard_cpu"])
                cpu["tabs"].append(run["tabs_cpu"])
            print(f"  {mode:>9}: {run['rate']:,.0f} msg/s", file=sys.stderr, flush=True)
    medians = {mode: statistics.median(rates[mode]) for mode in MODES}
    return {
        "n": n,
        "repeats": repeats,
        "tabs": len(PAGES),
        "interval_s": INTERVAL,
        "rates": rates,
        "medians": medians,
        "ratio": medians["dashboard"] / medians["off"],
        "cost_percent": (1 - medians["dashboard"] / medians["off"]) * 100,
        "cpus": os.cpu_count(),
        "dashboard_cpu_share": statistics.median(cpu["dashboard"]),
        "tabs_cpu_share": statistics.median(cpu["tabs"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="N=20,000, 3 runs per mode")
    parser.add_argument("--n", type=int, help="messages per run (default 200,000)")
    parser.add_argument("--repeats", type=int, help="runs per mode (default 5)")
    parser.add_argument("--url", help="use this broker instead of starting a node of our own")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--tabs", metavar="BASE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # The consume must last a few poll periods (3 s): at 50,000 messages (about 1.5 s) whether a
    # round of polls fell inside it decided the figure (+27 % and -9 % in two runs).
    n = args.n or (20_000 if args.quick else 200_000)
    repeats = args.repeats or (3 if args.quick else 5)
    if args.tabs:
        print(json.dumps(asyncio.run(_tabs(args.tabs, 3600))))
        return 0
    if args.child:
        print(json.dumps({"rate": asyncio.run(_consume(args.url, args.queue, n))}))
        return 0
    from bench import harness

    result = harness.on_broker(args.url, lambda url: _measure(url, n, repeats), "workqbenchdash")
    medians = result["medians"]
    print(f"consume, {n:,} messages, median of {repeats} runs each:")
    print(f"  no dashboard          {medians['off']:>9,.0f} msg/s")
    print(
        f"  5 tabs polling        {medians['dashboard']:>9,.0f} msg/s "
        f"({result['cost_percent']:+.1f} % cost)"
    )
    print(
        f"  the dashboard process used {result['dashboard_cpu_share']:.1%} of a core, "
        f"the 5 tabs {result['tabs_cpu_share']:.1%}"
    )
    print(json.dumps(result))
    if not args.no_docs:
        meta = harness.meta(["python", "-m", "bench.dashboard", *(argv or sys.argv[1:])])
        path = REPO_ROOT / "docs" / "img" / "bench_dashboard.json"
        path.write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
