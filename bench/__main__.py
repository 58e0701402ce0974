"""`python -m bench`: aio-workq against raw aiormq, aio-pika and the frameworks, on one broker.

Starts a RabbitMQ node of its own (scripts/broker.py, in a temporary directory, on free ports),
runs every workload for every system — each run in a fresh process, systems alternating, with
repeats — then writes `bench/results/latest.json`, `docs/benchmarks.md` and `docs/img/bench_*.png`.
`--quick` is the few-minutes version; a full run takes about half an hour on 2 cores.

`--against [REV]` compares the working tree with a reference commit instead (default: the one in
`bench/REFERENCE`): aio_workq, aio_workq@REV and raw aiormq alternate on one broker, and the
table says, per workload and queue type, whether the working tree is within 10 % of the
reference (bench/reference.py). It writes `bench/results/against-REV.json`, not the docs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import aiormq

from bench import reference
from bench.report import charts, markdown, summarize
from bench.runner import (
    BASELINE,
    OURS,
    PAIR,
    REPO_ROOT,
    SYSTEMS,
    WIDE,
    Launcher,
    Plan,
    Record,
    run_all,
)
from bench.systems._common import PAYLOAD_SIZE, QUEUE_TYPES, WORKLOADS

RESULTS = REPO_ROOT / "bench" / "results"
DOC = REPO_ROOT / "docs" / "benchmarks.md"
IMAGES = REPO_ROOT / "docs" / "img"
PACKAGES = (
    "aio-workq",
    "aio-pika",
    "aiormq",
    "pamqp",
    "faststream",
    "taskiq",
    "taskiq-aio-pika",
    "dramatiq",
    "pika",
    "celery",
    "kombu",
    "amqp",
    "lapinmq",
    "psutil",
    "matplotlib",
)


def _csv(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=5,000, 1 repeat, short latency/rss")
    parser.add_argument("--systems", type=_csv(SYSTEMS), help="comma-separated subset")
    parser.add_argument("--workloads", type=_csv(WORKLOADS), help="comma-separated subset")
    parser.add_argument("--queue-types", type=_csv(QUEUE_TYPES), help="classic,quorum")
    parser.add_argument("--repeats", type=int, help="runs per system and workload (default 3)")
    parser.add_argument("--n", type=int, help="messages for publish/consume/chain")
    parser.add_argument("--rss-n", type=int, help="messages for the rss workload")
    parser.add_argument("--url", help="use this broker instead of starting a node of our own")
    parser.add_argument("--no-docs", action="store_true", help="write only the JSON results")
    parser.add_argument(
        "--against",
        nargs="?",
        const="",
        metavar="REV",
        help="compare the working tree with commit REV (default: bench/REFERENCE) "
        "on publish, consume and chain; exit 3 if it is more than 10%% slower",
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="regenerate docs/benchmarks.md and the charts from a results file; run nothing",
    )
    args = parser.parse_args(argv)
    if args.against is not None:
        if args.systems or args.report_only:
            parser.error(
                "--against runs aio_workq, aio_workq@REV and aiormq_raw: drop --systems "
                "and --report-only"
            )
        extra = [w for w in args.workloads or () if w not in reference.WORKLOADS]
        if extra:
            parser.error(
                f"--against compares rates: workloads {', '.join(reference.WORKLOADS)} "
                f"(not {', '.join(extra)})"
            )
        args.workloads = args.workloads or reference.WORKLOADS
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    overrides = {
        key: value
        for key, value in {
            "systems": args.systems,
            "workloads": args.workloads,
            "queue_types": args.queue_types,
            "repeats": args.repeats,
            "n": args.n,
            "rss_n": args.rss_n,
        }.items()
        if value is not None
    }
    return Plan.quick(**overrides) if args.quick else Plan(**overrides)


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    memory_gb = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": memory_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


async def broker_info(url: str) -> dict[str, str]:
    connection = await aiormq.connect(url)
    try:
        props = connection.server_properties
        return {key: str(props.get(key, "?")) for key in ("product", "version", "platform")}
    finally:
        await connection.close()


def progress(total: int) -> Any:
    done = 0

    def report(record: Record) -> None:
        nonlocal done
        done += 1
        head = (
            f"[{done:>3}/{total}] {record['workload']:<8} {record['queue_type']:<7} "
            f"{record['system']:<18} #{record.get('repeat', 0)}"
        )
        status = record["status"]
        if status == "ok" and record["workload"] == "latency":
            lat = record["latency_ms"]
            detail = f"p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms"
        elif status == "ok" and record["workload"] == "rss":
            detail = (
                f"peak {record.get('rss_peak_mb', 0):.1f} MB, "
                f"growth {record.get('rss_growth_mb', 0):+.1f} MB, {record['rate']:,.0f} msg/s"
            )
        elif status == "ok":
            detail = f"{record['rate']:>9,.0f} msg/s, {record['cpu_us_per_msg']:.0f} µs CPU/msg"
        else:
            detail = f"{status}: {str(record.get('reason') or record.get('error')).splitlines()[0]}"
        print(f"{head}  {detail}", file=sys.stderr, flush=True)

    return report


def planned_runs(plan: Plan) -> int:
    return sum(
        len(plan.queue_types_for(w)) * plan.repeats_for(w) * len(plan.systems)
        for w in plan.workloads
    )


async def measure(
    url: str,
    plan: Plan,
    log_dir: Path,
    launchers: dict[str, Launcher] | None = None,
) -> tuple[dict[str, Any], list[Record]]:
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
        "plan": dataclasses.asdict(plan),
        "payload_bytes": PAYLOAD_SIZE,
        "machine": machine(),
        "versions": versions(),
        "broker": await broker_info(url),
    }
    records = await run_all(url, plan, log_dir, progress(planned_runs(plan)), launchers)
    return meta, records


def write_outputs(
    meta: dict[str, Any], records: list[Record], *, results: bool = True, docs: bool = True
) -> None:
    rows = summarize(records, meta["plan"]["systems"])
    if results:
        RESULTS.mkdir(parents=True, exist_ok=True)
        latest = RESULTS / "latest.json"
        document = {"meta": meta, "runs": records, "summary": rows}
        latest.write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {latest.relative_to(REPO_ROOT)}", file=sys.stderr)
    if not docs:
        return
    images = charts(rows, meta["plan"], IMAGES)
    links = {w: os.path.relpath(path, DOC.parent) for w, path in images.items()}
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(markdown(meta, rows, links))
    print(f"wrote {DOC.relative_to(REPO_ROOT)} and {len(images)} charts", file=sys.stderr)


async def _measure(
    url: str, plan: Plan, log_dir: Path, launchers: dict[str, Launcher] | None
) -> tuple[dict[str, Any], list[Record]]:
    """`measure`, cancelled cleanly by SIGTERM (the broker node is then stopped as on Ctrl-C)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await measure(url, plan, log_dir, launchers)


