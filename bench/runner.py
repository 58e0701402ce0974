"""Runs one system on one workload in its own process, feeds its queue and checks the outcome.

`run_one` is the unit: it starts `python -m bench.systems.<system>`, waits for `READY`, prepares
the queue (the feeder is the same module in `--workload feed` mode, so messages are in the
system's own wire format), sends `GO`, reads the result line, samples the process's RSS when
asked, and, once the process has exited, checks the broker's view with passive declares: the
published messages are all in the queue, or the consumed queue is empty — after the consumer's
connection is gone, so anything left unacked would be back in the queue. A failed check turns
the run into an error. `run_all` alternates the systems (the order rotates with each repeat).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiormq

from bench.systems._common import GO, READY, STOP, WORKLOADS

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = (
    "aio_workq",
    "aiormq_raw",
    "aiopika",
    "faststream",
    "taskiq_aio_pika",
    "dramatiq",
    "celery",
    "lapinmq",
    "lapinmq_sync",
)
BASELINE = "aiormq_raw"
OURS = "aio_workq"
PAIR = f"{OURS}.x2"
"""aio-workq in two processes on one queue: with the others, the broker's ceiling (#22)."""
WIDE = f"{OURS}_wide"
"""aio-workq in one process with the settings of two (`Producer(channels=2)`, the pair's
window of unacknowledged messages): the share of the ceiling one process reaches (#22)."""

READY_TIMEOUT = 120.0
EXIT_TIMEOUT = 60.0
DRAIN_TIMEOUT = 15.0

Record = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Launcher:
    """How a system's process starts: interpreter, module, working directory and import path.

    The default runs `bench.systems.<name>` with this interpreter from the working tree. The
    reference commit's system (`bench.reference`) runs the same module with the reference's own
    interpreter from a directory that holds only the bench, so that `aio_workq` is imported from
    the reference tree and not from the working tree.
    """

    module: str
    python: str = sys.executable
    cwd: Path = REPO_ROOT
    pythonpath: Path = REPO_ROOT

    @classmethod
    def default(cls, system: str) -> Launcher:
        return cls(module=f"bench.systems.{system}")

    def env(self) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH")
        here = str(self.pythonpath)
        return {**os.environ, "PYTHONPATH": f"{here}{os.pathsep}{path}" if path else here}


@dataclass(frozen=True, slots=True)
class Plan:
    """What to run; `Plan.quick()` is the few-minutes version."""

    systems: tuple[str, ...] = SYSTEMS
    workloads: tuple[str, ...] = WORKLOADS
    queue_types: tuple[str, ...] = ("classic", "quorum")
    repeats: int = 3
    n: int = 20_000
    prefetch: int = 100
    latency_rate: float = 1_000.0
    latency_seconds: float = 5.0
    rss_n: int = 200_000
    rss_queue_types: tuple[str, ...] = ("classic",)
    rss_repeats: int = 1

    @classmethod
    def quick(cls, **overrides: Any) -> Plan:
        settings: dict[str, Any] = {
            "repeats": 1,
            "n": 5_000,
            "latency_seconds": 2.0,
            "rss_n": 20_000,
        }
        return cls(**{**settings, **overrides})

    def messages(self, workload: str) -> int:
        if workload == "latency":
            return round(self.latency_rate * self.latency_seconds)
        return self.rss_n if workload == "rss" else self.n

    def queue_types_for(self, workload: str) -> tuple[str, ...]:
        if workload == "rss":
            return tuple(q for q in self.queue_types if q in self.rss_queue_types)
        return self.queue_types

    def repeats_for(self, workload: str) -> int:
        return self.rss_repeats if workload == "rss" else self.repeats


