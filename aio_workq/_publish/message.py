"""What a publish may say about its message: typed options, checked and turned into properties."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypedDict

from .._exceptions import (
    ConfigurationError,
    PublishTimeoutError,
    SerializationError,
    WorkqError,
)
from .._hooks import Hooks, PublishInfo
from .._link.delay import delay_ticks
from .._link.delay import routing_key as delayed_key
from .._link.settings import check_flag
from .._wire.frames import EncodedProperties, Properties, usual_properties
from .._wire.tracker import Batch, Outgoing
from .serialization import encode_body

if TYPE_CHECKING:
    from .._link.router import Router
    from .._link.specs import Exchange, Queue
    from .confirms import ConfirmPublisher

__all__ = (
    "REPLY_TO",
    "PublishOptions",
    "Sender",
    "build_message",
    "build_usual",
    "check_timeout",
    "new_message_id",
    "settle_in_order",
)

_ID_PREFIX = os.urandom(8).hex()
_ID_FORMAT = _ID_PREFIX + "%016x"  # %-formatting: about half the cost of an f-string's format
_ID_COUNTER = itertools.count(1)
_new = object.__new__


def _bare_format(prefix: str) -> tuple[int, bytes]:
    """The flags of a bytes body's usual properties (persistent, no content type, an id of
    aio-workq's), and the %-format of their encoding from the id's counter: `usual_properties(
    _ID_FORMAT % n, None)` is `(flags, format % n)` for every n under 2**64 (32-octet ids)."""
    flags, encoded = usual_properties(prefix + "0" * 16, None)
    head = encoded[: -len(prefix) - 16]
    return flags, head.replace(b"%", b"%%") + prefix.encode() + b"%016x"


_BARE_FLAGS, _BARE_FORMAT = _bare_format(_ID_PREFIX)


def _reseed_ids() -> None:
    """A forked child gets a prefix and counter of its own: the parent's would hand out the
    parent's ids again (and `idempotent()` would skip a different message as a duplicate)."""
    global _ID_PREFIX, _ID_FORMAT, _ID_COUNTER, _BARE_FLAGS, _BARE_FORMAT
    _ID_PREFIX = os.urandom(8).hex()
    _ID_FORMAT = _ID_PREFIX + "%016x"
    _ID_COUNTER = itertools.count(1)
    _BARE_FLAGS, _BARE_FORMAT = _bare_format(_ID_PREFIX)


os.register_at_fork(after_in_child=_reseed_ids)


async def settle_in_order(
    outcomes: Sequence[asyncio.Future[str] | WorkqError | str],
) -> list[str | BaseException]:
    """Wait for every confirm among `outcomes`; each slot becomes its message id or its error
    (a send's error, or a message id settled already, stays as it is), as
    `gather(return_exceptions=True)` would give them.

    The confirms are awaited one by one: one settled already costs nothing (they settle in
    batches, so most are), where gather added a done callback to each. Cancelled, it cancels
    the confirms still pending, as gather does.
    """
    results: list[str | BaseException] = []
    for index, outcome in enumerate(outcomes):
        if not isinstance(outcome, asyncio.Future):
            results.append(outcome)
            continue
        try:
            results.append(await outcome)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if outcome.cancelled() and not (task is not None and task.cancelling()):
                results.append(exc)  # the confirm was cancelled, not this wait
                continue
            for rest in outcomes[index:]:
                if isinstance(rest, asyncio.Future):
                    if not rest.done():
                        rest.cancel()
                    elif not rest.cancelled():
                        rest.exception()  # observed, as gather would have
            raise
        except BaseException as exc:  # noqa: B036 - as gather(return_exceptions=True)
            results.append(exc)
    return results


def new_message_id() -> str:
    """A message id unique across processes: a random per-process prefix (drawn again in a
    forked child) and a counter."""
    return _ID_FORMAT % next(_ID_COUNTER)


