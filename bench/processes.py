"""`python -m bench.processes`: the consume rate of `aio-workq worker --processes N`.

For each N (default 1 and 2) and each handler cost (`--work`: CPU microseconds the handler
spins; default 0 and 200), the runner fills a classic queue with M persistent 100-byte
messages, then starts `aio-workq worker bench.processes_target:workers --processes N` (one
`Worker` per process: concurrency and prefetch 100, no retries). Each process reports its count
every 0.1 s; the rate is the messages handled while every process was handling (from the last
process's first message to the first process's last one) over that time, and the CPU per
message is the processes' CPU time from their first message to their last, over the count.
Then SIGTERM drains the workers and the queue must be empty.

Starts a RabbitMQ node of its own unless `--url` is given. `--quick`: M = 10,000 (default
40,000).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness

BODY = b"." * 100


async def _fill(url: str, queue: str, m: int) -> None:
    from aio_workq import Producer

    async with Producer(url, queue_type="classic") as producer:
        await producer.declare(queue)
        for start in range(0, m, 10_000):
            await producer.publish_many([BODY] * min(10_000, m - start), queue=queue)


async def _drain_check(url: str, queue: str) -> int:
    import aiormq

    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        ok = await channel.queue_delete(queue)
        await channel.queue_delete(f"{queue}.dlq")
        return int(ok.message_count or 0)
    finally:
        await connection.close()


def _count_at(series: list[list[float]], t: float) -> float:
    """A process's count at wall time t, interpolated between its samples."""
    if not series or t <= series[0][0]:
        return series[0][1] if series else 0.0
    for (t0, c0), (t1, c1) in zip(series, series[1:], strict=False):
        if t0 <= t <= t1:
            return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return series[-1][1]


def summarize(stats: list[dict[str, Any]], m: int) -> dict[str, Any]:
    """Rate while every process handled, CPU per message, and each process's share."""
    start = max(s["first"] for s in stats)
    end = min(s["last"] for s in stats)
    if len(stats) == 1 or end <= start:
        start, end = min(s["first"] for s in stats), max(s["last"] for s in stats)
        handled = float(sum(s["count"] for s in stats) - len(stats))
    else:
        handled = sum(_count_at(s["series"], end) - _count_at(s["series"], start) for s in stats)
    cpu = sum(s["cpu_last"] - s["cpu_first"] for s in stats)
    return {
        "rate": round(handled / (end - start), 1),
        "overall_rate": round(
            m / (max(s["last"] for s in stats) - min(s["first"] for s in stats)), 1
        ),
        "cpu_us_per_msg": round(cpu / m * 1e6, 1),
        "counts": [s["count"] for s in stats],
    }


