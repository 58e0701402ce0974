"""Queues and exchanges, declared from one description so every client uses identical arguments.

A work queue `tasks` comes with:

* `tasks.dlq`, its dead-letter queue (the broker dead-letters into it when a quorum queue's
  delivery limit is reached; the worker moves failed messages into it with reason headers);
* `tasks.retry.<ms>ms`, one delay queue per retry delay level: a message waits there until the
  queue's TTL expires, then the broker dead-letters it back into `tasks`.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import aiormq

from .._exceptions import ConfigurationError, TopologyError
from .._wire.frames import NAME_PATTERN
from .connection import LinkSource, translate_errors

if TYPE_CHECKING:
    from .delay import DelayLadder

__all__ = (
    "Exchange",
    "ExchangeType",
    "Queue",
    "QueueType",
    "Router",
    "declare_exchange",
    "declare_queue",
    "raw_channel",
)

DEFAULT_DELIVERY_LIMIT = 20


class QueueType(enum.StrEnum):
    """The kind of queue aio-workq declares."""

    QUORUM = "quorum"
    """Replicated (in a cluster), counts redeliveries; RabbitMQ's choice for durable work."""
    CLASSIC = "classic"
    """The tutorials' classic durable queue: one node, no delivery limit."""


class ExchangeType(enum.StrEnum):
    """AMQP exchange types."""

    DIRECT = "direct"
    """Routes on an exact routing key."""
    TOPIC = "topic"
    """Routes on dotted patterns: `*` one word, `#` any number."""
    FANOUT = "fanout"
    """Every bound queue gets every message."""
    HEADERS = "headers"
    """Routes on message headers."""


def _check_name(kind: str, name: object, limit: int) -> None:
    if not isinstance(name, str):
        raise ConfigurationError(f"a {kind} name must be a str, got {type(name).__name__}")
    if len(name.encode()) > limit:
        raise ConfigurationError(
            f"{kind} name longer than {limit} bytes: {name[:40]!r}...; use a shorter name"
        )
    if not NAME_PATTERN.match(name):
        raise ConfigurationError(
            f"{kind} name {name!r} is invalid: AMQP names use letters, digits, '-', '_', '.' "
            "and ':' only"
        )


@dataclass(frozen=True, slots=True)
class Queue:
    """A queue and how to declare it.

    Args:
        name: the queue name; `""` asks the broker for a server-named, exclusive, auto-delete
            queue (publish/subscribe), which gets no retry or dead-letter queues.
        type: `"quorum"` (default) or `"classic"`.
        delivery_limit: quorum queues only: deliveries (including crash redeliveries) after which
            the broker dead-letters a message; the guard against a message that kills its worker.
        dead_letter: declare `<name>.dlq` and route dead letters to it.
        single_active_consumer: only one consumer gets messages at a time (ordered processing).
        passive: don't declare, only check the queue exists (raises `TopologyError` if not).
        arguments: extra `x-` arguments, merged over the defaults.
    """

    name: str
    type: QueueType | Literal["quorum", "classic"] = QueueType.QUORUM
    delivery_limit: int | None = DEFAULT_DELIVERY_LIMIT
    dead_letter: bool = True
    single_active_consumer: bool = False
    passive: bool = False
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "type", QueueType(self.type))
        except ValueError:
            raise ConfigurationError(
                f"queue {self.name!r}: type must be 'quorum' or 'classic', got {self.type!r}"
            ) from None
        if self.delivery_limit is not None and self.delivery_limit < 1:
            raise ConfigurationError(
                f"queue {self.name!r}: delivery_limit must be >= 1, got {self.delivery_limit!r}"
            )
        _check_name("queue", self.name, 200)

    @property
    def server_named(self) -> bool:
        """True for a server-named, exclusive, auto-delete subscriber queue."""
        return self.name == ""

    @property
    def dead_letter_queue(self) -> str:
        """The name of this queue's dead-letter queue."""
        return f"{self.name}.dlq"

    def delay_queue(self, delay_ms: int) -> str:
        """The name of this queue's delay queue for `delay_ms`."""
        return f"{self.name}.retry.{delay_ms}ms"

    def _common(self) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": QueueType(self.type).value}
        if self.type is QueueType.QUORUM:
            # At-least-once dead-lettering: the broker keeps a dead letter until the target queue
            # confirms it. It needs reject-publish overflow (RabbitMQ 3.10+).
            args["x-overflow"] = "reject-publish"
        return args

    def arguments_for_work_queue(self) -> dict[str, Any]:
        """The `x-` arguments of the work queue itself."""
        args = self._common()
        if self.dead_letter:
            args["x-dead-letter-exchange"] = ""
            args["x-dead-letter-routing-key"] = self.dead_letter_queue
            if self.type is QueueType.QUORUM:
                args["x-dead-letter-strategy"] = "at-least-once"
        if self.type is QueueType.QUORUM and self.delivery_limit is not None:
            args["x-delivery-limit"] = self.delivery_limit
        if self.single_active_consumer:
            args["x-single-active-consumer"] = True
        args.update(self.arguments)
        return args

    def arguments_for_delay_queue(self, delay_ms: int) -> dict[str, Any]:
        """A delay queue: its TTL dead-letters messages back into the work queue."""
        args = self._common()
        args["x-message-ttl"] = delay_ms
        args["x-dead-letter-exchange"] = ""
        args["x-dead-letter-routing-key"] = self.name
        if self.type is QueueType.QUORUM:
            args["x-dead-letter-strategy"] = "at-least-once"
        return args

    def arguments_for_dead_letter_queue(self) -> dict[str, Any]:
        """The dead-letter queue: a plain durable queue of the same type."""
        return {"x-queue-type": QueueType(self.type).value}


