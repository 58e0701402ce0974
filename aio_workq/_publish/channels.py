"""A publisher's channel across its reopenings: a `Lane` per channel in confirm mode, and what
the loss of a channel does to the messages written on it.

`ConfirmPublisher` writes on the current lane; `PublisherLanes` decides which lane that is. A
new channel gets a lane of its own (its delivery tags are its own), the messages waiting for it
are written on it, and the publisher is told to use it. A lost channel's unconfirmed messages
are resent on the next channel with the same message id (`resend=True`) or failed; when the
broker closed the channel alone for an error of its own (a 404, a 406), they are failed, as the
same messages would only close the next channel too, except after a missing exchange (#20,
finding 6): its own messages fail with `TopologyError`, the others are resent.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq

from .._exceptions import (
    ConnectionLostError,
    PublishError,
    PublishNackedError,
    TopologyError,
    WorkqError,
)
from .._link.channel import ManagedChannel
from .._link.connection import LinkSource
from .._link.declare import missing_exchange
from .._wire.frames import Properties, header_too_large, properties_limit
from .._wire.lanes import FastLane, Lane, PlainLane, negotiated_frame_max
from .._wire.seams import Wire
from .._wire.tracker import MAYBE, Batch, ConfirmTracker, InFlight, Outgoing
from .sizes import body_too_large, refused_limit

__all__ = ("NACK_BACKOFF", "NACK_RETRIES", "ChannelListener", "ExchangeListener", "PublisherLanes")

ChannelListener = Callable[[aiormq.abc.AbstractChannel], Awaitable[None]]
ExchangeListener = Callable[[str], None]
NACK_RETRIES = 5
NACK_BACKOFF = 0.05
"""A message nacked by a queue that may still be starting is sent again after 0.05 s, 0.1 s,
... up to `NACK_RETRIES` times (1.55 s in all), within its timeout."""


class PublisherLanes:
    """Opens (and reopens, until `close()`) one channel in confirm mode on `source`.

    Args:
        source: the connection to publish on.
        in_flight: the publisher's unsettled messages (settles what a lost channel fails).
        resend: after a lost connection, resend unconfirmed messages (else fail them).
        use: called with each new lane once it takes messages, with None once it is lost;
            `frame_max` is the last channel's connection's.
        what: how log lines name the owner.
        on_size_limit: called with the broker's `max_message_size` when it closed a channel
            for a message over it.
    """

    def __init__(
        self,
        source: LinkSource,
        *,
        in_flight: InFlight,
        resend: bool,
        use: Callable[[Lane | None], None],
        what: str,
        on_size_limit: Callable[[int], None] = lambda limit: None,
    ) -> None:
        self._in_flight = in_flight
        self._on_size_limit = on_size_limit
        self._resend = resend
        self._use = use
        self.current: Lane | None = None  # the current channel's, while it is open
        self.frame_max = 0  # of the last channel's connection (0: unknown or no limit)
        self._lanes: list[Lane] = []  # every lane whose channel's loss is not handled yet
        self._waiting: deque[Outgoing] = deque()  # for the next channel
        # Nacked by a queue still starting, each sent again once its timer fires; with the
        # tracker of the channel that nacked it (its loss fails them unless they are resent).
        self._resting: dict[Outgoing, tuple[asyncio.TimerHandle, ConfirmTracker]] = {}
        self._starting: Callable[[str, str], bool] = _never  # see send_again_while_starting
        self._listeners: list[ChannelListener] = []
        self._missing_listeners: list[ExchangeListener] = []
        self.ready = asyncio.Event()
        """Set while a channel is open."""
        self._closing = False
        self._channel = ManagedChannel(
            source, confirms=True, setup=self._on_channel, on_lost=self._on_lost, what=what
        )

    @property
    def channel(self) -> aiormq.abc.AbstractChannel | None:
        return self._channel.channel

    def add_channel_listener(self, listener: ChannelListener) -> None:
        """Run `listener` on every new channel, before messages are (re)sent on it."""
        self._listeners.append(listener)

    def add_missing_exchange_listener(self, listener: ExchangeListener) -> None:
        """Run `listener(name)` when a publish to exchange `name` closes the channel because
        the exchange does not exist (a 404)."""
        self._missing_listeners.append(listener)

    async def open(self, timeout: float | None = None) -> None:
        """Open the channel.

        Raises:
            BrokerConnectionError: no connection within `timeout`.
        """
        await self._channel.open(timeout)

    def outstanding(self) -> list[Outgoing]:
        """Every unsettled message: written on a channel or waiting for the next one."""
        return [
            *(out for lane in self._lanes for out in lane.tracker),
            *self._waiting,
            *self._resting,
        ]

    async def wait_settled(self, timeout: float) -> bool:
        """Wait until every message is settled; False if some are still pending at `timeout`."""
        waits: dict[asyncio.Future[Any], None] = {}  # each batch's once
        for out in self.outstanding():
            future = out.future
            waits[future.wait() if isinstance(future, Batch) else future] = None
        outstanding = list(waits)
        if not outstanding:
            return True
        done, pending = await asyncio.wait(outstanding, timeout=timeout)
        for fut in done:
            if not fut.cancelled():
                fut.exception()  # retrieved: the caller of send() owns the error
        return not pending

    def forget_settled(self) -> None:
        """Stop waiting for a channel to send the messages settled meanwhile on."""
        if self._waiting:
            self._waiting = deque(out for out in self._waiting if not out.settled)

    def send_again_while_starting(self, starting: Callable[[str, str], bool]) -> None:
        """Send a nacked message again, a few times within its timeout, when
        `starting(exchange, routing_key)` says its queue may still be starting (see
        `Router.starting`), instead of failing it with `PublishNackedError` at once."""
        self._starting = starting
        self._in_flight.send_again = self._nacked

    def _nacked(self, out: Outgoing, tracker: ConfirmTracker) -> bool:
        """`InFlight`: the broker nacked `out` on `tracker`'s channel (it is off that tracker
        now); True when it is written again in a moment: on the channel open then, or on the
        next one (as after a lost connection: when the nacking channel is lost first without
        `resend`, `out` fails instead)."""
        nacks: int = getattr(out, "nacks", 0)  # a slot set only here
        delay = NACK_BACKOFF * 2**nacks
        loop = asyncio.get_running_loop()
        if (
            nacks >= NACK_RETRIES
            or self._closing
            or loop.time() + delay >= out.deadline
            or not self._starting(out.exchange, out.routing_key)
        ):
            return False
        out.nacks = nacks + 1
        self._resting[out] = (loop.call_later(delay, self._send_again, out), tracker)
        return True

    def _send_again(self, out: Outgoing) -> None:
        del self._resting[out]
        if out.settled:  # timed out, or failed at close, meanwhile
            return
        lane = self.current
        if lane is None:
            self._waiting.append(out)
        elif lane.write(out):
            lane.flush()

    def closing(self) -> None:
        """From now on a lost channel's messages are failed, not resent; the messages waiting
        for their next try after a nack fail now, as refused (each try was nacked)."""
        self._closing = True
        for out in list(self._resting):
            self._give_up(out, _refused(out, "before close"))

    def _give_up(self, out: Outgoing, error: WorkqError) -> None:
        """End the tries of `out`, waiting for its next one after a nack: it fails with `error`."""
        handle, _ = self._resting.pop(out)
        handle.cancel()
        self._in_flight.settle(out, error)

    async def close(self) -> None:
        self._closing = True
        self.current = None
        self._lanes.clear()
        for handle, _ in self._resting.values():
            handle.cancel()
        self._resting.clear()
        await self._channel.close()

    async def _on_channel(self, channel: aiormq.abc.AbstractChannel, wire: Wire | None) -> None:
        for listener in self._listeners:
            await listener(channel)
        self.frame_max = frame_max = negotiated_frame_max(channel)
        limit = properties_limit(frame_max)
        tracker = ConfirmTracker(self._in_flight)  # this channel's own: its tags are its own
        lane: Lane = (
            FastLane(channel, wire, tracker, frame_max)
            if wire is not None
            else PlainLane(channel, tracker)
        )
        self._lanes.append(lane)
        self.current = lane
        self._use(lane)
        while self._waiting and self.current is lane:
            out = self._waiting.popleft()
            if out.settled:
                continue
            if len(out.encoded[1]) > limit:  # a new node with a smaller frame_max
                error = header_too_large(out.props or Properties(message_id=out.message_id),
                                         len(out.encoded[1]), frame_max)  # fmt: skip
                why = f"(it can't go on the new connection: {error})"
                self._in_flight.settle(out, out.unconfirmed(ConnectionLostError, why))
                continue
            lane.write(out)
        self.ready.set()

    def _resting_on(self, tracker: ConfirmTracker) -> list[Outgoing]:
        """The messages waiting to be sent again after a nack on `tracker`'s channel."""
        return [out for out, (_, nacked_on) in self._resting.items() if nacked_on is tracker]

    def _on_lost(self, channel: aiormq.abc.AbstractChannel, reason: BaseException | None) -> None:
        # The lane of `channel`, whichever is current: a new channel may already be writing.
        lane = next((lane for lane in self._lanes if lane.channel is channel), None)
        if lane is None:
            return
        self._lanes.remove(lane)
        if self.current is lane:
            self.current = None
            self.ready.clear()
            self._use(None)
        # Resend unless the broker closed this channel alone for an error of its own (404/406):
        # the same messages would only close the next channel too.
        channel_error = isinstance(reason, aiormq.exceptions.AMQPChannelError) and not (
            channel.connection.is_closed
        )
        connection_lost = not channel_error
        # --- a missing exchange (#20, finding 6): its own publishes fail with TopologyError; the
        # others were not the cause, so they are resent like after a lost connection (or failed).
        missing = missing_exchange(reason) if channel_error else None
        if missing is not None:
            for listener in self._missing_listeners:
                listener(missing)
        # --- a message over the broker's max_message_size: it fails with SerializationError,
        # the ones written after it were dropped unread (resent), the ones before as usual.
        limit = refused_limit(reason) if channel_error else None
        if limit is not None:
            self._on_size_limit(limit)
        resend = self._resend and not self._closing
        why = f"the channel closed ({reason})" if reason else "the channel closed"
        # Both kinds of this channel's messages by one rule: those on its tracker, and those it
        # nacked that wait for their next try (`_resting`). Resent (the waiting ones by their
        # timer) only with `resend` after a lost connection or a missing exchange (except the
        # tracker's to that exchange: TopologyError; a waiting one went to the default
        # exchange, which is never missing); else failed: after a lost connection without
        # `resend` (a worker's publisher: its delivery is redelivered instead, a copy sent later
        # is a duplicate), and after the broker closed the channel for an error of its own (any
        # message of the channel may be the cause). Each error says what is known: a message
        # written on the channel may have reached the queue; a waiting one was refused.
        resends = resend and (connection_lost or missing is not None or limit is not None)
        if not resends:
            for out in self._resting_on(lane.tracker):
                self._give_up(out, _refused(out, f"before {why}"))
        taken = lane.tracker.take_all()
        unread = _too_large(taken, limit, self._in_flight) if limit is not None else set()
        for out in taken:
            if out.settled:
                continue
            if out in unread and not self._closing:  # never read by the broker: no copy
                if self.current is not None:
                    self.current.write(out)
                else:
                    self._waiting.append(out)
            elif missing is not None and out.exchange == missing:
                self._in_flight.settle(out, _no_exchange(out))
            elif resends:
                if self.current is not None:
                    self.current.write(out)  # the next channel is open already
                else:
                    self._waiting.append(out)
            else:
                self._in_flight.settle(out, out.unconfirmed(ConnectionLostError, f"before {why}"))