class PublishOptions(TypedDict, total=False):
    """The keyword arguments every publish takes (`send`, `publish`, `publish_many`,
    `Job.forward`); mypy checks them in your code."""

    headers: Mapping[str, Any] | None
    """Message headers: str keys; str, int, float (finite), bool, None, datetime,
    Decimal, or lists and dicts of those."""
    message_id: str | None
    """Defaults to a fresh unique id."""
    mandatory: bool
    """Raise `UnroutableError` when no queue receives the message (default True)."""
    timeout: float | None
    """Seconds from the call to the confirm (declaration and window included): finite, > 0."""
    priority: int | None
    """0-255, to a queue declared with `Queue(name, type="classic", max_priority=N)` (or
    `x-max-priority`); to any other queue it is a `ConfigurationError`."""
    expiration: float | timedelta | None
    """Per-message TTL, in seconds: at most 315,360,000 (10 years, RabbitMQ's limit)."""
    correlation_id: str | None
    reply_to: str | None
    message_type: str | None
    content_type: str | None
    """Overrides the content type derived from the body."""
    timestamp: datetime | None
    persistent: bool
    """Written to disk by the broker (default True)."""
    delay: float | timedelta | None
    """Seconds the broker holds the message before it reaches its queue (100 ms precision,
    rounded up; never early). Publishes to a queue only; not with `expiration`."""


_KNOWN = frozenset(PublishOptions.__annotations__)

REPLY_TO = "amq.rabbitmq.reply-to"
"""RabbitMQ's direct reply-to pseudo-queue: `Producer.call()`'s requests carry it."""


def build_message(
    body: Any, options: Mapping[str, Any]
) -> tuple[bytes, Properties, bool, float | None]:
    """`(body bytes, properties, mandatory, timeout)` from a body and `PublishOptions`.

    Raises:
        ConfigurationError: an unknown option, or an option of the wrong kind.
        SerializationError: the body can't be encoded.
    """
    if not options:
        data, props, _ = build_usual(body)
        return data, props, True, None
    if len(options) == 1 and "timeout" in options:
        data, content_type = encode_body(body)
        timeout = check_timeout(options["timeout"])
        return (
            data,
            Properties(message_id=new_message_id(), content_type=content_type),
            True,
            timeout,
        )
    if not _KNOWN.issuperset(options):
        unknown = options.keys() - _KNOWN
        raise ConfigurationError(
            f"unknown publish option(s) {', '.join(sorted(unknown))}; the options are: "
            f"{', '.join(sorted(_KNOWN))}"
        )
    if "persistent" in options:
        check_flag("publish option persistent=", options["persistent"])
    if "mandatory" in options:
        check_flag("publish option mandatory=", options["mandatory"])
    data, content_type = encode_body(body)
    expiration = options.get("expiration")
    timestamp = options.get("timestamp")
    timeout = check_timeout(options.get("timeout"))
    props = Properties(
        message_id=options.get("message_id") or new_message_id(),
        content_type=options.get("content_type") or content_type,
        headers=options.get("headers"),
        delivery_mode=2 if options.get("persistent", True) else 1,
        priority=options.get("priority"),
        correlation_id=options.get("correlation_id"),
        reply_to=options.get("reply_to"),
        expiration=None if expiration is None else _milliseconds(expiration),
        timestamp=None if timestamp is None else _seconds(timestamp),
        type=options.get("message_type"),
    )
    return data, props, options.get("mandatory", True), timeout


def build_usual(body: Any) -> tuple[bytes, Properties, EncodedProperties]:
    """`build_message(body, {})`'s body and properties, and the properties' encoding (as
    `encode_properties` gives it, without its checks: every property here is aio-workq's own).
    The usual message, the hot path: a bytes body as it is, an id as `new_message_id()`.

    Raises:
        SerializationError: the body can't be encoded.
    """
    if type(body) is bytes:
        data, content_type = body, None
    else:
        data, content_type = encode_body(body)
    message_id = _ID_FORMAT % next(_ID_COUNTER)
    # `Properties(...)` without the class call: on Python 3.11 calling a class whose
    # `__init__` is Python packs the arguments into a tuple and a dict for it (about twice
    # the cost of calling `__init__` itself).
    props = _new(Properties)
    Properties.__init__(props, message_id=message_id, content_type=content_type)
    return data, props, usual_properties(message_id, content_type)


