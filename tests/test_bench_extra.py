"""The stand-alone workloads can't rot (#22): large bodies, 1,000 queues, RPC, --processes, soak.

Each runs on the session's broker at a tiny size (no timing thresholds: the figures only have
to be there and the broker-side checks hold), in well under 30 s. The report side (the docs
block, the verdicts) is tested offline.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench import harness, large, processes, queues, rpc, soak


def _printed(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    out = capsys.readouterr().out.strip().splitlines()
    result: dict[str, Any] = json.loads(out[-1])
    return result


@pytest.mark.broker
@pytest.mark.timeout(90)
def test_large_bodies_run_with_rss_per_byte_in_flight(
    amqp_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--url", amqp_url, "--sizes", f"{64 * 1024},{harness.MiB}", "--total-mb", "1",
            "--systems", "aio_workq,aiormq_raw", "--no-docs"]  # fmt: skip

    assert large.main(argv) == 0

    runs = _printed(capsys)["runs"]
    assert len(runs) == 2 * 2 * 2  # sizes x systems x (publish, consume)
    for run in runs:
        assert "error" not in run, run
        assert run["rate"] > 0 and run["mb_per_s"] > 0
        assert run["inflight"] == large.inflight(run["size"])
        assert run["rss_peak_mb"] >= run["rss_base_mb"] > 0


@pytest.mark.broker
@pytest.mark.timeout(90)
def test_many_queues_in_one_process(amqp_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--url", amqp_url, "--q", "20", "--m", "12",
            "--systems", "aio_workq,aiormq_raw/shared", "--no-docs"]  # fmt: skip

    assert queues.main(argv) == 0  # the runner checks that every queue is empty afterwards

    runs = _printed(capsys)["runs"]
    assert [r["system"] for r in runs] == ["aio_workq", "aiormq_raw/shared"]
    for run in runs:
        assert run["queues"] == 20 and run["per_queue"] == 12
        assert run["startup_s"] > 0 and run["rate"] > 0
        assert run["rss_started_mb"] >= run["rss_idle_mb"] > 0


@pytest.mark.broker
@pytest.mark.timeout(90)
def test_rpc_round_trips_at_each_level(amqp_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--url", amqp_url, "--calls", "20", "--systems", "aio_workq,aiormq_raw,aiopika",
            "--no-docs"]  # fmt: skip

    assert rpc.main(argv) == 0

    runs = _printed(capsys)["runs"]
    assert [r["system"] for r in runs] == ["aio_workq", "aiormq_raw", "aiopika"]
    for run in runs:
        assert set(run["levels"]) == {"1", "10", "100"}
        for level in run["levels"].values():
            assert 0 < level["p50_ms"] <= level["p99_ms"]
            assert level["calls_per_s"] > 0


# ~14 s: `make test-slow`.
@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_worker_processes_one_and_two(amqp_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # 1,000 messages of 2 ms of CPU each: long enough for the second process to start and take
    # its share.
    argv = ["--url", amqp_url, "--m", "1000", "--processes", "1,2", "--work", "2000", "--no-docs"]

    assert processes.main(argv) == 0  # every message handled, the queue empty afterwards

    runs = _printed(capsys)["runs"]
    assert [(r["processes"], len(r["counts"])) for r in runs] == [(1, 1), (2, 2)]
    for run in runs:
        assert sum(run["counts"]) == 1000
        assert run["rate"] > 0 and run["cpu_us_per_msg"] > 0


@pytest.mark.broker
@pytest.mark.timeout(90)
def test_soak_of_a_few_thousand_messages(amqp_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert soak.main(["5000", "--url", amqp_url, "--no-docs"]) == 0  # 1: a failed check

    result = _printed(capsys)
    run = result["run"]
    assert result["problems"] == []
    assert run["worker"]["handled"] == 5000 and run["producer"]["sent"] == 5000
    assert run["producer"]["end"]["window_waiters"] == 0
    assert run["producer"]["end"]["in_flight"] == 0
    assert run["samples"] and all(len(s) == 3 for s in run["samples"])
    for name in ("producer", "worker"):
        assert run["rss"][name]["peak_mb"] > 0


# --- offline -------------------------------------------------------------------------------------


def test_the_extra_block_goes_before_the_systems_section_and_is_replaced_in_place() -> None:
    page = f"# Benchmarks\n\n## Latency\n\ntext\n\n{harness.ANCHOR}\n\nmore\n"

    once = harness.splice(page, [harness.BEGIN, "first", harness.END])
    twice = harness.splice(once, [harness.BEGIN, "second", harness.END])

    assert once.index("first") < once.index(harness.ANCHOR)
    assert "first" not in twice and twice.count(harness.BEGIN) == 1
    assert twice.replace("second", "first") == once
    assert harness.splice("# Other\n", ["x"]).endswith("\n\nx\n")


def test_the_benchmarks_page_holds_the_extra_block_as_rendered_from_the_json() -> None:
    block = "\n".join(harness.extra_sections())

    assert block, "no docs/img/bench_<name>.json: run make bench-extra"
    assert block in harness.DOC.read_text()


def test_percentiles_are_nearest_rank() -> None:
    values = [float(x) for x in range(1, 101)]

    assert harness.percentile(values, 50) == 50
    assert harness.percentile(values, 99) == 99
    assert harness.percentile([3.0], 99) == 3.0


def test_processes_rate_counts_only_while_every_process_handled() -> None:
    one = {"first": 0.0, "last": 10.0, "cpu_first": 0.0, "cpu_last": 1.0, "count": 1000,
           "series": [[0.0, 0], [5.0, 500], [10.0, 1000]]}  # fmt: skip
    late = {"first": 5.0, "last": 10.0, "cpu_first": 0.0, "cpu_last": 0.5, "count": 500,
            "series": [[5.0, 0], [10.0, 500]]}  # fmt: skip

    summary = processes.summarize([one, late], 1500)

    assert summary["rate"] == pytest.approx(200.0)  # (500 + 500) messages over 5 s
    assert summary["cpu_us_per_msg"] == pytest.approx(1.5 / 1500 * 1e6)
    assert summary["counts"] == [1000, 500]


def _soak_run(growth: float, tasks_end: int) -> dict[str, Any]:
    census = {"tasks": 6, "pending_futures": 10}
    return {
        "n": 10,
        "left_in_queues": 0,
        "rss": {name: {"growth_mb": growth} for name in ("producer", "worker")},
        "producer": {"start": census, "sent": 10,
                     "end": {**census, "tasks": tasks_end, "in_flight": 0, "window_waiters": 0}},
        "worker": {"start": census, "end": census, "handled": 10},
    }  # fmt: skip


def test_soak_verdict_names_growth_and_leaked_tasks() -> None:
    assert soak.verdict(_soak_run(growth=1.0, tasks_end=6 + soak.SLACK)) == []

    problems = soak.verdict(_soak_run(growth=6.0, tasks_end=100))

    assert any("producer RSS grew 6.0 MB" in p for p in problems)
    assert any("100 asyncio tasks at the end" in p for p in problems)


def test_soak_growth_is_from_the_end_of_warm_up() -> None:
    series = [10.0, 50.0, 30.0, 30.0, 30.0, 30.5, 31.0, 30.0, 30.0, 32.0]

    g = soak.growth(series)

    assert g == {"warm_mb": 30.0, "peak_mb": 50.0, "last_mb": 32.0, "growth_mb": 2.0,
                 "max_over_warm_mb": 2.0}  # fmt: skip