_NOT_IN_QUEUE = "each try was refused, so it did not reach the queue"


def _too_large(taken: list[Outgoing], limit: int, in_flight: InFlight) -> set[Outgoing]:
    """A channel closed for a message over the broker's `limit` (`max_message_size`), its
    unsettled messages `taken` oldest first: each over `limit` fails with SerializationError
    (nothing of it reached a queue); the messages written after the first of them, which the
    broker dropped unread once it closed the channel, are returned: sent again, they make no
    copy. Those written before it were read and may have reached their queue (resent with
    `resend`, else failed, as after a lost connection)."""
    unread: set[Outgoing] = set()
    refused = False
    for out in taken:
        if out.settled:
            continue
        if out.size > limit:
            refused = True
            in_flight.settle(out, body_too_large(out.message_id, out.size, limit))
        elif refused:
            unread.add(out)
    return unread


def _never(exchange: str, routing_key: str) -> bool:
    return False


def _no_exchange(out: Outgoing) -> TopologyError:
    """The error of a message published to an exchange that does not exist (#20, finding 6)."""
    return TopologyError(
        f"message {out.message_id} to exchange {out.exchange!r} routing key {out.routing_key!r} "
        f"was not confirmed: exchange {out.exchange!r} does not exist (deleted?); declare it, "
        f"or publish with Exchange({out.exchange!r}) to have it declared; {MAYBE}"
    )


def _refused(out: Outgoing, why: str) -> PublishError:
    """The error of a message nacked on each of its tries, whose next try will not come: it was
    refused, not lost on the way (the nacks of a queue still starting are sent again)."""
    tries: int = getattr(out, "nacks", 0)
    return out.error(
        PublishNackedError,
        f"nacked by the broker on each of its tries ({tries}, its queue just declared and maybe "
        f"still starting); not sent again {why}; {_NOT_IN_QUEUE}",
    )
