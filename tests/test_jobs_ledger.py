"""The jobs ledger (scripts/jobs_ledger.py) on a small plan: 200 jobs in groups of 20 with
callbacks on 2 worker processes, one killed with SIGKILL; 10 queued and 3 running jobs
cancelled; a rate limit measured. `make jobs-ledger` runs the full plan (2,000 jobs, 3
processes, a kill every 10 s, 100 + 20 cancels).

The full plan once found a race (the last test here reproduces it offline): the `queued`
write of `Task.enqueue()` landed after the worker's claim had written `running`, and
overwrote it, so `cancel()` took the queued path while the job ran on. The enqueue's record
never overwrites a claim now; both plans enqueue the jobs they cancel while running with no
delay (`--hold-delay 0`), so a worker picks them up within milliseconds of the enqueue.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aio_workq.jobs import JobState, JobStore, MemoryStore, SQLiteStore, Write
from scripts.jobs_ledger import Plan, run

SMALL = Plan(
    jobs=200, group_size=20, processes=2, kill_every=3.0, max_kills=1, work=0.3,
    queued_cancels=10, running_cancels=3, hold=6.0, hold_delay=0.0, rate="20/s", rate_jobs=60,
    timeout=120,
)  # fmt: skip


@pytest.mark.postgres
@pytest.mark.broker
@pytest.mark.timeout(240)
async def test_the_small_ledger_is_right(
    amqp_url: str, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await run(amqp_url, postgres_dsn, SMALL, say=lambda line: None)
    with capsys.disabled():
        print("\n" + "\n".join(result.lines()))  # noqa: T201 - the figures the test is about
    assert result.problems == []
    assert result.kills == 1
    assert (
        result.jobs_enqueued == 200 + 10 + 13 + 1 + 60
    )  # members, callbacks, cancels, mark, ticks
    assert result.statuses == {"succeeded": 196 + 10 + 1 + 60, "failed": 4, "cancelled": 13}
    assert result.callbacks == result.callbacks_distinct == 10
    assert result.member_runs >= result.member_runs_expected
    assert (result.queued_ran, result.running_completed_after_cancel) == (0, 0)
    assert 20 * 0.85 <= result.rate_measured <= 20 * 1.1, result.rate_measured


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_the_enqueue_write_landing_after_the_claim_keeps_the_job_running(
    kind: str, tmp_path: Path
) -> None:
    store: JobStore = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "jobs.db")
    try:
        t = time.time()
        # The worker got the delivery first: its claim (attempt 1, as for a first delivery).
        claim = Write(job_id="j", task="t", queue="q", state=JobState.RUNNING, at=t, claim=True)
        assert await store.record([claim]) == [True]
        # Then Task.enqueue() records the job, after the broker's confirm: the same Write.
        await store.record([Write(job_id="j", task="t", queue="q", state=JobState.QUEUED, at=t)])
        status = await store.cancel("j", now=t + 0.01)
        assert status is not None
        assert (status.state, status.cancel_requested) == (JobState.RUNNING, True)
    finally:
        await store.close()
