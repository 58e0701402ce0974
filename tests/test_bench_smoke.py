"""The benchmark can't rot: aio-workq and raw aiormq run the publish and consume workloads.

A few hundred messages each, through the bench's own runner (a process per system, READY/GO,
the broker-side checks). No timing thresholds: the rates only have to be positive.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.runner import Run, run_one

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

N = 300


@pytest.mark.parametrize("workload", ["publish", "consume"])
@pytest.mark.parametrize("system", ["aio_workq", "aiormq_raw"])
async def test_system_runs_workload(amqp_url: str, tmp_path: Path, system: str, workload: str):
    run = Run(system, workload, "classic", repeat=0, n=N)

    record = await run_one(amqp_url, run, tmp_path)

    assert record["status"] == "ok", record
    assert record["n"] == N
    assert record["rate"] > 0
    assert record["seconds"] > 0


def test_typed_bench_runs(amqp_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.typed import main

    assert main(["--url", amqp_url, "--messages", "200", "--rounds", "1"]) == 0
    assert "typed/untyped = " in capsys.readouterr().out