def run_one(url: str, processes: int, work: float, m: int, timeout: float = 900) -> dict[str, Any]:
    queue = f"bench.processes.{processes}.{secrets.token_hex(3)}"
    asyncio.run(_fill(url, queue, m))
    with tempfile.TemporaryDirectory(prefix="bench-processes-") as tmp:
        env = {**os.environ, "BENCH_QUEUE": queue, "BENCH_STATS_DIR": tmp,
               "BENCH_WORK_US": str(work), "PYTHONPATH": str(harness.REPO_ROOT)}  # fmt: skip
        cmd = [sys.executable, "-m", "aio_workq", "worker", "bench.processes_target:workers",
               "--processes", str(processes), "--url", url, "--log-level", "WARNING"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=harness.REPO_ROOT, env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        stats: list[dict[str, Any]] = []
        try:
            while time.monotonic() < deadline:
                stats = [json.loads(p.read_text()) for p in Path(tmp).glob("*.json")]
                if sum(s["count"] for s in stats) >= m:
                    break
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
            time.sleep(0.25)  # one more sample from every process
            stats = [json.loads(p.read_text()) for p in Path(tmp).glob("*.json")]
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
    left = asyncio.run(_drain_check(url, queue))
    record: dict[str, Any] = {"processes": processes, "work_us": work, "m": m}
    total = sum(s["count"] for s in stats)
    if total < m or left:
        tail = "\n".join(err.decode(errors="replace").splitlines()[-10:])
        record["error"] = f"handled {total} of {m}, {left} left in the queue\n{tail}"
        return record
    record.update(summarize(stats, m))
    return record


def measure(
    url: str, processes: tuple[int, ...], works: tuple[float, ...], m: int
) -> list[dict[str, Any]]:
    runs = []
    for work in works:
        for n in processes:
            record = run_one(url, n, work, m)
            runs.append(record)
            head = f"--processes {n}, handler {work:g} µs:"
            if "error" in record:
                print(f"{head} error: {record['error']}", file=sys.stderr, flush=True)
            else:
                rate, cpu = record["rate"], record["cpu_us_per_msg"]
                text = f"{rate:,.0f} msg/s, {cpu:.0f} µs CPU/msg, counts {record['counts']}"
                print(f"{head} {text}", file=sys.stderr, flush=True)
    return runs


# --- report --------------------------------------------------------------------------------------


def _find(result: dict[str, Any], n: int, work: float) -> dict[str, Any]:
    for r in result["runs"]:
        if r["processes"] == n and r["work_us"] == work:
            return dict(r)
    return {}


def section(result: dict[str, Any], image: str) -> list[str]:
    plan = result["plan"]
    lines = []
    for work in plan["works"]:
        one = _find(result, plan["processes"][0], work)
        for n in plan["processes"]:
            r = _find(result, n, work)
            if "rate" not in r:
                lines.append([f"{work:g} µs", str(n), "error", "", "", ""])
                continue
            scale = f"{r['rate'] / one['rate']:.2f}×" if "rate" in one else "—"
            counts = " / ".join(map(str, r["counts"]))
            cpu = f"{r['cpu_us_per_msg']:.0f}"
            lines.append([f"{work:g} µs", str(n), f"{r['rate']:,.0f}", scale, cpu, counts])
    header = ["handler CPU", "--processes", "msg/s", "× 1 process", "CPU µs/msg (all processes)",
              "messages per process"]  # fmt: skip
    ceilings = []
    scaling = []
    for work in plan["works"]:
        base = _find(result, plan["processes"][0], work)
        for n in plan["processes"][1:]:
            r = _find(result, n, work)
            if "rate" in r and "rate" in base:
                scaling.append(
                    f"--processes {n} gave {r['rate'] / base['rate']:.2f}× the rate of "
                    f"--processes {plan['processes'][0]} with a {work:g} µs handler"
                )
    for work in plan["works"]:
        r = _find(result, plan["processes"][0], work)
        if "cpu_us_per_msg" in r:
            ceilings.append(
                f"{r['cpu_us_per_msg']:.0f} µs per message with a {work:g} µs handler: at most "
                f"{1e6 / r['cpu_us_per_msg']:,.0f} msg/s per core"
            )
    return [
        "### `aio-workq worker --processes N`",
        "",
        harness.measured_on(result),
        "",
        f"{plan['m']:,} persistent 100-byte messages in one classic queue, consumed by "
        "`aio-workq worker bench.processes_target:workers --processes N` (one Worker per "
        "process, concurrency and prefetch 100). The rate counts the messages handled while "
        "every process was handling, over that time; the CPU is all the processes' CPU from "
        "their first message to their last, over the messages.",
        "",
        f"![--processes]({image})",
        "",
        *harness.table(header, lines),
        "",
        " ".join(
            [
                "Here: " + "; ".join(scaling) + ".",
                "This machine has 2 cores, shared with the broker (which needs most of one at",
                "these rates) and with other jobs, so a second process has no core of its own",
                "and the ratio above says more about the load than about aio-workq.",
                "The CPU per message says what a bigger machine would do:",
                "; ".join(ceilings) + ".",
                "With a core for each process and one or more for the broker, N processes",
                "handle up to N times that, until the broker becomes the limit: a queue is one",
                "Erlang process, so one queue delivers at most what one broker core can (tens of",
                "thousands of small messages per second); past that, more processes help only",
                "across several queues. The heavier the handler, the further the processes",
                "scale: --processes is for CPU-bound handlers, which one event loop (one core)",
                "would otherwise limit.",
            ]
        ),
    ]


def chart(result: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    plan = result["plan"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    width = 0.8 / len(plan["processes"])
    for j, n in enumerate(plan["processes"]):
        xs, values = [], []
        for i, work in enumerate(plan["works"]):
            r = _find(result, n, work)
            if "rate" in r:
                xs.append(i - 0.4 + (j + 0.5) * width)
                values.append(r["rate"])
        bars = ax.bar(xs, values, width, label=f"--processes {n}")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(plan["works"])))
    ax.set_xticklabels([f"handler {w:g} µs CPU" for w in plan["works"]])
    ax.set_ylabel("msg/s")
    ax.set_title("aio-workq worker --processes N, 2 cores (loaded machine)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _numbers(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.processes", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10,000 messages per run")
    parser.add_argument("--m", type=int, help="messages per run (default 40,000)")
    parser.add_argument("--processes", type=_numbers, default=(1, 2), help="e.g. 1,2")
    parser.add_argument("--work", type=_numbers, default=(0, 200), help="handler µs, e.g. 0,200")
    parser.add_argument("--url", help="use this broker instead of starting a node of our own")
    parser.add_argument("--no-docs", action="store_true", help="print the JSON, write nothing")
    args = parser.parse_args(argv)
    m = args.m or (10_000 if args.quick else 40_000)
    processes = tuple(int(n) for n in args.processes)
    return harness.workload(
        "processes",
        argv,
        url=args.url,
        measure=lambda url: measure(url, processes, args.work, m),
        plan={"m": m, "processes": list(processes), "works": list(args.work)},
        chart=chart,
        no_docs=args.no_docs,
    )


if __name__ == "__main__":
    sys.exit(main())
