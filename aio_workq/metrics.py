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
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from ._exceptions import (
    ConfigurationError,
    ConnectionLostError,
    PublishNackedError,
    PublishTimeoutError,
    UnroutableError,
)
from ._hooks import HandleInfo, Hook, JobView, Outcome, PublishInfo

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
    from prometheus_client import metrics as _client_metrics
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
    from prometheus_client.samples import Sample
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "aio_workq.metrics needs prometheus-client: pip install 'aio-workq[prometheus]'"
    ) from exc

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from wsgiref.simple_server import WSGIServer

__all__ = ("CONTENT_TYPE", "MetricsServer", "PrometheusHook", "render", "serve")

CONTENT_TYPE: str = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", CONTENT_TYPE_LATEST)
"""The `Content-Type` of what `render()` returns (Prometheus text format 0.0.4)."""

# Seconds: from sub-millisecond handlers and confirms up to minutes-long jobs.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0, 60.0, 300.0)  # fmt: skip


_HELP = {
    "published": "Messages sent to the broker.",
    "confirmed": "Messages the broker confirmed.",
    "nacked": "Messages the broker refused (nack).",
    "returned": "Mandatory messages returned as unroutable.",
    "publish_timed_out": "Messages not confirmed within their timeout.",
    "publish_lost": "Messages whose connection closed before the confirm (on_reconnect='fail').",
    "publish_failed": (
        "Messages refused before they were sent (e.g. a header that can't be encoded)."
    ),
    "handled": "Deliveries settled, by outcome.",
    "connections_lost": "Connections lost.",
    "reconnects": "Connections re-established after a loss.",
    "confirm_latency_seconds": "Seconds from sending a message to its confirm.",
    "handler_duration_seconds": "Seconds a handler ran.",
    "handlers_in_flight": "Deliveries being handled or settled.",
    "publish_in_flight": "Messages sent whose confirm has not arrived.",
    "publish_window": "The publisher window (most unconfirmed messages) of the last publish.",
}
# A publish's end, after its confirm or failure: the `_Destination` attribute it counts in.
_PUBLISH_ENDS = ("confirmed", "nacked", "returned", "publish_timed_out", "publish_lost",
                 "publish_failed")  # fmt: skip
_OUTCOMES = tuple(outcome.value for outcome in Outcome)


def _multiprocess() -> bool:
    """prometheus-client's multiprocess mode (its values then live in per-process files)."""
    return bool(
        os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
    )


# -- plain counts, read at scrape time (the default) ---------------------------------------------
#
# prometheus-client's `inc()` and `observe()` take a lock and check the metric on every call; a
# message makes four to six of them. Here the hook adds to plain ints and floats, and the
# registry's collector sums them when scraped.
#
# Threads: each `_Counts` is written by one thread only (the one running the event loop of the
# producers and workers whose hooks count into it; another thread gets a `_Counts` of its own),
# so no increment is lost. A scrape, from the server's thread, only reads: reading an int or a
# float, and copying a dict (`tuple(d.items())`, done in C), are atomic under the GIL (and under
# the free-threaded build's per-object locks). A scrape may see a message counted in one series
# and not yet in the next (e.g. a histogram's count but not its sum): prometheus-client's own
# metrics are not read atomically across series either.


