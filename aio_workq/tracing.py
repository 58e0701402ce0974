"""OpenTelemetry tracing: a producer span per publish, a consumer span per handled message.

Needs the `otel` extra: `pip install 'aio-workq[otel]'` (the API only; your application sets
up the SDK and an exporter).

```python
from aio_workq.tracing import TracingHook

hooks = [TracingHook()]
producer = Producer(hooks=hooks)
worker = Worker(queue="images", handler=resize, hooks=hooks)
```

The trace context (W3C `traceparent`, by default) travels in the message headers. The
failure headers of a retry or a dead letter copy the original headers, and a replay keeps
them, so a retried, dead-lettered or replayed message is traced under the same producer span;
a message a handler forwards (`job.forward()`) is a child of that handler's span: one trace
shows the request, its job, and the jobs chained after it.

Spans follow the OpenTelemetry messaging semantic conventions for RabbitMQ: `publish
{destination}` (kind PRODUCER, operation type `send`) and `process {queue}` (kind CONSUMER,
operation type `process`), with `messaging.system=rabbitmq`, `messaging.destination.name`
(the exchange, `""` for the default one), `messaging.rabbitmq.destination.routing_key`,
`messaging.message.id`, and on the consumer side the queue
(`messaging.destination.subscription.name`), the delivery tag, `aio_workq.attempt` and
`aio_workq.outcome`; a failed handler sets `error.type` and records the exception.

Sampled (e.g. `ParentBased(TraceIdRatioBased(0.1))`), a message the sampler leaves out costs
little: the decision comes first, shown the attributes every message of the queue shares
(system, operation, exchange, queue); the message's own (id, delivery tag, attempt, routing
key, correlation id) are read and set only on a span that records. A message whose producer
did not sample it (its `traceparent` says so) is not shown to the SDK at all when the sampler
follows the parent's decision (`ParentBased`, as by default, or `ALWAYS_OFF`) and the
propagator is the default W3C one: its `traceparent` is read here and made current, so what
the handler forwards carries the trace id and the decision on. A message without a trace
context (a root: its producer did not trace) under the SDK's `TraceIdRatioBased` (alone or as
`ParentBased`'s root, as above; `ALWAYS_ON`/`ALWAYS_OFF` too) is decided here as that sampler
decides, on a trace id from the SDK's id generator: one it leaves out is the non-recording span
the SDK would make, without asking the SDK; one it keeps is started by the SDK on that trace
id. Any other sampler is asked by the SDK for every root, as before. A message whose producer
sampled it, under a sampler that records every such span (`ParentBased`'s default, or
`ALWAYS_ON`), is started with all its attributes at once (the SDK checks them in one go; a span
processor's `on_start` sees them). The span made current for a sampled-out message (a dropped
root, or its producer's unsampled parent) makes its span context the first time it is asked
for (a dropped root's span id is drawn then): most handlers never ask, and what they forward,
or an instrumented client they call, does.

What this relies on in the OpenTelemetry SDK beyond its documented API, all read, none written
on the SDK's own objects, and each checked by `tests/test_tracing_sampling.py` (an SDK that
differs makes the hook stand aside and the SDK decide, as it does for a custom sampler):

1. `ParentBased.get_description()` names its delegates as `ParentBased{root:...,
   remoteParentSampled:...,...}` (`_delegates`; the `[nested]` cases of
   `test_a_sampler_that_keeps_unsampled_parents_is_asked`).
2. `TraceIdRatioBased.bound` and `get_bound_for_rate()` decide on the low 64 bits of the trace
   id (`test_a_ratio_sampled_root_is_recorded_at_its_rate_and_as_the_sdk_records_it`).
3. The SDK's `Tracer` takes its ids from its public `id_generator` attribute when it starts a
   span, and a shallow copy of it starts spans like it: the hook starts a kept root on a copy
   of its own whose `id_generator` hands over the trace id decided on (the provider's tracer
   is never changed; same test, and `test_a_root_the_sampler_drops_asks_the_sdk_for_no_span`).
4. The SDK's `RandomIdGenerator` (the default) draws a trace id as `random.getrandbits(128)`,
   again while it is 0: under that generator itself (not a subclass, nor another one) the hook
   draws a root's trace id so, without the call (and calls it on a 0);
   `test_a_dropped_root_has_the_trace_id_the_sdk_would_draw` and
   `test_a_root_under_an_id_generator_of_its_own_takes_its_trace_ids`.

And two in the OpenTelemetry API, read once at import: `trace.set_span_in_context(span,
context)` makes a `Context` (a dict) of `context`'s entries and the span under one key, which
`trace.get_current_span` reads back. The span of each message is made current as a `Context`
built so from the current one, without that function's three calls; an API that differs (more
than one key, or a `Context` of that key the API does not read back) keeps the function in use
(`_span_key`; `test_a_span_is_made_current_as_set_span_in_context_makes_it` in
`tests/test_tracing_cost.py`). And the API's default runtime context keeps the current
`Context` in one context variable (`_RUNTIME_CONTEXT._current_context`, read, never replaced):
`attach`, `get_current` and `detach` are its `set`, `get` and `reset` under two layers, so the
hook calls those three itself, checked at import both ways (what `attach` makes current is the
variable's value, and its value is what `get_current` gives); under another runtime context
(`OTEL_PYTHON_CONTEXT`) the API's functions are used (`_context_var`;
`test_a_span_is_made_current_in_the_apis_own_context_variable`). A handler sees no difference:
`trace.get_current_span()` gives the message's span, and instrumentations read it as the API
made it current. Where `detach` would log a token it cannot reset (a span left in a context
other than the one it was made current in), `reset` raises and the worker's hooks log it; a
recording span is ended all the same.

The worker's hooks tell a recording consumer span its outcome (`aio_workq.outcome`, the error)
just before leaving it (`_hooks.Settling`): the hook has no `after_handle`, so a message it does
not record costs no `HandleInfo` and no call for it.
"""

