"""Proof by ledger for `aio_workq.jobs` on PostgreSQL (issue #23, item 7).

`python -m scripts.jobs_ledger` (`make jobs-ledger`, a few minutes) starts a RabbitMQ node and a
PostgreSQL node of its own (or takes `--url` / `--dsn`), then:

1. **Groups under kill -9.** `--jobs` member jobs in groups of `--group-size`, each group with a
   callback, run by `aio-workq worker scripts.jobs_ledger:workers --processes N`; one worker
   process is killed with SIGKILL every `--kill-every` seconds while they run (the supervisor
   restarts it). Every member run and every callback run appends a row to the ledger table
   (`<schema>.ledger`, append-only, one row per run, with the pid), written by the tasks
   themselves. One member in 50 raises, so it is retried once and fails for good.
2. **Cancellation.** `--running-cancels` long jobs are started, then cancelled while they run;
   `--queued-cancels` jobs are enqueued on a queue nobody consumes yet and cancelled there;
   a worker then drains that queue. Checked: no queued job ever ran, no running job finished
   after its `cancel()` returned, every one of them is recorded `cancelled`.
3. **Rate limit.** `--rate-jobs` jobs of a task limited to `--rate` on the same processes; the
   start times in the ledger give the rate measured over the steady part.

Then it counts, from the ledger and the job table: final statuses (each as expected: the
failing members `failed`, the others and every callback `succeeded`), callback runs (each
group's exactly once, with its members' outcomes; a second run of a callback is allowed only if
the process of the first run was killed, at-least-once like any job), member runs against
jobs (duplicates after kills allowed), and the cancellations. It prints `LEDGER` lines and a
Markdown table, and exits 1 if a check failed. `tests/test_jobs_ledger.py` runs a small plan.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from aio_workq import Producer, RetryPolicy, Worker
from aio_workq.jobs import GroupResult, JobState, Tasks, current_job, group
from aio_workq.jobs.postgres import PostgresStore, migrate

FAIL_EVERY, FAIL_AT = 50, 7  # member n fails (for good, after its retry) iff n % 50 == 7
RETRY = RetryPolicy(max_attempts=2, initial_delay=0.2, max_delay=0.2)
ENV_DSN, ENV_SCHEMA, ENV_PREFIX = "WORKQ_LEDGER_DSN", "WORKQ_LEDGER_SCHEMA", "WORKQ_LEDGER_PREFIX"
ENV_WORK, ENV_HOLD, ENV_RATE = "WORKQ_LEDGER_WORK", "WORKQ_LEDGER_HOLD", "WORKQ_LEDGER_RATE"


def fails(n: int) -> bool:
    return n % FAIL_EVERY == FAIL_AT


# --- the tasks (run in the worker processes; the orchestrator declares the same to enqueue) ---


class Notes:
    """Appends the ledger rows of this process (a small pool, opened on first use)."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.schema = schema
        self._pool = AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False)
        self._lock = asyncio.Lock()
        self._open = False

    async def add(self, kind: str, detail: str = "", at: float | None = None) -> None:
        running = current_job()
        job_id = running.job_id if running is not None else "?"
        if not self._open:
            async with self._lock:
                if not self._open:
                    await self._pool.open()
                    self._open = True
        async with self._pool.connection() as conn:
            await conn.execute(
                f"INSERT INTO {self.schema}.ledger (job_id, kind, pid, at, detail) "
                "VALUES (%s, %s, %s, %s, %s)",
                (job_id, kind, os.getpid(), time.time() if at is None else at, detail),
            )

    async def close(self) -> None:
        if self._open:
            await self._pool.close()


@dataclass
class App:
    """The registry and its tasks, on queues named after `prefix`."""

    tasks: Tasks
    prefix: str
    member: Any
    report: Any
    hold: Any
    parked: Any
    mark: Any
    tick: Any

    @property
    def busy_queues(self) -> list[str]:
        """The queues of the worker processes (the parked one is drained later, apart)."""
        return [f"{self.prefix}.{q}" for q in ("members", "callbacks", "hold", "rate")]

    @property
    def parked_queue(self) -> str:
        return f"{self.prefix}.parked"


