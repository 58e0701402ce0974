"""The schedules ledger: scheduler replicas killed under a 1-second and a 1-minute schedule.

    python -m scripts.schedules_ledger [--url URL] [--replicas 3] [--duration 180]
        [--kill-every 20] [--outage 30] [--json PATH]

Starts a RabbitMQ node of its own unless `--url` is given, then `--replicas` scheduler
processes (`python -m scripts.schedules_ledger replica ...`), each with the same two schedules:
`interval` (every second) and `minutely` (cron `* * * * *`). A ledger consumer records each
tick's message id. Every `--kill-every` seconds the active replica is killed with SIGKILL and
restarted; once, halfway, every replica is killed and all stay down for `--outage` seconds.
Then each tick due in the run is counted: fired 0, 1 or more times, both raw (deliveries) and
deduplicated by message id; takeover is the time from the SIGKILL to the moment another
replica says it is active.

`--cluster` runs it on a local 3-node cluster instead, killing nodes rather than replicas
(`scripts/schedules_cluster.py`; `make schedules-ledger-cluster`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

__all__ = ("LedgerResult", "run_ledger")

ROOT = Path(__file__).resolve().parent.parent
INTERVAL = timedelta(seconds=1)
CRON = "* * * * *"


@dataclass
class LedgerResult:
    """What the ledger counted."""

    replicas: int
    duration: float
    kills: int
    outage: float
    fault: str = "kill"
    ticks_due: dict[str, int] = field(default_factory=dict)
    raw: dict[str, dict[str, int]] = field(default_factory=dict)  # schedule -> {"0","1",">1"}
    deduped: dict[str, dict[str, int]] = field(default_factory=dict)
    takeovers: list[float] = field(default_factory=list)
    outage_recovery: float | None = None
    max_lateness: float = 0.0
    strays: int = 0  # ids outside the counted window
    # --cluster: which node each kill hit, the queues' types, kills the active scheduler outlived
    kill_targets: list[str] = field(default_factory=list)
    queue_types: dict[str, str] = field(default_factory=dict)
    kept: int = 0
    overlaps: int = 0  # two replicas said they were active at once
    max_overlap: float = 0.0  # seconds
    brief_terms: int = 0  # active terms shorter than 1 s (a failed first read of the state)

    @property
    def missed(self) -> int:
        return sum(counts["0"] for counts in self.raw.values())

    @property
    def doubled_raw(self) -> int:
        return sum(counts[">1"] for counts in self.raw.values())

    @property
    def fault_name(self) -> str:
        if self.fault == "node":
            return "kill -9 of a cluster node"
        return "kill -9" if self.fault == "kill" else "SIGSTOP (a partition: heartbeat timeout)"

    def summary(self) -> str:
        lines = [
            f"schedules ledger: {self.replicas} replicas, {self.duration:.0f} s, "
            f"{self.kills} {self.fault_name} of the active one, outage {self.outage:.0f} s",
        ]
        for name, due in self.ticks_due.items():
            raw, dedup = self.raw[name], self.deduped[name]
            lines.append(
                f"  {name}: {due} ticks due; raw 0/1/>1 = {raw['0']}/{raw['1']}/{raw['>1']}; "
                f"deduped by id 0/1 = {dedup['0']}/{dedup['1']}"
            )
        if self.takeovers:
            median = statistics.median(self.takeovers)
            lines.append(
                f"  takeover after {self.fault_name}: median {median:.3f} s, "
                f"max {max(self.takeovers):.3f} s (n={len(self.takeovers)})"
            )
        if self.outage_recovery is not None:
            lines.append(
                f"  after the outage: active again {self.outage_recovery:.3f} s after restart"
            )
        if self.fault == "node":
            targets = Counter(self.kill_targets)
            lines.append(
                "  nodes killed: " + ", ".join(f"{k} {n}" for k, n in sorted(targets.items()))
                + f"; the active scheduler kept the lease through {self.kept} of them; "
                + f"{self.overlaps} overlaps of two active replicas"
                + (f" (max {self.max_overlap:.3f} s)" if self.overlaps else "")
                + f"; {self.brief_terms} active terms shorter than 1 s"
            )  # fmt: skip
            lines.append(
                "  queue types: " + ", ".join(f"{q} {t}" for q, t in self.queue_types.items())
            )
        else:
            lines.append(f"  latest tick arrival after its due time: {self.max_lateness:.3f} s")
        return "\n".join(lines)


# --- a replica ------------------------------------------------------------------------------


async def replica(url: str, group: str, prefix: str) -> None:
    """One scheduler process: prints `ACTIVE <unix time>` when it becomes active."""
    from aio_workq import run_workers
    from aio_workq.schedules import Schedule, Scheduler

    scheduler = Scheduler(
        url,
        [
            Schedule("interval", every=INTERVAL, queue=f"{prefix}.interval"),
            Schedule("minutely", cron=CRON, queue=f"{prefix}.minutely"),
        ],
        group=group,
        retry_delay=0.5,
    )

    def on_active(active: bool) -> None:
        print("ACTIVE" if active else "PASSIVE", f"{time.time():.6f}", flush=True)

    scheduler.on_active = on_active
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print("STARTED", os.getpid(), flush=True)
    await run_workers(schedules=scheduler)


# --- the run --------------------------------------------------------------------------------


def _stderr() -> int:
    """Where replicas log: `$SCHEDULES_LEDGER_LOGS/replica-<n>.log` if set, else nowhere."""
    folder = os.environ.get("SCHEDULES_LEDGER_LOGS")
    if not folder:
        return asyncio.subprocess.DEVNULL
    path = os.path.join(folder, f"replica-{time.monotonic_ns()}.log")
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


class Replica:
    """A replica process and what it said."""

    def __init__(self, url: str, group: str, prefix: str) -> None:
        self.args = [
            sys.executable,
            "-m",
            "scripts.schedules_ledger",
            "replica",
            url,
            group,
            prefix,
        ]
        self.process: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task[None] | None = None

    async def start(self, events: asyncio.Queue[tuple[str, float, Replica]]) -> None:
        stderr = _stderr()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.args, stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=ROOT
            )
        finally:
            if stderr >= 0:
                os.close(stderr)
        self.reader = asyncio.create_task(self._read(self.process, events))

    async def _read(
        self, process: asyncio.subprocess.Process, events: asyncio.Queue[tuple[str, float, Replica]]
    ) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            word, _, rest = line.decode().strip().partition(" ")
            if word in ("ACTIVE", "PASSIVE"):
                await events.put((word, float(rest), self))

    def pause(self, paused: bool) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)

    async def terminate(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await self.process.wait()
            except TimeoutError:
                await self.kill()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


async def run_ledger(
    url: str,
    *,
    replicas: int = 3,
    duration: float = 180.0,
    kill_every: float = 20.0,
    outage: float = 30.0,
    settle: float = 8.0,
    fault: str = "kill",
) -> LedgerResult:
    """Run the scenario against the broker at `url` and count every tick.

    `fault="pause"` stops the active replica with SIGSTOP instead (the broker sees a silent
    peer, as in a partition, until the heartbeat timeout), resuming it once another is active.
    """
    import aio_workq

    group = f"ledger-{uuid.uuid4().hex[:8]}"
    prefix = group
    deliveries: Counter[str] = Counter()
    lateness: list[float] = []

    async def record(job: aio_workq.Job) -> None:
        ident = job.message_id or ""
        deliveries[ident] += 1
        due = datetime.fromisoformat(ident.partition(":")[2])
        lateness.append(time.time() - due.timestamp())

    consumers = [
        aio_workq.Worker(url, queue=f"{prefix}.{name}", handler=record, concurrency=4)
        for name in ("interval", "minutely")
    ]
    runs = [asyncio.create_task(w.run()) for w in consumers]
    events: asyncio.Queue[tuple[str, float, Replica]] = asyncio.Queue()
    fleet = [Replica(url, group, prefix) for _ in range(replicas)]
    active: Replica | None = None
    result = LedgerResult(replicas=replicas, duration=duration, kills=0, outage=outage, fault=fault)

    async def next_active(deadline: float) -> tuple[float, Replica] | None:
        nonlocal active
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                async with asyncio.timeout(remaining):
                    word, at, who = await events.get()
            except TimeoutError:
                return None
            if word == "ACTIVE":
                active = who
                return at, who
            if who is active:
                active = None

    async def drain_events() -> None:
        nonlocal active
        while not events.empty():
            word, _, who = events.get_nowait()
            if word == "ACTIVE":
                active = who
            elif who is active:
                active = None

    try:
        for member in fleet:
            await member.start(events)
        if await next_active(time.monotonic() + 60) is None:
            raise RuntimeError("no replica became active within 60 s")
        began = datetime.now(UTC)
        start = time.monotonic()
        outage_done = outage <= 0
        next_kill = start + kill_every
        while time.monotonic() - start < duration:
            await drain_events()
            now = time.monotonic()
            if not outage_done and now - start >= duration / 2:
                for member in fleet:
                    await member.kill()
                await asyncio.sleep(outage)  # the outage itself is the scenario, not a wait
                restarted = time.time()
                for member in fleet:
                    await member.start(events)
                got = await next_active(time.monotonic() + 60)
                if got is not None:
                    result.outage_recovery = got[0] - restarted
                outage_done = True
                next_kill = time.monotonic() + kill_every
                continue
            if now >= next_kill and active is not None:
                victim = active
                killed_at = time.time()
                if fault == "pause":
                    victim.pause(True)
                else:
                    await victim.kill()
                active = None
                result.kills += 1
                got = await next_active(time.monotonic() + 60)
                if got is not None:
                    result.takeovers.append(got[0] - killed_at)
                if fault == "pause":
                    victim.pause(False)
                else:
                    await victim.start(events)
                next_kill = time.monotonic() + kill_every
                continue
            await asyncio.sleep(0.2)  # the orchestrator's own pace
        ended = datetime.now(UTC)
        await asyncio.sleep(settle)  # let the last ticks arrive before counting
    finally:
        for member in fleet:
            await member.terminate()
        for consumer in consumers:
            await consumer.stop()
        await asyncio.gather(*runs, return_exceptions=True)

    count_ticks(result, deliveries, began, ended)
    result.max_lateness = max(lateness, default=0.0)
    return result


def count_ticks(
    result: LedgerResult, deliveries: Counter[str], began: datetime, ended: datetime
) -> None:
    """Count each tick due in the run (2 s margins) as fired 0, 1 or more times."""
    from aio_workq.schedules import Schedule, tick_id

    window_start = began + timedelta(seconds=2)
    window_end = ended - timedelta(seconds=2)
    schedules = [
        Schedule("interval", every=INTERVAL, queue="x"),
        Schedule("minutely", cron=CRON, queue="x"),
    ]
    counted: set[str] = set()
    for schedule in schedules:
        due = [tick_id(schedule.name, d) for d in schedule.due_between(window_start, window_end)]
        counted.update(due)
        result.ticks_due[schedule.name] = len(due)
        raw = Counter(
            "0" if deliveries[i] == 0 else "1" if deliveries[i] == 1 else ">1" for i in due
        )
        result.raw[schedule.name] = {k: raw[k] for k in ("0", "1", ">1")}
        result.deduped[schedule.name] = {
            "0": raw["0"],
            "1": raw["1"] + raw[">1"],
        }
    result.strays = sum(1 for ident in deliveries if ident not in counted)


def _with_heartbeat(url: str, heartbeat: int | None) -> str:
    if heartbeat is None:
        return url
    return f"{url}{'&' if '?' in url else '?'}heartbeat={heartbeat}"


async def _cluster(args: argparse.Namespace) -> LedgerResult:
    from scripts.cluster import LocalCluster
    from scripts.schedules_cluster import run_cluster_ledger, start_cluster

    options = {"replicas": args.replicas, "duration": args.duration, "kill_every": args.kill_every}
    if args.cluster_dir:
        return await run_cluster_ledger(LocalCluster.from_dir(Path(args.cluster_dir)), **options)
    with tempfile.TemporaryDirectory(prefix="schedules-cluster-") as tmp:
        cluster = await asyncio.to_thread(start_cluster, Path(tmp))
        try:
            return await run_cluster_ledger(cluster, **options)
        finally:
            await asyncio.to_thread(cluster.close)


async def _main(args: argparse.Namespace) -> LedgerResult:
    if args.cluster or args.cluster_dir:
        return await _cluster(args)
    if args.url:
        result = await run_ledger(
            _with_heartbeat(args.url, args.heartbeat),
            replicas=args.replicas, duration=args.duration,
            kill_every=args.kill_every, outage=args.outage, fault=args.fault,
        )  # fmt: skip
    else:
        from scripts.broker import LocalBroker, ensure_installed

        ensure_installed()
        with tempfile.TemporaryDirectory(prefix="schedules-ledger-") as tmp:
            node = LocalBroker(Path(tmp), name="schedledger")
            node.start()
            try:
                result = await run_ledger(
                    _with_heartbeat(node.url, args.heartbeat),
                    replicas=args.replicas, duration=args.duration,
                    kill_every=args.kill_every, outage=args.outage, fault=args.fault,
                )  # fmt: skip
            finally:
                node.close()
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "replica":
        url, group, prefix = argv[1:4]
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(replica(url, group, prefix))
        return 0
    parser = argparse.ArgumentParser(prog="python -m scripts.schedules_ledger")
    parser.add_argument("--url", help="a running broker (default: a node of its own)")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--kill-every", type=float, default=20.0)
    parser.add_argument("--outage", type=float, default=30.0)
    parser.add_argument("--heartbeat", type=int, help="the replicas' AMQP heartbeat (s)")
    parser.add_argument(
        "--fault", choices=("kill", "pause"), default="kill",
        help="kill -9 the active replica, or SIGSTOP it (a partition; add ?heartbeat=N to the URL)",
    )  # fmt: skip
    parser.add_argument(
        "--cluster", action="store_true",
        help="on a 3-node cluster of its own (or --cluster-dir): kill -9 the active "
        "scheduler's node and the lease queue's leader, in turn (scripts/schedules_cluster.py)",
    )  # fmt: skip
    parser.add_argument("--cluster-dir", help="a running cluster (`make cluster-start`)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = asyncio.run(_main(args))
    print(result.summary())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0 if result.missed == 0 and result.overlaps == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