from __future__ import annotations

import copy
import os
import random
import re
import threading
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

from ._exceptions import ConfigurationError, qualname
from ._hooks import Hook, JobView, Outcome, PublishInfo, Settling
from ._version import __version__

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import (
        NonRecordingSpan,
        ProxyTracer,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        TracerProvider,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "aio_workq.tracing needs opentelemetry-api: pip install 'aio-workq[otel]'"
    ) from exc

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from types import TracebackType

__all__ = ("TracingHook",)

_Context = otel_context.Context
_new = object.__new__
"""Makes an object of a class of ours without calling its `__init__` (its slots set by the
caller, as `__init__` would): the per-message spans and managers of sampled-out messages."""
_NO_PARENT = _Context()
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
"""A W3C `traceparent` of version 00 as it is written (the propagator also takes spaces)."""
_W3C = (
    frozenset({"traceparent", "tracestate"}),
    frozenset({"traceparent", "tracestate", "baggage"}),
)
"""The fields of W3C trace context (and baggage) propagators: the default one."""
_RATIO = re.compile(r"TraceIdRatioBased\{(.+)\}")
"""The description of the SDK's `TraceIdRatioBased` (as `ParentBased`'s root)."""
_STATIC = {"AlwaysOffSampler": 0, "AlwaysOnSampler": 1 << 64}
"""The root bounds of the SDK's `ALWAYS_OFF` and `ALWAYS_ON` (alone or as a root)."""
_LOW_64 = (1 << 64) - 1
"""The bits of a trace id the SDK's `TraceIdRatioBased` decides on."""
_FLAGS = {f"{flags:02x}": TraceFlags(flags) for flags in range(256)}
_SAMPLED = {text: flags.sampled for text, flags in _FLAGS.items()}
_INVALID_TRACE_ID = "0" * 32
_INVALID_SPAN_ID = "0" * 16
_SHARED_MAX = 1024
"""(queue, exchange) pairs whose span name and shared attributes are kept (then started over)."""
_FAILED = frozenset({Outcome.RETRY, Outcome.DEAD_LETTERED, Outcome.REJECTED, Outcome.FAILED})
_OUTCOMES = {outcome: outcome.value for outcome in Outcome}
"""The `aio_workq.outcome` of each outcome (a plain str: `.value` is two calls of enum's)."""


