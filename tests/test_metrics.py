"""Prometheus metrics (issue 14, part 3): /metrics scraped over HTTP after known traffic."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from aio_workq import (
    ConfigurationError,
    HandleInfo,
    Hook,
    Job,
    Outcome,
    Producer,
    PublishInfo,
    Reject,
    Retry,
    SerializationError,
    UnroutableError,
    Worker,
)
from aio_workq.metrics import CONTENT_TYPE, PrometheusHook, render, serve
from tests.helpers import Counter

pytestmark = pytest.mark.broker

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _scrape(port: int) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode(), response.headers["Content-Type"]


async def test_metrics_after_known_traffic(
    amqp_url: str, make_worker: Callable[..., Worker], queue_name: str
) -> None:
    registry = CollectorRegistry()
    hooks = [PrometheusHook(registry=registry)]
    server = serve(0, registry=registry)
    settled = Counter()
    release = asyncio.Event()
    started = Counter()

    async def handle(job: Job) -> None:
        kind = job.data
        if kind == "slow":
            started.add(job.message_id)
            await release.wait()
        if kind == "retry" and job.attempt == 1:
            raise Retry(delay=0)
        if kind == "reject":
            raise Reject("bad")

    class Settled(Hook):
        def after_handle(self, info: HandleInfo) -> None:
            settled.add(info)

    try:
        async with Producer(amqp_url, hooks=hooks, window=500) as producer:
            await producer.declare(queue_name)
            await producer.publish_many(["ok"] * 5 + ["retry", "reject", "slow"], queue=queue_name)
            with pytest.raises(UnroutableError):
                await producer.publish("lost", exchange="amq.direct", routing_key=queue_name)
            with pytest.raises(SerializationError):  # refused before it was sent
                await producer.publish("bad", queue=queue_name, headers={"x": object()})
            worker = make_worker(
                queue=queue_name, handler=handle, hooks=[*hooks, Settled()],
                concurrency=4,
            )  # fmt: skip
            await worker.start()
            await started.wait_for(1)
            await settled.wait_for(8)  # all but the slow one (the retry is handled twice)
            text, content_type = await asyncio.to_thread(_scrape, server.port)
            during = _samples(text)
            release.set()
            await settled.wait_for(9)
            after = _samples((await asyncio.to_thread(_scrape, server.port))[0])
    finally:
        server.close()

    assert content_type == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    q = (("queue", queue_name),)
    d = (("destination", queue_name),)
    assert during["aio_workq_handlers_in_flight", q] == 1  # the slow one
    assert after["aio_workq_handlers_in_flight", q] == 0
    assert after["aio_workq_published_total", d] == 9
    assert after["aio_workq_publish_failed_total", d] == 1
    assert after["aio_workq_confirmed_total", d] == 8
    assert after["aio_workq_returned_total", (("destination", "amq.direct"),)] == 1
    assert after["aio_workq_published_total", (("destination", "amq.direct"),)] == 1
    assert after["aio_workq_confirm_latency_seconds_count", d] == 8
    assert after["aio_workq_publish_in_flight", ()] == 0
    assert after["aio_workq_publish_window", ()] == 500

    def handled(outcome: str) -> float:
        return after["aio_workq_handled_total", (("outcome", outcome), ("queue", queue_name))]

    assert handled("ok") == 7  # 5 ok, the retry's second attempt, the slow one
    assert handled("retry") == 1
    assert handled("dead-lettered") == 1
    assert after["aio_workq_handler_duration_seconds_count", q] == 9
    # The worker's own moves (retry, dead letter) are not publishes of the application.
    published_to = {dict(labels)["destination"] for name, labels in after
                    if name == "aio_workq_published_total"}  # fmt: skip
    assert published_to == {queue_name, "amq.direct"}


def test_render_gives_the_text_format_of_a_registry() -> None:
    registry = CollectorRegistry()
    hook = PrometheusHook(registry=registry)
    again = PrometheusHook(registry=registry)  # shares the metrics: no duplicate error
    hook.on_reconnect("amqp://guest:***@localhost/")
    again.on_reconnect("amqp://guest:***@localhost/")
    samples = _samples(render(registry).decode())
    assert samples["aio_workq_reconnects_total", ()] == 2


def test_render_collects_every_process_with_a_multiprocess_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several worker processes (the CLI's --processes) behind one /metrics."""
    script = (
        "from aio_workq.metrics import PrometheusHook\nPrometheusHook().on_reconnect('amqp://x/')\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    samples = _samples(render().decode())
    assert samples["aio_workq_reconnects_total", ()] == 2


def test_workers_get_hooks_added_before_they_start() -> None:
    worker = Worker("amqp://localhost/", queue="q", handler=print)
    hook = PrometheusHook(registry=CollectorRegistry())
    worker.add_hooks(hook)
    worker.add_hooks(Hook())
    assert worker._hooks is not None and worker._hooks.hooks[0] is hook
    assert len(worker._hooks.hooks) == 2


def _handle(hook: PrometheusHook, queue: str, outcome: Outcome, seconds: float | None) -> None:
    job = SimpleNamespace(message_id="m", attempt=1)
    assert hook.handling(job, queue) is None  # counted, no manager
    hook.after_handle(HandleInfo(job, queue, outcome, None, seconds))


def test_counts_made_on_several_threads_add_up() -> None:
    """The hook adds to plain numbers, one set per thread: none is lost, a scrape sums them."""
    registry = CollectorRegistry()
    hook = PrometheusHook(registry=registry)
    other = PrometheusHook(registry=registry)

    def work(which: PrometheusHook) -> None:
        for _ in range(2_000):
            _handle(which, "q", Outcome.OK, 0.003)

    threads = [threading.Thread(target=work, args=(h,)) for h in (hook, hook, other, other)]
    for thread in threads:
        thread.start()
    work(hook)
    for thread in threads:
        thread.join(30)
    hook.on_reconnect("amqp://x/")
    samples = _samples(render(registry).decode())
    q = (("queue", "q"),)
    assert samples["aio_workq_handled_total", (("outcome", "ok"), *q)] == 10_000
    assert samples["aio_workq_handler_duration_seconds_count", q] == 10_000
    assert samples["aio_workq_handler_duration_seconds_bucket", (("le", "0.0025"), *q)] == 0
    assert samples["aio_workq_handler_duration_seconds_bucket", (("le", "0.005"), *q)] == 10_000
    assert samples["aio_workq_handler_duration_seconds_sum", q] == pytest.approx(30.0)
    assert samples["aio_workq_handlers_in_flight", q] == 0
    assert samples["aio_workq_reconnects_total", ()] == 1


def test_the_exposition_names_types_and_help_texts() -> None:
    registry = CollectorRegistry()
    hook = PrometheusHook(registry=registry)
    info = PublishInfo(exchange="", routing_key="q", message_id="m", headers={}, body_size=1,
                       window=7)  # fmt: skip
    hook.before_publish(info)
    job = SimpleNamespace(message_id="m", attempt=1)
    hook.handling(job, "q")
    families = {f.name: f for f in text_string_to_metric_families(render(registry).decode())}
    types = {name: f.type for name, f in families.items() if not name.endswith("_created")}
    assert types == {
        "aio_workq_published": "counter", "aio_workq_confirmed": "counter",
        "aio_workq_nacked": "counter", "aio_workq_returned": "counter",
        "aio_workq_publish_timed_out": "counter", "aio_workq_publish_lost": "counter",
        "aio_workq_publish_failed": "counter", "aio_workq_handled": "counter",
        "aio_workq_connections_lost": "counter", "aio_workq_reconnects": "counter",
        "aio_workq_confirm_latency_seconds": "histogram",
        "aio_workq_handler_duration_seconds": "histogram",
        "aio_workq_handlers_in_flight": "gauge", "aio_workq_publish_in_flight": "gauge",
        "aio_workq_publish_window": "gauge",
    }  # fmt: skip
    assert families["aio_workq_handled"].documentation == "Deliveries settled, by outcome."
    samples = _samples(render(registry).decode())
    assert samples["aio_workq_publish_in_flight", ()] == 1
    assert samples["aio_workq_publish_window", ()] == 7
    assert samples["aio_workq_handlers_in_flight", (("queue", "q"),)] == 1
    assert samples["aio_workq_confirmed_total", (("destination", "q"),)] == 0


def test_a_registry_keeps_the_mode_of_its_first_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    PrometheusHook(registry=registry)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")
    with pytest.raises(ConfigurationError, match="PROMETHEUS_MULTIPROC_DIR"):
        PrometheusHook(registry=registry)


def test_a_hook_made_in_multiprocess_mode_writes_to_prometheus_client_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under PROMETHEUS_MULTIPROC_DIR the values must go where every process reads them: a
    subclass of `PrometheusHook` keeps its own overrides there too."""
    from aio_workq.metrics import _SharedPrometheusHook

    class Mine(PrometheusHook):
        def on_reconnect(self, url: str) -> None:
            super().on_reconnect(url)
            super().on_reconnect(url)

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")
    registry = CollectorRegistry()
    plain, mine = PrometheusHook(registry=registry), Mine(registry=registry)
    assert isinstance(plain, _SharedPrometheusHook)
    assert isinstance(mine, Mine) and isinstance(mine, _SharedPrometheusHook)
    mine.on_reconnect("amqp://x/")
    job = SimpleNamespace(message_id="m", attempt=1)
    assert plain.handling(job, "q") is not None  # prometheus-client's gauge, in and out
    samples = _samples(render(registry).decode())
    assert samples["aio_workq_reconnects_total", ()] == 2