def run_measure(
    url: str | None,
    plan: Plan,
    log_dir: Path,
    launchers: dict[str, Launcher] | None = None,
) -> tuple[dict[str, Any], list[Record]]:
    """`measure` on url, or on a RabbitMQ node of its own started for the run.

    Raises:
        asyncio.CancelledError: the bench got SIGTERM.
    """
    if url:
        return asyncio.run(_measure(url, plan, log_dir, launchers))
    from scripts.broker import LocalBroker, ensure_installed

    ensure_installed()
    with tempfile.TemporaryDirectory(prefix="aio-workq-bench-") as tmp:
        node = LocalBroker(Path(tmp), name="workqbench")
        print("starting a RabbitMQ node for the bench…", file=sys.stderr, flush=True)
        with node:
            return asyncio.run(_measure(node.url, plan, log_dir, launchers))


REGRESSED = 3
"""Exit status of `--against` when the working tree is slower than the rule allows."""


def against(args: argparse.Namespace, log_dir: Path, results: Path = RESULTS) -> int:
    """The reference comparison: build (or reuse) the reference, run, print the verdicts.

    Writes `against-REV.json` into results; returns the exit status (0 PASS, 1 failed runs,
    2 no reference, `REGRESSED`).
    """
    try:
        ref = reference.prepare(args.against or reference.default_rev())
    except reference.ReferenceError as exc:
        print(f"bench --against: {exc}", file=sys.stderr)
        return 2
    log_dir.mkdir(parents=True, exist_ok=True)
    base = make_plan(args)
    # PAIR (aio-workq in two processes) runs for the broker's ceiling: each side's share of it;
    # WIDE (one process with the pair's settings), for the share one process reaches.
    plan = dataclasses.replace(base, systems=(OURS, ref.system, BASELINE, PAIR, WIDE))
    meta, records = run_measure(args.url, plan, log_dir, {ref.system: ref.launcher})
    meta["reference"] = ref.describe()
    rows = reference.verdicts(records, ref.system)
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"against-{ref.label}.json"
    out.write_text(json.dumps({"meta": meta, "runs": records, "verdicts": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    print(reference.table(rows, ref, meta["plan"]), flush=True)
    verdict = reference.outcome(rows)
    print(f"against {ref.system}: {verdict}", flush=True)
    failed = [r for r in records if r["status"] == "error"]
    if failed:
        print(f"{len(failed)} run(s) failed: see {log_dir}", file=sys.stderr)
    if failed or verdict == reference.MISSING:
        return 1
    return REGRESSED if verdict == reference.REGRESSION else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        saved = json.loads(args.report_only.read_text())
        write_outputs(saved["meta"], saved["runs"], results=False)
        return 0
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        if args.against is not None:
            return against(args, log_dir)
        meta, records = run_measure(args.url, make_plan(args), log_dir)
    except asyncio.CancelledError:
        print("bench terminated (SIGTERM): nothing written", file=sys.stderr)
        return 128 + signal.SIGTERM
    write_outputs(meta, records, docs=not args.no_docs)
    failed = [r for r in records if r["status"] == "error"]
    if failed:
        print(f"{len(failed)} run(s) failed: see {log_dir}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
