"""Run a handler on one message without a broker, through the worker's own code.

`run_handler` builds a real `Delivery` from the body and publish options, a real `Job` on it,
and hands it to the worker's real `Dispatcher` with the real `HandlerRunner` and retry policy:
what happens next (ack, RPC reply, `route_failure`'s retry, deferral or dead letter) is decided
by the same code as on a broker. Only the broker-facing ends are recorders: the acks, the
publisher that would send the RPC reply, the mover that would publish the failed copy, and the
forwarder behind `job.forward()` (which still checks bodies and options like the real one).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from .._consume.delivery import Delivery
from .._consume.dispatch import Dispatcher
from .._consume.execution import Handler, HandlerRunner
from .._consume.failures import ATTEMPT_HEADER, Move, MoveKind
from .._consume.job import Job
from .._consume.retry import RetryPolicy
from .._consume.worker import WorkerState
from .._exceptions import ConfigurationError
from .._hooks import Hook, Hooks
from .._link.delay import delay_ticks
from .._link.specs import Exchange, Queue
from .._publish.message import PublishOptions, _delayed_queue, build_message, new_message_id
from .._publish.rpc import REPLY_TO
from .._publish.serialization import decode_body
from .._wire.frames import Properties, encode_properties
from .._wire.tracker import Outgoing

__all__ = ("Forwarded", "Outcome", "run_handler", "run_worker", "wait_handled")

OutcomeKind = Literal["acked", "retried", "deferred", "dead-lettered", "dropped", "requeued"]

_BASIC_CLASS = 60
_HEADER = struct.Struct(">HHQH")  # class, weight, body size, property flags


@dataclass(frozen=True, slots=True)
class Forwarded:
    """A message the handler published with `job.forward()` / `job.send()`."""

    body: bytes
    """As it would go on the wire."""
    data: Any
    """The body decoded by its content type (what a typed or `job.data` consumer sees)."""
    queue: str | None
    exchange: str
    routing_key: str | None
    options: Mapping[str, Any]
    """The publish options, e.g. `delay`, `headers`."""


@dataclass(slots=True)
class Outcome:
    """What the worker would have done with the message.

    `kind` is one of `"acked"`, `"retried"` (back to the queue after `delay` seconds, as the
    next attempt), `"deferred"` (after `delay`, the same attempt), `"dead-lettered"` (with
    `reason` and `headers`), `"dropped"` (failed, and the queue has no dead-letter queue) or
    `"requeued"` (the worker could not settle it).
    """

    kind: OutcomeKind
    result: Any = None
    """The handler's return value (None when it raised)."""
    error: BaseException | None = None
    """The exception the handler raised (or a `PayloadError` for a body that did not validate)."""
    delay: float | None = None
    """Seconds until the retry or deferral runs (0 for an immediate retry)."""
    reason: str | None = None
    """`Type: message` of the failure, for a dead letter (the header the DLQ shows)."""
    headers: dict[str, Any] = field(default_factory=dict)
    """The headers of the copy the worker publishes (retry, deferral, dead letter)."""
    forwarded: list[Forwarded] = field(default_factory=list)
    replied: bool = False
    """An RPC reply was sent (the message had `reply_to`)."""
    reply: Any = None
    """The RPC reply's body, decoded (the handler's return value, or the error text)."""
    reply_error: str | None = None
    """For an error reply: the remote exception type the caller's `RPCError` names."""

    @property
    def acked(self) -> bool:
        return self.kind == "acked"

    @property
    def retried(self) -> bool:
        return self.kind == "retried"

    @property
    def deferred(self) -> bool:
        return self.kind == "deferred"

    @property
    def dead_lettered(self) -> bool:
        return self.kind == "dead-lettered"


class _Acks:
    """Stands in for the channel's `Acker`: notes how the delivery was settled."""

    closed = gone = False  # the channel stays open

    def __init__(self) -> None:
        self.settled: list[tuple[str, bool]] = []

    def track(self, tag: int) -> None:
        pass

    def ack(self, tag: int) -> None:
        self.settled.append(("ack", False))

    def nack(self, tag: int, *, requeue: bool) -> None:
        self.settled.append(("nack", requeue))