@dataclass(slots=True)
class Run:
    """One system on one workload, queue type and repeat."""

    system: str
    workload: str
    queue_type: str
    repeat: int
    n: int
    prefetch: int = 100
    latency_rate: float = 1_000.0
    """msg/s the feeder offers in the latency workload."""
    launcher: Launcher | None = None
    """How to start the system's process (default: `Launcher.default(system)`)."""
    queue: str = field(init=False)

    @property
    def processes(self) -> int:
        """`NAME.xK` runs K processes of system NAME on the one queue, N/K messages each."""
        _, sep, count = self.system.rpartition(".x")
        return int(count) if sep and count.isdigit() else 1

    @property
    def base_system(self) -> str:
        return self.system.rpartition(".x")[0] if self.processes > 1 else self.system

    def __post_init__(self) -> None:
        token = secrets.token_hex(3)
        # `aio_workq@REV` names a system; a queue name has no '@' (newer commits refuse it).
        system = self.system.replace("@", ".at.")
        self.queue = f"bench.{self.workload}.{self.queue_type}.{system}.{self.repeat}.{token}"
        if self.launcher is None:
            self.launcher = Launcher.default(self.base_system)

    @property
    def forward_queue(self) -> str:
        return f"{self.queue}.out"

    def command(
        self, url: str, *, feed: bool = False, rate: float | None = None, n: int | None = None
    ) -> list[str]:
        assert self.launcher is not None
        cmd = [
            self.launcher.python, "-m", self.launcher.module,
            "--url", url,
            "--workload", "feed" if feed else self.workload,
            "--queue", self.queue,
            "--forward-queue", self.forward_queue,
            "--n", str(self.n if n is None else n),
            "--prefetch", str(self.prefetch),
            "--queue-type", self.queue_type,
        ]  # fmt: skip
        if rate is not None:
            cmd += ["--rate", str(rate)]
        if n is not None:
            cmd.append("--shared")
        return cmd


class RunError(Exception):
    """The run failed; the message says how (with the system's last log lines)."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class _Process:
    """A system process and its line protocol."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, run: Run, cmd: Sequence[str], log: Path) -> _Process:
        launcher = run.launcher or Launcher.default(run.base_system)
        with log.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=launcher.cwd,
                env=launcher.env(),
            )
        return cls(proc, log)

    async def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise RunError(f"no answer in {timeout:.0f}s\n{_tail(self.log)}") from None
        if not raw:
            await self.proc.wait()
            raise RunError(f"exited with code {self.proc.returncode}\n{_tail(self.log)}")
        return raw.decode().strip()

    async def result(self, timeout: float) -> Record:
        text = await self.line(timeout)
        try:
            record: Record = json.loads(text)
        except ValueError:
            raise RunError(f"expected a JSON result, got {text!r}\n{_tail(self.log)}") from None
        return record

    async def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.finish()

    async def finish(self, timeout: float = EXIT_TIMEOUT) -> None:
        """Close stdin, read stdout to its end and wait for the exit (kill after timeout)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.stdout.read(), timeout)
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        finally:
            try:
                await self.proc.stdin.wait_closed()
            except (BrokenPipeError, ConnectionResetError):
                pass


async def _feed(run: Run, url: str, log: Path, rate: float | None = None) -> None:
    proc = await _Process.start(run, run.command(url, feed=True, rate=rate), log)
    try:
        record = await proc.result(READY_TIMEOUT + run.n / 500)
    except BaseException:
        await proc.kill()
        raise
    await proc.finish()
    if record.get("status") != "ok":
        raise RunError(f"feeder failed: {record.get('error') or record}")


async def _sample_rss(pid: int, stop: asyncio.Event, interval: float = 1.0) -> list[float]:
    """RSS of pid in MB, every interval seconds until stop is set."""
    import psutil  # only the rss workload needs it

    process = psutil.Process(pid)
    samples: list[float] = []
    while True:
        try:
            samples.append(process.memory_info().rss / 2**20)
        except psutil.Error:
            return samples
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return samples
        except TimeoutError:
            pass


def rss_summary(samples: Sequence[float]) -> dict[str, float]:
    """Peak, and growth from the end of warm-up (the first fifth of the samples) to the end."""
    if not samples:
        return {}
    warm = samples[len(samples) // 5]
    return {
        "rss_peak_mb": round(max(samples), 1),
        "rss_growth_mb": round(samples[-1] - warm, 1),
        "rss_start_mb": round(warm, 1),
        "rss_samples": len(samples),
    }


async def _depth(connection: aiormq.abc.AbstractConnection, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of queue, by passive declare."""
    channel = await connection.channel()
    try:
        ok = await channel.queue_declare(queue, passive=True)
    finally:
        if not channel.is_closed:
            await channel.close()
    return int(ok.message_count or 0), int(ok.consumer_count or 0)