class TracingHook(Hook):
    """Traces publishes and handled messages, carrying the context in message headers.

    Args:
        tracer_provider: where spans go (default: the global one, set by the SDK).
        propagator: how the context is written to and read from headers (default: the
            global propagator, W3C trace context and baggage).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("aio_workq", __version__, tracer_provider=tracer_provider)
        self._tracer_provider = tracer_provider
        self._propagator = propagator
        self._shared: dict[tuple[str, str], tuple[str, Mapping[str, Any]]] = {}
        self._w3c_of: TextMapPropagator | None = None
        """The propagator `_w3c` was found for."""
        self._w3c = False
        """Whether the propagator reads W3C trace context only (and baggage)."""
        self._drops_unsampled: bool | None = None
        """Whether the sampler drops a span whose remote parent was not sampled (`None`: the
        tracer is not the SDK's yet)."""
        self._keeps_sampled = False
        """Whether the SDK's sampler records every span whose remote parent was sampled
        (`ParentBased`, as by default, or `ALWAYS_ON`): such a span is then started with all
        its attributes."""
        self._roots: _Roots | None = None
        """How a root is decided here (`None`: not looked at yet, or the SDK decides)."""
        self._roots_known = False
        """Whether `_roots` was worked out (from the SDK's tracer)."""

    def _reads_w3c(self) -> bool:
        """Whether the propagator in use reads W3C trace context (and baggage) only, so that
        a `traceparent` read here gives what it would."""
        propagator = self._propagator or propagate.get_global_textmap()
        if propagator is not self._w3c_of:
            self._w3c_of = propagator
            self._w3c = frozenset(propagator.fields) in _W3C
        return self._w3c

    def _sampler_drops_unsampled(self) -> bool:
        """Whether the SDK's sampler drops every span whose remote parent was not sampled
        (`ParentBased`, as by default, or `ALWAYS_OFF`): told by its description."""
        tracer = self._tracer
        if isinstance(tracer, ProxyTracer):  # no SDK when the hook was made: maybe now
            tracer = trace.get_tracer("aio_workq", __version__, self._tracer_provider)
            if isinstance(tracer, ProxyTracer):
                return False
            self._tracer = tracer
        sampler = getattr(tracer, "sampler", None)
        description = sampler.get_description() if sampler is not None else ""
        drops = description == "AlwaysOffSampler" or (
            _delegates(description).get("remoteParentNotSampled") == "AlwaysOffSampler"
        )
        self._drops_unsampled = drops
        self._keeps_sampled = description == "AlwaysOnSampler" or (
            _delegates(description).get("remoteParentSampled") == "AlwaysOnSampler"
        )
        if not self._roots_known:
            self._roots = _Roots.of(tracer, sampler, description)
            self._roots_known = True
        return drops

    def _records_sampled(self) -> bool:
        """Whether the SDK's sampler records every span whose remote parent was sampled."""
        if self._drops_unsampled is None:  # not looked at yet (or no SDK yet)
            self._sampler_drops_unsampled()
        return self._keeps_sampled

    def _root_plan(self) -> _Roots | None:
        """How a root is decided here, once the SDK's tracer is known (`None`: by the SDK)."""
        self._sampler_drops_unsampled()
        return self._roots

    def _inject(self, headers: dict[str, Any], span: trace.Span) -> None:
        context = trace.set_span_in_context(span)
        if self._propagator is None:
            propagate.inject(headers, context=context)
        else:
            self._propagator.inject(headers, context=context)

    def before_publish(self, message: PublishInfo) -> Any:
        roots = self._roots if self._roots_known else self._root_plan()
        if roots is not None:  # the SDK's ratio sampler: a span it drops is made here
            parent = trace.get_current_span().get_span_context()
            ids = roots.ids
            if not parent.is_valid:  # a root
                root_id: int = (roots.random and random.getrandbits(128)) or ids.generate_trace_id()
                if root_id & _LOW_64 >= roots.bound:
                    context = SpanContext(root_id, ids.generate_span_id(), False, roots.flags)
                    return self._inject_dropped(message, context)
            elif not parent.trace_flags.sampled and (
                roots.drops_remote_unsampled if parent.is_remote else roots.drops_local_unsampled
            ):  # under a span not sampled: what the SDK makes, as its trace's
                flags = TraceFlags(parent.trace_flags & roots.random_flag)
                span_id = ids.generate_span_id()
                context = SpanContext(parent.trace_id, span_id, False, flags, parent.trace_state)
                return self._inject_dropped(message, context)
            else:
                roots = None
        attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": message.exchange,
            "messaging.message.id": message.message_id,
        }
        if message.routing_key:
            attributes["messaging.rabbitmq.destination.routing_key"] = message.routing_key
        name = f"publish {message.destination}"
        if roots is not None:  # a root the ratio keeps: the SDK starts it, on that trace id
            span = roots.start(root_id, name, attributes, SpanKind.PRODUCER, None)
        else:
            span = self._tracer.start_span(name, kind=SpanKind.PRODUCER, attributes=attributes)
        self._inject(message.headers, span)
        return span

    def _inject_dropped(self, message: PublishInfo, context: SpanContext) -> trace.Span:
        """The span for a publish the sampler drops, its context written to the headers."""
        span = NonRecordingSpan(context)
        self._inject(message.headers, span)
        return span

    def after_publish(self, message: PublishInfo, state: Any) -> None:
        span: trace.Span = state
        error = message.error
        if error is not None:
            span.set_attribute("error.type", qualname(error))
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()

    def handling(self, job: JobView, queue: str) -> AbstractContextManager[Any]:
        # Sampling is decided first, on what every message of the queue shares (what a
        # sampler is shown); the message's own attributes are read only for a span that
        # records. A message whose producer did not sample it costs reading its traceparent
        # and making it current (so what it forwards carries the decision on): no SDK span.
        # A root costs the SDK's decision and making its span current.
        headers = job.headers
        if not headers:
            parent = _NO_PARENT  # what extracting from no headers gives
        elif (
            (traceparent := headers.get("traceparent")).__class__ is str
            and "tracestate" not in headers
            and "baggage" not in headers
            and self._reads_w3c()
            and (found := _TRACEPARENT.fullmatch(traceparent)) is not None
        ):
            # What the W3C propagator reads from a traceparent alone, without its layers.
            trace_id, span_id, flags = found.groups()
            if trace_id == _INVALID_TRACE_ID or span_id == _INVALID_SPAN_ID:
                parent = _NO_PARENT
            elif not _SAMPLED[flags] and (self._drops_unsampled or self._sampler_drops_unsampled()):
                # Sampled out by its producer: its span and the manager making it current,
                # as `_Current(_Remote(trace_id, span_id, flags))` makes them (without their
                # `__init__` calls: this runs for most messages).
                remote = _new(_Remote)
                remote._made = None
                remote._trace_id, remote._span_id, remote._flags = trace_id, span_id, flags
                current = _new(_Current)
                current._span = remote
                return current
            else:
                context = SpanContext(int(trace_id, 16), int(span_id, 16), True, _FLAGS[flags])
                parent = trace.set_span_in_context(NonRecordingSpan(context))
                if _SAMPLED[flags] and self._records_sampled():
                    # Recorded whatever it is shown: all its attributes at once (the SDK
                    # checks them in one go, rather than in a second call with its locks).
                    exchange = job.exchange
                    name, attributes = self._shared.get((queue, exchange)) or self._share(
                        queue, exchange
                    )
                    span = self._tracer.start_span(
                        name,
                        context=parent,
                        kind=SpanKind.CONSUMER,
                        attributes=_own(job, dict(attributes)),
                    )
                    return _Recording(span) if span.is_recording() else _Ended(span)
        elif "traceparent" not in headers and "baggage" not in headers and self._reads_w3c():
            parent = _NO_PARENT  # what the W3C propagator reads from them: no trace context
        elif self._propagator is None:
            parent = propagate.extract(headers)
        else:
            parent = self._propagator.extract(headers)
        if parent is _NO_PARENT:
            roots = self._roots if self._roots_known else self._root_plan()
            if roots is not None:  # the SDK's ratio sampler: decided here, as it would
                # The SDK's `RandomIdGenerator.generate_trace_id`, without its call (it
                # draws again on 0: its own call does that here).
                root_id: int = (
                    roots.random and random.getrandbits(128)
                ) or roots.ids.generate_trace_id()
                if root_id & _LOW_64 >= roots.bound:  # left out: the span the SDK makes
                    # As `_Current(_Dropped(root_id, roots))` makes them (see above).
                    dropped = _new(_Dropped)
                    dropped._made = None
                    dropped._trace_id, dropped._roots = root_id, roots
                    current = _new(_Current)
                    current._span = dropped
                    return current
                exchange = job.exchange
                name, attributes = self._shared.get((queue, exchange)) or self._share(
                    queue, exchange
                )
                own = _own(job, dict(attributes))
                span = roots.start(root_id, name, own, SpanKind.CONSUMER, _NO_PARENT)
                if span.is_recording():  # as the sampler, asked again there, says
                    return _Recording(span)
                return _Ended(span)
        exchange = job.exchange
        name, attributes = self._shared.get((queue, exchange)) or self._share(queue, exchange)
        span = self._tracer.start_span(
            name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        if span.is_recording():
            span.set_attributes(_own(job, {}))
            return _Recording(span)
        return _Ended(span)

    def _share(self, queue: str, exchange: str) -> tuple[str, Mapping[str, Any]]:
        """The span name and the attributes every message of (queue, exchange) shares."""
        if len(self._shared) >= _SHARED_MAX:
            self._shared.clear()
        attributes = MappingProxyType(
            {
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": exchange,
                "messaging.destination.subscription.name": queue,
            }
        )
        shared = self._shared[(queue, exchange)] = (f"process {queue}", attributes)
        return shared


def _own(job: JobView, own: dict[str, Any]) -> dict[str, Any]:
    """`own` with the attributes of a consumer span that are the message's own (read only to
    record) added."""
    own["messaging.rabbitmq.message.delivery_tag"] = job.delivery_tag
    own["aio_workq.attempt"] = job.attempt
    if message_id := job.message_id:
        own["messaging.message.id"] = message_id
    if routing_key := job.routing_key:
        own["messaging.rabbitmq.destination.routing_key"] = routing_key
    if correlation_id := job.correlation_id:
        own["messaging.message.conversation_id"] = correlation_id
    return own


class _Roots:
    """Decides a root consumer span (a message without a trace context) as the SDK's
    `TraceIdRatioBased` (alone or as `ParentBased`'s root; `ALWAYS_ON`, `ALWAYS_OFF` too) does:
    on the low 64 bits of a trace id from the SDK's id generator.

    A root the ratio leaves out is made here as the SDK's `Tracer.start_span` makes it, with
    public API and without asking it: a `NonRecordingSpan` of that trace id, a new span id,
    not sampled (the random-trace-id flag as the SDK sets it), no trace state. A root the
    ratio keeps is started by the SDK, on that same trace id: a copy of the SDK's tracer whose
    id generator hands it the id decided on (once, in this thread), so the sampler, asked
    again there, keeps it; one SDK span per recorded message, none per dropped one.
    """

    __slots__ = (
        "_pinned",
        "_trace_id",
        "bound",
        "drops_local_unsampled",
        "drops_remote_unsampled",
        "flags",
        "ids",
        "random",
        "random_flag",
    )

    def __init__(self, tracer: trace.Tracer, ids: Any, bound: int, description: str) -> None:
        self.bound = bound
        """A root whose trace id's low 64 bits are below this is recorded."""
        self.ids = ids
        """The SDK's id generator."""
        self.random = _is_random_id_generator(ids)
        """Whether `ids` is the SDK's `RandomIdGenerator` itself (not a subclass): its trace id
        is then drawn here as it draws one, `random.getrandbits(128)` (again on 0)."""
        self.random_flag = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)
        """The random-trace-id flag (0 before the API had it), which a child keeps."""
        is_random = getattr(ids, "is_trace_id_random", None)
        random_ids = is_random is not None and is_random()
        self.flags = TraceFlags(self.random_flag if random_ids else 0)
        """The trace flags of a root the SDK does not sample."""
        always_off = description == "AlwaysOffSampler"
        delegates = _delegates(description)
        self.drops_remote_unsampled = (
            always_off or delegates.get("remoteParentNotSampled") == "AlwaysOffSampler"
        )
        """Whether a span whose remote parent was not sampled is dropped."""
        self.drops_local_unsampled = (
            always_off or delegates.get("localParentNotSampled") == "AlwaysOffSampler"
        )
        """Whether a span whose parent in this process was not sampled is dropped."""
        self._trace_id = _Pending()
        self._pinned = copy.copy(tracer)  # ours: the provider's tracer is left as it is
        cast(Any, self._pinned).id_generator = _Pinned(ids, self._trace_id)

    @classmethod
    def of(cls, tracer: trace.Tracer, sampler: Any, description: str) -> _Roots | None:
        """How `tracer` (the SDK's) decides roots, if its sampler is one of the SDK's that
        decide on the trace id alone; `None` (the SDK decides) for any other sampler, and when
        the SDK counts the spans it starts (`OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED`)."""
        ids = getattr(tracer, "id_generator", None)
        if sampler is None or ids is None or _sdk_counts_spans():
            return None
        try:
            return cls._of(tracer, ids, sampler, description)
        except Exception:  # an SDK that differs from the one known here: it decides
            return None

    @classmethod
    def _of(cls, tracer: trace.Tracer, ids: Any, sampler: Any, description: str) -> _Roots | None:
        from opentelemetry.sdk.trace import sampling  # the SDK is there: a sampler is

        if type(sampler).__module__ != sampling.__name__:  # not the SDK's (or a subclass)
            return None
        if isinstance(sampler, sampling.TraceIdRatioBased):
            return cls(tracer, ids, sampler.bound, description)
        parent_based = isinstance(sampler, sampling.ParentBased)
        if parent_based:  # its root is told only by its description
            root = _delegates(description).get("root", "")
        elif isinstance(sampler, sampling.StaticSampler):
            root = description
        else:
            return None
        if root in _STATIC:
            return cls(tracer, ids, _STATIC[root], description)
        if parent_based and (found := _RATIO.fullmatch(root)) is not None:
            try:
                rate = float(found[1])
            except ValueError:
                return None
            bound = sampling.TraceIdRatioBased.get_bound_for_rate(rate)
            return cls(tracer, ids, bound, description)
        return None

    def start(
        self,
        trace_id: int,
        name: str,
        attributes: dict[str, Any],
        kind: SpanKind,
        context: otel_context.Context | None,
    ) -> trace.Span:
        """The SDK's span for a root its sampler keeps, on `trace_id`."""
        pending = self._trace_id
        pending.value = trace_id
        try:
            return self._pinned.start_span(name, context=context, kind=kind, attributes=attributes)
        finally:
            pending.value = None


