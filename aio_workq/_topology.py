"""Queues and exchanges, declared from one description so every client uses identical arguments.

A work queue `tasks` comes with:

* `tasks.dlq`, its dead-letter queue (the broker dead-letters into it when a quorum queue's
  delivery limit is reached; the worker moves failed messages into it with reason headers);
* `tasks.retry.<ms>ms`, one delay queue per retry delay level: a message waits there until the
  queue's TTL expires, then the broker dead-letters it back into `tasks`.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import aiormq
from aio_pika.abc import AbstractRobustConnection

from ._connection import translate_errors
from ._exceptions import ConfigurationError, TopologyError

__all__ = (
    "Exchange",
    "ExchangeType",
    "Queue",
    "QueueType",
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
        if len(self.name.encode()) > 200:
            raise ConfigurationError(f"queue name longer than 200 bytes: {self.name[:40]!r}...")

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
                f"exchange {exchange.name!r} does not exist (passive use); declare it first "
                "or drop passive=True"
            ) from exc
        raise TopologyError(
            f"exchange {exchange.name!r} already exists with another type or arguments ({exc})"
        ) from exc


@asynccontextmanager
async def raw_channel(
    connection: AbstractRobustConnection, *, publisher_confirms: bool = False
) -> AsyncIterator[aiormq.Channel]:
    """A short-lived aiormq channel (declarations, dead-letter moves), closed on exit: a 406 on
    it closes nothing else."""
    with translate_errors("opening a channel"):
        await connection.ready()
        transport = connection.transport
        if transport is None:
            raise TopologyError("the connection is not open")
        channel = cast(
            aiormq.Channel,
            await transport.connection.channel(publisher_confirms=publisher_confirms),
        )
    try:
        yield channel
    finally:
        if not channel.is_closed:
            with suppress(Exception):
                await channel.close()
