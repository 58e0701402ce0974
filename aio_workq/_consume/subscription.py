"""A worker's subscription: declare the queue (and its retry and dead-letter queues), bind it,
set QoS and consume, on a channel that reopens and does it all again after a loss.

On aio-workq's own connections deliveries come straight off the socket (`FrameDemux`) to the
dispatcher as their fields (`on_fields`); on others through aiormq's consumer callback
(`on_delivery`). Either way each becomes a `Delivery`, settled through the channel's `Acker`.

A queue bound to an exchange is bound again every `REBIND_EVERY` seconds: deleting an exchange
deletes its bindings without a word to the consumers, so a worker would stay deaf to it once it
is declared again (a producer's next publish declares it) until its next reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage

from .._exceptions import BrokerConnectionError
from .._link.channel import ManagedChannel
from .._link.connection import LinkSource, translate_errors
from .._link.declare import declare_exchange, declaring_channel
from .._link.router import Router
from .._link.specs import Exchange, Queue
from .._wire.acker import Acker
from .._wire.seams import Wire
from .delivery import Delivery

__all__ = ("Subscription", "worker_label")

log = logging.getLogger("aio_workq")

REBIND_EVERY = 5.0
"""Seconds between a bound worker's checks that its bindings still stand."""
_STARTING_ATTEMPTS = 4
"""Consumes at start while the new quorum queue may still be starting (`start`)."""

OnDelivery = Callable[[Delivery, Acker], None]
OnFields = Callable[..., None]
"""A delivery the demux took, as its fields, after the channel's gate and acker
(`Dispatcher.take`)."""


def worker_label(queue: Queue, exchange: str | Exchange | None) -> str:
    """The queue a worker consumes, for its log lines: a server-named queue has no name until
    declared (and another after each reconnect), so it is named by its exchange."""
    if not queue.server_named:
        return repr(queue.name)
    name = exchange.name if isinstance(exchange, Exchange) else exchange
    return (
        f"on a server-named queue bound to exchange {name!r}" if name else "on a server-named queue"
    )


