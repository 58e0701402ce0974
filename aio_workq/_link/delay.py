"""Delayed publish: a ladder of TTL queues by powers of two, held by the broker, no plugin.

A delay is a whole number of ticks (100 ms, rounded up: a message never arrives early). Level
`k` of the ladder is a topic exchange `workq.delay.k` and a queue `workq.delay.k` whose
`x-message-ttl` is `2**k` ticks and whose dead-letter exchange is level `k - 1` (level 0's is
`workq.delay.deliver`). A message is published with the routing key `b31.b30. ... .b0.<queue>`,
the bits of its delay then its destination queue, to the exchange of the level of its delay's
highest bit (the levels above would only pass it on). Exchange `k` routes it into queue `k`
when bit `k` is 1 (it waits `2**k` ticks there, then the broker dead-letters it into exchange
`k - 1`), and on to exchange `k - 1` when it is 0. After level 0,
`workq.delay.deliver` routes it by the destination part of the key, through one binding per
destination queue (`*` for each of the 32 bits, then the queue's name, so only that exact name
matches).

Each level queue holds messages of one TTL only, so the one at its head is always the first to
expire: no message waits behind a longer one. The queues are quorum queues with at-least-once
dead-lettering: durable, replicated in a cluster, and a message moves to the next level only
once that level has it. 32 levels of 100 ms span 13.6 years.

The ladder is declared once per connection (`Router`) on the first delayed publish; each
destination queue is bound once, on its first delayed publish.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

from .._exceptions import ConfigurationError
from .connection import LinkSource, translate_errors
from .declare import declaring_channel

__all__ = ("DELIVER_EXCHANGE", "LEVELS", "TICK_MS", "DelayLadder", "delay_ticks", "routing_key")

TICK_MS = 100
LEVELS = 32
PREFIX = "workq.delay"
DELIVER_EXCHANGE = f"{PREFIX}.deliver"
MAX_DELAY = (2**LEVELS - 1) * TICK_MS / 1000
_KEY_LIMIT = 255


def delay_ticks(delay: object) -> int:
    """The delay in whole ticks, rounded up.

    Raises:
        ConfigurationError: not a number of seconds or a timedelta, negative, or too long.
    """
    if isinstance(delay, timedelta):
        delay = delay.total_seconds()
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not delay >= 0:
        raise ConfigurationError(
            f"delay must be seconds (a number >= 0 or a timedelta), got {delay!r}"
        )
    if delay > MAX_DELAY:
        raise ConfigurationError(f"delay must be at most {MAX_DELAY:.0f} s, got {delay!r}")
    milliseconds = math.ceil(round(delay * 1000, 6))
    return -(-milliseconds // TICK_MS)


def routing_key(ticks: int, queue: str) -> str:
    """The ladder's routing key for a delay of `ticks` to `queue`: its bits, top first.

    Raises:
        ConfigurationError: the queue name is too long to fit in the key.
    """
    key = ".".join(format(ticks, f"0{LEVELS}b")) + "." + queue
    if len(key.encode()) > _KEY_LIMIT:
        longest = _KEY_LIMIT - 2 * LEVELS
        raise ConfigurationError(
            f"delayed publish to queue {queue[:40]!r}...: a delayed message's queue name may be "
            f"at most {longest} bytes long; use a shorter name"
        )
    return key


def _exchange(level: int) -> str:
    return f"{PREFIX}.{level}" if level >= 0 else DELIVER_EXCHANGE


def _pattern(level: int, bit: str) -> str:
    """The binding key of exchange `level` that matches keys whose bit `level` is `bit`."""
    words = ["*"] * LEVELS
    words[LEVELS - 1 - level] = bit
    return ".".join(words) + ".#"


def _queue_arguments(level: int) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-overflow": "reject-publish",
        "x-message-ttl": TICK_MS * 2**level,
        "x-dead-letter-exchange": _exchange(level - 1),
        "x-dead-letter-strategy": "at-least-once",
    }


def _failed(task: asyncio.Future[None] | None) -> bool:
    """No declaration yet, or the last one failed (then it is tried again)."""
    return task is None or (task.done() and (task.cancelled() or task.exception() is not None))


def _start(declaration: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
    """Run a declaration that callers share (each waits for it shielded, within its timeout)."""
    task = asyncio.ensure_future(declaration)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
    return task


class DelayLadder:
    """The delay exchanges and queues of one connection, declared on first use."""

    def __init__(self, source: LinkSource) -> None:
        self._source = source
        self._declared: asyncio.Future[None] | None = None
        self._declared_at: float | None = None  # when the ladder was last declared (loop time)
        self._bound: set[str] = set()
        self._binding: dict[str, asyncio.Future[None]] = {}

    @staticmethod
    def exchange_for(ticks: int) -> str:
        """Where a message delayed by `ticks` (> 0) is published: the level of its highest
        bit. The levels above would only pass it on; each exchange it skips is routing work
        the broker saves (it shows in bursts of delayed publishes)."""
        return _exchange(ticks.bit_length() - 1)

    def starting(self, exchange: str, within: float) -> bool:
        """Whether `exchange` is a level of the ladder, declared here less than `within` s
        ago: a delayed publish to it goes to that level's quorum queue alone, which may still
        be starting (its nack is worth sending again)."""
        declared_at = self._declared_at
        if declared_at is None or exchange == DELIVER_EXCHANGE:
            return False
        if not exchange.startswith(f"{PREFIX}."):
            return False
        return asyncio.get_running_loop().time() - declared_at < within

    def ready_for(self, queue: str) -> bool:
        """True when the ladder is declared and `queue` is bound to it (the hot path)."""
        return queue in self._bound

    async def prepare(self, queue: str) -> None:
        """Declare the ladder (once) and bind `queue` to its last step (once per queue).

        Raises:
            TopologyError: a declaration failed (the ladder exists with other arguments).
            BrokerConnectionError: the connection is down.
        """
        if queue in self._bound:
            return
        if _failed(self._declared):
            self._declared = _start(self._declare_ladder())
        assert self._declared is not None
        await asyncio.shield(self._declared)
        pending = self._binding.get(queue)
        if pending is None or _failed(pending):
            pending = self._binding[queue] = _start(self._bind(queue))
        await asyncio.shield(pending)
        self._bound.add(queue)
        self._binding.pop(queue, None)

    async def _declare_ladder(self) -> None:
        async with declaring_channel(self._source) as channel:
            with translate_errors("declaring the delayed-publish exchanges and queues"):
                await channel.exchange_declare(
                    exchange=DELIVER_EXCHANGE, exchange_type="topic", durable=True
                )
                for level in range(LEVELS):
                    name = _exchange(level)
                    await channel.exchange_declare(
                        exchange=name, exchange_type="topic", durable=True
                    )
                    await channel.queue_declare(
                        queue=name, durable=True, arguments=_queue_arguments(level)
                    )
                    await channel.queue_bind(name, name, routing_key=_pattern(level, "1"))
                    await channel.exchange_bind(
                        destination=_exchange(level - 1),
                        source=name,
                        routing_key=_pattern(level, "0"),
                    )
        self._declared_at = asyncio.get_running_loop().time()

    async def _bind(self, queue: str) -> None:
        async with declaring_channel(self._source) as channel:
            with translate_errors(f"binding queue {queue!r} to the delayed-publish exchange"):
                await channel.queue_bind(queue, DELIVER_EXCHANGE, routing_key="*." * LEVELS + queue)