def build(
    tasks: Tasks, notes: Notes | None, prefix: str, *, work: float, hold: float, rate: str
) -> App:
    """Declare the ledger's tasks in `tasks` (notes None: the enqueueing side, never run)."""

    async def note(kind: str, detail: str = "", at: float | None = None) -> None:
        assert notes is not None, "the ledger tasks run in processes that have notes"
        await notes.add(kind, detail, at)

    @tasks.task(queue=f"{prefix}.members", name="ledger.member")
    async def member(n: int) -> int:
        await note("member")
        await asyncio.sleep(work)
        if fails(n):
            raise ValueError(f"member {n} fails")
        return n

    @tasks.task(queue=f"{prefix}.callbacks", name="ledger.report")
    async def report(results: list[GroupResult], group: int) -> int:
        ok = sum(1 for r in results if r.ok)
        await note("callback", f"{group}:{ok}/{len(results)}")
        return ok

    @tasks.task(queue=f"{prefix}.hold", name="ledger.hold")
    async def held(n: int) -> int:
        await note("hold-start")
        await asyncio.sleep(hold)
        await note("hold-done")
        return n

    @tasks.task(queue=f"{prefix}.parked", name="ledger.parked")
    async def parked(n: int) -> int:
        await note("parked-run")
        return n

    @tasks.task(queue=f"{prefix}.parked", name="ledger.mark")
    async def mark() -> None:
        await note("mark")

    @tasks.task(queue=f"{prefix}.rate", name="ledger.tick", rate_limit=rate)
    async def tick(n: int) -> None:
        await note("tick", at=time.time())

    return App(tasks, prefix, member, report, held, parked, mark, tick)


def workers() -> list[Worker]:
    """The factory of `aio-workq worker scripts.jobs_ledger:workers` (configured by env)."""
    dsn, schema = os.environ[ENV_DSN], os.environ[ENV_SCHEMA]
    store = PostgresStore(dsn, schema=schema, max_size=4, timeout=30)
    app = build(
        Tasks(store=store), Notes(dsn, schema), os.environ[ENV_PREFIX],
        work=float(os.environ[ENV_WORK]), hold=float(os.environ[ENV_HOLD]),
        rate=os.environ[ENV_RATE],
    )  # fmt: skip
    return app.tasks.workers(concurrency=8, retry=RETRY, queues=app.busy_queues)


# --- the orchestrator ---


@dataclass(frozen=True)
class Plan:
    jobs: int = 2000
    group_size: int = 20
    processes: int = 3
    kill_every: float = 10.0
    max_kills: int | None = None
    work: float = 0.5  # seconds each member sleeps (so the kills land on running jobs)
    queued_cancels: int = 100
    running_cancels: int = 20
    hold: float = 20.0  # seconds a held job would take if nobody cancelled it
    hold_delay: float = 0.0  # enqueue the held jobs with this delay (see --hold-delay)
    rate: str = "20/s"
    rate_jobs: int = 200
    timeout: float = 600.0

    @property
    def groups(self) -> int:
        return self.jobs // self.group_size


