"""What `TracingHook` costs a consumer per message, bounded without timing (#22, the hooks).

Offline: the hooks called as the worker calls them (`Hooks.begin`/`end` around the handler),
the Python calls per message counted by a profile function: for 11 messages less 1, over 10.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

from aio_workq import Outcome
from aio_workq._hooks import Hooks
from aio_workq.tracing import TracingHook

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"  # sampled out upstream


class Job:
    """A `JobView` whose fields are plain attributes (no call of their own to count)."""

    def __init__(self, headers: dict[str, Any]) -> None:
        self.headers = headers

    body = data = b""
    message_id: str | None = "m-1"
    content_type: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    redelivered = False
    routing_key = exchange = ""
    attempt = 1
    delivery_tag = 7


def _calls_per_message(hook: TracingHook, headers: dict[str, Any]) -> Counter[str]:
    """The Python calls (function: count) one message costs through the hooks."""
    hooks = Hooks.of([hook])
    assert hooks is not None

    def count(messages: int) -> Counter[str]:
        jobs = [Job(headers) for _ in range(messages)]
        calls: Counter[str] = Counter()

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call":
                calls[frame.f_code.co_qualname] += 1

        previous = sys.getprofile()
        sys.setprofile(profile)
        try:
            for job in jobs:
                entered = hooks.begin(job, "tasks")
                hooks.end(job, "tasks", entered, (Outcome.OK, None, None), None)
        finally:
            sys.setprofile(previous)
        return calls

    one, eleven = count(1), count(11)
    eleven.subtract(one)
    return Counter({name: calls // 10 for name, calls in eleven.items() if calls >= 10})


class Collect(SpanProcessor):
    """Keeps the ended spans (no context of its own attached, as `SimpleSpanProcessor`
    does: its calls would be counted with the hook's)."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


def _hook(sampler: Any, processor: SpanProcessor | None = None) -> TracingHook:
    provider = TracerProvider(sampler=sampler)
    if processor is not None:
        provider.add_span_processor(processor)
    return TracingHook(tracer_provider=provider)


@pytest.mark.parametrize("headers", [{}, {"traceparent": PARENT}], ids=["root", "child"])
def test_a_sampled_out_message_costs_a_few_calls_and_no_handle_info(
    headers: dict[str, Any],
) -> None:
    """Sampled out (a root the ratio drops, or its producer's decision): the hook decides,
    makes the span current and leaves it; no `HandleInfo` is built for it, no `after_handle`
    called (only a recorded span takes the outcome), no context copied through
    `set_span_in_context`'s layers, none made current or left through the API's two layers
    (its context variable's own `set` and `reset`), no call for the SDK's random trace id,
    no `__init__` for the span and its manager. 20 calls a message before, then 14 (a root)
    and 15 (its producer's decision)."""
    calls = _calls_per_message(_hook(ParentBased(TraceIdRatioBased(0.0))), headers)
    assert "HandleInfo.__init__" not in calls and "TracingHook.after_handle" not in calls
    assert "set_value" not in calls
    assert not {"get_current", "attach", "detach"} & set(calls), calls
    assert "RandomIdGenerator.generate_trace_id" not in calls
    # begin, handling, enter, end, exit (and for a child the propagator's check: two).
    assert sum(calls.values()) <= (5 if not headers else 7), calls


def test_a_recorded_message_costs_few_calls_beyond_the_sdk_s() -> None:
    """A recorded root: beyond the SDK's own calls (starting, ending and its attributes),
    the hook's and the OpenTelemetry API's it calls. 27 a message before (the outcome through
    `after_handle` and its `HandleInfo`, three layers of exit, the id generator's wrappers),
    then 17 (the API's layers of `get_current`, `attach` and `detach`, the SDK's random trace
    id)."""
    collect = Collect()
    calls = _calls_per_message(_hook(ALWAYS_ON, collect), {})
    ours = {
        name: count
        for name, count in calls.items()
        if name.split(".")[0]
        in {"Hooks", "TracingHook", "_Roots", "_Pinned", "_Recording", "_Ended", "_Current",
            "_own", "HandleInfo", "set_span_in_context", "set_value", "get_current", "attach",
            "detach", "ContextVarsRuntimeContext", "property", "Enum"}
    }  # fmt: skip
    assert sum(ours.values()) <= 10, ours
    assert len(collect.spans) == 12  # the outcome still on each
    assert all(dict(span.attributes or {})["aio_workq.outcome"] == "ok" for span in collect.spans)


def test_a_span_is_made_current_as_set_span_in_context_makes_it() -> None:
    """The hook makes a message's span current in a `Context` it builds (the current one's
    entries and the span, under the key `set_span_in_context` uses, read once at import):
    what the API's function would make, other entries (baggage) kept, the span read back by
    `get_current_span`."""
    from opentelemetry import baggage, trace
    from opentelemetry import context as otel_context

    from aio_workq import tracing

    assert tracing._SPAN_KEY is not None  # this API is the one known: the shortcut is taken
    hook = _hook(ParentBased(TraceIdRatioBased(0.0)))
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        outer = otel_context.get_current()
        with hook.handling(Job({"traceparent": PARENT}), "tasks") as span:
            current = otel_context.get_current()
            assert current == trace.set_span_in_context(span, outer)
            assert trace.get_current_span() is span
            assert baggage.get_baggage("tenant") == "acme"
        assert otel_context.get_current() is outer
    finally:
        otel_context.detach(token)


@pytest.mark.parametrize("times", [False, True], ids=["tracing-alone", "with-after-handle"])
async def test_a_handler_is_timed_only_for_a_hook_that_reads_its_time(
    times: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How long the handler ran reaches only `after_handle` (`HandleInfo.seconds`): with no
    hook that has one (`TracingHook` alone), the worker does not time its handlers (two clock
    reads and a dict entry per delivery before)."""
    import asyncio
    import struct
    import time
    from typing import cast

    from aio_workq import HandleInfo, Hook
    from aio_workq._consume import dispatch
    from aio_workq._consume.delivery import Delivery
    from tests.test_speed import _dispatcher, _Settled

    clock: list[float] = []
    perf_counter = time.perf_counter

    def counted() -> float:
        clock.append(perf_counter())
        return clock[-1]

    monkeypatch.setattr(dispatch, "perf_counter", counted)
    seen: list[HandleInfo] = []

    class Timed(Hook):
        def after_handle(self, info: HandleInfo) -> None:
            seen.append(info)

    hooks = Hooks.of([_hook(ParentBased(TraceIdRatioBased(0.0))), *([Timed()] if times else [])])
    dispatcher, settled = _dispatcher(hooks=hooks), _Settled()
    header = struct.pack(">HHQH", 60, 0, 1, 0)
    for tag in (1, 2, 3):
        delivery = Delivery(cast(Any, None), "c", tag, False, "", "tasks", header, b"x")
        dispatcher.dispatch(delivery, cast(Any, settled))
    await asyncio.wait(set(dispatcher.tasks))
    assert settled.acked == [1, 2, 3]
    assert hooks is not None and not hooks.durations
    if times:
        assert len(clock) == 6 and len(seen) == 3
        assert all(info.seconds is not None and info.seconds >= 0 for info in seen)
    else:
        assert clock == []


def test_a_dropped_root_has_the_trace_id_the_sdk_would_draw() -> None:
    """The SDK's `RandomIdGenerator` draws a trace id as `random.getrandbits(128)` (again on
    0): the hook draws it so, without the call, and the same seed gives the same id."""
    import random

    from opentelemetry import trace
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    hook = _hook(ParentBased(TraceIdRatioBased(0.0)))
    random.seed(7)
    with hook.handling(Job({}), "tasks"):
        drawn = trace.get_current_span().get_span_context().trace_id
    random.seed(7)
    assert drawn == RandomIdGenerator().generate_trace_id()


def test_a_root_under_an_id_generator_of_its_own_takes_its_trace_ids() -> None:
    """An id generator other than the SDK's own (a subclass too) is asked for each trace id."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class Fixed(RandomIdGenerator):
        def generate_trace_id(self) -> int:
            return 0xABC

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)), id_generator=Fixed())
    hook = TracingHook(tracer_provider=provider)
    with hook.handling(Job({}), "tasks"):
        assert trace.get_current_span().get_span_context().trace_id == 0xABC