@dataclass(frozen=True, slots=True)
class Exchange:
    """An exchange and how to declare it (durable; `passive=True` only checks it exists)."""

    name: str
    type: ExchangeType | Literal["direct", "topic", "fanout", "headers"] = ExchangeType.DIRECT
    passive: bool = False
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "type", ExchangeType(self.type))
        except ValueError:
            raise ConfigurationError(
                f"exchange {self.name!r}: type must be direct, topic, fanout or headers, "
                f"got {self.type!r}"
            ) from None
        if not self.name:
            raise ConfigurationError(
                "the default exchange '' can't be declared; leave exchange unset"
            )
        _check_name("exchange", self.name, 255)


async def _declare_one(
    channel: aiormq.abc.AbstractChannel,
    name: str,
    arguments: dict[str, Any],
    *,
    passive: bool = False,
    exclusive: bool = False,
) -> str:
    what = f"declaring queue {name!r}" if name else "declaring a server-named queue"
    try:
        with translate_errors(what):
            ok = await channel.queue_declare(
                queue=name,
                durable=not exclusive,
                exclusive=exclusive,
                auto_delete=exclusive,
                passive=passive,
                arguments=arguments,
            )
    except TopologyError as exc:
        if passive:
            raise TopologyError(
                f"queue {name!r} does not exist (passive use); declare it first or drop "
                "passive=True"
            ) from exc
        raise TopologyError(
            f"queue {name!r} already exists with other arguments ({exc}). aio-workq declares it "
            f"with {arguments}. Nothing was changed or deleted. To migrate: drain and delete the "
            f"old queue (rabbitmqctl delete_queue {name}), or use a new queue name, or pass "
            f"Queue({name!r}, passive=True) to use the existing queue as it is."
        ) from exc
    return ok.queue or name


async def declare_queue(
    channel: aiormq.abc.AbstractChannel,
    queue: Queue,
    *,
    delays_ms: tuple[int, ...] = (),
) -> str:
    """Declare `queue` with its dead-letter and delay queues; returns its (server) name."""
    if queue.server_named:
        return await _declare_one(channel, "", dict(queue.arguments), exclusive=True)
    if queue.dead_letter:
        await _declare_one(
            channel, queue.dead_letter_queue, queue.arguments_for_dead_letter_queue()
        )
    for delay in delays_ms:
        await _declare_one(
            channel, queue.delay_queue(delay), queue.arguments_for_delay_queue(delay)
        )
    if queue.passive:  # the work queue must exist; its retry and dead-letter queues are ours
        return await _declare_one(channel, queue.name, {}, passive=True)
    return await _declare_one(channel, queue.name, queue.arguments_for_work_queue())


async def declare_exchange(channel: aiormq.abc.AbstractChannel, exchange: Exchange) -> None:
    """Declare a durable exchange, or check that it exists when passive."""
    try:
        with translate_errors(f"declaring exchange {exchange.name!r}"):
            await channel.exchange_declare(
                exchange=exchange.name,
                exchange_type=ExchangeType(exchange.type).value,
                durable=True,
                passive=exchange.passive,
                arguments=dict(exchange.arguments),
            )
    except TopologyError as exc:
        if exchange.passive:
            raise TopologyError(
                f"exchange {exchange.name!r} does not exist. exchange='{exchange.name}' (a name) "
                f"only checks that an exchange exists; pass Exchange({exchange.name!r}) to "
                "declare it (durable), or declare it first"
            ) from exc
        raise TopologyError(
            f"exchange {exchange.name!r} already exists with another type or arguments ({exc})"
        ) from exc


