"""`python -m bench.soak [N]`: N messages (default 1,000,000) through publish -> consume ->
forward -> consume in one process pair, RSS sampled every second.

- the producer process: a `Producer` publishes N persistent 100-byte messages to `soak.in`,
  `publish_many` in batches of 1,000, pausing while `soak.in` holds more than 20,000 ready
  messages (so that the run is a steady stream, not a backlog on the broker);
- the worker process: one `Worker` on `soak.in` whose handler forwards the body to `soak.out`
  with `job.send` (the upstream ack waits for the downstream confirm), and one `Worker` on
  `soak.out` that counts (both concurrency 50, prefetch 100, the library's defaults otherwise).

The runner samples both processes' RSS every second. Growth is the last sample minus the
sample at the end of warm-up (the first fifth of the run); the goal is <= 5 MB in each process.
At the end each process counts its asyncio tasks and the pending futures that are not tasks
(found by the garbage collector) — the worker once its count reaches N, before it stops; the
producer after its last confirm, before it closes — and the producer its messages in flight
and the senders waiting for room in its publish window (read from the window, which has no
public count of them), all of which should be what they were at the start: no leak.

Starts a RabbitMQ node of its own unless `--url` is given. `--quick`: N = 100,000.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import harness

BODY = b"." * 100
BATCH = 1_000
BACKLOG = 20_000
GROWTH_GOAL_MB = 5.0
SLACK = 4
"""Tasks or pending futures the end may have over the start: machinery made on first use (the
worker's forwarding publisher, ...). A leak per message or per batch would be thousands."""


def _window_waiters(producer: Any) -> int | None:
    """Senders waiting for room in the producer's window (read-only; None if not found)."""
    try:
        return len(producer._publisher._window._waiters)
    except AttributeError:
        return None


async def _ready(channel: Any, queue: str) -> int:
    """Messages ready in queue (passive declare)."""
    ok = await channel.queue_declare(queue, passive=True)
    return int(ok.message_count or 0)


async def _producer(url: str, queue: str, n: int) -> None:
    import aiormq

    from aio_workq import Producer

    async with Producer(url, queue_type="classic") as producer:
        await producer.declare(queue)
        start = {**harness.asyncio_census(), "in_flight": producer.in_flight,
                 "task_names": harness.task_names()}  # fmt: skip
        print("READY", flush=True)
        depth = await aiormq.connect(url)
        channel = await depth.channel()
        sent = 0
        while sent < n:
            while await _ready(channel, queue) > BACKLOG:  # noqa: ASYNC110 - the broker's count
                await asyncio.sleep(0.05)
            batch = min(BATCH, n - sent)
            await producer.publish_many([BODY] * batch, queue=queue)
            sent += batch
        await depth.close()
        await asyncio.sleep(
            0.5
        )  # the depth connection's tasks end; the census is of a quiet producer
        end = {
            **harness.asyncio_census(),
            "in_flight": producer.in_flight,
            "window_waiters": _window_waiters(producer),
            "task_names": harness.task_names(),
        }
    harness.print_json({"role": "producer", "sent": sent, "start": start, "end": end})
    await asyncio.to_thread(sys.stdin.readline)


async def _worker(url: str, queue: str, n: int) -> None:
    from aio_workq import Job, Worker

    out = f"{queue}.out"
    done = asyncio.Event()
    count = 0
    first = last = 0.0

    async def forward(job: Job) -> None:
        await job.send(job.body, queue=out)

    async def final(job: Job) -> None:
        nonlocal count, first, last
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count == n:
            last = time.perf_counter()
            done.set()

    settings: dict[str, Any] = {"queue_type": "classic", "concurrency": 50, "prefetch": 100}
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(Worker(url, queue=out, handler=final, **settings))
        await stack.enter_async_context(Worker(url, queue=queue, handler=forward, **settings))
        start = {**harness.asyncio_census(), "task_names": harness.task_names()}
        print("READY", flush=True)
        await done.wait()
        await asyncio.sleep(0.5)  # the last acks go out; the census is of a quiet worker
        end = {**harness.asyncio_census(), "task_names": harness.task_names()}
    harness.print_json({"role": "worker", "handled": count, "seconds": last - first,
                        "start": start, "end": end})  # fmt: skip
    await asyncio.to_thread(sys.stdin.readline)


# --- the runner ----------------------------------------------------------------------------------


def _start(role: str, url: str, queue: str, n: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.soak", "--child", role, "--url", url, "--queue", queue,
         "--n", str(n)],
        cwd=harness.REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":
        proc.kill()
        raise RuntimeError(f"the soak's {role} did not start (exit {proc.wait()})")
    return proc


def _result_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a soak process exited with {proc.wait()} before its result")
    result: dict[str, Any] = json.loads(line)
    return result


def measure(url: str, n: int, timeout: float) -> dict[str, Any]:
    queue = f"bench.soak.{secrets.token_hex(3)}"
    worker = _start("worker", url, queue, n)
    producer = _start("producer", url, queue, n)
    pids = {"producer": producer.pid, "worker": worker.pid}
    samples: list[list[float]] = []
    t0 = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    try:
        import selectors

        selector = selectors.DefaultSelector()
        for name, proc in (("producer", producer), ("worker", worker)):
            assert proc.stdout is not None
            selector.register(proc.stdout, selectors.EVENT_READ, name)
        next_sample = t0
        while len(results) < 2:
            now = time.monotonic()
            if now > t0 + timeout:
                raise RuntimeError(f"the soak took more than {timeout:.0f} s")
            if now >= next_sample:
                samples.append([round(now - t0, 2)] + [
                    round(harness.rss_mb(pids[name]), 2)
                    for name in ("producer", "worker")
                ])  # fmt: skip
                next_sample += 1.0
            for key, _ in selector.select(timeout=max(0.0, next_sample - time.monotonic())):
                proc = producer if key.data == "producer" else worker
                results[key.data] = _result_line(proc)
                selector.unregister(key.fileobj)
        elapsed = time.monotonic() - t0
    finally:
        for proc in (producer, worker):
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
        left = asyncio.run(_cleanup(url, queue))
    return {
        "n": n,
        "seconds": round(elapsed, 1),
        "rate": round(n / results["worker"]["seconds"], 1),
        "samples": samples,
        "producer": results["producer"],
        "worker": results["worker"],
        "left_in_queues": left,
        "rss": {
            name: growth([s[i + 1] for s in samples])
            for i, name in enumerate(("producer", "worker"))
        },  # fmt: skip
    }


def growth(series: list[float]) -> dict[str, float]:
    """Peak, the sample at the end of warm-up (first fifth), and last minus that sample."""
    if not series:
        return {}
    warm = series[len(series) // 5]
    return {
        "warm_mb": round(warm, 1),
        "peak_mb": round(max(series), 1),
        "last_mb": round(series[-1], 1),
        "growth_mb": round(series[-1] - warm, 2),
        "max_over_warm_mb": round(max(series[len(series) // 5 :]) - warm, 2),
    }


async def _cleanup(url: str, queue: str) -> int:
    import aiormq

    left = 0
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        for name in (queue, f"{queue}.out"):
            ok = await channel.queue_delete(name)
            left += int(ok.message_count or 0)
            await channel.queue_delete(f"{name}.dlq")
    finally:
        await connection.close()
    return left


def verdict(run: dict[str, Any]) -> list[str]:
    """What fails the soak: growth over the goal, leftovers, anything pending at the end."""
    problems = []
    for name in ("producer", "worker"):
        g = run["rss"][name].get("growth_mb", 0.0)
        if g > GROWTH_GOAL_MB:
            problems.append(f"{name} RSS grew {g:.1f} MB after warm-up (goal <= {GROWTH_GOAL_MB})")
        start, end = run[name]["start"], run[name]["end"]
        if end["tasks"] > start["tasks"] + SLACK:
            problems.append(
                f"{name}: {end['tasks']} asyncio tasks at the end, {start['tasks']} at the start"
            )
        if end["pending_futures"] > start["pending_futures"] + SLACK:
            problems.append(f"{name}: {end['pending_futures']} pending futures at the end, "
                            f"{start['pending_futures']} at the start")  # fmt: skip
    if run["producer"]["end"].get("window_waiters"):
        problems.append(f"producer: {run['producer']['end']['window_waiters']} window waiters")
    if run["producer"]["end"]["in_flight"]:
        problems.append(f"producer: {run['producer']['end']['in_flight']} messages in flight")
    if run["left_in_queues"]:
        problems.append(f"{run['left_in_queues']} messages left in the queues")
    if run["worker"]["handled"] != run["n"]:
        problems.append(f"the worker handled {run['worker']['handled']} of {run['n']}")
    return problems


# --- report --------------------------------------------------------------------------------------


def section(result: dict[str, Any], image: str) -> list[str]:
    run = result["run"]
    lines = []
    for name in ("producer", "worker"):
        g, start, end = run["rss"][name], run[name]["start"], run[name]["end"]
        lines.append([
            name, f"{g['warm_mb']:.1f}", f"{g['peak_mb']:.1f}", f"{g['last_mb']:.1f}",
            f"{g['growth_mb']:+.1f}", f"{start['tasks']} → {end['tasks']}",
            f"{start['pending_futures']} → {end['pending_futures']}",
        ])  # fmt: skip
    header = ["process", "RSS after warm-up MB", "peak MB", "last MB", "growth MB",
              "asyncio tasks start → end", "pending futures start → end"]  # fmt: skip
    problems = result.get("problems", [])
    outcome = (
        "Every check held: " if not problems else "**Failed checks:** " + "; ".join(problems) + ". "
    )
    end = run["producer"]["end"]
    return [
        "### Soak: publish → consume → forward → consume",
        "",
        harness.measured_on(result),
        "",
        f"{run['n']:,} persistent 100-byte messages published by one process (batches of "
        f"{BATCH:,}, pausing while more than {BACKLOG:,} wait in the first queue), forwarded "
        "by a second process's Worker to a second queue with `job.send` and counted there "
        f"by another Worker in that process; {run['seconds']:,.0f} s in all, "
        f"{run['rate']:,.0f} msg/s end to end. RSS sampled every second; growth is the last "
        "sample minus the one at the end of the first fifth (warm-up).",
        "",
        f"![soak RSS]({image})",
        "",
        *harness.table(header, lines),
        "",
        f"{outcome}RSS growth after warm-up within {GROWTH_GOAL_MB:g} MB in both processes, "
        f"the producer ended with {end['in_flight']} messages in flight and "
        f"{end.get('window_waiters', '?')} senders waiting on its window, no asyncio task or "
        f"future more at the end than at the start (beyond {SLACK}: machinery made on first use), "
        "and both queues empty. Memory flat after "
        "warm-up means nothing per message stays behind: not the confirms' futures, not the "
        "forwarded jobs' pending acks, not the tasks the workers start for each delivery.",
    ]


def chart(result: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    run = result["run"]
    samples = run["samples"]
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    times = [s[0] for s in samples]
    for i, name in enumerate(("producer", "worker")):
        ax.plot(times, [s[i + 1] for s in samples], label=f"{name} process", color=f"C{i}")
    if samples:
        warm = samples[len(samples) // 5]
        ax.axvline(warm[0], color="grey", linestyle="--", linewidth=0.8, label="end of warm-up")
        for i in range(2):  # the goal: no more than GROWTH_GOAL_MB over the warm-up sample
            ax.hlines(warm[i + 1] + GROWTH_GOAL_MB, warm[0], times[-1], color=f"C{i}",
                      linestyle=":", linewidth=0.8)  # fmt: skip
        values = [v for s in samples for v in s[1:]]
        ax.set_ylim(min(values) - 3, max(max(values), max(warm[1:]) + GROWTH_GOAL_MB) + 3)
    ax.set_xlabel("seconds")
    ax.set_ylabel(f"RSS (MiB); dotted: warm-up + {GROWTH_GOAL_MB:g} MB")
    ax.set_title(f"Soak: {run['n']:,} messages, publish → forward → consume (loaded machine)",
                 fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("n", type=int, nargs="?", help="messages (default 1,000,000)")
    parser.add_argument("--quick", action="store_true", help="N = 100,000")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds (default 7200)")
    parser.add_argument("--url", help="use this broker instead of starting a node of our own")
    parser.add_argument("--no-docs", action="store_true", help="print the JSON, write nothing")
    parser.add_argument("--child", choices=("producer", "worker"), help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--n", dest="child_n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        role = _producer if args.child == "producer" else _worker
        asyncio.run(role(args.url, args.queue, args.child_n))
        return 0
    n = args.n or (100_000 if args.quick else 1_000_000)
    meta = harness.meta(["python", "-m", "bench.soak", *(argv or sys.argv[1:])])
    run = harness.on_broker(args.url, lambda url: measure(url, n, args.timeout), "workqbenchsoak")
    problems = verdict(run)
    result = {"meta": meta, "run": run, "problems": problems}
    for name in ("producer", "worker"):
        g = run["rss"][name]
        print(f"{name}: RSS {g['warm_mb']:.1f} MB after warm-up, peak {g['peak_mb']:.1f}, "
              f"growth {g['growth_mb']:+.2f} MB; tasks {run[name]['start']['tasks']} -> "
              f"{run[name]['end']['tasks']}, pending futures "
              f"{run[name]['start']['pending_futures']} -> {run[name]['end']['pending_futures']}",
              file=sys.stderr)  # fmt: skip
    print(f"{n:,} messages in {run['seconds']:.0f} s ({run['rate']:,.0f} msg/s); "
          f"producer window waiters {run['producer']['end'].get('window_waiters')}, in flight "
          f"{run['producer']['end']['in_flight']}", file=sys.stderr)  # fmt: skip
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    if args.no_docs:
        harness.print_json(result)
    else:
        harness.save("soak", result, chart)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