def test_a_span_is_made_current_in_the_apis_own_context_variable() -> None:
    """The API keeps the current `Context` in one context variable (its default runtime
    context): the hook sets and resets that variable, what `attach` and `detach` do."""
    from opentelemetry import context as otel_context

    from aio_workq import tracing

    assert tracing._context_var() is tracing._VAR is not None
    probe = otel_context.Context({"probe": 1})
    token = tracing._attach(probe)
    assert otel_context.get_current() is probe and tracing._get_current() is probe
    tracing._detach(token)
    assert otel_context.get_current() is not probe


def test_a_recorded_span_left_in_another_context_is_ended_and_the_failure_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Leaving a span's context where it was not made current (a token of another context)
    raises in `reset`, which `detach` logged: the worker's hooks log it, and the span is
    still ended."""
    import contextvars

    collect = Collect()
    hooks = Hooks.of([_hook(ALWAYS_ON, collect)])
    assert hooks is not None
    job = Job({})
    entered = contextvars.copy_context().run(hooks.begin, job, "tasks")
    with caplog.at_level("ERROR", logger="aio_workq"):
        hooks.end(job, "tasks", entered, (Outcome.OK, None, None), None)
    assert len(collect.spans) == 1
    assert dict(collect.spans[0].attributes or {})["aio_workq.outcome"] == "ok"
    assert any("handling (exit)" in record.getMessage() for record in caplog.records)
