"""OpenTelemetry tracing (issue 14, part 4): spans checked with the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from aio_workq import Job, Producer, Reject, Retry, Worker
from aio_workq.tracing import TracingHook
from tests.helpers import Counter, wait_until

pytestmark = pytest.mark.broker


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


async def _finished(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """The finished spans, once there are `count` (a span ends once its message is settled)."""

    async def enough() -> bool:
        return len(exporter.get_finished_spans()) >= count

    await wait_until(enough)
    return list(exporter.get_finished_spans())


def _attr(span: ReadableSpan, key: str) -> Any:
    assert span.attributes is not None
    return span.attributes[key]


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def _trace(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


async def test_one_trace_from_the_request_through_a_chain_and_a_retry(
    amqp_url: str,
    make_worker: Callable[..., Worker],
    queue_name: str,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    hooks = [TracingHook(tracer_provider=provider)]
    second = f"{queue_name}-next"
    done = Counter()

    async def first_step(job: Job) -> None:
        await job.forward({"step": 2}, queue=second)

    async def second_step(job: Job) -> None:
        if job.attempt == 1:
            raise Retry(delay=0)
        done.add(job.message_id)

    await make_worker(queue=queue_name, handler=first_step, hooks=hooks).start()
    await make_worker(queue=second, handler=second_step, hooks=hooks).start()
    tracer = provider.get_tracer("tests")
    async with Producer(amqp_url, hooks=hooks) as producer:
        with tracer.start_as_current_span("request") as request:
            message_id = await producer.publish({"step": 1}, queue=queue_name)
    await done.wait_for(1)
    spans = await _finished(exporter, 6)
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    assert sorted(by_name) == sorted(
        ["request", f"publish {queue_name}", f"process {queue_name}", f"publish {second}",
         f"process {second}"]
    )  # fmt: skip
    (publish_1,) = by_name[f"publish {queue_name}"]
    (process_1,) = by_name[f"process {queue_name}"]
    (publish_2,) = by_name[f"publish {second}"]
    attempts = sorted(by_name[f"process {second}"], key=lambda s: _attr(s, "aio_workq.attempt"))
    assert len(attempts) == 2

    # One trace: request -> publish -> process -> publish (forward) -> process (both attempts).
    assert {_trace(s) for s in spans} == {request.get_span_context().trace_id}
    assert _parent(publish_1) == request.get_span_context().span_id
    assert _parent(process_1) == _id(publish_1)
    assert _parent(publish_2) == _id(process_1)
    assert [_parent(s) for s in attempts] == [_id(publish_2), _id(publish_2)]

    assert publish_1.kind is SpanKind.PRODUCER and process_1.kind is SpanKind.CONSUMER
    assert publish_1.attributes is not None and process_1.attributes is not None
    assert publish_1.attributes["messaging.system"] == "rabbitmq"
    assert publish_1.attributes["messaging.operation.type"] == "send"
    assert publish_1.attributes["messaging.destination.name"] == ""
    assert publish_1.attributes["messaging.rabbitmq.destination.routing_key"] == queue_name
    assert publish_1.attributes["messaging.message.id"] == message_id
    assert process_1.attributes["messaging.operation.type"] == "process"
    assert process_1.attributes["messaging.message.id"] == message_id
    assert process_1.attributes["messaging.destination.subscription.name"] == queue_name
    assert process_1.attributes["aio_workq.outcome"] == "ok"
    failed, retried = attempts
    assert failed.attributes is not None and retried.attributes is not None
    assert failed.attributes["aio_workq.outcome"] == "retry"
    assert failed.attributes["error.type"] == "aio_workq.Retry"
    assert failed.status.status_code is StatusCode.ERROR
    assert retried.attributes["aio_workq.outcome"] == "ok"
    assert retried.status.status_code is not StatusCode.ERROR


async def test_a_dead_letter_replayed_stays_in_the_trace_of_its_publish(
    amqp_url: str,
    make_worker: Callable[..., Worker],
    queue_name: str,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    hooks = [TracingHook(tracer_provider=provider)]
    seen = Counter()

    async def handle(job: Job) -> None:
        seen.add(job.message_id)
        if len(seen.items) == 1:
            raise Reject("not yet")

    await make_worker(queue=queue_name, handler=handle, hooks=hooks).start()
    async with Producer(amqp_url, hooks=hooks) as producer:
        await producer.publish("x", queue=queue_name)
        await seen.wait_for(1)
        dead_letters = producer.dead_letters(queue_name)

        async def dead_lettered() -> bool:
            return await dead_letters.count() == 1

        await wait_until(dead_lettered)
        letters = await dead_letters.read()
        assert "traceparent" in letters[0].headers
        assert await dead_letters.replay() == 1
        await seen.wait_for(2)
    spans = await _finished(exporter, 3)
    (publish,) = [s for s in spans if s.kind is SpanKind.PRODUCER]
    processes = [s for s in spans if s.kind is SpanKind.CONSUMER]
    assert len(processes) == 2
    assert [_parent(s) for s in processes] == [_id(publish), _id(publish)]
    assert {_trace(s) for s in spans} == {_trace(publish)}
    outcomes = [_attr(s, "aio_workq.outcome") for s in processes]
    assert sorted(outcomes) == ["dead-lettered", "ok"]
