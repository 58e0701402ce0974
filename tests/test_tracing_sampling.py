"""Tracing at a sampling rate: a sampled-out message costs close to nothing (#22 item 3).

Offline: `TracingHook.handling` on a job that notes what is read of it, and on a `Job` whose
properties decode on first use.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, cast

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Tracer, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from aio_workq import Hook, Job, JobView, Outcome, PublishInfo
from aio_workq._consume.delivery import Delivery
from aio_workq._hooks import Hooks
from aio_workq._wire.frames import Properties, decode_header, encode_properties
from aio_workq.tracing import TracingHook

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"  # sampled out upstream


class NotedJob:
    """A `JobView` that notes which of its fields were read."""

    def __init__(self, headers: Mapping[str, Any] | None = None) -> None:
        self.read: set[str] = set()
        self._headers = dict(headers or {})

    def _note(self, name: str, value: Any) -> Any:
        self.read.add(name)
        return value

    headers = property(lambda self: self._note("headers", self._headers))
    body = property(lambda self: self._note("body", b""))
    data = property(lambda self: self._note("data", b""))
    message_id = property(lambda self: self._note("message_id", "m-1"))
    content_type = property(lambda self: self._note("content_type", None))
    correlation_id = property(lambda self: self._note("correlation_id", "c-1"))
    reply_to = property(lambda self: self._note("reply_to", None))
    redelivered = property(lambda self: self._note("redelivered", False))
    routing_key = property(lambda self: self._note("routing_key", "tasks"))
    exchange = property(lambda self: self._note("exchange", ""))
    attempt = property(lambda self: self._note("attempt", 2))
    delivery_tag = property(lambda self: self._note("delivery_tag", 7))


class Noting(Sampler):
    """Samples everything in, noting the attributes it was shown."""

    def __init__(self) -> None:
        self.shown: list[dict[str, Any]] = []

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        self.shown.append(dict(attributes or {}))
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "Noting"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


def _hook(sampler: Sampler, exporter: InMemorySpanExporter) -> TracingHook:
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return TracingHook(tracer_provider=provider)


def _handle(hook: TracingHook, job: NotedJob) -> trace.SpanContext:
    manager = hook.handling(job, "tasks")
    with manager:
        return trace.get_current_span().get_span_context()


@pytest.mark.parametrize("headers", [None, {"traceparent": PARENT}], ids=["root", "child"])
def test_a_sampled_out_message_reads_only_its_headers(
    headers: dict[str, Any] | None, exporter: InMemorySpanExporter
) -> None:
    hook = _hook(ParentBased(ALWAYS_OFF), exporter)
    job = NotedJob(headers)
    context = _handle(hook, job)
    assert job.read == {"headers"}  # not even the exchange (the span name's)
    assert not context.trace_flags.sampled
    if headers:  # still current while handled: what it forwards carries the decision on
        assert context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert exporter.get_finished_spans() == ()


def test_a_recorded_message_has_every_attribute(exporter: InMemorySpanExporter) -> None:
    sampler = Noting()
    hook = _hook(sampler, exporter)
    _handle(hook, NotedJob())
    (span,) = exporter.get_finished_spans()
    assert span.name == "process tasks" and span.kind is SpanKind.CONSUMER
    assert dict(span.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "",
        "messaging.destination.subscription.name": "tasks",
        "messaging.rabbitmq.message.delivery_tag": 7,
        "aio_workq.attempt": 2,
        "messaging.message.id": "m-1",
        "messaging.rabbitmq.destination.routing_key": "tasks",
        "messaging.message.conversation_id": "c-1",
    }
    # The sampler decides on what is the same for every message of the queue.
    assert sampler.shown == [
        {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": "",
            "messaging.destination.subscription.name": "tasks",
        }
    ]


def test_every_message_is_recorded_with_sampling_on(exporter: InMemorySpanExporter) -> None:
    hook = _hook(ALWAYS_ON, exporter)
    for tag in range(3):
        _handle(hook, NotedJob({"n": tag}))
    assert len(exporter.get_finished_spans()) == 3


def test_the_headers_of_a_message_without_any_are_read_without_decoding_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded: list[bytes] = []

    def noted(header: bytes) -> Any:
        decoded.append(header)
        return decode_header(header)

    monkeypatch.setattr("aio_workq._consume.delivery.decode_header", noted)

    def job(props: Properties) -> Job:
        flags, encoded = encode_properties(props)
        header = struct.pack(">HHQH", 60, 0, 1, flags) + encoded
        delivery = Delivery(cast(Any, None), "c", 1, False, "", "tasks", header, b"x")
        return Job(delivery, cast(Any, None))

    plain = job(Properties(message_id="m-1", delivery_mode=2))
    assert plain.headers == {} and plain.attempt == 1
    assert decoded == []
    assert plain.message_id == "m-1"  # decoded once asked for
    assert len(decoded) == 1
    with_headers = job(Properties(message_id="m-2", headers={"x-workq-attempt": 3}))
    assert with_headers.headers == {"x-workq-attempt": 3} and with_headers.attempt == 3


def _forward(hook: TracingHook) -> dict[str, Any]:
    """The headers of a message published while a delivery is handled (a forward)."""
    info = PublishInfo(exchange="", routing_key="next", message_id="f-1", headers={},
                       body_size=1, window=10)  # fmt: skip
    hook.after_publish(info, hook.before_publish(info))
    return info.headers


def test_a_message_its_producer_sampled_out_asks_the_sdk_nothing(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its traceparent says not sampled and the sampler follows the parent: no extract, no
    span from the SDK; what the handler forwards carries the trace id and the decision on."""
    asked: list[str] = []

    def noted(name: str, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            asked.append(name)
            return method(*args, **kwargs)

        return call

    monkeypatch.setattr(Tracer, "start_span", noted("start_span", Tracer.start_span))
    extract = TraceContextTextMapPropagator.extract
    monkeypatch.setattr(TraceContextTextMapPropagator, "extract", noted("extract", extract))
    hook = _hook(ParentBased(TraceIdRatioBased(0.5)), exporter)
    job = NotedJob({"traceparent": PARENT})
    with hook.handling(job, "tasks"):
        context = trace.get_current_span().get_span_context()
        asked_for_the_message = list(asked)
        forwarded = _forward(hook)
    assert asked_for_the_message == []
    assert not context.trace_flags.sampled and not trace.get_current_span().is_recording()
    assert context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    version, trace_id, _, flags = forwarded["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "00")
    assert exporter.get_finished_spans() == ()


def test_a_forward_of_a_sampled_message_is_a_child_of_its_span(
    exporter: InMemorySpanExporter,
) -> None:
    hook = _hook(ParentBased(ALWAYS_OFF), exporter)
    sampled = PARENT[:-2] + "01"
    with hook.handling(NotedJob({"traceparent": sampled}), "tasks"):
        forwarded = _forward(hook)
    publish, process = exporter.get_finished_spans()
    assert process.name == "process tasks" and publish.name == "publish next"
    assert process.parent is not None and process.parent.span_id == 0xB7AD6B7169203331
    assert process.parent.is_remote
    assert publish.parent is not None and publish.parent.span_id == process.context.span_id
    assert (
        process.context.trace_id == publish.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    )
    assert forwarded["traceparent"] == (
        f"00-0af7651916cd43dd8448eb211c80319c-{publish.context.span_id:016x}-01"
    )


@pytest.mark.parametrize(
    "sampler",
    [
        ParentBased(ALWAYS_OFF, remote_parent_not_sampled=ALWAYS_ON),
        ALWAYS_ON,
        ParentBased(
            ALWAYS_OFF,
            remote_parent_sampled=ParentBased(ALWAYS_ON),  # names a ParentBased that drops them
            remote_parent_not_sampled=ALWAYS_ON,
        ),
    ],
    ids=["parent-based-keeping-unsampled-parents", "always-on", "nested"],
)
def test_a_sampler_that_keeps_unsampled_parents_is_asked(
    sampler: Sampler, exporter: InMemorySpanExporter
) -> None:
    hook = _hook(sampler, exporter)
    _handle(hook, NotedJob({"traceparent": PARENT}))
    (span,) = exporter.get_finished_spans()
    assert span.parent is not None and span.parent.span_id == 0xB7AD6B7169203331
    assert span.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": PARENT, "baggage": "tenant=acme"},
        {"traceparent": PARENT, "tracestate": "vendor=x"},
        {"traceparent": " " + PARENT},  # what the propagator also takes
    ],
    ids=["baggage", "tracestate", "spaces"],
)
def test_what_the_propagator_reads_beyond_a_traceparent_is_kept(
    headers: dict[str, Any], exporter: InMemorySpanExporter
) -> None:
    hook = _hook(ParentBased(ALWAYS_OFF), exporter)
    with hook.handling(NotedJob(headers), "tasks"):
        context = trace.get_current_span().get_span_context()
        forwarded = _forward(hook)
    assert context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert forwarded["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert forwarded.get("tracestate") == headers.get("tracestate")
    assert exporter.get_finished_spans() == ()


class Counted:
    """Counts the SDK's `Tracer.start_span` calls (a span the SDK started, recording or not)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        start_span = Tracer.start_span

        def counted(tracer: Tracer, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return start_span(tracer, *args, **kwargs)

        monkeypatch.setattr(Tracer, "start_span", counted)


def test_a_root_the_sampler_drops_asks_the_sdk_for_no_span(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root (its producer did not trace) and sampled out by the SDK's ratio sampler: no SDK
    span, yet what the handler forwards carries the consumer's trace id on, as the SDK's own
    non-recording span would (not sampled, the random-trace-id flag of the SDK's ids)."""
    counted = Counted(monkeypatch)
    hook = _hook(ParentBased(TraceIdRatioBased(0.0)), exporter)
    with hook.handling(NotedJob(), "tasks"):
        span = trace.get_current_span()
        context = span.get_span_context()
        asked = counted.calls
        forwarded = _forward(hook)
    assert asked == 0
    assert not span.is_recording() and context.is_valid and not context.is_remote
    assert context.trace_flags == 0x02  # what the SDK gives: not sampled, random trace id
    version, trace_id, _, flags = forwarded["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", f"{context.trace_id:032x}", "02")
    assert exporter.get_finished_spans() == ()


def test_a_ratio_sampled_root_is_recorded_at_its_rate_and_as_the_sdk_records_it(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One SDK span per recorded message, as many recorded as the ratio says (not the ratio
    squared), each with a trace id the ratio keeps, its attributes as before."""
    random.seed(22)
    counted = Counted(monkeypatch)
    sampler = TraceIdRatioBased(0.5)
    hook = _hook(ParentBased(sampler), exporter)
    dropped = []
    for _ in range(400):
        context = _handle(hook, NotedJob())
        if not context.trace_flags.sampled:
            dropped.append(context.trace_id)
    spans = exporter.get_finished_spans()
    assert 150 <= len(spans) <= 250  # 200 expected; the ratio squared would give 100
    assert counted.calls == len(spans) and len(dropped) == 400 - len(spans)
    limit = TraceIdRatioBased.TRACE_ID_LIMIT
    for span in spans:
        assert span.context is not None
        assert span.context.trace_id & limit < sampler.bound
        assert span.parent is None and span.name == "process tasks"
        assert span.kind is SpanKind.CONSUMER
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == "aio_workq"
        assert list(span.attributes or {}) == [
            "messaging.system",
            "messaging.operation.type",
            "messaging.operation.name",
            "messaging.destination.name",
            "messaging.destination.subscription.name",
            "messaging.rabbitmq.message.delivery_tag",
            "aio_workq.attempt",
            "messaging.message.id",
            "messaging.rabbitmq.destination.routing_key",
            "messaging.message.conversation_id",
        ]
    assert all(trace_id & limit >= sampler.bound for trace_id in dropped)
    assert len(set(dropped) | {span.context.trace_id for span in spans if span.context}) == 400


class CountedContexts:
    """Counts the `SpanContext`s the hook makes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made = 0

        def counted(*args: Any, **kwargs: Any) -> SpanContext:
            self.made += 1
            return SpanContext(*args, **kwargs)

        monkeypatch.setattr("aio_workq.tracing.SpanContext", counted)


@pytest.mark.parametrize("headers", [None, {"traceparent": PARENT}], ids=["root", "child"])
def test_a_sampled_out_message_makes_its_span_context_only_when_asked(
    headers: dict[str, Any] | None,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Most handlers never look at their span: a sampled-out message's span context (a span id
    from the SDK's ids for a root, the traceparent's numbers for a child) is made the first
    time it is asked for, then is the same whenever asked, as the SDK's span's."""
    made = CountedContexts(monkeypatch)
    hook = _hook(ParentBased(TraceIdRatioBased(0.0)), exporter)
    for _ in range(3):
        with hook.handling(NotedJob(headers), "tasks"):
            span = trace.get_current_span()
    assert made.made == 0
    assert not span.is_recording()
    with hook.handling(NotedJob(headers), "tasks"):
        span = trace.get_current_span()
        context = span.get_span_context()
        assert made.made == 1
        assert span.get_span_context() is context and made.made == 1
        forwarded = _forward(hook)["traceparent"]
    assert repr(span) == f"NonRecordingSpan({context!r})"
    assert context.is_valid and not context.trace_flags.sampled
    assert forwarded.startswith(f"00-{context.trace_id:032x}-")
    if headers:  # the producer's span, as the W3C propagator reads it
        assert context.is_remote and context.span_id == 0xB7AD6B7169203331
        assert context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    else:
        assert not context.is_remote and context.trace_flags == 0x02


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-00000000000000000000000000000000-b7ad6b7169203331-00",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-00",
    ],
    ids=["trace-id", "span-id"],
)
def test_an_invalid_traceparent_makes_the_message_a_root(
    traceparent: str, exporter: InMemorySpanExporter
) -> None:
    """As the W3C propagator reads it: no parent, so the ratio decides (here: keeps it)."""
    hook = _hook(ParentBased(TraceIdRatioBased(1.0)), exporter)
    context = _handle(hook, NotedJob({"traceparent": traceparent}))
    (span,) = exporter.get_finished_spans()
    assert span.parent is None and span.context is not None
    assert span.context.trace_id == context.trace_id != 0


class Dropping(Noting):
    """Drops everything, noting each call."""

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        super().should_sample(*args, **kwargs)
        return SamplingResult(Decision.DROP)

    def get_description(self) -> str:
        return "Dropping"


@pytest.mark.parametrize("parent_based", [False, True], ids=["alone", "parent-based-root"])
def test_a_custom_sampler_is_asked_for_every_root(
    parent_based: bool, exporter: InMemorySpanExporter
) -> None:
    sampler = Dropping()
    hook = _hook(ParentBased(sampler) if parent_based else sampler, exporter)
    for _ in range(3):
        _handle(hook, NotedJob())
    assert len(sampler.shown) == 3
    assert exporter.get_finished_spans() == ()


def test_the_outcome_goes_on_the_messages_own_span_whatever_span_is_current(
    exporter: InMemorySpanExporter,
) -> None:
    """`after_handle` finds the message's span by its job, not as the current span: a hook
    entered after the tracing one may have made a span of its own current."""
    hook = _hook(ALWAYS_ON, exporter)
    tracer = trace.get_tracer("inner", tracer_provider=TracerProvider())  # not exported

    class Inner(Hook):
        def handling(self, job: JobView, queue: str) -> AbstractContextManager[Any]:
            return tracer.start_as_current_span("inner")

    hooks = Hooks.of([hook, Inner()])
    assert hooks is not None
    job = NotedJob()
    entered = hooks.begin(job, "tasks")
    hooks.end(job, "tasks", entered, (Outcome.OK, None, None), None)
    (span,) = exporter.get_finished_spans()
    assert dict(span.attributes or {})["aio_workq.outcome"] == "ok"


class Ratio(TraceIdRatioBased):
    """A user's subclass of the SDK's ratio sampler: its decision is its own."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self.asked = 0

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        self.asked += 1
        return SamplingResult(Decision.DROP)


def test_a_subclass_of_the_ratio_sampler_is_asked_for_every_root(
    exporter: InMemorySpanExporter,
) -> None:
    sampler = Ratio()
    hook = _hook(sampler, exporter)
    for _ in range(3):
        assert not _handle(hook, NotedJob()).trace_flags.sampled
    assert sampler.asked == 3 and exporter.get_finished_spans() == ()


def test_the_samplers_the_sdk_configures_from_the_environment_are_decided_here(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`OTEL_TRACES_SAMPLER=parentbased_traceidratio` gives the SDK's `ParentBased` subclass."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    counted = Counted(monkeypatch)
    provider = TracerProvider()
    assert type(provider.sampler) is not ParentBased
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hook = TracingHook(tracer_provider=provider)
    for _ in range(3):
        assert _handle(hook, NotedJob()).is_valid
    assert counted.calls == 0 and exporter.get_finished_spans() == ()


def test_with_the_sdks_own_span_counts_on_every_root_is_its_span(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED`: the SDK counts the spans it starts."""
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    counted = Counted(monkeypatch)
    hook = _hook(ParentBased(TraceIdRatioBased(0.0)), exporter)
    for _ in range(3):
        _handle(hook, NotedJob())
    assert counted.calls == 3


def test_a_publish_the_sampler_drops_asks_the_sdk_for_no_span(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer's root, and a forward under a consumer span sampled out: their spans are
    the SDK's non-recording ones, made without it; the traceparent carries them on."""
    counted = Counted(monkeypatch)
    hook = _hook(ParentBased(TraceIdRatioBased(0.0)), exporter)
    root = _forward(hook)["traceparent"]
    with hook.handling(NotedJob(), "tasks"):
        consumer = trace.get_current_span().get_span_context()
        forwarded = _forward(hook)["traceparent"]
    assert counted.calls == 0
    version, trace_id, span_id, flags = root.split("-")
    assert version == "00" and int(trace_id, 16) != 0 and flags == "02"
    assert trace_id != f"{consumer.trace_id:032x}"
    version, trace_id, span_id, flags = forwarded.split("-")
    assert (version, trace_id, flags) == ("00", f"{consumer.trace_id:032x}", "02")
    assert span_id != f"{consumer.span_id:016x}"
    assert exporter.get_finished_spans() == ()


def test_a_ratio_sampled_publish_is_recorded_at_its_rate_and_as_the_sdk_records_it(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    random.seed(22)
    counted = Counted(monkeypatch)
    sampler = TraceIdRatioBased(0.5)
    hook = _hook(ParentBased(sampler), exporter)
    sent = [_forward(hook)["traceparent"] for _ in range(400)]
    spans = exporter.get_finished_spans()
    assert 150 <= len(spans) <= 250 and counted.calls == len(spans)
    assert sum(parent.endswith("-03") for parent in sent) == len(spans)
    for span in spans:
        assert span.context is not None and span.parent is None
        assert span.context.trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < sampler.bound
        assert span.name == "publish next" and span.kind is SpanKind.PRODUCER
        assert dict(span.attributes or {}) == {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": "",
            "messaging.message.id": "f-1",
            "messaging.rabbitmq.destination.routing_key": "next",
        }


@pytest.mark.parametrize("parent", ["none", "unsampled"])
def test_the_hooks_only_bench_runs(parent: str) -> None:
    """`python -m bench.observability --hooks-only` (for callgrind) can't rot."""
    from bench.observability import main

    assert main(["--child", "sampled", "--hooks-only", "--n", "50", "--parent", parent]) == 0


@pytest.mark.parametrize("sampler", [ParentBased(ALWAYS_OFF), ALWAYS_ON], ids=["parent", "on"])
def test_a_message_its_producer_sampled_is_started_with_all_its_attributes(
    sampler: Sampler, exporter: InMemorySpanExporter
) -> None:
    """Its traceparent says sampled and the sampler records every such span (`ParentBased`,
    `ALWAYS_ON`): its span is started with the message's own attributes too, in one go (a
    processor's `on_start` sees them), the same attributes in the same order as before."""
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

    class Starts(SpanProcessor):
        def __init__(self) -> None:
            self.seen: list[dict[str, Any]] = []

        def on_start(self, span: Any, parent_context: Context | None = None) -> None:
            self.seen.append(dict(cast(ReadableSpan, span).attributes or {}))

    provider = TracerProvider(sampler=sampler)
    starts = Starts()
    provider.add_span_processor(starts)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hook = TracingHook(tracer_provider=provider)
    with hook.handling(NotedJob({"traceparent": PARENT[:-2] + "01"}), "tasks"):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.parent is not None and span.parent.span_id == 0xB7AD6B7169203331
    own = {
        "messaging.rabbitmq.message.delivery_tag": 7,
        "aio_workq.attempt": 2,
        "messaging.message.id": "m-1",
        "messaging.rabbitmq.destination.routing_key": "tasks",
        "messaging.message.conversation_id": "c-1",
    }
    assert starts.seen == [{**SHARED, **own}]
    assert list(span.attributes or {}) == [*SHARED, *own]  # (the outcome: told by Hooks)


SHARED = {
    "messaging.system": "rabbitmq",
    "messaging.operation.type": "process",
    "messaging.operation.name": "process",
    "messaging.destination.name": "",
    "messaging.destination.subscription.name": "tasks",
}
