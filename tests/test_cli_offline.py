"""The `aio-workq` command's parts that need no broker: targets, health rule, grouping."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from aio_workq import Worker
from aio_workq.admin.queues import RawQueue as _Raw
from aio_workq.admin.queues import default_management_url, group_rows
from aio_workq.cli._errors import TargetError
from aio_workq.cli._health import Debounce
from aio_workq.cli._run import HealthOptions
from aio_workq.cli._supervisor import RestartPolicy, Supervisor
from aio_workq.cli._target import WorkerOptions, build_workers, import_target
from tests import cli_app

pytestmark = pytest.mark.cli

URL = "amqp://guest:guest@127.0.0.1:5672/"


def test_import_target_names_what_is_wrong() -> None:
    assert import_target("tests.cli_app:slow") is cli_app.slow
    with pytest.raises(TargetError, match="is not MODULE:ATTR"):
        import_target("tests.cli_app")
    with pytest.raises(TargetError, match="has no attribute 'nope'"):
        import_target("tests.cli_app:nope")
    with pytest.raises(TargetError, match="cannot import 'tests.missing'"):
        import_target("tests.missing:x")


async def test_build_workers_from_each_kind_of_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLI_TEST_QUEUE", "q1")
    [from_factory] = await build_workers(cli_app.slow_workers, WorkerOptions("m:f"))
    assert from_factory.queue_name == "q1"
    options = WorkerOptions("m:h", queues=("q2",), concurrency=3, url=URL)
    [from_handler] = await build_workers(cli_app.slow, options)
    assert from_handler.queue_name == "q2" and "concurrency=3" in repr(from_handler)
    worker = Worker(URL, queue="q3", handler=cli_app.quick)
    assert await build_workers(worker, WorkerOptions("m:w")) == [worker]
    assert await build_workers([worker, worker], WorkerOptions("m:l")) == [worker, worker]

    async def async_factory() -> Worker:
        return worker

    assert await build_workers(async_factory, WorkerOptions("m:a")) == [worker]


async def test_build_workers_rejects_what_it_cannot_run() -> None:
    worker = Worker(URL, queue="q", handler=cli_app.quick)
    with pytest.raises(TargetError, match="looks like a handler: pass --queue"):
        await build_workers(cli_app.quick, WorkerOptions("m:h"))
    with pytest.raises(TargetError, match="drop --queue"):
        await build_workers(worker, WorkerOptions("m:w", queues=("q",)))
    with pytest.raises(TargetError, match="--concurrency applies to a handler"):
        await build_workers(worker, WorkerOptions("m:w", concurrency=2))
    with pytest.raises(TargetError, match="'m:x' is a int; expected a Worker"):
        await build_workers(3, WorkerOptions("m:x"))
    with pytest.raises(TargetError, match="the factory 'm:f' failed: RuntimeError"):
        await build_workers(cli_app.broken_factory, WorkerOptions("m:f"))

    def no_workers() -> list[Worker]:
        return []

    with pytest.raises(TargetError, match="returned a list of 0 items"):
        await build_workers(no_workers, WorkerOptions("m:f"))


def test_health_is_forgiven_a_lapse_up_to_the_grace_only_once_it_was_up() -> None:
    health = Debounce(grace=5)
    assert not health.update(False, now=0)  # starting
    assert health.update(True, now=1)
    assert health.update(False, now=2)  # a lapse...
    assert health.update(False, now=6.9)  # ...of under 5 s is forgiven
    assert not health.update(False, now=7)
    assert health.update(True, now=8)
    assert not Debounce(grace=0).update(False, now=0)


def test_restart_backoff_doubles_up_to_its_bound() -> None:
    policy = RestartPolicy(backoff_min=0.5, backoff_max=4)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5, 10)] == [0.5, 1, 2, 4, 4, 4]


def test_queues_are_grouped_with_their_retry_and_dead_letter_queues() -> None:
    raws = [
        _Raw("a", 3, 1, 2),
        _Raw("a.dlq", 4, 0, 0),
        _Raw("a.retry.1000ms", 2, 0, 0),
        _Raw("a.retry.2000ms", 1, 0, 0),
        _Raw("orphan.dlq", 5, 0, 0),
        _Raw("gone.retry.500ms", 6, 0, 0),
        _Raw("b", 0, 0, 1),
        *(_Raw(f"workq.delay.{k}", 1, 0, 0) for k in range(32)),
        *(_Raw(f"workq.scheduler.{k}", 1, 0, 1) for k in ("lease", "state", "status")),
        # each task worker's cancel listener, a presence watcher: exclusive, one connection's
        _Raw("amq.gen-Uv5MxwS3NgvwOlnnHonNxw", 0, 0, 1),
        _Raw("amq.gen-3KkZlq0cTx3wQ2Xn1i8mVg", 0, 0, 1),
    ]
    rows = {row.queue: row for row in group_rows(raws)}
    assert sorted(rows) == ["a", "b", "gone", "orphan"]  # no ladder, scheduler, internal queue
    assert (rows["a"].ready, rows["a"].unacked, rows["a"].retry, rows["a"].dead_letters) == (
        3, 1, 3, 4,
    )  # fmt: skip
    assert rows["a"].retry_queues == {"a.retry.1000ms": 2, "a.retry.2000ms": 1}
    assert rows["b"].dead_letters is None
    assert not rows["orphan"].present and rows["orphan"].dead_letters == 5
    assert not rows["gone"].present and rows["gone"].retry == 6
    assert [row.queue for row in group_rows(raws, ["b", "a"])] == ["b", "a"]
    [ladder] = [row for row in group_rows(raws, all_queues=True) if row.kind == "delay-ladder"]
    assert (ladder.queue, ladder.ready) == ("workq.delay.* (32 queues)", 32)
    [scheduler] = [row for row in group_rows(raws, all_queues=True) if row.kind == "scheduler"]
    assert (scheduler.queue, scheduler.consumers) == ("workq.scheduler.* (3 queues)", 3)
    [named] = [row for row in group_rows(raws, all_queues=True) if row.kind == "server-named"]
    assert (named.queue, named.consumers) == ("amq.* (2 queues)", 2)


@pytest.mark.parametrize("width", [80, 200])
def test_queue_names_are_never_cut_at_80_or_200_columns(width: int) -> None:
    from rich.console import Console

    from aio_workq.cli._queues_cmd import _TableMaker

    name = "billing-invoices-reconciliation-eu-west-1"
    raws = [
        _Raw(name, 1_234, 56, 3, 10.0, 12.5, 12.5),
        _Raw(f"{name}.dlq", 7, 0, 0),
        _Raw("images", 0, 0, 1, 0.0, 0.0, 0.0),
    ]
    console = Console(width=width, record=True, color_system=None)
    console.print(_TableMaker(URL, all_queues=True)(group_rows(raws), "test", width))
    text = console.export_text()
    assert all(len(line) <= width for line in text.splitlines())
    [line] = [line for line in text.splitlines() if line.startswith(name)]
    assert line.split()[:3] == [name, "1,234", "56"]
    assert ("deliver/s" in text) == (width == 200)  # the rates go first when it is narrow


def test_management_url_defaults_to_the_broker_host_and_user() -> None:
    assert default_management_url("amqp://u:p@rabbit:5672/vh") == "http://u:p@rabbit:15672/"
    assert default_management_url("amqps://h/") == "https://h:15671/"


def test_outbox_subcommand_prints_the_migration() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "aio_workq", "outbox", "schema"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "CREATE TABLE" in proc.stdout.upper()


async def test_a_stop_signal_while_a_child_is_being_spawned_reaches_that_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM to the supervisor while a child was being spawned (at start, or restarting a
    crashed one): the signal went to the children already known, not to the one on its way,
    so the supervisor waited on it until a second signal (or its SIGKILL). Now a child
    spawned after the stop is told to stop at once."""
    spawned: list[asyncio.subprocess.Process] = []
    real = asyncio.create_subprocess_exec

    async def spawn_then_signal(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await real(*args, **kwargs)
        spawned.append(proc)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the supervisor's loop handler...
        await asyncio.sleep(0.2)  # ...which runs before the spawn returns
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn_then_signal)
    supervisor = Supervisor(
        command=[sys.executable, "-c", "import time; time.sleep(60)"],
        processes=1,
        policy=RestartPolicy(),
        health=HealthOptions(),
    )
    try:
        async with asyncio.timeout(10):
            assert await supervisor.run() == 0
    finally:
        for proc in spawned:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert [proc.returncode for proc in spawned] == [-signal.SIGTERM]


