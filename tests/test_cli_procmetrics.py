"""`aio-workq worker --processes N --metrics-port P`: `/metrics` sums the children's metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aio_workq import ConfigurationError, Producer
from aio_workq.cli._errors import CliError
from aio_workq.cli._procmetrics import MetricsDirError, ProcessMetrics
from tests.helpers import wait_until
from tests.test_cli import Cli, cli, run_cli, wait_health

pytestmark = pytest.mark.cli

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def env(amqp_url: str, tmp_path: Path) -> dict[str, str]:
    """The supervisor's private directory goes under `tmp_path` (even if a test kills it)."""
    clean = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return {**clean, "AMQP_URL": amqp_url, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}


def scrape(port: int) -> tuple[int, str, Samples]:
    """`GET /metrics`: the status, the Content-Type and the samples."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            status, content_type, text = 200, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        status, content_type, text = exc.code, exc.headers["Content-Type"], exc.read()
    samples: Samples = {}
    if status == 200:
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text.decode())
            for sample in family.samples
        }
    return status, content_type, samples


async def endpoint(proc: Cli) -> int:
    """The port of `/healthz` and `/metrics` (`--metrics-port 0` picks a free one)."""
    [found] = await proc.wait_for(
        lambda: proc.lines(r"health endpoint on http://127\.0\.0\.1:(\d+)/healthz", "err"),
        what="the health endpoint",
    )
    return int(found[1])


# --- end to end ----------------------------------------------------------------------------


@pytest.mark.broker
async def test_processes_serve_summed_metrics_that_survive_a_killed_child(
    env: dict[str, str], amqp_url: str, queue_name: str
) -> None:
    args = [
        "worker", "tests.cli_app:tally", "--queue", queue_name, "--processes", "2",
        "--metrics-port", "0", "--health-grace", "0",
    ]  # fmt: skip
    handled = ("aio_workq_handled_total", (("outcome", "ok"), ("queue", queue_name)))
    durations = ("aio_workq_handler_duration_seconds_count", (("queue", queue_name),))
    in_flight = ("aio_workq_handlers_in_flight", (("queue", queue_name),))
    samples: Samples = {}

    async def metrics_show(count: float, busy: float = 0) -> bool:
        nonlocal samples
        status, _, samples = await asyncio.to_thread(scrape, port)
        assert status == 200
        # A scrape reads each child's files one after the other, while the child writes its
        # counter, then its histogram: one scrape can catch the one without the other. The
        # counts are read from a scrape where both have settled (and must then agree, below).
        settled = samples.get(handled) == count and samples.get(durations) is not None
        return settled and samples.get(in_flight) == busy and samples[durations] >= count

    async def wait_metrics(count: float, busy: float = 0) -> None:
        try:
            await wait_until(lambda: metrics_show(count, busy), timeout=20)
        except TimeoutError:
            raise AssertionError(
                f"wanted handled={count} in_flight={busy}; /metrics says handled="
                f"{samples.get(handled)} in_flight={samples.get(in_flight)} durations="
                f"{samples.get(durations)}"
            ) from None

    async with Producer(amqp_url) as producer:
        await producer.declare(queue_name)
    async with cli(*args, env=env) as sup:
        port = await endpoint(sup)
        [shared] = await sup.wait_for(
            lambda: sup.lines(r"sums the children's metrics from (\S+)", "err")
        )
        directory = shared[1]
        assert directory.startswith(env["TMPDIR"])
        await wait_health(port, 200)
        status, content_type, _ = await asyncio.to_thread(scrape, port)
        assert (status, content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")

        # Known traffic, handled by both children: /metrics counts it once, summed.
        async with Producer(amqp_url) as producer:
            await producer.publish_many([f"m{i}" for i in range(20)], queue=queue_name)
        await wait_metrics(20)
        assert samples[durations] == 20
        assert len({m[1] for m in sup.lines(r"^DONE (\d+) m")}) == 2  # in two processes

        # A delivery held by one child shows in the summed in-flight gauge...
        async with Producer(amqp_url) as producer:
            await producer.publish("hold", queue=queue_name)
        [holding] = await sup.wait_for(lambda: sup.lines(r"^HOLDING (\d+) hold"))
        await wait_metrics(20, busy=1)
        # ...until that child is killed: its gauge goes, its counts stay (never backwards).
        os.kill(int(holding[1]), signal.SIGKILL)
        await sup.wait_for(lambda: sup.lines(r"was killed by SIGKILL; restarting in", "err"))
        _, _, after_kill = await asyncio.to_thread(scrape, port)
        assert after_kill[handled] >= 20
        await wait_health(port, 200, where=lambda body: _restarts(body) == [0, 1])
        await sup.wait_for(lambda: sup.lines(r"^DONE \d+ hold"), what="the redelivery")
        await wait_metrics(21)  # + the redelivered one

        # The restarted child counts on top: 7 more messages, exactly 7 more.
        async with Producer(amqp_url) as producer:
            await producer.publish_many([f"n{i}" for i in range(7)], queue=queue_name)
        await wait_metrics(28)
        assert samples[durations] == 28
        assert len(sup.lines(r"^DONE \d+ ")) == 28

        sup.proc.send_signal(signal.SIGTERM)
        assert await sup.exit_code() == 0
    assert not await asyncio.to_thread(os.path.exists, directory)  # gone with the supervisor


@pytest.mark.broker
@pytest.mark.parametrize("processes", ["1", "2"])
async def test_a_worker_with_its_own_prometheus_hook_is_counted_once(
    env: dict[str, str], amqp_url: str, queue_name: str, processes: str
) -> None:
    """The command adds no second `PrometheusHook` to a worker that has one: each delivery
    counts once on `/metrics`, not twice."""
    env = {**env, "CLI_TEST_QUEUE": queue_name}
    args = ["worker", "tests.cli_app:metered_workers", "-p", processes, "--metrics-port", "0"]
    handled = ("aio_workq_handled_total", (("outcome", "ok"), ("queue", queue_name)))
    durations = ("aio_workq_handler_duration_seconds_count", (("queue", queue_name),))
    samples: Samples = {}

    async def all_counted() -> bool:
        nonlocal samples
        _, _, samples = await asyncio.to_thread(scrape, port)
        return samples.get(handled, 0) >= 6 and samples.get(durations, 0) >= 6

    async with Producer(amqp_url) as producer:
        await producer.declare(queue_name)
    async with cli(*args, env=env) as worker:
        port = await endpoint(worker)
        await wait_health(port, 200)
        async with Producer(amqp_url) as producer:
            await producer.publish_many([f"m{i}" for i in range(6)], queue=queue_name)
        await worker.wait_for(lambda: len(worker.lines(r"^DONE \d+ m")) == 6, what="6 DONE")
        await wait_until(all_counted, timeout=10)
        assert (samples[handled], samples[durations]) == (6, 6)
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.exit_code() == 0


def _restarts(body: dict[str, object]) -> list[int]:
    processes = body["processes"]
    assert isinstance(processes, list)
    return sorted(p["restarts"] for p in processes)


_WITHOUT_PROMETHEUS = (
    "import sys; sys.modules['prometheus_client'] = None; "
    "from aio_workq.cli import main; main(sys.argv[1:])"
)


@asynccontextmanager
async def cli_without_prometheus(*args: str, env: dict[str, str]) -> AsyncIterator[Cli]:
    """`aio-workq` as if prometheus-client were not installed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WITHOUT_PROMETHEUS, *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    running = Cli(proc)
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.broker
@pytest.mark.parametrize("processes", ["1", "2"])
async def test_without_prometheus_client_healthz_still_works_and_metrics_is_not_found(
    env: dict[str, str], queue_name: str, processes: str
) -> None:
    args = ["worker", "tests.cli_app:quick", "-q", queue_name, "-p", processes]
    async with cli_without_prometheus(*args, "--metrics-port", "0", env=env) as worker:
        port = await endpoint(worker)
        await wait_health(port, 200)
        status, content_type, _ = await asyncio.to_thread(scrape, port)
        assert (status, content_type) == (404, "application/json")
        assert worker.lines(r"/metrics is off: install aio-workq\[prometheus\] for it", "err")
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.exit_code() == 0