class _Pending(threading.local):
    """The trace id the next root span started in this thread is to have."""

    value: int | None = None


class _Pinned:
    """The SDK's id generator, but for the trace id of a root decided on already (its span
    ids and whether its trace ids are random are the generator's own methods: no call of ours
    in between)."""

    __slots__ = ("_ids", "_pending", "generate_span_id", "is_trace_id_random")

    def __init__(self, ids: Any, pending: _Pending) -> None:
        self._ids = ids
        self._pending = pending
        self.generate_span_id: Callable[[], int] = ids.generate_span_id
        is_random = getattr(ids, "is_trace_id_random", None)
        self.is_trace_id_random: Callable[[], bool] = is_random or _not_random

    def generate_trace_id(self) -> int:
        pending = self._pending
        trace_id = pending.value
        if trace_id is None:
            return int(self._ids.generate_trace_id())
        pending.value = None
        return trace_id


def _is_random_id_generator(ids: Any) -> bool:
    """Whether `ids` is the SDK's `RandomIdGenerator` (exactly: a subclass may draw otherwise)."""
    try:
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    except ImportError:  # pragma: no cover - an SDK that moved it: its generator is called
        return False
    return type(ids) is RandomIdGenerator


def _not_random() -> bool:
    """`is_trace_id_random` of an id generator from before the SDK had it."""
    return False