@asynccontextmanager
async def raw_channel(
    source: LinkSource, *, publisher_confirms: bool = False, timeout: float | None = None
) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A short-lived aiormq channel (declarations, dead-letter moves), closed on exit: a 406 on
    it closes nothing else. Opening waits at most `timeout` for the connection."""
    link = await source.link(timeout)
    with translate_errors("opening a channel"):
        async with asyncio.timeout(timeout):
            channel = await link.connection.channel(publisher_confirms=publisher_confirms)
    try:
        yield channel
    finally:
        if not channel.is_closed:
            with suppress(Exception):
                await asyncio.wait_for(channel.close(), 5)


class Router:
    """Turns `queue=` / `exchange=` / `routing_key=` into a destination, declaring it once.

    `exchange="name"` only checks that the exchange exists (it is someone else's); an
    `Exchange(...)` is declared on first use.
    """

    def __init__(self, source: LinkSource, queue_type: QueueType) -> None:
        self._source = source
        self._queue_type = queue_type
        self._queues: dict[str, Queue] = {}
        self._exchanges: set[str] = set()
        # One declaration in flight per queue: concurrent first publishes share it (re-declaring
        # a quorum queue while messages arrive for it makes the broker nack some of them).
        self._declaring: dict[tuple[str, tuple[int, ...]], tuple[Queue, asyncio.Future[str]]] = {}
        self._ladder: DelayLadder | None = None

    @property
    def delays(self) -> DelayLadder:
        """The delayed-publish ladder of this connection (declared on its first use)."""
        if self._ladder is None:
            from .delay import DelayLadder

            self._ladder = DelayLadder(self._source)
        return self._ladder

    def queue_spec(self, queue: str | Queue) -> Queue:
        if isinstance(queue, Queue):
            return queue
        spec = self._queues.get(queue)
        return spec if spec is not None else Queue(queue, type=self._queue_type)

    def lookup(
        self,
        queue: str | Queue | None,
        exchange: str | Exchange,
        routing_key: str | None,
    ) -> tuple[str, str] | None:
        """The destination when nothing needs declaring (the hot path), else None."""
        if queue is not None:
            if exchange:
                return None
            if isinstance(queue, str):
                return ("", queue) if queue in self._queues else None
            declared = self._queues.get(queue.name)
            return ("", queue.name) if declared is queue or declared == queue else None
        name = exchange.name if isinstance(exchange, Exchange) else exchange
        if name:
            return (name, routing_key or "") if name in self._exchanges else None
        return ("", routing_key) if routing_key else None

    async def destination(
        self,
        queue: str | Queue | None,
        exchange: str | Exchange,
        routing_key: str | None,
    ) -> tuple[str, str]:
        """`(exchange, routing_key)` to publish to, declared or checked on first use.

        Raises:
            ConfigurationError: both or neither of a queue and an exchange are given.
            TopologyError: the queue exists with other arguments, or the named exchange does not.
        """
        if queue is not None:
            if exchange:
                raise ConfigurationError("publish to queue= or to exchange=, not both")
            spec = self.queue_spec(queue)
            declared = self._queues.get(spec.name)
            # A plain name maps to the cached spec itself: no field-by-field compare per publish.
            if declared is not spec and declared != spec:
                await self.declare(spec)
            return "", spec.name
        if isinstance(exchange, Exchange):
            if exchange.name not in self._exchanges:
                await self._declare_exchange(exchange)
            return exchange.name, routing_key or ""
        if exchange:
            if exchange not in self._exchanges:
                await self._declare_exchange(Exchange(exchange, passive=True))
            return exchange, routing_key or ""
        if not routing_key:
            raise ConfigurationError(
                "nowhere to publish: pass queue='name', or exchange= and routing_key="
            )
        return "", routing_key

    async def declare(self, spec: Queue, delays_ms: tuple[int, ...] = ()) -> str:
        """Declare `spec` (and these delay levels); returns the queue's name.

        Raises:
            TopologyError: the queue exists with other arguments (or not at all, if passive).
            BrokerConnectionError: the connection is down.
        """
        key = (spec.name, delays_ms)
        pending = self._declaring.get(key) if not spec.server_named else None
        if pending is not None and pending[0] == spec:
            return await asyncio.shield(pending[1])
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if not spec.server_named:
            self._declaring[key] = (spec, future)
        try:
            async with raw_channel(self._source) as channel:
                name = await declare_queue(channel, spec, delays_ms=delays_ms)
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            future.exception()  # retrieved here; waiters get it too
            raise
        else:
            future.set_result(name)
        finally:
            if key in self._declaring and self._declaring[key][1] is future:
                del self._declaring[key]
        if not spec.server_named:
            self._queues[spec.name] = spec
        return name

    async def _declare_exchange(self, exchange: Exchange) -> None:
        async with raw_channel(self._source) as channel:
            await declare_exchange(channel, exchange)
        self._exchanges.add(exchange.name)