class Subscription:
    """Consumes one queue with a prefetch window, through whatever channel is current."""

    def __init__(
        self,
        source: LinkSource,
        router: Router,
        *,
        queue: Queue,
        delays_ms: tuple[int, ...],
        exchange: str | Exchange | None,
        binding_keys: Sequence[str],
        binding_arguments: Mapping[str, Any],
        prefetch: int,
        on_delivery: OnDelivery,
        on_fields: OnFields,
        on_declared: Callable[[str], None] | None = None,
    ) -> None:
        self._source = source
        self._router = router
        self._queue = queue
        self._delays_ms = delays_ms
        self._exchange = exchange
        self._binding_keys = tuple(binding_keys)
        self._binding_arguments = dict(binding_arguments)
        self._prefetch = prefetch
        self._on_delivery = on_delivery
        self._on_fields = on_fields
        self._on_declared = on_declared
        self.queue_name = queue.name
        self.acker: Acker | None = None
        self.consumer_tag: str | None = None
        self.stopping = False
        self._keeper: asyncio.Task[None] | None = None  # binds again, with an exchange
        self._channel = ManagedChannel(
            source,
            confirms=False,
            setup=self._setup,
            on_lost=self._on_lost,
            on_closing=self._on_closing,
            what=f"worker {worker_label(queue, exchange)}",
        )

    @property
    def consuming(self) -> bool:
        return self.consumer_tag is not None and self._channel.is_open

    @property
    def connected(self) -> bool:
        return self._source.is_connected and self._channel.is_open

    async def start(self, timeout: float | None) -> None:
        """Declare, bind and consume.

        Raises:
            BrokerConnectionError: no connection within `timeout`.
            TopologyError: a declaration or binding failed.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        for attempt in range(_STARTING_ATTEMPTS):
            left = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await self._channel.open(left)
                break
            except BrokerConnectionError as exc:
                # Two workers declaring one new quorum queue at once: the second declare-ok
                # can come back while the queue is still starting, and a consume then makes
                # the broker close the connection (541 INTERNAL_ERROR, `noproc`). Declared
                # here a moment ago (`Router.starting`): consume again once it reconnected.
                if (
                    attempt == _STARTING_ATTEMPTS - 1
                    or (deadline is not None and loop.time() >= deadline)
                    or not self._router.starting("", self._queue.name)
                ):
                    raise
                log.info(
                    "worker %s: consuming its new queue failed (%s), it may still be "
                    "starting: consuming again", worker_label(self._queue, self._exchange), exc,
                )  # fmt: skip
        if self._exchange is not None and self._keeper is None:
            name = f"aio-workq binding of worker {worker_label(self._queue, self._exchange)}"
            self._keeper = asyncio.create_task(self._keep_bound(), name=name)

    async def _setup(self, channel: aiormq.abc.AbstractChannel, wire: Wire | None) -> None:
        self.queue_name = await self._router.declare(self._queue, delays_ms=self._delays_ms)
        if self._on_declared is not None:
            self._on_declared(self.queue_name)
        if self._exchange is not None:
            await self._bind()
        if wire is not None:  # the lean path: deliveries skip aiormq's frame parsing
            gate = wire.demux.attach(channel)
            acker = Acker(channel, (wire.writer, gate))
            # Straight to the dispatcher (`Dispatcher.take`), which drops a delivery once the
            # gate closes or the acker is closed (`_on_closing`): the broker redelivers it.
            gate.on_delivery = functools.partial(self._on_fields, gate, acker)
        else:
            acker = Acker(channel, None)

        async def callback(message: DeliveredMessage) -> None:  # aiormq's: the plain path
            self._deliver(Delivery.of(message), acker)

        with translate_errors(f"consuming {self.queue_name!r}"):
            await channel.basic_qos(prefetch_count=self._prefetch)
            self.acker = acker
            ok = await channel.basic_consume(self.queue_name, callback, no_ack=False)
        self.consumer_tag = ok.consumer_tag
        channel.on_consumer_cancel_callbacks.add(self._on_cancelled)

    def _deliver(self, delivery: Delivery, acker: Acker) -> None:
        if acker is not self.acker or acker.channel.is_closed:
            return  # from a channel closed or replaced: the broker redelivers it
        self._on_delivery(delivery, acker)

    async def _keep_bound(self) -> None:
        """Bind the queue again every `REBIND_EVERY` s while the channel is open (a binding
        that stands is left as it is): an exchange deleted and declared again is bound within
        that time. While it can't be (the exchange is gone), one warning says so."""
        failing = False
        while True:
            await asyncio.sleep(REBIND_EVERY)
            channel = self._channel.channel
            if channel is None or channel.is_closed or self.stopping:
                continue  # a new channel binds as it opens
            try:
                async with asyncio.timeout(REBIND_EVERY):
                    await self._bind(timeout=REBIND_EVERY)
            except Exception as exc:  # a background loop: say it, try again
                if not failing and channel is self._channel.channel and not self.stopping:
                    log.warning(
                        "worker %s can't bind its queue again (%s): it receives nothing "
                        "through that exchange until it can; trying again every %g s",
                        worker_label(self._queue, self._exchange), exc, REBIND_EVERY,
                    )  # fmt: skip
                    failing = True
            else:
                if failing:
                    log.warning(
                        "worker %s: its queue is bound again",
                        worker_label(self._queue, self._exchange),
                    )
                failing = False

    async def _bind(self, timeout: float | None = None) -> None:
        exchange = self._exchange
        if isinstance(exchange, str):
            exchange = Exchange(exchange, passive=True)
        assert exchange is not None
        keys = self._binding_keys or (self.queue_name,)
        async with declaring_channel(self._source, timeout=timeout) as channel:
            await declare_exchange(channel, exchange)
            for key in keys:
                with translate_errors(f"binding {self.queue_name!r} to {exchange.name!r}"):
                    await channel.queue_bind(
                        self.queue_name, exchange.name, routing_key=key,
                        arguments=self._binding_arguments,
                    )  # fmt: skip

    def _on_lost(self, channel: aiormq.abc.AbstractChannel, reason: BaseException | None) -> None:
        self.consumer_tag = None
        if reason is not None and not self.stopping:
            log.warning(
                "worker %r lost its channel (%s); unacked deliveries go back to the queue, "
                "consuming resumes when the channel reopens",
                self.queue_name,
                reason,
            )

    def _on_closing(self, channel: aiormq.abc.AbstractChannel) -> None:
        """The channel is about to be closed: its acks so far go out, none after."""
        acker = self.acker
        if acker is not None and acker.channel is channel:
            self.acker = None  # deliveries still arriving on it are dropped (redelivered)
            acker.close()

    def _on_cancelled(self, consumer_tag: Any) -> None:
        if self.stopping or self._channel.channel is None:
            return
        log.warning("the broker cancelled the consumer of %r; re-declaring", self.queue_name)
        self.consumer_tag = None
        # A new channel declares the queue again and consumes; the old one is closed the
        # one safe way (its acks so far first, none after).
        self._channel.recycle()

    async def cancel(self) -> None:
        """Stop new deliveries (running ones still settle on this channel)."""
        self.stopping = True
        await self._stop_keeper()
        channel, tag = self._channel.channel, self.consumer_tag
        if channel is None or tag is None or channel.is_closed:
            return
        with contextlib.suppress(Exception):
            await channel.basic_cancel(tag, timeout=5)

    async def close(self) -> None:
        self.stopping = True
        await self._stop_keeper()
        await self._channel.close()

    async def _stop_keeper(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.wait({keeper})  # its end; a cancel of the caller still raises
