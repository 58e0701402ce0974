"""Pipelined publishing with publisher confirms: the publish hot path.

`send()` first validates and encodes the message (`_wire`): a bad property, header, name or id
raises `SerializationError` before anything is recorded. Then it waits, within the message's
timeout, for room in the `Window` and for an open channel, and hands the message to the
channel's lane (`_lanes`), which tags it and records it in that channel's own `ConfirmTracker`.
The content header must fit in one frame of the connection's negotiated `frame_max`: larger
properties (in practice, the headers) are refused with `SerializationError` before anything is
recorded, instead of making the broker close the connection (501 FRAME_ERROR).

Every message ends in exactly one of: confirmed (its future's result is the message id), or a
typed error on its future: `PublishNackedError`, `UnroutableError`, `PublishTimeoutError` (its
deadline passed: `expiry`) or `ConnectionLostError`. When the connection drops, unconfirmed
messages are re-sent on the next channel with the same message id (`resend=True`,
at-least-once) or failed. A nacked message is sent again, a few times within its timeout, when
its quorum queue was declared a moment before and may still be starting
(`send_again_while_starting`); otherwise, and after those tries, it fails. Its tries cut short
(the publisher closes, or its channel is lost and not resent), it fails as refused: it is not
in the queue.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from time import monotonic
from typing import overload

import aiormq

from .._exceptions import (
    BrokerUnavailableError,
    ConnectionLostError,
    PublishError,
    PublishTimeoutError,
)
from .._link.connection import LinkSource
from .._link.router import Router
from .._wire.frames import (
    EncodedProperties,
    Properties,
    check_destination,
    encode_properties,
    header_too_large,
    properties_limit,
)
from .._wire.lanes import FastLane, Lane
from .._wire.tracker import Batch, InFlight, Outgoing
from .._wire.window import Window
from .channels import ChannelListener, PublisherLanes
from .expiry import SLOW, Expiry
from .sizes import MAX_MESSAGE_SIZE, body_too_large

__all__ = ("MAX_MESSAGE_SIZE", "ConfirmPublisher")

_CHECKED: set[tuple[str, str, bool]] = set()  # destinations check_destination passed
_new = object.__new__
# The longest encoding of a message's usual properties (`send_now`'s): a content type and a
# message id of at most 255 bytes each, their length octets and the delivery mode.
_USUAL_MAX = 2 * (1 + 255) + 1


class _Publishing:
    """What a `ConfirmPublisher` sends through, and its life from `start` to `close`: the
    self-reopening channel in confirm mode (its lanes), the window, the records in flight and
    their expiry.

    Args:
        source: the connection to publish on.
        window: how many messages and body bytes may wait for confirms.
        timeout: default seconds from `send()` to the confirm.
        resend: after a lost connection, resend unconfirmed messages (else fail them).
        what: how log lines and errors name the owner.
        fail_fast: while the connection is down, `send()` raises `BrokerUnavailableError` at
            once instead of waiting for it within the timeout.
    """

    def __init__(
        self,
        source: LinkSource,
        *,
        window: Window,
        timeout: float,
        resend: bool,
        what: str = "publisher",
        fail_fast: bool = False,
    ) -> None:
        self._source = source
        self._window = window
        self._timeout = timeout
        self._resend = resend
        self._fail_fast = fail_fast
        self._time, self._new_future = _loop_calls(asyncio.get_running_loop())
        self._expiry = Expiry(self, window, source)
        self._in_flight = InFlight(self._expiry.on_settled)
        self._by_id = self._in_flight.by_id
        self._lane: Lane | None = None  # the current channel's, while it is open
        # The current lane is the plain one, which hands aiormq each message's properties: on
        # the fast path a message keeps only their encoding (`plain_properties` decodes it).
        self._keep_props = True
        self._frame_max = 0  # of the last channel's connection (0: unknown or no limit)
        self._properties_max = properties_limit(0)
        self._closed = False
        # The largest body sent: RabbitMQ's default, or the broker's own once a refusal said it.
        self._max_body = MAX_MESSAGE_SIZE
        self._lanes = PublisherLanes(
            source, in_flight=self._in_flight, resend=resend, use=self._use, what=what,
            on_size_limit=self._learn_size_limit,
        )  # fmt: skip

    def _learn_size_limit(self, limit: int) -> None:
        """`PublisherLanes`: the broker refused a message over `limit` bytes (its
        `max_message_size`): larger bodies are refused before they are sent from now on."""
        self._max_body = min(self._max_body, limit)

    @property
    def in_flight(self) -> int:
        """Messages sent or waiting to be sent whose confirm has not arrived (and those that
        timed out while their frames still wait to be written)."""
        return self._window.count

    @property
    def window_size(self) -> int:
        """The most messages in flight."""
        return self._window.size

    @property
    def channel(self) -> aiormq.abc.AbstractChannel | None:
        return self._lanes.channel

    def add_channel_listener(self, listener: ChannelListener) -> None:
        """Run `listener` on every new channel, before messages are (re)sent on it."""
        self._lanes.add_channel_listener(listener)

    def routed_by(self, router: Router) -> None:
        """Tell `router` of a missing exchange (a publish to it closed the channel with a
        404: it checks it again before the next one), and send a nacked message again while
        `router` says its queue may still be starting (`Router.starting`)."""
        self._lanes.add_missing_exchange_listener(router.forget_exchange)
        self._lanes.send_again_while_starting(router.starting)

    async def start(self, timeout: float | None = None) -> None:
        """Open the channel.

        Raises:
            BrokerConnectionError: no connection within `timeout`.
        """
        await self._lanes.open(timeout)

    def _use(self, lane: Lane | None) -> None:
        """`PublisherLanes`: write on `lane` from now on (None: no channel, wait for one)."""
        self._lane = lane
        if lane is not None:
            self._frame_max = frame_max = self._lanes.frame_max
            self._properties_max = properties_limit(frame_max)
            self._keep_props = not isinstance(lane, FastLane)

    def outstanding(self) -> list[Outgoing]:
        """Every unsettled message: written on a channel or waiting for the next one."""
        return self._lanes.outstanding()

    def fail(self, records: Iterable[Outgoing], cls: type[PublishError], why: str) -> None:
        """Fail `records` with a `cls` error each: not confirmed `why` (or not sent, which
        says it did not reach the queue), and stop waiting for a channel to send them on."""
        fail = self._in_flight.settle
        for out in records:
            fail(out, out.unconfirmed(cls, why))
        self._lanes.forget_settled()

    def when_flushed(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the frames of every message written so far have left."""
        if self._lane is not None:
            self._lane.when_flushed(callback)
        else:
            callback()  # no channel: its frames are gone with the connection

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every message is settled; False if some are still pending at `timeout`."""
        return await self._lanes.wait_settled(timeout)

    async def close(self, timeout: float = 10.0) -> None:
        """Wait up to `timeout` for outstanding confirms, then fail whatever is left."""
        if timeout > 0:
            await self.wait_idle(timeout)
        self._closed = True
        self._lanes.closing()
        self.fail(self.outstanding(), ConnectionLostError, "before close")
        self._expiry.stop()
        self._lane = None
        await self._lanes.close()


class ConfirmPublisher(_Publishing):
    """Publishes on one self-reopening channel in confirm mode, within a bounded window
    (`_Publishing`'s arguments): `send` waits for room or a channel within its timeout,
    `send_now` is the no-wait road of a handler's forward."""

    @overload
    async def send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: Properties,
        *,
        mandatory: bool = True,
        timeout: float | None = None,
        deadline: float | None = None,
        encoded: EncodedProperties | None = None,
        batch: None = None,
    ) -> asyncio.Future[str]: ...

    @overload
    async def send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: Properties,
        *,
        mandatory: bool = True,
        timeout: float | None = None,
        deadline: float | None = None,
        encoded: EncodedProperties | None = None,
        batch: Batch,
    ) -> None: ...

    async def send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: Properties,
        *,
        mandatory: bool = True,
        timeout: float | None = None,
        deadline: float | None = None,
        encoded: EncodedProperties | None = None,
        batch: Batch | None = None,
    ) -> asyncio.Future[str] | None:
        """Hand one message to the connection; the returned future settles with its confirm.

        Waits only while the window is full or the channel is reopening, up to `timeout` (or
        until `deadline`, the loop's time, when given: then `timeout` is not used). `encoded`
        is `encode_properties(props)` when the caller has it already (`build_usual`). With a
        `batch`, the message's outcome is counted in it instead (no future of its own): returns
        None.

        Raises:
            SerializationError: a property, header, name or id can't be sent, the headers
                make a content header larger than the connection's `frame_max`, or the body
                is over RabbitMQ's 128 MiB limit (or the broker's `max_message_size`, once
                it refused a body over it); nothing was sent.
            ConfigurationError: the message id of a mandatory message is already in flight.
            PublishTimeoutError: no room in the window, or no channel, within `timeout`.
            BrokerUnavailableError: with `fail_fast`, the connection is down; nothing was sent.
            ConnectionLostError: the publisher is closed.
        """
        destination = (exchange, routing_key, mandatory)
        try:
            checked = destination in _CHECKED  # the usual case: a destination checked before
        except TypeError:  # unhashable: not a str; check_destination names it
            checked = False
        if not checked:
            _check_new(destination)
        if encoded is None:
            encoded = encode_properties(props)
        if len(encoded[1]) > self._properties_max:
            raise header_too_large(props, len(encoded[1]), self._frame_max)
        if len(body) > self._max_body:
            raise body_too_large(props.message_id, len(body), self._max_body)
        if self._closed:
            raise ConnectionLostError(
                "the publisher is closed",
                message_id=props.message_id,
                exchange=exchange,
                routing_key=routing_key,
            )
        if deadline is None:
            deadline = self._time() + (self._timeout if timeout is None else timeout)
        if self._lane is None or self._window.full:
            if self._fail_fast and self._lane is None and not self._source.is_connected:
                raise BrokerUnavailableError(
                    f"message {props.message_id} was not sent: "
                    f"{self._source.trouble() or 'the connection to the broker is down'}"
                )
            await self._wait_for_room(deadline, props.message_id, exchange, routing_key)
            if len(encoded[1]) > self._properties_max:  # the new connection allows less
                raise header_too_large(props, len(encoded[1]), self._frame_max)
        # `Outgoing(...)` without the class call (see `build_usual`): its __init__ directly.
        out = _new(Outgoing)
        Outgoing.__init__(
            out,
            exchange,
            routing_key,
            mandatory,
            props.message_id,
            encoded,
            body,
            self._new_future() if batch is None else batch,
            deadline,
            props if self._keep_props else None,
        )
        expiry = self._expiry
        if deadline < expiry.earliest:  # a lower bound, so told before anything can fail
            expiry.expect(deadline)
        self._in_flight.admit(out)
        if batch is not None:
            batch.left += 1
        self._window.take(len(body))
        lane = self._lane
        assert lane is not None
        burst = lane.write(out)
        if expiry.handle is None:
            expiry.start()
        if burst:
            # A long burst (publish_many): the broker starts on these while the rest are built.
            lane.flush()
            await asyncio.sleep(0)
        return out.future if batch is None else None  # type: ignore[return-value]

    def send_now(
        self, exchange: str, routing_key: str, body: bytes, message_id: str,
        content_type: str | None, encoded: EncodedProperties, timeout: float,
    ) -> Outgoing | None:  # fmt: skip
        """`send(exchange, routing_key, body, props, timeout=timeout, encoded=encoded)` of a
        message whose only properties are `message_id` and `content_type` (mandatory), when
        it would not wait: its record, whose `future` is the confirm (and whose `then` its
        sender may set, #22); or None, nothing done, when the window is full, there is no
        channel or the publisher is closed (then await `send`). No coroutine, and no
        `Properties` unless the lane is the plain one (which hands them to aiormq): a
        handler's forward, the hot path of a chain step.

        Raises:
            SerializationError: as `send`; nothing was sent.
        """
        lane = self._lane
        if lane is None or self._window.full or self._closed:
            return None
        destination = (exchange, routing_key, True)
        try:
            checked = destination in _CHECKED
        except TypeError:  # unhashable: not a str; check_destination names it
            checked = False
        if not checked:
            _check_new(destination)
        props = None
        # The usual properties are at most `_USUAL_MAX` bytes: measured only when the
        # connection allows fewer (a frame_max under 4 KiB, which RabbitMQ never sets).
        if self._keep_props or self._properties_max < _USUAL_MAX:
            props = Properties(message_id=message_id, content_type=content_type)
            if len(encoded[1]) > self._properties_max:
                raise header_too_large(props, len(encoded[1]), self._frame_max)
        size = len(body)
        if size > self._max_body:
            raise body_too_large(message_id, size, self._max_body)
        deadline = self._time() + timeout
        future = self._new_future()
        # `Outgoing(exchange, routing_key, True, message_id, encoded, body, future, deadline,
        # props)`, its __init__ inline (one call less per forward), with the size measured here.
        out = _new(Outgoing)
        out.exchange = exchange
        out.routing_key = routing_key
        out.mandatory = True
        out.message_id = message_id
        out.encoded = encoded
        out.body = body
        out.size = size
        out.future = future
        out.deadline = deadline
        out.props = props
        out.sent = out.settled = False
        out.tag = 0
        out.tracker = None
        out.then = None
        expiry = self._expiry
        if deadline < expiry.earliest:
            expiry.expect(deadline)
        # `InFlight.admit(out)` inline: a mandatory record under its (unique) message id.
        by_id = self._by_id
        if message_id in by_id:
            self._in_flight.admit(out)  # raises ConfigurationError
        by_id[message_id] = out
        self._window.take(size)
        if lane.write(out):
            lane.flush()  # a long burst: out at once (no yield here, unlike `send`)
        if expiry.handle is None:
            expiry.start()
        return out

    async def _wait_for_room(
        self, deadline: float, message_id: str, exchange: str, routing_key: str
    ) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                while self._lane is None or self._window.full:
                    if self._lane is None:
                        await self._lanes.ready.wait()
                    else:
                        await self._window.wait()
        except TimeoutError:
            trouble = self._source.trouble()
            if self._lane is None:
                state = trouble or "its channel is being reopened"
            else:
                state = f"the window is full ({self._window.count} messages wait for confirms): "
                state += trouble or SLOW
            raise _not_sent_in_time(message_id, exchange, routing_key, state) from None