class _Histogram:
    """Bucket counts (not cumulative; the last is +Inf) and the sum of the observations."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(_BUCKETS, value)] += 1  # le: value <= bound
        self.sum += value


class _Destination:
    """What one thread counted for one destination."""

    __slots__ = ("confirmed", "created", "latency", "nacked", "publish_failed", "publish_lost",
                 "publish_timed_out", "published", "returned")  # fmt: skip

    def __init__(self) -> None:
        self.created = time.time()
        self.published = self.confirmed = self.nacked = self.returned = 0
        self.publish_timed_out = self.publish_lost = self.publish_failed = 0
        self.latency = _Histogram()


class _Queue:
    """What one thread counted for one queue."""

    __slots__ = ("created", "duration", "handled", "started")

    def __init__(self) -> None:
        self.created = time.time()
        self.started = 0
        self.handled = dict.fromkeys(_OUTCOMES, 0)
        """By `Outcome` value (an `Outcome`'s own hash is a Python call)."""
        self.duration = _Histogram()


class _Counts:
    """Everything one thread counted into one registry."""

    __slots__ = ("destinations", "lost_connections", "queues", "reconnects")

    def __init__(self) -> None:
        self.destinations: dict[str, _Destination] = {}
        self.queues: dict[str, _Queue] = {}
        self.lost_connections = 0
        self.reconnects = 0

    def destination(self, name: str) -> _Destination:
        destination = self.destinations[name] = _Destination()
        return destination

    def queue(self, name: str) -> _Queue:
        queue = self.queues[name] = _Queue()
        return queue


class _Collector(Collector):
    """The metrics of one registry: the sums of every thread's `_Counts`, at scrape time."""

    def __init__(self) -> None:
        self.created = time.time()
        self.window = 0
        self._by_thread: dict[int, _Counts] = {}
        self._lock = threading.Lock()

    def counts(self, thread: int) -> _Counts:
        """The counts of `thread` (made on its first call)."""
        with self._lock:
            counts = self._by_thread.get(thread)
            if counts is None:
                counts = self._by_thread[thread] = _Counts()
            return counts

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            every = tuple(self._by_thread.values())
        destinations: dict[str, list[_Destination]] = {}
        queues: dict[str, list[_Queue]] = {}
        for counts in every:
            for name, destination in tuple(counts.destinations.items()):
                destinations.setdefault(name, []).append(destination)
            for name, queue in tuple(counts.queues.items()):
                queues.setdefault(name, []).append(queue)
        # False under PROMETHEUS_DISABLE_CREATED_SERIES, as for prometheus-client's metrics.
        created = getattr(_client_metrics, "_use_created", True)

        def when(parts: list[_Destination] | list[_Queue]) -> float | None:
            return min(part.created for part in parts) if created else None

        def counter(name: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(f"aio_workq_{name}", _HELP[name], labels=labels)

        in_flight = 0
        for name in ("published", *_PUBLISH_ENDS):
            family = counter(name, ("destination",))
            for label, sent in destinations.items():
                value = sum(getattr(part, name) for part in sent)
                in_flight += value if name == "published" else -value
                # Like labelled children made on the first publish (confirmed) or the first
                # failure of the kind (the others).
                if value or name in ("published", "confirmed"):
                    family.add_metric([label], value, created=when(sent))
            yield family
        handled = counter("handled", ("queue", "outcome"))
        for outcome in _OUTCOMES:
            for label, consumed in queues.items():
                if count := sum(part.handled[outcome] for part in consumed):
                    handled.add_metric([label, outcome], count, created=when(consumed))
        yield handled
        lost = counter("connections_lost")
        lost.add_metric([], sum(counts.lost_connections for counts in every),
                        created=self.created if created else None)  # fmt: skip
        yield lost
        reconnects = counter("reconnects")
        reconnects.add_metric([], sum(counts.reconnects for counts in every),
                              created=self.created if created else None)  # fmt: skip
        yield reconnects
        yield _histogram(
            "confirm_latency_seconds", "destination",
            {name: ([part.latency for part in parts], when(parts))
             for name, parts in destinations.items()},
        )  # fmt: skip
        yield _histogram(
            "handler_duration_seconds", "queue",
            {name: ([part.duration for part in parts], when(parts))
             for name, parts in queues.items()},
        )  # fmt: skip
        handlers = GaugeMetricFamily(
            "aio_workq_handlers_in_flight", _HELP["handlers_in_flight"], labels=("queue",)
        )
        for label, consumed in queues.items():
            settled = sum(sum(part.handled.values()) for part in consumed)
            handlers.add_metric([label], sum(part.started for part in consumed) - settled)
        yield handlers
        yield GaugeMetricFamily(
            "aio_workq_publish_in_flight", _HELP["publish_in_flight"], value=in_flight
        )
        yield GaugeMetricFamily(
            "aio_workq_publish_window", _HELP["publish_window"], value=self.window
        )


_LE = [*(floatToGoString(bound) for bound in _BUCKETS), "+Inf"]  # type: ignore[no-untyped-call]


def _histogram(
    name: str, label: str, series: dict[str, tuple[list[_Histogram], float | None]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(f"aio_workq_{name}", _HELP[name], labels=(label,))
    for value, (parts, created) in series.items():
        cumulative, buckets = 0, []
        for i, le in enumerate(_LE):
            cumulative += sum(part.buckets[i] for part in parts)
            buckets.append((le, float(cumulative)))
        total = sum(part.sum for part in parts)
        family.add_metric([value], buckets, total)
        if created is not None:  # as prometheus-client's own histograms have
            family.samples.append(Sample(f"{family.name}_created", {label: value}, created))
    return family


_collectors: WeakKeyDictionary[CollectorRegistry, _Collector | _Metrics] = WeakKeyDictionary()
_lock = threading.Lock()


def _collector(registry: CollectorRegistry) -> _Collector:
    with _lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _collectors[registry] = _Collector()
            registry.register(collector)
        if not isinstance(collector, _Collector):
            raise ConfigurationError(
                "this registry has the metrics of prometheus-client's multiprocess mode: set "
                "PROMETHEUS_MULTIPROC_DIR before the first PrometheusHook, or not at all"
            )
        return collector


def _counts_by_default(hooks: Iterable[Hook]) -> bool:
    """Whether one of `hooks` is a `PrometheusHook` counting into the global registry, the
    one `render()` reads: another such hook on the same worker would count it twice."""
    return any(isinstance(hook, PrometheusHook) and hook._registry is REGISTRY for hook in hooks)


class PrometheusHook(Hook):
    """Counts publishes, confirms, deliveries and reconnects into Prometheus metrics.

    Metrics (all prefixed `aio_workq_`): counters `published_total`, `confirmed_total`,
    `nacked_total`, `returned_total`, `publish_timed_out_total`, `publish_lost_total`,
    `publish_failed_total` (label `destination`: the queue, or the exchange), `handled_total`
    (labels `queue`, `outcome`),
    `connections_lost_total`, `reconnects_total`; histograms `confirm_latency_seconds`
    (`destination`) and `handler_duration_seconds` (`queue`); gauges `handlers_in_flight`
    (`queue`), `publish_in_flight` and `publish_window`.

    A message costs a few additions to plain numbers, which a scrape sums; under
    prometheus-client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR` set when the hook is
    made) the hook writes to prometheus-client's metrics instead, which share their values
    through files.

    Args:
        registry: where the metrics live (default: prometheus-client's global registry).

    Raises:
        ConfigurationError: the registry's metrics were made in the other mode (multiprocess
            or not).
    """

    def __new__(cls, *, registry: CollectorRegistry = REGISTRY) -> PrometheusHook:
        if _multiprocess() and not issubclass(cls, _SharedPrometheusHook):
            return super().__new__(_shared_class(cls))
        return super().__new__(cls)

    def __init__(self, *, registry: CollectorRegistry = REGISTRY) -> None:
        self._registry = registry
        self._set_up(registry)

    def _set_up(self, registry: CollectorRegistry) -> None:
        self._collector = _collector(registry)
        self._thread: int | None = None
        """The thread `_counts` is of (the first that counted)."""
        self._counts = _Counts()

    def _own(self) -> _Counts:
        """The counts of the calling thread, when it is not the one `_counts` is of."""
        thread = threading.get_ident()
        with _lock:
            if self._thread is None:
                self._thread = thread
                self._counts = self._collector.counts(thread)
            if thread == self._thread:
                return self._counts
        return self._collector.counts(thread)

    def before_publish(self, message: PublishInfo) -> Any:
        counts = self._counts if get_ident() == self._thread else self._own()
        destination = message.destination
        counted = counts.destinations.get(destination) or counts.destination(destination)
        counted.published += 1
        self._collector.window = message.window
        return None

    def after_publish(self, message: PublishInfo, state: Any) -> None:
        counts = self._counts if get_ident() == self._thread else self._own()
        destination = message.destination
        counted = counts.destinations.get(destination) or counts.destination(destination)
        error = message.error
        if error is None:
            counted.confirmed += 1
            counted.latency.observe(message.seconds)
        elif isinstance(error, UnroutableError):
            counted.returned += 1
        elif isinstance(error, PublishNackedError):
            counted.nacked += 1
        elif isinstance(error, PublishTimeoutError):
            counted.publish_timed_out += 1
        elif isinstance(error, ConnectionLostError):
            counted.publish_lost += 1
        else:
            counted.publish_failed += 1

    def handling(self, job: JobView, queue: str) -> AbstractContextManager[Any] | None:
        # In flight: the deliveries started and not yet settled (`after_handle`, which the
        # worker calls for every delivery it called this for).
        counts = self._counts if get_ident() == self._thread else self._own()
        (counts.queues.get(queue) or counts.queue(queue)).started += 1
        return None

    def after_handle(self, info: HandleInfo) -> None:
        counts = self._counts if get_ident() == self._thread else self._own()
        queue = info.queue
        counted = counts.queues.get(queue) or counts.queue(queue)
        counted.handled[info.outcome._value_] += 1
        seconds = info.seconds
        if seconds is not None:  # `_Histogram.observe`, without the call
            duration = counted.duration
            duration.buckets[bisect_left(_BUCKETS, seconds)] += 1
            duration.sum += seconds

    def on_connection_lost(self, url: str) -> None:
        counts = self._counts if get_ident() == self._thread else self._own()
        counts.lost_connections += 1

    def on_reconnect(self, url: str) -> None:
        counts = self._counts if get_ident() == self._thread else self._own()
        counts.reconnects += 1


get_ident = threading.get_ident


# -- prometheus-client's metrics (multiprocess mode) ---------------------------------------------


class _Metrics:
    """The metric objects of one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"aio_workq_{name}", _HELP[name], labels, registry=registry)

        self.published = counter("published", ("destination",))
        self.confirmed = counter("confirmed", ("destination",))
        self.nacked = counter("nacked", ("destination",))
        self.returned = counter("returned", ("destination",))
        self.timed_out = counter("publish_timed_out", ("destination",))
        self.lost = counter("publish_lost", ("destination",))
        self.failed = counter("publish_failed", ("destination",))
        self.handled = counter("handled", ("queue", "outcome"))
        self.lost_connections = counter("connections_lost")
        self.reconnects = counter("reconnects")
        self.confirm_latency = Histogram(
            "aio_workq_confirm_latency_seconds",
            _HELP["confirm_latency_seconds"],
            ("destination",),
            buckets=_BUCKETS,
            registry=registry,
        )
        self.handler_duration = Histogram(
            "aio_workq_handler_duration_seconds",
            _HELP["handler_duration_seconds"],
            ("queue",),
            buckets=_BUCKETS,
            registry=registry,
        )
        self.handlers_in_flight = Gauge(
            "aio_workq_handlers_in_flight",
            _HELP["handlers_in_flight"],
            ("queue",),
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.publish_in_flight = Gauge(
            "aio_workq_publish_in_flight",
            _HELP["publish_in_flight"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.publish_window = Gauge(
            "aio_workq_publish_window",
            _HELP["publish_window"],
            registry=registry,
            multiprocess_mode="livemax",
        )


def _metrics(registry: CollectorRegistry) -> _Metrics:
    with _lock:
        metrics = _collectors.get(registry)
        if metrics is None:
            metrics = _collectors[registry] = _Metrics(registry)
        if not isinstance(metrics, _Metrics):
            raise ConfigurationError(
                "this registry has the metrics of a PrometheusHook made without "
                "PROMETHEUS_MULTIPROC_DIR: set it before the first PrometheusHook, or not at all"
            )
        return metrics


class _SharedPrometheusHook(PrometheusHook):
    """`PrometheusHook` under prometheus-client's multiprocess mode: it writes to
    prometheus-client's metrics, whose values every process shares through files."""

    def _set_up(self, registry: CollectorRegistry) -> None:
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


_shared_classes: dict[type[PrometheusHook], type[PrometheusHook]] = {}


def _shared_class(cls: type[PrometheusHook]) -> type[PrometheusHook]:
    """`cls` writing to prometheus-client's metrics: a subclass of yours overrides them too."""
    if cls is PrometheusHook:
        return _SharedPrometheusHook
    with _lock:
        shared = _shared_classes.get(cls)
        if shared is None:
            shared = _shared_classes[cls] = type(
                cls.__name__, (cls, _SharedPrometheusHook), {"__module__": cls.__module__}
            )
        return shared


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