class _Replies:
    """Stands in for the worker's `ConfirmPublisher`: `send_reply` sends replies through it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, Properties]] = []

    async def send(
        self, exchange: str, routing_key: str, body: bytes, props: Properties, *, mandatory: bool
    ) -> asyncio.Future[str]:
        self.sent.append((routing_key, body, props))
        return _done(props.message_id)


class _Moves:
    """Stands in for the `Mover`: records the `Move` that `route_failure` decided."""

    def __init__(self) -> None:
        self.moves: list[Move] = []

    async def move(self, job: Job, move: Move) -> None:
        self.moves.append(move)


class _Forwards:
    """Stands in for the worker's `Sender`: checks like it, records instead of sending."""

    def __init__(self) -> None:
        self.forwarded: list[Forwarded] = []

    async def forward(
        self,
        body: Any,
        queue: str | Queue | None,
        exchange: str | Exchange,
        routing_key: str | None,
        options: PublishOptions,
    ) -> asyncio.Future[str]:
        data, props, _, _ = build_message(body, options)
        encode_properties(props)  # raises for a property the wire can't carry
        delay = options.get("delay")
        if delay is not None and delay_ticks(delay):
            _delayed_queue(queue, exchange, routing_key, options)
        if queue is None and not exchange and not routing_key:
            _delayed_queue(queue, exchange, routing_key, {})  # "nowhere to publish"
        self.forwarded.append(
            Forwarded(
                body=data,
                data=decode_body(data, props.content_type),
                queue=queue.name if isinstance(queue, Queue) else queue,
                exchange=exchange.name if isinstance(exchange, Exchange) else exchange,
                routing_key=routing_key,
                options=dict(options),
            )
        )
        return _done(props.message_id)

    def send_now(
        self,
        body: Any,
        queue: str | Queue | None,
        exchange: str | Exchange,
        routing_key: str | None,
        options: PublishOptions,
    ) -> Outgoing | None:
        return None  # every forward goes through `forward`, which records it


def _done(value: str) -> asyncio.Future[str]:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _delivery(
    body: Any, queue: str, attempt: int, rpc: bool, redelivered: bool, options: Mapping[str, Any]
) -> Delivery:
    headers = dict(options.get("headers") or {})
    if attempt != 1:
        headers[ATTEMPT_HEADER] = attempt
    message: dict[str, Any] = {**options, "headers": headers or None}
    if rpc:
        message.setdefault("reply_to", REPLY_TO)
        message.setdefault("correlation_id", new_message_id())
    data, props, _, _ = build_message(body, message)
    flags, encoded = encode_properties(props)
    header = _HEADER.pack(_BASIC_CLASS, 0, len(data), flags) + encoded
    return Delivery(
        channel=cast(Any, None),
        consumer_tag="aio-workq-testing",
        delivery_tag=1,
        redelivered=redelivered,
        exchange="",
        routing_key=queue,
        header=header,
        body=data,
    )


async def run_handler(
    handler: Handler,
    body: Any = b"",
    *,
    queue: str | Queue = "tasks",
    retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, immutable
    attempt: int = 1,
    rpc: bool = False,
    executor: Literal["thread", "process"] = "thread",
    handler_timeout: float | None = None,
    hooks: Sequence[Hook] = (),
    **options: Any,
) -> Outcome:
    """Run `handler` on one message, as a worker of `queue` would, and say what happened.

    ```python
    outcome = await run_handler(resize, {"path": "cat.png"})
    assert outcome.acked and outcome.forwarded[0].queue == "thumbnails"
    ```

    Args:
        handler: a handler as `Worker` takes it (of a `Job`, or of a typed payload).
        body: the message body, encoded as `publish()` would (bytes, str, JSON data, a
            pydantic model or a dataclass).
        queue: the queue the message came from (its dead-letter settings count).
        retry: the worker's retry policy (`None`: dead-letter on the first failure).
        attempt: the delivery's attempt number (`job.attempt`), e.g. the last one.
        rpc: the message is an RPC request (has `reply_to`): the outcome has the reply.
        executor: `"thread"` or `"process"`, as for `Worker`.
        handler_timeout: as for `Worker`.
        hooks: `Hook`s around the handling, as a worker's (`handling`, `after_handle`).
        **options: publish options of the message (`headers`, `content_type`,
            `message_id`, ...), and `redelivered=True`.

    Raises:
        ConfigurationError: the handler, an option, or the queue is not valid (as `Worker`
            and `publish()` would say); `attempt` is not an int >= 1.
        SerializationError: the body can't be encoded.
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ConfigurationError(
            f"attempt must be an int >= 1 (a first delivery is attempt 1), got {attempt!r}"
        )
    spec = queue if isinstance(queue, Queue) else Queue(queue)
    runner = HandlerRunner(
        handler,
        executor=executor,
        concurrency=1,
        timeout=handler_timeout,
        name=spec.name or "testing",
    )
    acks, replies, moves, forwards = _Acks(), _Replies(), _Moves(), _Forwards()
    failure: list[BaseException] = []
    result: list[Any] = []
    run = runner.run

    async def observed(job: Job) -> Any:
        """The runner's own `run`, with its return value or exception noted for the outcome."""
        try:
            value = await run(job)
        except BaseException as exc:
            failure.append(exc)
            raise
        result.append(value)
        return value

    runner.run = observed  # type: ignore[method-assign]
    # Built after the observation is in place: the dispatcher binds `runner.run` once.
    dispatcher = Dispatcher(
        runner=runner,
        policy=retry,
        queue=spec,
        publisher=cast(Any, replies),
        mover=cast(Any, moves),
        forwarder=forwards,
        concurrency=1,
        prefetch=1,
        hooks=Hooks.of(hooks),
    )
    redelivered = bool(options.pop("redelivered", False))
    delivery = _delivery(body, spec.name, attempt, rpc, redelivered, options)
    try:
        dispatcher.dispatch(delivery, cast(Any, acks))
        await dispatcher.idle()  # its task may start only once a hook's `arrived` is answered
    finally:
        runner.close()
    return _outcome(acks, replies, moves, forwards, failure[0] if failure else None, result)


