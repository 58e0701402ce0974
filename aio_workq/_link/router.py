"""Where a publish goes: `queue=` / `exchange=` / `routing_key=` resolved, declared once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, TypeVar

import aiormq

from .._exceptions import BrokerConnectionError, ConfigurationError
from .connection import LinkSource
from .declare import (
    check_exchange,
    check_queue,
    declare_exchange,
    declare_queue,
    declaring_channel,
)
from .delay import DelayLadder
from .specs import Exchange, Queue, QueueType

__all__ = ("Router",)

T = TypeVar("T")
_ATTEMPTS = 3
STARTING = 5.0
"""Seconds after its declare-ok during which a quorum queue may still be starting (below)."""


class _Abandoned(Exception):
    """The caller running a shared declaration was cancelled; its waiters declare themselves."""


class Router:
    """Turns `queue=` / `exchange=` / `routing_key=` into a destination, declaring it once.

    `exchange="name"` only checks that the exchange exists (it is someone else's); an
    `Exchange(...)` is declared on first use.
    """

    def __init__(
        self,
        source: LinkSource,
        queue_type: QueueType,
        *,
        declare: Literal["always", "never"] = "always",
    ) -> None:
        self._source = source
        self._queue_type = queue_type
        # declare="never": destinations are only checked, never declared (`declare()` still
        # declares when asked by name).
        self._check_only = declare == "never"
        self._queues: dict[str, Queue] = {}
        # The names of the queues declared or checked (never removed), for the hot path's
        # `lookup` of a queue by name without a call (`Sender.send_now`).
        self.queues: Mapping[str, Queue] = self._queues
        self._exchanges: set[str] = set()
        # One declaration or check in flight per queue or exchange: concurrent first publishes
        # share it (re-declaring a quorum queue while messages arrive for it makes the broker
        # nack some of them; 20 publishes to a missing exchange would open 20 channels, each
        # closed by the broker with a 404).
        self._pending: dict[object, tuple[object, asyncio.Future[Any]]] = {}
        self._ladder: DelayLadder | None = None
        # Quorum queues declared here (and queues checked, `declare="never"`) -> when: the
        # broker may nack publishes to one for a moment (`starting`). Kept until a lookup
        # finds the moment over.
        self._declared_at: dict[str, float] = {}

    @property
    def delays(self) -> DelayLadder:
        """The delayed-publish ladder of this connection (declared on its first use)."""
        if self._ladder is None:
            self._ladder = DelayLadder(self._source)
        return self._ladder

    def queue_spec(self, queue: str | Queue) -> Queue:
        if isinstance(queue, Queue):
            return queue
        spec = self._queues.get(queue) if isinstance(queue, str) else None
        # Not a str: `Queue(...)` raises the ConfigurationError that names it.
        return spec if spec is not None else Queue(queue, type=self._queue_type)

    def check_priority(self, queue: str | Queue) -> None:
        """Check that `queue` honours message priorities (a publish with `priority=`).

        Raises:
            ConfigurationError: the queue's spec has no `x-max-priority`: the broker would
                ignore the priority.
        """
        if self._check_only and isinstance(queue, str):
            return  # an existing queue, used as it is: its arguments are not ours to know
        spec = self.queue_spec(queue)
        if not spec.honours_priority:
            raise spec.priority_error()

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
            if not isinstance(queue, Queue):
                return None  # `destination()` names what is wrong with it
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
            TopologyError: the queue exists with other arguments, or the named exchange does not;
                with `declare="never"`, the queue or exchange does not exist.
        """
        if queue is not None:
            if exchange:
                raise ConfigurationError("publish to queue= or to exchange=, not both")
            spec = self.queue_spec(queue)
            declared = self._queues.get(spec.name)
            # A plain name maps to the cached spec itself: no field-by-field compare per publish.
            if declared is not spec and declared != spec:
                if self._check_only:
                    await self._on_raw_channel(lambda channel: check_queue(channel, spec.name))
                    self._queues[spec.name] = spec
                    # Found moments after another process declared it, it may still be
                    # starting (`starting`): its type is not known here, and a nack from the
                    # one queue of a name is safe to send again whatever its type.
                    self._declared_at[spec.name] = asyncio.get_running_loop().time()
                else:
                    await self.declare(spec)
            return "", spec.name
        if isinstance(exchange, Exchange):
            if exchange.name not in self._exchanges:
                if self._check_only:
                    await self._shared(
                        ("check", exchange.name),
                        None,
                        lambda: self._on_raw_channel(lambda ch: check_exchange(ch, exchange.name)),
                    )
                    self._exchanges.add(exchange.name)
                else:
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
        if spec.server_named:  # a new queue each time: nothing to share
            return await self._on_raw_channel(
                lambda channel: declare_queue(channel, spec, delays_ms=delays_ms)
            )
        name: str = await self._shared(
            ("queue", spec.name, delays_ms),
            spec,
            lambda: self._on_raw_channel(
                lambda channel: declare_queue(channel, spec, delays_ms=delays_ms)
            ),
        )
        self._queues[spec.name] = spec
        if spec.type is QueueType.QUORUM:
            # Its dead-letter and delay queues too: a worker's moves go to them.
            now = asyncio.get_running_loop().time()
            self._declared_at[spec.name] = now
            if spec.dead_letter:
                self._declared_at[spec.dead_letter_queue] = now
            for delay in delays_ms:
                self._declared_at[spec.delay_queue(delay)] = now
        return name

    def starting(self, exchange: str, routing_key: str) -> bool:
        """Whether the queue a message to `exchange` / `routing_key` went to is a quorum
        queue declared here less than `STARTING` s ago (a queue of `declare`, or its
        dead-letter or delay queue; or a queue that `declare="never"` found then; or, for a
        delayed publish, the delay ladder's queue of its level), which may still be starting.
        A message to another exchange is not sent again: where the exchange routes it is not
        known here (it may have reached some of its queues).

        Two processes declaring a new quorum queue at once: the second declare-ok comes back
        while the first declarer's queue is still starting its Raft member, and the broker
        nacks what reaches it meanwhile (measured: about one publish in eight, each right after
        its declare). Such a nack is worth sending again; later ones are the queue's answer.
        """
        if exchange:
            return self._ladder is not None and self._ladder.starting(exchange, STARTING)
        declared_at = self._declared_at.get(routing_key)
        if declared_at is None:
            return False
        if asyncio.get_running_loop().time() - declared_at < STARTING:
            return True
        del self._declared_at[routing_key]
        return False

    async def _shared(self, key: object, spec: object, run: Callable[[], Awaitable[T]]) -> T:
        """`run()`, or the result of the one already in flight for `key` with an equal `spec`.

        A caller cancelled while running it (its own timeout) leaves the waiters to run it
        themselves: they do not inherit its cancellation.
        """
        while True:
            pending = self._pending.get(key)
            if pending is None or pending[0] != spec:
                break
            try:
                result: T = await asyncio.shield(pending[1])
            except _Abandoned:
                continue  # its caller was cancelled: run it ourselves
            return result
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[key] = (spec, future)
        try:
            result = await run()
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else _Abandoned())
            future.exception()  # retrieved here; waiters get it too
            raise
        else:
            future.set_result(result)
        finally:
            if key in self._pending and self._pending[key][1] is future:
                del self._pending[key]
        return result

    def forget_exchange(self, name: str) -> None:
        """`name` was found missing (a publish to it closed the channel): check or declare it
        again before the next publish to it."""
        self._exchanges.discard(name)

    async def _declare_exchange(self, exchange: Exchange) -> None:
        await self._shared(
            ("exchange", exchange.name),
            exchange,
            lambda: self._on_raw_channel(lambda channel: declare_exchange(channel, exchange)),
        )
        self._exchanges.add(exchange.name)

    async def _on_raw_channel(
        self, declare: Callable[[aiormq.abc.AbstractChannel], Awaitable[T]]
    ) -> T:
        """`declare` on a short-lived channel; again on the next connection when this one is
        lost under it (the caller's timeout bounds the wait for that).

        Raises:
            BrokerConnectionError: the connection failed under it again, or it failed while
                the connection stayed up.
        """
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with declaring_channel(self._source) as channel:
                    return await declare(channel)
            except BrokerConnectionError:
                if attempt == _ATTEMPTS or self._source.is_connected or self._source.is_closed:
                    raise
        raise AssertionError("unreachable")
