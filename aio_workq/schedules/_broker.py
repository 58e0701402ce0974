"""The broker objects of a scheduler group, and the confirmed messages kept in them.

A group (default `workq.scheduler`) has a lease queue (the election, see `_lease`), a fanout
exchange for the state, and two last-value queues bound to it: `.state`, which the next active
scheduler reads, and `.status`, which `aio-workq schedules` reads. All of them are quorum queues
that keep only their newest message (`x-max-length: 1`, `drop-head`). The active scheduler also
holds the guard `.active`, an exclusive classic queue (see `_guard`).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiormq
from aiormq import spec
from aiormq.abc import AbstractChannel

from .._exceptions import BrokerConnectionError, ConfigurationError
from .._link.connection import Connection
from .._link.errors import translate_errors
from .._link.settings import URLs
from .._wire.frames import NAME_PATTERN
from ._state import State

__all__ = (
    "GROUP",
    "LEASE_QUEUE",
    "STATE_EXCHANGE",
    "STATE_QUEUE",
    "STATUS_QUEUE",
    "Names",
    "declare_state",
    "publish_confirmed",
    "publish_state",
    "read_state",
    "read_status",
)

log = logging.getLogger("aio_workq.schedules")

GROUP = "workq.scheduler"
LEASE_QUEUE = f"{GROUP}.lease"
STATE_EXCHANGE = f"{GROUP}.state"
STATE_QUEUE = f"{GROUP}.state"
STATUS_QUEUE = f"{GROUP}.status"

_LAST_VALUE: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-max-length": 1,
    "x-overflow": "drop-head",
}
_LEASE_ARGS: dict[str, Any] = {**_LAST_VALUE, "x-single-active-consumer": True}
_PERSISTENT = 2


@dataclass(frozen=True, slots=True)
class Names:
    """The broker objects of one scheduler group."""

    lease: str
    state: str
    status: str
    active: str

    @classmethod
    def of(cls, group: str) -> Names:
        """The names for `group`.

        Raises:
            ConfigurationError: `group` is not a valid queue name prefix.
        """
        if not isinstance(group, str) or not group or not NAME_PATTERN.match(group):
            raise ConfigurationError(
                f"group {group!r} is invalid: use letters, digits, '-', '_', '.' and ':'"
            )
        return cls(
            lease=f"{group}.lease",
            state=f"{group}.state",
            status=f"{group}.status",
            active=f"{group}.active",
        )


async def declare_state(channel: AbstractChannel, names: Names) -> None:
    """Declare the lease queue, the state exchange and its two last-value queues.

    Raises:
        aiormq.exceptions.AMQPError: a declare failed (the caller translates it).
    """
    await channel.queue_declare(names.lease, durable=True, arguments=_LEASE_ARGS)
    await channel.exchange_declare(names.state, exchange_type="fanout", durable=True)
    await channel.queue_declare(names.state, durable=True, arguments=_LAST_VALUE)
    await channel.queue_declare(names.status, durable=True, arguments=_LAST_VALUE)
    await channel.queue_bind(names.state, names.state, routing_key="")
    await channel.queue_bind(names.status, names.state, routing_key="")


async def _newest(channel: AbstractChannel, queue: str) -> bytes | None:
    """The body of the newest message in `queue`, left in it (got, then requeued at once);
    None when the queue is empty."""
    message = await channel.basic_get(queue, no_ack=False)
    delivery = message.delivery
    if not isinstance(delivery, spec.Basic.GetOk) or delivery.delivery_tag is None:
        return None
    try:
        return message.body
    finally:
        await channel.basic_reject(delivery.delivery_tag, requeue=True)


async def read_state(channel: AbstractChannel, names: Names) -> State:
    """The newest state message, left in its queue; from the status queue (which gets every
    state too) when the state queue is empty: deleted or purged by an operator, it would make
    every schedule new, and lose the ticks due since the last one fired."""
    for queue in (names.state, names.status):
        body = await _newest(channel, queue)
        if body is None:
            continue
        if queue == names.status:
            log.warning(
                "the schedules state queue %r is empty (deleted or purged?): going on from "
                "the copy in %r", names.state, queue,
            )  # fmt: skip
        try:
            return State.decode(body)
        except ValueError as exc:
            log.error("the schedules state in %r is unreadable (%s): starting afresh", queue, exc)
            return State()
    return State()


async def publish_confirmed(
    channel: AbstractChannel,
    body: bytes,
    *,
    exchange: str,
    routing_key: str,
    content_type: str | None = None,
) -> None:
    """Publish persistent `body` and wait for the broker's confirm.

    Raises:
        BrokerConnectionError: the broker nacked it (or the channel closed meanwhile).
    """
    confirm = await channel.basic_publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        properties=spec.Basic.Properties(delivery_mode=_PERSISTENT, content_type=content_type),
    )
    if not isinstance(confirm, spec.Basic.Ack):
        raise BrokerConnectionError(
            f"the broker did not confirm a message to {exchange or routing_key!r} "
            f"({type(confirm).__name__})"
        )


async def publish_state(
    channel: AbstractChannel, names: Names, state: State, now: datetime
) -> None:
    """Record `state` (stamped `now`) in the state and status queues, confirmed.

    Raises:
        BrokerConnectionError: the broker did not confirm it.
    """
    state.updated = now
    await publish_confirmed(
        channel,
        state.encode(),
        exchange=names.state,
        routing_key="",
        content_type="application/json",
    )


async def read_status(
    url: URLs | None = None,
    *,
    group: str = GROUP,
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 10.0,
) -> State | None:
    """The state the active scheduler last published (None before any), for `aio-workq
    schedules` (`connect_timeout`: seconds for each connection attempt).

    Raises:
        ConfigurationError: an invalid URL, or `ssl_context=` with an `amqp://` URL.
        AuthenticationError, AccessRefusedError, TLSError: the broker refused.
        BrokerConnectionError: the broker can't be reached.
    """
    names = Names.of(group)
    connection = Connection(
        url, ssl_context=ssl_context, name="aio-workq schedules", connect_timeout=connect_timeout
    )
    await connection.open()
    try:
        channel = await connection.channel(timeout=connect_timeout)
        with translate_errors("reading the schedules' status"):
            try:  # passive: looking creates nothing
                await channel.queue_declare(names.status, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return None
            body = await _newest(channel, names.status)
        return None if body is None else State.decode(body)
    finally:
        await connection.close()