def check_timeout(timeout: object) -> float | None:
    """`timeout` (seconds, or None for the default) once checked.

    Raises:
        ConfigurationError: it is not a finite number of seconds > 0 (NaN never fires: the
            publish would have no bound; a bool is not a number).
    """
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < _INFINITY  # NaN included
    ):
        raise ConfigurationError(f"timeout must be > 0 seconds and finite, got {timeout!r}")
    return timeout


_INFINITY = float("inf")


MAX_EXPIRATION = 315_360_000
"""RabbitMQ's largest per-message TTL, in seconds (10 years): over it, the broker closes the
channel (406 PRECONDITION_FAILED), failing every other message in flight on it."""


def _milliseconds(expiration: object) -> str:
    if isinstance(expiration, timedelta):
        expiration = expiration.total_seconds()
    if (
        isinstance(expiration, bool)
        or not isinstance(expiration, int | float)
        or not 0 <= expiration <= MAX_EXPIRATION  # NaN included
    ):
        raise SerializationError(
            "expiration must be seconds (a number >= 0 or a timedelta), at most "
            f"{MAX_EXPIRATION:,} (10 years, RabbitMQ's limit), got {expiration!r}"
        )
    return str(round(expiration * 1000))


def _seconds(timestamp: object) -> int:
    if not isinstance(timestamp, datetime):
        raise SerializationError(f"timestamp must be a datetime, got {timestamp!r}")
    try:
        return int(timestamp.timestamp())
    except (ValueError, OverflowError, OSError):  # a naive one at the ends of datetime's range
        raise SerializationError(
            f"timestamp {timestamp!r} is out of range: send whole seconds since the epoch"
        ) from None