def test_worker_help_says_concurrency_reaches_a_factory() -> None:
    """`--concurrency` is passed to a factory that takes it (`tasks.workers`), as the jobs guide
    says: the help must not limit it to `--queue` (a taskiq user reading it would not try it)."""
    from click.testing import CliRunner

    from aio_workq.cli._app import cli

    result = CliRunner().invoke(cli, ["worker", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    after = result.output[result.output.index("--concurrency") :]
    text = " ".join(after[: after.index("--processes")].split())  # its help, unwrapped
    assert "tasks.workers" in text and "concurrency=" in text, text


async def test_job_command_prints_a_jobs_status_from_the_store(tmp_path: Path) -> None:
    """A taskiq or Celery user looks for one job's status on the command line (`celery result
    ID`): `aio-workq job ID --store URL` reads it from the job store, as the dashboard's Jobs
    page does; an unknown id ends with exit code 1 naming it."""
    import json
    import subprocess
    import time

    from aio_workq.jobs import JobState, SQLiteStore, Write

    path = tmp_path / "jobs.db"
    store = SQLiteStore(str(path))
    now = time.time()
    await store.record([
        Write(job_id="j-ok", task="orders.charge", queue="payments", state=JobState.SUCCEEDED,
              at=now, result=b'{"charged": 1250}', content_type="application/json"),
        Write(job_id="j-bad", task="orders.charge", queue="payments", state=JobState.FAILED,
              at=now, attempt=3, error_type="ValueError", error_message="no card"),
    ])  # fmt: skip
    await store.close()

    def job(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aio_workq", "job", *args, "--store", f"sqlite:///{path}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    ok = job("j-ok")
    assert ok.returncode == 0, ok.stderr
    assert "succeeded" in ok.stdout and "orders.charge" in ok.stdout, ok.stdout
    assert '{"charged": 1250}' in ok.stdout, ok.stdout
    bad = job("j-bad", "--json")
    assert bad.returncode == 0, bad.stderr
    document = json.loads(bad.stdout)
    assert document["state"] == "failed" and document["attempt"] == 3, document
    assert document["error_type"] == "ValueError" and document["error_message"] == "no card"
    missing = job("nope")
    assert missing.returncode == 1 and "no job 'nope'" in missing.stderr, missing
