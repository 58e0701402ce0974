"""The benchmark can't rot: aio-workq and raw aiormq run the publish and consume workloads.

A few hundred messages each, through the bench's own runner (a process per system, READY/GO,
the broker-side checks). No timing thresholds: the rates only have to be positive. The same for
the comparison with the reference commit (`python -m bench --against`), whose verdict rule and
argument checks are tested offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import reference
from bench.__main__ import REGRESSED, against, parse_args
from bench.reference import FLOOR, Reference, ReferenceError
from bench.runner import BASELINE, OURS, PAIR, REPO_ROOT, Record, Run, run_one

pytestmark = [pytest.mark.timeout(180)]

N = 300


@pytest.mark.broker
@pytest.mark.parametrize("workload", ["publish", "consume"])
@pytest.mark.parametrize("system", ["aio_workq", "aiormq_raw"])
async def test_system_runs_workload(amqp_url: str, tmp_path: Path, system: str, workload: str):
    run = Run(system, workload, "classic", repeat=0, n=N)

    record = await run_one(amqp_url, run, tmp_path)

    assert record["status"] == "ok", record
    assert record["n"] == N
    assert record["rate"] > 0
    assert record["seconds"] > 0


@pytest.mark.broker
def test_typed_bench_runs(amqp_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.typed import main

    assert main(["--url", amqp_url, "--messages", "200", "--rounds", "1"]) == 0
    assert "typed/untyped = " in capsys.readouterr().out


# --- against the reference commit ----------------------------------------------------------------


@pytest.fixture(scope="module")
def built_reference() -> Reference:
    """The reference of bench/REFERENCE, built once (about 10 s) and reused from .bench-ref/."""
    return reference.prepare(reference.default_rev())


@pytest.mark.broker
def test_against_runs_both_sides_on_one_broker(
    amqp_url: str,
    built_reference: Reference,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse_args(
        ["--against", "--url", amqp_url, "--quick", "--n", str(N)]
        + ["--workloads", "publish,consume", "--queue-types", "classic"]
    )

    status = against(args, tmp_path / "logs", results=tmp_path)

    out = capsys.readouterr().out
    assert status in (0, REGRESSED), out  # 300 messages: the verdict itself is noise
    system = built_reference.system
    assert system == f"{OURS}@{reference.default_rev()}"
    assert system in out
    saved = json.loads((tmp_path / f"against-{built_reference.label}.json").read_text())
    runs = {(r["system"], r["workload"]): r for r in saved["runs"]}
    for name in (OURS, system, BASELINE):
        for workload in ("publish", "consume"):
            assert runs[name, workload]["status"] == "ok", runs[name, workload]
            assert runs[name, workload]["n"] == N
    rows = {r["workload"]: r for r in saved["verdicts"]}
    assert set(rows) == {"publish", "consume"}
    for workload, row in rows.items():
        assert row["ours_x_baseline"] > 0 and row["reference_x_baseline"] > 0
        assert row["over"] == pytest.approx(
            runs[OURS, workload]["rate"] / runs[system, workload]["rate"]
        )
        assert row["verdict"] in (reference.PASS, reference.REGRESSION)
        assert row["ours_cpu_us"] > 0 and row["reference_cpu_us"] > 0
        assert f"| {workload} | classic | " in out


def test_the_reference_system_imports_the_reference_package(built_reference: Reference) -> None:
    """Run from the working tree, the reference's interpreter would import the working tree."""
    reference._probe(built_reference)  # as built: the reference's package, this bench
    from_working_tree = Reference(
        rev=built_reference.rev,
        commit=built_reference.commit,
        root=built_reference.root,
        harness=REPO_ROOT,
    )

    with pytest.raises(ReferenceError, match="imports aio_workq from .*, not "):
        reference._probe(from_working_tree)


def test_a_second_prepare_reuses_the_build(
    built_reference: Reference, capsys: pytest.CaptureFixture[str]
) -> None:
    again = reference.prepare(built_reference.rev)

    assert again == built_reference
    assert "reusing" in capsys.readouterr().err


def _record(system: str, workload: str, rate: float, repeat: int = 0) -> Record:
    return {
        "system": system,
        "workload": workload,
        "queue_type": "classic",
        "repeat": repeat,
        "status": "ok",
        "rate": rate,
        "cpu_us_per_msg": 1e6 / rate,
    }


def test_below_ninety_percent_of_the_reference_is_a_regression() -> None:
    ref = "aio_workq@abc"
    records = [
        _record(BASELINE, "publish", 1_000.0),
        _record(OURS, "publish", 2_700.0),
        _record(ref, "publish", 3_000.0),  # 0.90: still passes
        _record(BASELINE, "consume", 1_000.0),
        _record(OURS, "consume", 2_600.0),
        _record(ref, "consume", 3_000.0),  # 0.87
    ]

    rows = {r["workload"]: r for r in reference.verdicts(records, ref)}

    assert rows["publish"]["over"] == pytest.approx(FLOOR)
    assert rows["publish"]["verdict"] == reference.PASS
    assert rows["publish"]["ours_x_baseline"] == pytest.approx(2.7)
    assert rows["publish"]["reference_x_baseline"] == pytest.approx(3.0)
    assert rows["consume"]["verdict"] == reference.REGRESSION
    assert reference.outcome(list(rows.values())) == reference.REGRESSION