class Sender:
    """Encodes, routes (declaring on first use) and sends messages: `Producer.send`, and the
    `Forwarder` of a worker's jobs."""

    __slots__ = ("_hooks", "_publisher", "_queues", "_router", "_timeout", "_turn")

    def __init__(
        self,
        publishers: Sequence[ConfirmPublisher],
        router: Router,
        timeout: float,
        hooks: Hooks | None = None,
    ) -> None:
        if not publishers:
            raise ValueError("a Sender needs a publisher")
        self._publisher = publishers[0]
        # With several (a Producer's `channels=N`), each message goes out on the next one's
        # channel in turn; with one (the usual case, and every worker's), no turn is taken.
        self._turn = itertools.cycle(publishers).__next__ if len(publishers) > 1 else None
        self._router = router
        self._queues = router.queues  # the queues `router.lookup` finds by name
        self._timeout = timeout
        # Only hooks that see publishes: the others' `before_publish` and `after_publish` do
        # nothing, so a forward without them is sent without a coroutine (`send_now`), as a
        # worker's without hooks is (a job recorder's, #22).
        self._hooks = hooks if hooks is not None and hooks.publishes else None
        for publisher in publishers:
            publisher.routed_by(router)

    async def forward(
        self,
        body: Any,
        queue: str | Queue | None,
        exchange: str | Exchange,
        routing_key: str | None,
        options: Mapping[str, Any],
        deadline: float | None = None,
    ) -> asyncio.Future[str]:
        """Send one message; returns its confirm. The declaration counts against its timeout,
        or `deadline` (the loop's time) instead of one (`forward_many`: the batch's).

        Raises:
            ConfigurationError, SerializationError: bad input; nothing was sent.
            TopologyError: the destination can't be declared.
            PublishTimeoutError: no declaration, window room or channel within the timeout.
        """
        encoded: EncodedProperties | None = None  # encoded by publisher.send, unless here
        if options:
            data, props, mandatory, timeout = build_message(body, options)
            if timeout is None:
                timeout = self._timeout
        else:
            data, props, encoded = build_usual(body)
            mandatory, timeout = True, self._timeout
        router = self._router
        if props.priority is not None and queue is not None and type(props.priority) is int:
            router.check_priority(queue)  # before anything is declared (#21)
        delay = options.get("delay")
        ticks = 0 if delay is None else delay_ticks(delay)
        destination: tuple[str, str] | None
        if ticks:
            queue = _delayed_queue(queue, exchange, routing_key, options)
            name = queue.name if not isinstance(queue, str) else queue
            key = delayed_key(ticks, name)
            ladder = router.delays
            ready = ladder.ready_for(name) and router.lookup(queue, "", None) is not None
            destination = (ladder.exchange_for(ticks), key) if ready else None
        else:
            destination = router.lookup(queue, exchange, routing_key)
        if destination is None:
            loop = asyncio.get_running_loop()
            within = f"{timeout:g} s" if deadline is None else "the batch's timeout"
            if deadline is None:
                deadline = loop.time() + timeout
            try:
                async with asyncio.timeout_at(deadline):
                    if ticks:
                        _, name = await router.destination(queue, "", None)
                        await router.delays.prepare(name)
                        key = delayed_key(ticks, name)
                        destination = (router.delays.exchange_for(ticks), key)
                    else:
                        destination = await router.destination(queue, exchange, routing_key)
            except TimeoutError:
                raise PublishTimeoutError(
                    f"message {props.message_id}: its destination could not be declared within "
                    f"{within} (the connection is down, or the broker does not answer); "
                    "nothing was sent",
                    message_id=props.message_id,
                    routing_key=routing_key or "",
                ) from None
        target_exchange, key = destination
        # Direct reply-to answers on the channel that consumes the replies (the first: the
        # RPC client's); a request on another one makes the broker close that channel.
        if self._turn is None or props.reply_to == REPLY_TO:
            publisher = self._publisher
        else:
            publisher = self._turn()
        if self._hooks is not None:  # they may add headers: `send` encodes the properties
            return await self._hooked(
                publisher, target_exchange, key, data, props, mandatory, timeout, deadline
            )
        return await publisher.send(
            target_exchange, key, data, props, mandatory=mandatory, timeout=timeout,
            deadline=deadline, encoded=encoded,
        )  # fmt: skip

    def send_now(
        self,
        body: Any,
        queue: str | Queue | None,
        exchange: str | Exchange,
        routing_key: str | None,
        options: Mapping[str, Any],
    ) -> Outgoing | None:
        """`forward`'s work, without its coroutine, for a message without options or hooks to
        a destination known already, when it need not wait: its record, whose `future` is the
        confirm. None, nothing sent, when `forward` must be awaited instead (a handler's
        forward: the hot path).

        Raises:
            SerializationError: the body can't be encoded; nothing was sent.
        """
        if options or self._hooks is not None:
            return None
        if type(queue) is str and not exchange:  # `Router.lookup`'s first road, inline
            if queue not in self._queues:
                return None
            target_exchange, key = "", queue
        else:
            destination = self._router.lookup(queue, exchange, routing_key)
            if destination is None:
                return None
            target_exchange, key = destination
        # `build_usual`'s work without its `Properties`: the fast lane sends the encoding only.
        number = next(_ID_COUNTER)
        if type(body) is bytes:  # `usual_properties(message_id, None)`, formatted at once
            data, content_type = body, None
            properties = _BARE_FORMAT % number
            # The id is the encoding's last 32 octets (ASCII): read there, not formatted again.
            message_id = properties[-32:].decode()
            encoded = (_BARE_FLAGS, properties)
        else:
            message_id = _ID_FORMAT % number
            data, content_type = encode_body(body)
            encoded = usual_properties(message_id, content_type)
        publisher = self._publisher if self._turn is None else self._turn()
        return publisher.send_now(
            target_exchange, key, data, message_id, content_type, encoded, self._timeout
        )

    async def forward_many(
        self,
        bodies: Iterable[Any],
        queue: str | Queue | None,
        exchange: str | Exchange,
        routing_key: str | None,
        options: dict[str, Any],
        return_exceptions: bool,
    ) -> list[Any]:
        """Send every message pipelined within the window and wait for every confirm, all
        within one timeout (`Producer.publish_many`)."""
        if options.get("message_id"):
            raise ConfigurationError("publish_many gives each message its own message_id")
        timeout = check_timeout(options.pop("timeout", None))
        # One deadline for the batch, handed to each message as it is (no clock read each).
        deadline = asyncio.get_running_loop().time() + (
            self._timeout if timeout is None else timeout
        )
        # The usual messages' outcomes are counted in one `Batch` (no future each); their
        # slots hold their message ids until then. Others (options, hooks, a first
        # declaration) have their own futures.
        batch = Batch(asyncio.get_running_loop())
        outcomes: list[asyncio.Future[str] | WorkqError | str] = []
        forward, lookup = self.forward, self._router.lookup
        turn = self._turn
        send: Callable[..., Awaitable[Any]] = (
            self._publisher.send if turn is None else _in_turn(turn)
        )
        usual = not options and self._hooks is None  # each message is `forward`'s usual one
        for body in bodies:
            try:
                if usual and (destination := lookup(queue, exchange, routing_key)) is not None:
                    # `forward`'s steps for a message without options to a known destination,
                    # without a coroutine of its own (the hot path).
                    data, props, encoded = build_usual(body)
                    await send(
                        destination[0], destination[1], data, props, deadline=deadline,
                        encoded=encoded, batch=batch,
                    )  # fmt: skip
                    outcomes.append(props.message_id)
                else:  # declares the destination first, or has options or hooks
                    confirm = await forward(body, queue, exchange, routing_key, options, deadline)
                    outcomes.append(confirm)
            except WorkqError as exc:
                if not return_exceptions:
                    # Settle what was sent before raising: no confirm is left unobserved.
                    while batch.left:
                        await asyncio.shield(batch.wait())
                    await asyncio.gather(
                        *(o for o in outcomes if isinstance(o, asyncio.Future)),
                        return_exceptions=True,
                    )
                    raise
                outcomes.append(exc)
        while batch.left:
            # Shielded: cancelling publish_many leaves its messages in flight, each settled
            # by its confirm (or timeout) as before; nothing waits for them any more.
            await asyncio.shield(batch.wait())
        if batch.errors:
            errors = batch.errors
            outcomes = [errors.get(o, o) if type(o) is str else o for o in outcomes]
        results = await settle_in_order(outcomes)
        if not return_exceptions:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return results

    async def _hooked(
        self,
        publisher: ConfirmPublisher,
        exchange: str,
        routing_key: str,
        data: bytes,
        props: Properties,
        mandatory: bool,
        timeout: float,
        deadline: float | None,
    ) -> asyncio.Future[str]:
        """`send` through the hooks: they see the message and may add headers."""
        assert self._hooks is not None
        info = PublishInfo(
            exchange=exchange,
            routing_key=routing_key,
            message_id=props.message_id,
            headers=dict(props.headers or {}),
            body_size=len(data),
            window=publisher.window_size,
        )

        def send(headers: dict[str, Any]) -> Awaitable[asyncio.Future[str]]:
            props.headers = headers or None
            return publisher.send(
                exchange, routing_key, data, props, mandatory=mandatory, timeout=timeout,
                deadline=deadline,
            )  # fmt: skip

        return await self._hooks.publish(send, info)


def _in_turn(turn: Callable[[], ConfirmPublisher]) -> Callable[..., Awaitable[Any]]:
    """`ConfirmPublisher.send` on the next publisher of `turn` at each call."""

    def send(*args: Any, **kwargs: Any) -> Awaitable[Any]:
        return turn().send(*args, **kwargs)

    return send


def _delayed_queue(
    queue: str | Queue | None,
    exchange: str | Exchange,
    routing_key: str | None,
    options: Mapping[str, Any],
) -> str | Queue:
    """The queue a delayed message goes to.

    Raises:
        ConfigurationError: the message goes to an exchange, or has an expiration too.
    """
    if options.get("expiration") is not None:
        raise ConfigurationError(
            "delay= and expiration= can't be combined: the expiration would cut the delay "
            "short; drop one of them"
        )
    if exchange:
        raise ConfigurationError(
            "delay= publishes to a queue (queue='name'); a delayed message can't go through "
            "an exchange: publish it delayed to a queue bound to what the exchange routes to"
        )
    if queue is not None:
        return queue
    if routing_key:
        return routing_key
    raise ConfigurationError("nowhere to publish: pass queue='name'")