def _outcome(
    acks: _Acks,
    replies: _Replies,
    moves: _Moves,
    forwards: _Forwards,
    error: BaseException | None,
    result: list[Any],
) -> Outcome:
    outcome = Outcome(
        kind="acked",
        result=result[0] if result else None,
        error=error,
        forwarded=forwards.forwarded,
    )
    if replies.sent:
        _, reply_body, props = replies.sent[-1]
        headers = props.headers or {}
        outcome.replied = True
        outcome.reply = decode_body(reply_body, props.content_type)
        if headers.get("x-workq-status") == "error":
            outcome.reply_error = str(headers.get("x-workq-exception-type"))
    if moves.moves:
        move = moves.moves[-1]
        outcome.headers = dict(move.headers)
        if move.kind is MoveKind.DEAD_LETTER:
            outcome.kind = "dead-lettered"
            outcome.reason = (
                f"{move.headers.get('x-workq-exception-type')}: "
                f"{move.headers.get('x-workq-exception-message')}"
            )
        else:
            outcome.kind = "deferred" if move.kind is MoveKind.DEFER else "retried"
            wait_ms = move.expiration_ms or move.delay_ms
            outcome.delay = 0.0 if wait_ms is None else wait_ms / 1000
    elif acks.settled and acks.settled[-1] == ("nack", False):
        outcome.kind = "dropped"
    elif acks.settled and acks.settled[-1] == ("nack", True):
        outcome.kind = "requeued"
    return outcome


async def wait_handled(worker: Any, count: int, *, timeout: float = 30.0) -> WorkerState:
    """Wait until `worker` has handled `count` messages (succeeded or failed); its state.

    Raises:
        TimeoutError: fewer were handled within `timeout` seconds.
    """
    async with asyncio.timeout(timeout):
        while True:
            state: WorkerState = worker.state
            if state.processed + state.failed >= count:
                return state
            await asyncio.sleep(0.01)


async def run_worker(
    url: str | None = None,
    *,
    queue: str | Queue,
    handler: Handler,
    count: int,
    timeout: float = 30.0,
    **worker_options: Any,
) -> WorkerState:
    """Start a `Worker`, let it handle `count` messages, stop it; its final state.

    ```python
    await producer.publish({"path": "cat.png"}, queue="images")
    state = await run_worker(url, queue="images", handler=resize, count=1)
    assert state.processed == 1
    ```

    Raises:
        TimeoutError: fewer than `count` were handled within `timeout` seconds (the worker is
            stopped all the same).
        BrokerConnectionError, TopologyError: the worker could not start.
    """
    from .._consume.worker import Worker

    worker = Worker(url, queue=queue, handler=handler, **worker_options)
    async with worker:
        await wait_handled(worker, count, timeout=timeout)
    return worker.state