def _span_key() -> str | None:
    """The one key `trace.set_span_in_context` puts a span under in the `Context` (a dict) it
    makes, when a `Context` of that key alone gives the span back to `get_current_span`;
    `None` (the API's function is used) otherwise."""
    probe = NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
    made = trace.set_span_in_context(probe, otel_context.Context())
    if len(made) != 1:
        return None
    (key,) = made
    if made[key] is not probe or trace.get_current_span(otel_context.Context(made)) is not probe:
        return None
    return key


_SPAN_KEY = _span_key()
"""Where `set_span_in_context` puts the span (see `_span_key`): a span is made current with
the current context's entries and it, as that function does, without its three calls."""


def _context_var() -> ContextVar[otel_context.Context] | None:
    """The context variable the OpenTelemetry API keeps the current `Context` in (its default
    runtime context, `contextvars`), when what `attach` makes current is what the variable
    holds and what the variable is set to is what `get_current` gives; `None` (the API's
    functions are used) otherwise, e.g. under another runtime context (`OTEL_PYTHON_CONTEXT`)."""
    var = getattr(getattr(otel_context, "_RUNTIME_CONTEXT", None), "_current_context", None)
    if not isinstance(var, ContextVar):
        return None
    probe = otel_context.Context({"aio_workq.probe": True})
    token = otel_context.attach(probe)
    try:
        attached = var.get(None)
    finally:
        otel_context.detach(token)
    if attached is not probe:
        return None
    reset = var.set(probe)
    try:
        current = otel_context.get_current()
    finally:
        var.reset(reset)
    if current is not probe:
        return None
    return cast("ContextVar[otel_context.Context]", var)


