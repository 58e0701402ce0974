"""Queues and exchanges, declared from one description so every client uses identical arguments.

A work queue `tasks` comes with:

* `tasks.dlq`, its dead-letter queue (the broker dead-letters into it when a quorum queue's
  delivery limit is reached; the worker moves failed messages into it with reason headers);
* `tasks.retry.<ms>ms`, one delay queue per retry delay level: a message waits there until the
  queue's TTL expires, then the broker dead-letters it back into `tasks`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .._exceptions import ConfigurationError
from .._wire.frames import NAME_PATTERN

__all__ = (
    "DEFAULT_DELIVERY_LIMIT",
    "Exchange",
    "ExchangeType",
    "Queue",
    "QueueType",
    "check_queue_type",
)

DEFAULT_DELIVERY_LIMIT = 20


class QueueType(enum.StrEnum):
    """The kind of queue aio-workq declares."""

    QUORUM = "quorum"
    """Replicated (in a cluster), counts redeliveries; RabbitMQ's choice for durable work."""
    CLASSIC = "classic"
    """The tutorials' classic durable queue: one node, no delivery limit."""


def check_queue_type(value: str, what: str = "queue_type") -> QueueType:
    """`value` ('quorum', 'classic' or a `QueueType`) as a `QueueType`.

    Raises:
        ConfigurationError: any other value; the message names `what`.
    """
    try:
        return QueueType(value)
    except ValueError:
        raise ConfigurationError(f"{what} must be 'quorum' or 'classic', got {value!r}") from None


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
    if len(name.encode(errors="surrogatepass")) > limit:  # (a surrogate fails the pattern)
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
        max_priority: classic queues only: declare the queue with `x-max-priority` (1-255;
            RabbitMQ advises at most 10), so that `publish(..., priority=N)` delivers higher
            priorities first. A publish with `priority=` to a queue without it raises
            `ConfigurationError` (the broker would ignore the priority).
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
    max_priority: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", check_queue_type(self.type, f"queue {self.name!r}: type"))
        if self.delivery_limit is not None and self.delivery_limit < 1:
            raise ConfigurationError(
                f"queue {self.name!r}: delivery_limit must be >= 1, got {self.delivery_limit!r}"
            )
        _check_name("queue", self.name, 200)
        if self.max_priority is not None:
            self._check_max_priority(self.max_priority)

    def _check_max_priority(self, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
            raise ConfigurationError(
                f"queue {self.name!r}: max_priority must be an int from 1 to 255 (10 or less is "
                f"advised), got {value!r}"
            )
        if self.type is not QueueType.CLASSIC:
            raise ConfigurationError(
                f"queue {self.name!r}: quorum queues have no message priorities (RabbitMQ "
                f"3.x); use Queue({self.name!r}, type='classic', max_priority={value})"
            )

    @property
    def honours_priority(self) -> bool:
        """True when the broker orders this queue by message priority (`x-max-priority`), or
        may (a passive queue: its arguments are not ours to know)."""
        return self.passive or (
            self.type is QueueType.CLASSIC
            and (self.max_priority is not None or "x-max-priority" in self.arguments)
        )

    def priority_error(self) -> ConfigurationError:
        """The error of a publish with `priority=` to this queue when it can't honour it."""
        why = (
            "a quorum queue has no message priorities"
            if self.type is QueueType.QUORUM
            else "it is not declared with max_priority"
        )
        return ConfigurationError(
            f"publish to queue {self.name!r} with a message priority (priority=): the broker "
            f"would ignore it ({why}). Declare the queue as Queue({self.name!r}, "
            "type='classic', max_priority=10) where it is declared: the producer's and the "
            "workers' queues, or a task's @tasks.task(queue=...) (a new queue name, or delete "
            "the old queue first); or drop priority="
        )

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
        if self.max_priority is not None:
            args["x-max-priority"] = self.max_priority
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