# --- the directory -------------------------------------------------------------------------


async def test_a_used_multiproc_dir_is_refused_with_what_to_do(
    tmp_path: Path, queue_name: str
) -> None:
    (tmp_path / "counter_123.db").write_bytes(b"")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    args = ["worker", "tests.cli_app:quick", "-q", queue_name, "-p", "2", "--metrics-port", "0"]
    code, _, err = await run_cli(*args, env=env)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"PROMETHEUS_MULTIPROC_DIR='{tmp_path}' is not empty (1 file: counter_123.db)" in err
    assert f"empty it before starting (rm {tmp_path}/*.db), or unset" in err


def test_the_directory_is_private_unless_the_environment_names_an_empty_one(
    tmp_path: Path,
) -> None:
    private = ProcessMetrics.create({})
    assert private is not None and private.path.is_dir() and not any(private.path.iterdir())
    assert private.env["PROMETHEUS_MULTIPROC_DIR"] == str(private.path)
    private.close()
    assert not private.path.exists()

    with pytest.raises(MetricsDirError, match="is not a directory: create it") as info:
        ProcessMetrics.create({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")})
    assert isinstance(info.value, CliError) and isinstance(info.value, ConfigurationError)

    given = ProcessMetrics.create({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert given is not None and given.path == tmp_path
    given.started(4242)
    for name in ("counter_4242.db", "gauge_livesum_4242.db", "counter_777.db", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    given.close()  # the user's directory stays, with what other processes wrote
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_777.db", "notes.txt"]


_WRITE = """
import os, sys
from aio_workq.metrics import PrometheusHook
hook = PrometheusHook()
hook.on_reconnect("amqp://x/")
m = hook._m
m.handlers_in_flight.labels("q").inc()
m.publish_window.set(int(sys.argv[1]))
print(os.getpid())
"""


def test_a_dead_process_keeps_its_counts_and_loses_its_gauges(tmp_path: Path) -> None:
    metrics = ProcessMetrics.create({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert metrics is not None
    env = {**os.environ, **metrics.env}
    pids = [
        int(subprocess.run([sys.executable, "-c", _WRITE, window], env=env, check=True,
                           capture_output=True, text=True, timeout=60).stdout)
        for window in ("100", "500")
    ]  # fmt: skip

    def samples() -> Samples:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(metrics.render()[0].decode())
            for sample in family.samples
        }

    q = (("queue", "q"),)
    before = samples()
    assert before["aio_workq_reconnects_total", ()] == 2
    assert before["aio_workq_handlers_in_flight", q] == 2  # livesum
    assert before["aio_workq_publish_window", ()] == 500  # livemax
    metrics.exited(pids[1])
    after = samples()
    assert after["aio_workq_reconnects_total", ()] == 2  # a counter never goes back
    assert after["aio_workq_handlers_in_flight", q] == 1
    assert after["aio_workq_publish_window", ()] == 100
    metrics.close()
