"""Prometheus metrics: a hook that counts publishes, confirms and deliveries, and `/metrics`.

Needs the `prometheus` extra: `pip install 'aio-workq[prometheus]'`.

```python
from aio_workq.metrics import PrometheusHook, serve

hooks = [PrometheusHook()]
server = serve(9100)  # GET http://127.0.0.1:9100/metrics
async with Producer(hooks=hooks) as producer: ...
await Worker(queue="images", handler=resize, hooks=hooks).run()
```

Every `PrometheusHook` on the same registry shares the same metrics, so one per producer or
worker is fine. With `PROMETHEUS_MULTIPROC_DIR` set (several worker processes behind one
endpoint), `render()` collects the metrics of every process: counters and histograms are summed
over every process that ever wrote there (a dead one's counts stay), the in-flight gauges over
the live ones (`livesum`), and the publisher window is the largest of the live ones (`livemax`);
call `prometheus_client.multiprocess.mark_process_dead(pid)` when a process exits.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from ._exceptions import (
    ConfigurationError,
    ConnectionLostError,
    PublishNackedError,
    PublishTimeoutError,
    UnroutableError,
)
from ._hooks import HandleInfo, Hook, JobView, PublishInfo

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        exposition,
        generate_latest,
        multiprocess,
        start_http_server,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "aio_workq.metrics needs prometheus-client: pip install 'aio-workq[prometheus]'"
    ) from exc

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

__all__ = ("CONTENT_TYPE", "MetricsServer", "PrometheusHook", "render", "serve")

CONTENT_TYPE: str = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", CONTENT_TYPE_LATEST)
"""The `Content-Type` of what `render()` returns (Prometheus text format 0.0.4)."""

# Seconds: from sub-millisecond handlers and confirms up to minutes-long jobs.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0, 60.0, 300.0)  # fmt: skip


class _Metrics:
    """The metric objects of one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"aio_workq_{name}", doc, labels, registry=registry)

        self.published = counter("published", "Messages sent to the broker.", ("destination",))
        self.confirmed = counter("confirmed", "Messages the broker confirmed.", ("destination",))
        self.nacked = counter("nacked", "Messages the broker refused (nack).", ("destination",))
        self.returned = counter(
            "returned", "Mandatory messages returned as unroutable.", ("destination",)
        )
        self.timed_out = counter(
            "publish_timed_out", "Messages not confirmed within their timeout.", ("destination",)
        )
        self.lost = counter(
            "publish_lost",
            "Messages whose connection closed before the confirm (on_reconnect='fail').",
            ("destination",),
        )
        self.failed = counter(
            "publish_failed",
            "Messages refused before they were sent (e.g. a header that can't be encoded).",
            ("destination",),
        )
        self.handled = counter("handled", "Deliveries settled, by outcome.", ("queue", "outcome"))
        self.lost_connections = counter("connections_lost", "Connections lost.")
        self.reconnects = counter("reconnects", "Connections re-established after a loss.")
        self.confirm_latency = Histogram(
            "aio_workq_confirm_latency_seconds",
            "Seconds from sending a message to its confirm.",
            ("destination",),
            buckets=_BUCKETS,
            registry=registry,
        )
        self.handler_duration = Histogram(
            "aio_workq_handler_duration_seconds",
            "Seconds a handler ran.",
            ("queue",),
            buckets=_BUCKETS,
            registry=registry,
        )
        self.handlers_in_flight = Gauge(
            "aio_workq_handlers_in_flight",
            "Deliveries being handled or settled.",
            ("queue",),
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.publish_in_flight = Gauge(
            "aio_workq_publish_in_flight",
            "Messages sent whose confirm has not arrived.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.publish_window = Gauge(
            "aio_workq_publish_window",
            "The publisher window (most unconfirmed messages) of the last publish.",
            registry=registry,
            multiprocess_mode="livemax",
        )


_by_registry: WeakKeyDictionary[CollectorRegistry, _Metrics] = WeakKeyDictionary()
_lock = threading.Lock()


def _metrics(registry: CollectorRegistry) -> _Metrics:
    with _lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = _by_registry[registry] = _Metrics(registry)
        return metrics


class PrometheusHook(Hook):
    """Counts publishes, confirms, deliveries and reconnects into Prometheus metrics.

    Metrics (all prefixed `aio_workq_`): counters `published_total`, `confirmed_total`,
    `nacked_total`, `returned_total`, `publish_timed_out_total`, `publish_lost_total`,
    `publish_failed_total` (label `destination`: the queue, or the exchange), `handled_total`
    (labels `queue`, `outcome`),
    `connections_lost_total`, `reconnects_total`; histograms `confirm_latency_seconds`
    (`destination`) and `handler_duration_seconds` (`queue`); gauges `handlers_in_flight`
    (`queue`), `publish_in_flight` and `publish_window`.

    Args:
        registry: where the metrics live (default: prometheus-client's global registry).
    """

    def __init__(self, *, registry: CollectorRegistry = REGISTRY) -> None:
        self._m = _metrics(registry)
        # The labelled children, looked up once per queue or destination.
        self._queues: dict[str, tuple[Gauge, Histogram, dict[str, Counter]]] = {}
        self._destinations: dict[str, tuple[Counter, Counter, Histogram]] = {}

    def _destination(self, destination: str) -> tuple[Counter, Counter, Histogram]:
        children = self._destinations.get(destination)
        if children is None:
            m = self._m
            children = self._destinations[destination] = (
                m.published.labels(destination),
                m.confirmed.labels(destination),
                m.confirm_latency.labels(destination),
            )
        return children

    def _queue(self, queue: str) -> tuple[Gauge, Histogram, dict[str, Counter]]:
        children = self._queues.get(queue)
        if children is None:
            m = self._m
            children = self._queues[queue] = (
                m.handlers_in_flight.labels(queue),
                m.handler_duration.labels(queue),
                {},
            )
        return children

    def before_publish(self, message: PublishInfo) -> Any:
        m = self._m
        self._destination(message.destination)[0].inc()
        m.publish_in_flight.inc()
        m.publish_window.set(message.window)
        return None

    def after_publish(self, message: PublishInfo, state: Any) -> None:
        m = self._m
        m.publish_in_flight.dec()
        destination = message.destination
        error = message.error
        if error is None:
            _, confirmed, latency = self._destination(destination)
            confirmed.inc()
            latency.observe(message.seconds)
        elif isinstance(error, UnroutableError):
            m.returned.labels(destination).inc()
        elif isinstance(error, PublishNackedError):
            m.nacked.labels(destination).inc()
        elif isinstance(error, PublishTimeoutError):
            m.timed_out.labels(destination).inc()
        elif isinstance(error, ConnectionLostError):
            m.lost.labels(destination).inc()
        else:
            m.failed.labels(destination).inc()

    def handling(self, job: JobView, queue: str) -> _InFlight:
        return _InFlight(self._queue(queue)[0])

    def after_handle(self, info: HandleInfo) -> None:
        _, duration, outcomes = self._queue(info.queue)
        outcome = info.outcome.value
        counter = outcomes.get(outcome)
        if counter is None:
            counter = outcomes[outcome] = self._m.handled.labels(info.queue, outcome)
        counter.inc()
        if info.seconds is not None:
            duration.observe(info.seconds)

    def on_connection_lost(self, url: str) -> None:
        self._m.lost_connections.inc()

    def on_reconnect(self, url: str) -> None:
        self._m.reconnects.inc()


class _InFlight:
    """Counts a delivery in the in-flight gauge while it is handled."""

    __slots__ = ("_gauge",)

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge

    def __enter__(self) -> None:
        self._gauge.inc()

    def __exit__(self, *exc_info: object) -> None:
        self._gauge.dec()


def render(registry: CollectorRegistry | None = None) -> bytes:
    """The metrics in Prometheus' text format (serve it with `Content-Type: CONTENT_TYPE`).

    For a server of your own (the `aio-workq worker --metrics-port` endpoint uses it):
    `registry` defaults to the global one, or, with `PROMETHEUS_MULTIPROC_DIR` set, to the
    metrics of every process writing there.
    """
    if registry is None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = REGISTRY
    return generate_latest(registry)


class MetricsServer:
    """A `/metrics` endpoint in a background thread (prometheus-client's stdlib server)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        """The port listened on (useful with `serve(0)`)."""
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(
    port: int, host: str = "127.0.0.1", *, registry: CollectorRegistry = REGISTRY
) -> MetricsServer:
    """Serve `GET /metrics` on `host:port` from a thread; `close()` the result to stop.

    Raises:
        OSError: the address is taken or not available.
    """
    server, thread = start_http_server(port, host, registry=registry)
    return MetricsServer(server, thread)