async def _check(connection: aiormq.abc.AbstractConnection, run: Run) -> None:
    """The broker holds what the workload should have left; raises RunError otherwise."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        ready, consumers = await _depth(connection, run.queue)
        if consumers == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    expected = run.n if run.workload == "publish" else 0
    if ready != expected:
        raise RunError(f"queue {run.queue} holds {ready} messages, expected {expected}")
    if run.workload == "chain":
        downstream, _ = await _depth(connection, run.forward_queue)
        if downstream != run.n:
            raise RunError(f"queue {run.forward_queue} holds {downstream}, expected {run.n}")


async def _delete(connection: aiormq.abc.AbstractConnection, run: Run) -> None:
    for queue in (run.queue, run.forward_queue):
        channel = await connection.channel()
        try:
            await channel.queue_delete(queue)
        except aiormq.exceptions.AMQPError:
            pass
        finally:
            if not channel.is_closed:
                await channel.close()


async def run_one(url: str, run: Run, log_dir: Path) -> Record:
    """Run it and return its record: status "ok" (checked), "n/a" or "error"."""
    log = log_dir / f"{run.workload}-{run.queue_type}-{run.system}-{run.repeat}.log"
    head: Record = {
        "system": run.system,
        "workload": run.workload,
        "queue_type": run.queue_type,
        "repeat": run.repeat,
        "n": run.n,
    }
    connection = await aiormq.connect(url)
    try:
        if run.processes > 1:
            record = await _run_shared(url, run, log, connection)
        else:
            record = await _run(url, run, log)
        if record.get("status") == "ok":
            await _check(connection, run)
        # The system's own name (`aio_workq`) must not replace the run's (`aio_workq@REV`).
        return {**head, **record, "system": run.system}
    except (RunError, aiormq.exceptions.AMQPError, OSError) as exc:
        return {**head, "status": "error", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        await _delete(connection, run)
        await connection.close()


async def _run(url: str, run: Run, log: Path) -> Record:
    proc = await _Process.start(run, run.command(url), log)
    feeder: asyncio.Task[None] | None = None
    sampler: asyncio.Task[list[float]] | None = None
    stop = asyncio.Event()
    try:
        first = await proc.line(READY_TIMEOUT)
        if first != READY:
            await proc.finish()
            answer: Record = json.loads(first)
            return answer
        if run.workload in ("consume", "chain"):
            await _feed(run, url, log)
        await proc.send(GO)
        if run.workload == "latency":
            feeder = asyncio.create_task(_feed(run, url, log, rate=run.latency_rate))
        elif run.workload == "rss":
            feeder = asyncio.create_task(_feed(run, url, log))
            sampler = asyncio.create_task(_sample_rss(proc.proc.pid, stop))
        record = await proc.result(READY_TIMEOUT + run.n / 100)
        stop.set()
        if feeder is not None:
            await feeder
        if sampler is not None:
            record.update(rss_summary(await sampler))
    except BaseException:
        stop.set()
        for task in (feeder, sampler):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*(t for t in (feeder, sampler) if t), return_exceptions=True)
        await proc.kill()
        raise
    await proc.finish()
    return record


async def _run_shared(
    url: str, run: Run, log: Path, connection: aiormq.abc.AbstractConnection
) -> Record:
    """`run.processes` processes of one system on one queue, as one run: N/K messages each to
    publish; N to consume between them, each until its N/K or, once the queue is empty, STOP
    (a process can take more than its share while another takes less). The rate is all the
    messages over the span from the first process's start to the last one's end."""
    if run.workload not in ("publish", "consume", "chain"):
        return {"status": "n/a", "reason": f"{run.processes} processes: throughput only"}
    k = run.processes
    shares = [run.n // k + (1 if i < run.n % k else 0) for i in range(k)]
    procs = [await _Process.start(run, run.command(url, n=share), log) for share in shares]
    pending: dict[asyncio.Task[Record], _Process] = {}
    try:
        for proc in procs:
            first = await proc.line(READY_TIMEOUT)
            if first != READY:
                for other in procs:
                    await other.kill()
                answer: Record = json.loads(first)
                return answer
        if run.workload != "publish":
            await _feed(run, url, log)
        for proc in procs:
            await proc.send(GO)
        for proc in procs:
            pending[asyncio.create_task(proc.result(READY_TIMEOUT + run.n / 100))] = proc
        if run.workload != "publish":
            await _stop_when_drained(connection, run, pending)
        records = [await task for task in pending]
    except BaseException:
        for task in pending:
            task.cancel()
        for proc in procs:
            await proc.kill()
        raise
    for proc in procs:
        await proc.finish()
    return _added_up(records)


async def _stop_when_drained(
    connection: aiormq.abc.AbstractConnection,
    run: Run,
    pending: dict[asyncio.Task[Record], _Process],
) -> None:
    """Once one process has its share and the queue is empty, STOP the others."""
    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    while not all(task.done() for task in pending):
        ready, _ = await _depth(connection, run.queue)
        if ready == 0:
            await asyncio.sleep(0.5)  # what was delivered but not handled yet finishes
            for task, proc in pending.items():
                if not task.done():
                    await proc.send(STOP)
            return
        await asyncio.wait(pending, timeout=0.1)


def _added_up(records: Sequence[Record]) -> Record:
    """One record for the processes of a shared run (each "ok" with `start_at`/`end_at`)."""
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        return failed[0]
    count = sum(int(r["n"]) for r in records)
    cpu = sum(float(r["cpu_seconds"]) for r in records)
    seconds = max(r["end_at"] for r in records) - min(r["start_at"] for r in records)
    timed = count - (0 if records[0]["workload"] == "publish" else 1)
    return {
        "status": "ok",
        "n": count,
        "seconds": round(seconds, 4),
        "rate": round(timed / seconds, 1),
        "cpu_seconds": round(cpu, 3),
        "cpu_us_per_msg": round(cpu / count * 1e6, 1),
        "processes": [
            {"n": r["n"], "rate": r["rate"], "cpu_us_per_msg": r["cpu_us_per_msg"]} for r in records
        ],
    }


def rotated(items: Sequence[str], by: int) -> list[str]:
    k = by % len(items) if items else 0
    return [*items[k:], *items[:k]]


async def run_all(
    url: str,
    plan: Plan,
    log_dir: Path,
    progress: Callable[[Record], None],
    launchers: Mapping[str, Launcher] | None = None,
) -> list[Record]:
    """Every workload, queue type and repeat, systems alternating; n/a ones are asked once.

    Each system's stderr goes to a log file in log_dir (which must exist). launchers: how to
    start the systems that are not `bench.systems.<name>` of the working tree.
    """
    launchers = launchers or {}
    records: list[Record] = []
    for workload in plan.workloads:
        not_applicable: set[str] = set()
        for queue_type in plan.queue_types_for(workload):
            for repeat in range(plan.repeats_for(workload)):
                for system in rotated(plan.systems, repeat):
                    if system in not_applicable:
                        continue
                    run = Run(
                        system,
                        workload,
                        queue_type,
                        repeat,
                        n=plan.messages(workload),
                        prefetch=plan.prefetch,
                        latency_rate=plan.latency_rate,
                        launcher=launchers.get(system),
                    )
                    record = await run_one(url, run, log_dir)
                    if record["status"] == "n/a":
                        not_applicable.add(system)
                    records.append(record)
                    progress(record)
    return records
