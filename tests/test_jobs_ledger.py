"""The jobs ledger (scripts/jobs_ledger.py) on a small plan: 200 jobs in groups of 20 with
callbacks on 2 worker processes, one killed with SIGKILL; 10 queued and 3 running jobs
cancelled; a rate limit measured. `make jobs-ledger` runs the full plan (2,000 jobs, 3
processes, a kill every 10 s, 100 + 20 cancels)."""

from __future__ import annotations

import pytest

from scripts.jobs_ledger import Plan, run

pytestmark = [pytest.mark.postgres, pytest.mark.broker]

SMALL = Plan(
    jobs=200, group_size=20, processes=2, kill_every=3.0, max_kills=1, work=0.3,
    queued_cancels=10, running_cancels=3, hold=6.0, rate="20/s", rate_jobs=60, timeout=120,
)  # fmt: skip


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