def _loop_calls(
    loop: asyncio.AbstractEventLoop,
) -> tuple[Callable[[], float], Callable[[], asyncio.Future[str]]]:
    """`loop.time` and `loop.create_future` for `send_now`, once per message: the calls they
    make, without their Python frame, where the loop's are asyncio's own (`time.monotonic()`
    and `asyncio.Future(loop=loop)`); a loop of another kind (uvloop) keeps its own."""
    base = asyncio.BaseEventLoop
    kind = type(loop)
    time = monotonic if kind.time is base.time and "time" not in vars(loop) else loop.time
    new_future: Callable[[], asyncio.Future[str]] = (
        functools.partial(asyncio.Future, loop=loop)
        if kind.create_future is base.create_future and "create_future" not in vars(loop)
        else loop.create_future
    )
    return time, new_future


def _check_new(destination: tuple[str, str, bool]) -> None:
    """Check a destination not seen before (`check_destination`), then remember it.

    Raises:
        SerializationError: a name can't be sent; nothing was.
    """
    check_destination(*destination)
    if len(_CHECKED) < 4096:
        _CHECKED.add(destination)


def _not_sent_in_time(
    message_id: str, exchange: str, routing_key: str, state: str
) -> PublishTimeoutError:
    return PublishTimeoutError(
        f"message {message_id} could not be sent in time: {state}; nothing was sent",
        message_id=message_id,
        exchange=exchange,
        routing_key=routing_key,
    )