_VAR = _context_var()
_get_current: Callable[[], otel_context.Context] = (
    otel_context.get_current if _VAR is None else _VAR.get
)
_attach: Callable[[otel_context.Context], Token[otel_context.Context]] = (
    otel_context.attach if _VAR is None else _VAR.set
)
_detach: Callable[[Token[otel_context.Context]], None] = (
    otel_context.detach if _VAR is None else _VAR.reset
)
"""`get_current`, `attach` and `detach` of the OpenTelemetry API, or what each of them does
(a layer of the API and one of its runtime context), its context variable's `get`, `set` and
`reset`, as a message's span is made current and left (see `_context_var`). Where `detach`
logs a token that cannot be reset, `reset` raises: the worker's hooks log it."""


def _delegates(description: str) -> dict[str, str]:
    """The samplers a description of the SDK's `ParentBased` names, by role (`root`,
    `remoteParentNotSampled`, ...: theirs may nest); empty for any other description."""
    if not (description.startswith("ParentBased{") and description.endswith("}")):
        return {}
    delegates: dict[str, str] = {}
    depth = start = 0
    inner = description[len("ParentBased{") : -1] + ","
    for at, char in enumerate(inner):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            role, _, sampler = inner[start:at].partition(":")
            delegates[role] = sampler
            start = at + 1
    return delegates