@dataclass
class Result:
    """The ledger's figures; `problems` lists every check that failed."""

    plan: dict[str, Any]
    jobs_enqueued: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    wrong_statuses: int = 0
    member_jobs: int = 0
    member_runs: int = 0
    member_runs_expected: int = 0  # one per member, plus the retry of each failing one
    members_never_run: int = 0
    callbacks: int = 0
    callback_runs: int = 0
    callbacks_distinct: int = 0
    callback_extra_runs_after_kill: int = 0
    callback_wrong_results: int = 0
    kills: int = 0
    queued_cancelled: int = 0
    queued_ran: int = 0
    running_cancelled: int = 0
    running_completed_after_cancel: int = 0
    running_completed_at_all: int = 0
    rate_limit: str = ""
    rate_measured: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        s = self
        return [
            f"LEDGER jobs: enqueued={s.jobs_enqueued} statuses={s.statuses} "
            f"wrong={s.wrong_statuses}",
            f"LEDGER members: jobs={s.member_jobs} runs={s.member_runs} "
            f"expected_without_kills={s.member_runs_expected} never_run={s.members_never_run} "
            f"kills={s.kills}",
            f"LEDGER callbacks: groups={s.callbacks} distinct_run={s.callbacks_distinct} "
            f"runs={s.callback_runs} extra_after_kill={s.callback_extra_runs_after_kill} "
            f"wrong_results={s.callback_wrong_results}",
            f"LEDGER cancels: queued={s.queued_cancelled} queued_ran={s.queued_ran} "
            f"running={s.running_cancelled} completed_after_cancel="
            f"{s.running_completed_after_cancel} completed_at_all={s.running_completed_at_all}",
            f"LEDGER rate: limit={s.rate_limit} measured={s.rate_measured:.2f}/s",
            f"LEDGER seconds: {s.seconds}",
            f"LEDGER problems: {s.problems or 'none'}",
        ]

    def table(self) -> str:
        s = self
        rows = [
            ("jobs enqueued", f"{s.jobs_enqueued:,}"),
            ("final statuses", ", ".join(f"{k} {v:,}" for k, v in sorted(s.statuses.items()))),
            ("final status not the expected one", str(s.wrong_statuses)),
            ("worker processes killed (SIGKILL)", str(s.kills)),
            ("member jobs / member runs", f"{s.member_jobs:,} / {s.member_runs:,} "
             f"({s.member_runs_expected:,} without kills: one each, two for the "
             f"{s.member_runs_expected - s.member_jobs} failing ones)"),
            ("callbacks: groups / run / runs", f"{s.callbacks} / {s.callbacks_distinct} / "
             f"{s.callback_runs} ({s.callback_extra_runs_after_kill} re-run after a kill)"),
            ("callbacks with wrong member outcomes", str(s.callback_wrong_results)),
            ("queued jobs cancelled / ran", f"{s.queued_cancelled} / {s.queued_ran}"),
            ("running jobs cancelled / completed after cancel() returned",
             f"{s.running_cancelled} / {s.running_completed_after_cancel}"),
            (f"rate limit {s.rate_limit}, measured (steady part)", f"{s.rate_measured:.2f}/s"),
        ]  # fmt: skip
        return "\n".join(["| | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def steady_rate(times: list[float], trim: float = 0.15) -> float:
    """Starts a second over the steady part: the first and last `trim` of them dropped."""
    times = sorted(times)
    cut = int(len(times) * trim)
    middle = times[cut : len(times) - cut]
    if len(middle) < 2 or middle[-1] <= middle[0]:
        return 0.0
    return (len(middle) - 1) / (middle[-1] - middle[0])


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _start_time(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 1 << 62


class Supervisor:
    """`python -m aio_workq worker scripts.jobs_ledger:workers --processes N`, its output
    drained and kept."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.err: list[str] = []
        self.out: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(proc.stdout, self.out)),
            asyncio.create_task(self._read(proc.stderr, self.err)),
        ]

    @staticmethod
    async def _read(stream: asyncio.StreamReader, into: list[str]) -> None:
        while line := await stream.readline():
            into.append(line.decode(errors="replace").rstrip("\n"))

    @classmethod
    async def start(cls, processes: int, env: dict[str, str]) -> Supervisor:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aio_workq", "worker", "scripts.jobs_ledger:workers",
            "--processes", str(processes),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        return cls(proc)

    def consuming(self) -> int:
        return sum("worker consuming" in line for line in self.err)

    def oldest_child(self) -> int | None:
        children = _children(self.proc.pid)
        return min(children, key=_start_time) if children else None

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(30):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)


async def until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    """Poll `check()` (a coroutine function) until truthy; AssertionError after `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            while not (value := await check()):  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(every)  # the condition lives in other processes' tables
            return value
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None


async def run(url: str, dsn: str, plan: Plan, *, say: Callable[[str], None] = print) -> Result:
    """The whole ledger on a broker and a PostgreSQL server; returns the figures."""
    schema = f"ledger_{uuid.uuid4().hex[:10]}"
    prefix = f"ledger.{uuid.uuid4().hex[:6]}"
    result = Result(plan=asdict(plan), rate_limit=plan.rate)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        await migrate(db, schema=schema)
        await db.execute(
            f"CREATE TABLE {schema}.ledger (seq bigserial PRIMARY KEY, job_id text NOT NULL, "
            "kind text NOT NULL, pid integer NOT NULL, at double precision NOT NULL, "
            "detail text NOT NULL)"
        )
        try:
            await _run(url, dsn, schema, prefix, plan, result, db, say)
        finally:
            await db.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return result


async def _rows(db: psycopg.AsyncConnection[Any], sql: str, *args: Any) -> list[tuple[Any, ...]]:
    cursor = await db.execute(sql, args or None)
    return await cursor.fetchall()


async def _run(
    url: str, dsn: str, schema: str, prefix: str, plan: Plan, result: Result,
    db: psycopg.AsyncConnection[Any], say: Callable[[str], None],
) -> None:  # fmt: skip
    env = {
        **os.environ, "AMQP_URL": url, "PYTHONUNBUFFERED": "1", ENV_DSN: dsn,
        ENV_SCHEMA: schema, ENV_PREFIX: prefix, ENV_WORK: str(plan.work),
        ENV_HOLD: str(plan.hold), ENV_RATE: plan.rate,
    }  # fmt: skip
    t_start = time.monotonic()
    store = PostgresStore(dsn, schema=schema, max_size=8, timeout=30)
    notes = Notes(dsn, schema)
    sup = await Supervisor.start(plan.processes, env)
    expected: dict[str, str] = {}
    kills: list[tuple[int, float]] = []
    try:
        async with Producer(url) as producer:
            app = build(
                Tasks(producer=producer, store=store), notes, prefix, work=plan.work,
                hold=plan.hold, rate=plan.rate,
            )  # fmt: skip
            wanted = plan.processes * (len(app.busy_queues) + 1)

            async def started() -> bool:
                if sup.proc.returncode is not None:
                    raise AssertionError(f"the workers exited: {sup.err[-20:]}")
                return sup.consuming() >= wanted

            await until("the worker processes consuming", started, 120)
            result.seconds["workers_up"] = round(time.monotonic() - t_start, 1)
            say(f"workers up after {result.seconds['workers_up']} s; phase 1: groups and kills")

            # 1. groups under kill -9
            t1 = time.monotonic()
            done = asyncio.Event()

            async def killer() -> None:
                async def first_member() -> bool:
                    rows = await _rows(db, f"SELECT 1 FROM {schema}.ledger LIMIT 1")
                    return bool(rows)

                await until("a first member run", first_member, 120)
                while not done.is_set() and (plan.max_kills is None or len(kills) < plan.max_kills):
                    try:
                        async with asyncio.timeout(plan.kill_every):
                            await done.wait()
                        return
                    except TimeoutError:
                        pass
                    pid = sup.oldest_child()
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        kills.append((pid, time.time()))
                        say(f"killed worker process {pid} (kill {len(kills)})")

            kill_task = asyncio.create_task(killer())
            handles = []
            sem = asyncio.Semaphore(8)

            async def enqueue(g: int) -> Any:
                ns = range(g * plan.group_size, (g + 1) * plan.group_size)
                async with sem:
                    return await group(
                        [app.member.s(n) for n in ns], then=app.report.partial(group=g)
                    ).enqueue()

            handles = await asyncio.gather(*(enqueue(g) for g in range(plan.groups)))
            member_n: dict[str, int] = {}
            callback_group: dict[str, int] = {}
            for g, handle in enumerate(handles):
                for i, h in enumerate(handle.members):
                    n = g * plan.group_size + i
                    member_n[h.job_id] = n
                    expected[h.job_id] = "failed" if fails(n) else "succeeded"
                assert handle.callback is not None
                callback_group[handle.callback.job_id] = g
                expected[handle.callback.job_id] = "succeeded"
            say(f"{len(handles)} groups enqueued in {time.monotonic() - t1:.1f} s")

            callback_ids = list(callback_group)

            async def callbacks_done() -> bool:
                rows = await _rows(
                    db, f"SELECT count(*) FROM {schema}.workq_jobs WHERE job_id = ANY(%s) "
                    "AND state = 'succeeded'", callback_ids,
                )  # fmt: skip
                return int(rows[0][0]) == len(callback_ids)

            try:
                await until("every group's callback succeeded", callbacks_done, plan.timeout)
            finally:
                done.set()
                await kill_task
            result.kills = len(kills)

            async def restarted() -> bool:  # every process killed is consuming again
                per_process = len(app.busy_queues) + 1
                return sup.consuming() >= per_process * (plan.processes + len(kills))

            # else the jobs of phase 2 meet fewer processes than planned, and the held ones
            # more than the handlers there to run them at once
            await until("the killed worker processes back", restarted, 120)
            result.seconds["groups"] = round(time.monotonic() - t1, 1)
            say(f"phase 1 done in {result.seconds['groups']} s with {len(kills)} kills")

            # 2. cancellation: running ones, then queued ones on a queue nobody consumes yet
            t2 = time.monotonic()
            hold_task = app.hold.options(delay=plan.hold_delay) if plan.hold_delay else app.hold
            held = [await hold_task.enqueue(n) for n in range(plan.running_cancels)]
            held_ids = [h.job_id for h in held]

            async def all_running() -> bool:
                rows = await _rows(
                    db, f"SELECT count(DISTINCT job_id) FROM {schema}.ledger WHERE "
                    "kind = 'hold-start' AND job_id = ANY(%s)", held_ids,
                )  # fmt: skip
                return int(rows[0][0]) == len(held_ids)

            await until("the held jobs running", all_running, 120)
            parked = [await app.parked.enqueue(n) for n in range(plan.queued_cancels)]
            for h in parked:
                status = await h.cancel()
                expected[h.job_id] = "cancelled"
                if status.state is not JobState.CANCELLED:
                    result.problems.append(f"queued {h.job_id}: cancel() said {status.state}")
            result.queued_cancelled = len(parked)
            returned: dict[str, float] = {}
            for h in held:
                status = await h.cancel()
                returned[h.job_id] = time.time()
                expected[h.job_id] = "cancelled"
                if status.state is not JobState.RUNNING:
                    result.problems.append(f"running {h.job_id}: cancel() said {status.state}")
            result.running_cancelled = len(held)
            for h in held:
                await h.wait(timeout=60)
            say(f"{len(held)} running jobs cancelled; draining the parked queue")
            # Now a worker for the parked queue (one at a time, prefetch 1): the mark behind
            # the cancelled jobs runs only once each of them was delivered and settled.
            drain = app.tasks.workers(
                url, concurrency=1, prefetch=1, retry=RETRY, queues=[app.parked_queue]
            )
            for worker in drain:
                await worker.start()
            try:
                mark = await app.mark.enqueue()
                expected[mark.job_id] = "succeeded"
                await mark.wait(timeout=120)
            finally:
                for worker in drain:
                    await worker.stop(timeout=5)
            result.seconds["cancels"] = round(time.monotonic() - t2, 1)

            # 3. the rate limit, on the same processes
            t3 = time.monotonic()
            ticks = await asyncio.gather(*(app.tick.enqueue(n) for n in range(plan.rate_jobs)))
            tick_ids = [h.job_id for h in ticks]
            for h in ticks:
                expected[h.job_id] = "succeeded"

            async def ticked() -> bool:
                rows = await _rows(
                    db, f"SELECT count(*) FROM {schema}.workq_jobs WHERE job_id = ANY(%s) "
                    "AND state = 'succeeded'", tick_ids,
                )  # fmt: skip
                return int(rows[0][0]) == len(tick_ids)

            await until("the rate-limited jobs", ticked, plan.rate_jobs / 5 + 120)
            result.seconds["rate"] = round(time.monotonic() - t3, 1)
            # A held job would have finished `hold` s after it started: wait past that before
            # counting completions.
            last_start = (await _rows(
                db, f"SELECT max(at) FROM {schema}.ledger WHERE kind = 'hold-start'"
            ))[0][0]  # fmt: skip
            left = last_start + plan.hold + 2 - time.time()
            if left > 0:
                say(f"waiting {left:.0f} s past the held jobs' would-be end")
                await asyncio.sleep(left)  # the point is that nothing happens meanwhile
    finally:
        await sup.stop()
        await notes.close()
        await store.close()
    result.seconds["total"] = round(time.monotonic() - t_start, 1)
    await _count(db, schema, result, expected, member_n, callback_group, held_ids,
                 [h.job_id for h in parked], returned, tick_ids, kills, plan)  # fmt: skip


async def _count(
    db: psycopg.AsyncConnection[Any], schema: str, result: Result, expected: dict[str, str],
    member_n: dict[str, int], callback_group: dict[str, int], held_ids: list[str],
    parked_ids: list[str], returned: dict[str, float], tick_ids: list[str],
    kills: list[tuple[int, float]], plan: Plan,
) -> None:  # fmt: skip
    states = dict(await _rows(db, f"SELECT job_id, state FROM {schema}.workq_jobs"))
    result.jobs_enqueued = len(expected)
    result.statuses = dict(Counter(states.get(j, "absent") for j in expected))
    wrong = [j for j, want in expected.items() if states.get(j) != want]
    result.wrong_statuses = len(wrong)
    if wrong:
        result.problems.append(
            f"{len(wrong)} wrong final statuses, e.g. "
            + ", ".join(f"{j}: {states.get(j)} (want {expected[j]})" for j in wrong[:5])
        )
    ledger = await _rows(
        db, f"SELECT job_id, kind, pid, at, detail FROM {schema}.ledger ORDER BY seq"
    )
    runs: dict[str, list[tuple[Any, ...]]] = {}
    for row in ledger:
        runs.setdefault(row[0], []).append(row)
    # members
    result.member_jobs = len(member_n)
    result.member_runs = sum(len(runs.get(j, [])) for j in member_n)
    result.member_runs_expected = sum(2 if fails(n) else 1 for n in member_n.values())
    result.members_never_run = sum(1 for j in member_n if j not in runs)
    if result.members_never_run:
        result.problems.append(f"{result.members_never_run} members never ran")
    # callbacks: each once; a further run only after the process of the earlier one was killed
    killed_at = dict(kills)
    result.callbacks = len(callback_group)
    for job_id, g in callback_group.items():
        rows = runs.get(job_id, [])
        result.callback_runs += len(rows)
        if rows:
            result.callbacks_distinct += 1
        for earlier in rows[:-1]:
            pid, at = earlier[2], earlier[3]
            if pid in killed_at and killed_at[pid] >= at:
                result.callback_extra_runs_after_kill += 1
            else:
                result.problems.append(f"callback {job_id} ran again without a kill: {rows}")
        ns = range(g * plan.group_size, (g + 1) * plan.group_size)
        want = f"{g}:{sum(1 for n in ns if not fails(n))}/{plan.group_size}"
        if any(r[4] != want for r in rows):
            result.callback_wrong_results += 1
            result.problems.append(f"callback {job_id} saw {[r[4] for r in rows]}, want {want}")
    if result.callbacks_distinct != result.callbacks:
        result.problems.append(
            f"{result.callbacks - result.callbacks_distinct} callbacks never ran"
        )
    groups = await _rows(
        db, f"SELECT count(*) FROM {schema}.workq_groups WHERE remaining = 0 AND "
        "callback_claimed AND callback_published",
    )  # fmt: skip
    if int(groups[0][0]) != result.callbacks:
        result.problems.append(
            f"groups claimed and published: {groups[0][0]} of {result.callbacks}"
        )
    # cancellations
    result.queued_ran = sum(1 for j in parked_ids if j in runs)
    if result.queued_ran:
        result.problems.append(f"{result.queued_ran} cancelled queued jobs ran")
    for job_id in held_ids:
        finished = [r for r in runs.get(job_id, []) if r[1] == "hold-done"]
        result.running_completed_at_all += bool(finished)
        if any(r[3] > returned[job_id] for r in finished):
            result.running_completed_after_cancel += 1
    if result.running_completed_after_cancel:
        result.problems.append(
            f"{result.running_completed_after_cancel} running jobs completed after cancel()"
        )
    # the rate limit
    starts = [r[3] for j in tick_ids for r in runs.get(j, []) if r[1] == "tick"]
    result.rate_measured = round(steady_rate(starts), 2)


def main(argv: list[str] | None = None) -> int:
    from scripts.broker import LocalBroker, ensure_installed
    from scripts.postgres import LocalPostgres

    parser = argparse.ArgumentParser(
        prog="python -m scripts.jobs_ledger",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Plan()
    parser.add_argument("--jobs", type=int, default=d.jobs)
    parser.add_argument("--group-size", type=int, default=d.group_size)
    parser.add_argument("--processes", type=int, default=d.processes)
    parser.add_argument("--kill-every", type=float, default=d.kill_every)
    parser.add_argument("--work", type=float, default=d.work, help="seconds a member takes")
    parser.add_argument("--queued-cancels", type=int, default=d.queued_cancels)
    parser.add_argument("--running-cancels", type=int, default=d.running_cancels)
    parser.add_argument(
        "--hold-delay", type=float, default=d.hold_delay,
        help="enqueue the jobs cancelled while running with this delay (s), so that the "
        "enqueue's `queued` write lands before the worker's claim",
    )  # fmt: skip
    parser.add_argument("--rate", default=d.rate)
    parser.add_argument("--rate-jobs", type=int, default=d.rate_jobs)
    parser.add_argument("--url", default=None, help="broker URL (default: a node of its own)")
    parser.add_argument("--dsn", default=None, help="PostgreSQL DSN (default: a node of its own)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.jobs % args.group_size:
        parser.error("--jobs must be a multiple of --group-size")
    plan = Plan(
        jobs=args.jobs, group_size=args.group_size, processes=args.processes,
        kill_every=args.kill_every, work=args.work, queued_cancels=args.queued_cancels,
        running_cancels=args.running_cancels, hold_delay=args.hold_delay, rate=args.rate,
        rate_jobs=args.rate_jobs,
    )  # fmt: skip
    broker = postgres = None
    base = Path(tempfile.mkdtemp(prefix="aio-workq-jobs-ledger-"))
    try:
        if args.url is None:
            ensure_installed()
            broker = LocalBroker(base / "broker", name="jobsledger")
            broker.start()
        if args.dsn is None:
            postgres = LocalPostgres(Path(tempfile.mkdtemp(prefix="aio-workq-ledger-pg-")))
            postgres.start()
        url = args.url or (broker.url if broker else "")
        dsn = args.dsn or (postgres.dsn if postgres else "")
        result = asyncio.run(run(url, dsn, plan))
    finally:
        if broker is not None:
            broker.close()
        if postgres is not None:
            postgres.close()
            shutil.rmtree(postgres.base_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    print("\n".join(result.lines()))
    print(result.table())
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=1) + "\n")
    return 1 if result.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
