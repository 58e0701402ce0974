"""Declaring queues and exchanges on a short-lived channel, with errors that say what to do."""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from typing import Any

import aiormq

from .._exceptions import TopologyError
from .connection import LinkSource, translate_errors
from .specs import Exchange, ExchangeType, Queue

__all__ = (
    "check_exchange",
    "check_queue",
    "declare_exchange",
    "declare_queue",
    "declaring_channel",
    "missing_exchange",
    "raw_channel",
)

# RabbitMQ's reply to a publish to an exchange that does not exist (rabbit_misc:not_found/1).
_NO_EXCHANGE = re.compile(r"NOT_FOUND - no exchange '([^']*)' in vhost ")


async def _declare_one(
    channel: aiormq.abc.AbstractChannel,
    name: str,
    arguments: dict[str, Any],
    *,
    passive: bool = False,
    exclusive: bool = False,
    owner: Queue | None = None,
) -> str:
    """Declare one queue; `owner` is the work queue whose dead-letter or delay queue it is."""
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
            f"with {arguments}. Nothing was changed or deleted. {_fix(name, owner)}"
        ) from exc
    return ok.queue or name


def _fix(name: str, owner: Queue | None) -> str:
    """What to do about queue `name` declared with other arguments than aio-workq's."""
    if owner is None:
        return (
            f"To migrate: drain and delete the old queue (rabbitmqctl delete_queue {name}), or "
            f"use a new queue name, or pass Queue({name!r}, passive=True) to use the existing "
            "queue as it is."
        )
    role = "dead-letter queue" if name == owner.dead_letter_queue else "retry (delay) queue"
    return (
        f"It is the {role} of Queue({owner.name!r}), which aio-workq declares itself: give "
        f"Queue({owner.name!r}) the type and arguments it had when {name!r} was created "
        "(Queue(type=...), Worker(queue_type=...)), or delete the old queue once its messages "
        f"are dealt with (rabbitmqctl delete_queue {name}; `aio-workq queues delete "
        f"{owner.name}` deletes the work queue with its dead-letter and retry queues, messages "
        "and all)."
    )


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
            channel,
            queue.dead_letter_queue,
            queue.arguments_for_dead_letter_queue(),
            owner=queue,
        )
    for delay in delays_ms:
        await _declare_one(
            channel, queue.delay_queue(delay), queue.arguments_for_delay_queue(delay), owner=queue
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


async def check_queue(channel: aiormq.abc.AbstractChannel, name: str) -> None:
    """Check that queue `name` exists, declaring nothing (`Producer(declare="never")`).

    Raises:
        TopologyError: it does not exist (or may not be used).
    """
    hint = f"start its worker, or call producer.declare({name!r})"
    await _check_exists(channel.queue_declare(queue=name, passive=True), "queue", name, hint)


async def check_exchange(channel: aiormq.abc.AbstractChannel, name: str) -> None:
    """Check that exchange `name` exists, declaring nothing (`Producer(declare="never")`).

    Raises:
        TopologyError: it does not exist (or may not be used).
    """
    await _check_exists(channel.exchange_declare(exchange=name, passive=True), "exchange", name)


async def _check_exists(
    passive: Awaitable[object], kind: str, name: str, hint: str | None = None
) -> None:
    """Await `passive` (the passive declaration of `kind` `name`): a missing one is a
    `TopologyError` that says this producer never declares one, and how to get it."""
    first = f"declare the {kind} first" + (f" ({hint})" if hint else "")
    with translate_errors(f"checking that {kind} {name!r} exists"):
        try:
            await passive
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise TopologyError(
                f"{kind} {name!r} does not exist, and this producer never declares {kind}s "
                f"(declare='never'): check the name for a typo, or {first}"
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


_IDLE: weakref.WeakKeyDictionary[Any, list[aiormq.abc.AbstractChannel]] = (
    weakref.WeakKeyDictionary()
)
"""A connection's channels that finished a declaration cleanly, for the next one."""
_KEEP_IDLE = 2


@asynccontextmanager
async def declaring_channel(
    source: LinkSource, *, timeout: float | None = None
) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A channel for declarations and checks, as `raw_channel` but reused: an idle one of the
    connection's if there is one, else a new one. After a body that finished without error on a
    channel still open, the channel waits (at most two per connection) for the next declaration
    instead of being closed: starting many workers then costs no channel open and close per
    declaration. After any error (a 406 or 404 closes the channel; a cancelled call may have
    left a reply due) it is closed, as `raw_channel` does, and a new one serves the next."""
    link = await source.link(timeout)
    connection = link.connection
    channel: aiormq.abc.AbstractChannel | None = None
    idle = _IDLE.get(connection)
    while idle and channel is None:
        candidate = idle.pop()
        if not candidate.is_closed:
            channel = candidate
    if channel is None:
        with translate_errors("opening a channel"):
            async with asyncio.timeout(timeout):
                channel = await connection.channel(publisher_confirms=False)
    clean = False
    try:
        yield channel
        clean = True
    finally:
        if clean and not channel.is_closed and not connection.is_closed:
            idle = _IDLE.setdefault(connection, [])
            if len(idle) < _KEEP_IDLE:
                idle.append(channel)
                channel = None
        if channel is not None and not channel.is_closed:
            with suppress(Exception):
                await asyncio.wait_for(channel.close(), 5)


def missing_exchange(reason: BaseException | None) -> str | None:
    """The exchange named by a channel close for a publish to a missing exchange (a 404), or
    None when `reason` is anything else."""
    if not isinstance(reason, aiormq.exceptions.ChannelNotFoundEntity) or not reason.args:
        return None
    text = getattr(reason.args[0], "reply_text", reason.args[0])
    match = _NO_EXCHANGE.match(text) if isinstance(text, str) else None
    return match.group(1) if match else None