def test_medians_over_repeats_and_paired_spread() -> None:
    ref = "aio_workq@abc"
    records = [
        _record(OURS, "chain", rate, repeat=i) for i, rate in enumerate((900.0, 1_100.0, 1_000.0))
    ]
    records += [_record(ref, "chain", 1_000.0, repeat=i) for i in range(3)]
    records += [_record(BASELINE, "chain", 500.0, repeat=i) for i in range(3)]

    (row,) = reference.verdicts(records, ref)

    assert row["over"] == pytest.approx(1.0)
    assert (row["over_min"], row["over_max"]) == (pytest.approx(0.9), pytest.approx(1.1))
    assert row["ours_x_baseline"] == pytest.approx(2.0)
    assert (row["ours_cpu_us"], row["reference_cpu_us"]) == (pytest.approx(1e3), pytest.approx(1e3))


def test_the_share_of_the_ceiling_is_against_the_best_system_of_the_run() -> None:
    """#22 item 2: one process's share of the best aggregate any client reached in the run."""
    ref = "aio_workq@abc"
    records = [
        _record(BASELINE, "consume", 4_000.0),
        _record(OURS, "consume", 3_000.0),
        _record(ref, "consume", 2_000.0),
        _record("lapinmq", "consume", 3_750.0),
    ]

    (row,) = reference.verdicts(records, ref)

    assert row["ceiling"] == pytest.approx(4_000.0)
    assert row["ceiling_system"] == BASELINE
    assert row["ours_share"] == pytest.approx(0.75)
    assert row["reference_share"] == pytest.approx(0.5)
    fake = Reference("abc", "abc" * 13 + "a", Path("/nowhere"), Path("/nowhere"))
    text = reference.table([row], fake, {"n": 5_000, "repeats": 1})
    assert "share of the ceiling" in text and "0.75 (0.50)" in text


def test_a_side_without_a_successful_run_is_an_error_not_a_pass() -> None:
    ref = "aio_workq@abc"
    failed = {**_record(ref, "publish", 1.0), "status": "error", "error": "boom"}
    records = [_record(BASELINE, "publish", 1_000.0), _record(OURS, "publish", 2_000.0), failed]

    rows = reference.verdicts(records, ref)

    assert rows[0]["verdict"] == reference.MISSING
    assert reference.outcome(rows) == reference.MISSING


def test_the_default_reference_comes_from_bench_reference(tmp_path: Path) -> None:
    assert reference.default_rev() == (REPO_ROOT / "bench" / "REFERENCE").read_text().split()[0]
    named = tmp_path / "REFERENCE"
    named.write_text("# a comment first\n  0123abc  # the commit\n")
    assert reference.default_rev(named) == "0123abc"
    named.write_text("# nothing but comments\n")
    with pytest.raises(ReferenceError, match="names no commit"):
        reference.default_rev(named)


def test_an_unknown_revision_is_named_in_the_error() -> None:
    with pytest.raises(ReferenceError, match="'no-such-rev-xyz': no such commit"):
        reference.resolve("no-such-rev-xyz")


def test_against_takes_the_throughput_workloads_only(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--against"])
    assert args.against == "" and args.workloads == reference.WORKLOADS
    assert parse_args(["--against", "v1"]).against == "v1"

    with pytest.raises(SystemExit):
        parse_args(["--against", "--workloads", "publish,latency"])
    assert "not latency" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--against", "--systems", "celery"])
    assert "drop --systems" in capsys.readouterr().err


def test_the_benchmarks_page_has_the_reference_section_as_generated() -> None:
    from bench.report import against_reference

    section = "\n".join(against_reference(reference.default_rev()))
    assert section in (REPO_ROOT / "docs" / "benchmarks.md").read_text()


def test_a_reference_run_has_a_queue_name_every_commit_accepts() -> None:
    """`aio_workq@REV` is the system's name; newer commits check queue names (no '@')."""
    from aio_workq import Queue

    run = Run("aio_workq@b28dd61", "chain", "classic", repeat=0, n=N)
    Queue(run.queue)
    Queue(run.forward_queue)
    assert "b28dd61" in run.queue


@pytest.mark.broker
@pytest.mark.parametrize("workload", ["publish", "consume", "chain"])
async def test_two_processes_share_one_queue_as_one_run(
    amqp_url: str, tmp_path: Path, workload: str
) -> None:
    # The broker's ceiling counts aio-workq in two processes too (#22): one run, N messages
    # between them, checked by the broker like any run (all published, or the queue empty).
    run = Run(PAIR, workload, "classic", repeat=0, n=N)
    assert run.processes == 2 and run.base_system == OURS

    record = await run_one(amqp_url, run, tmp_path)

    assert record["status"] == "ok", record
    assert record["system"] == PAIR
    # Consuming, what a process finishes after its share (while it closes) is not counted.
    assert record["n"] == N if workload == "publish" else N // 2 < record["n"] <= N
    assert [p["n"] > 0 for p in record["processes"]] == [True, True]
    assert record["rate"] > 0 and record["cpu_us_per_msg"] > 0


@pytest.mark.broker
def test_the_channels_bench_runs_every_layout(amqp_url: str, capsys: pytest.CaptureFixture[str]):
    from bench.channels import LAYOUTS, main

    assert main(["--n", "200", "--repeats", "1", "--url", amqp_url]) == 0
    out = capsys.readouterr().out
    for layout in LAYOUTS:
        assert f"  {layout} " in out