def _sdk_counts_spans() -> bool:
    """Whether the SDK counts the spans it starts, dropped ones too (then it starts them)."""
    value = os.environ.get("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "")
    return value.strip().lower() == "true"


class _Unsampled(NonRecordingSpan):
    """A span not sampled, made current while its message is handled, whose span context is
    made the first time it is asked for: most handlers never ask (what they forward, or an
    instrumented client they call, does)."""

    __slots__ = ("_made",)

    _made: SpanContext | None

    def __init__(self) -> None:  # no super().__init__(): its context is made on demand
        self._made = None

    def get_span_context(self) -> SpanContext:
        made = self._made
        if made is None:
            with _MAKING:  # a sync handler's threads may ask at once: one context
                made = self._made
                if made is None:
                    made = self._made = self._make()
        return made

    def _make(self) -> SpanContext:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"NonRecordingSpan({self.get_span_context()!r})"


_MAKING = threading.Lock()


class _Dropped(_Unsampled):
    """The span the SDK makes for a root its sampler leaves out, made here: a
    `NonRecordingSpan` of the trace id decided on, a new span id from the SDK's id generator,
    not sampled (the random-trace-id flag as the SDK sets it), no trace state."""

    __slots__ = ("_roots", "_trace_id")

    def __init__(self, trace_id: int, roots: _Roots) -> None:
        self._made = None
        self._trace_id = trace_id
        self._roots = roots

    def _make(self) -> SpanContext:
        roots = self._roots
        return SpanContext(self._trace_id, roots.ids.generate_span_id(), False, roots.flags)


class _Remote(_Unsampled):
    """The context of a message's `traceparent` (valid, not sampled), as the W3C propagator
    reads it: a remote `NonRecordingSpan`."""

    __slots__ = ("_flags", "_span_id", "_trace_id")

    def __init__(self, trace_id: str, span_id: str, flags: str) -> None:
        self._made = None
        self._trace_id = trace_id
        self._span_id = span_id
        self._flags = flags

    def _make(self) -> SpanContext:
        return SpanContext(
            int(self._trace_id, 16), int(self._span_id, 16), True, _FLAGS[self._flags]
        )


class _Current:
    """Makes a span made here (not recording: nothing to end) current while a delivery is
    handled and settled (a slimmer `start_as_current_span`: this runs once per message)."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def __enter__(self) -> trace.Span:
        span = self._span
        if _SPAN_KEY is None:
            context = trace.set_span_in_context(span)
        else:  # what it makes, without its layers
            context = _Context({**_get_current(), _SPAN_KEY: span})
        self._token = _attach(context)
        return span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _detach(self._token)


class _Ended(_Current):
    """Makes a span the tracer started current while a delivery is handled and settled, then
    ends it."""

    __slots__ = ()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            _detach(self._token)
        finally:  # ended even if the token could not be reset (it raises: logged)
            if exc is not None:  # the worker stopped (the message is requeued), or a bug
                self._span.record_exception(exc)
            self._span.end()


class _Recording(_Ended, Settling):
    """Makes a recording span current while a delivery is handled and settled, adds the
    outcome once it is settled (told by the worker's hooks: no `HandleInfo` built for it, no
    `after_handle` called for every message), then ends it."""

    __slots__ = ()

    def settled(self, outcome: Outcome, error: BaseException | None) -> None:
        span = self._span
        span.set_attribute("aio_workq.outcome", _OUTCOMES[outcome])
        if error is not None:
            span.record_exception(error)
            if outcome in _FAILED:
                span.set_attribute("error.type", qualname(error))
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
