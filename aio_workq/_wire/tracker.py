"""The confirm trackers: which unconfirmed message each broker confirm, nack or return is about.

Every message becomes an `Outgoing` record. Two bookkeepers settle it, each exactly once: the
future gets the message id (confirmed), or a `PublishError` saying what happened (a message of a
`Batch`, publish_many's, is counted in the batch instead, its error kept there). A record that
ends unconfirmed says whether it may have reached the queue: only if it was `sent` (handed to
the connection's writer, or to aiormq on the plain path), at least once.

- `InFlight`, one per publisher: every unsettled record, whichever channel it was written on
  (or none yet, while it waits for a channel); mandatory records also under their message id,
  which must be unique among them (a return names only the message id).
- `ConfirmTracker`, one per publishing channel, made with the channel's lane: the records
  written on that channel under their delivery tags (in tag order). A confirm on the channel
  only ever reaches its own tracker, so a channel's tags can never be taken for another's:
  this does not depend on the order in which the old channel's loss and the new channel's
  first writes are handled. `take_all()` closes the tracker and hands back what was written on
  the channel and not settled, for the publisher to resend or fail; it ignores anything later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import final

from .._exceptions import (
    ConfigurationError,
    PublishError,
    PublishNackedError,
    UnroutableError,
    WorkqError,
)
from .frames import EncodedProperties, Properties

__all__ = ("MAYBE", "NOT_SENT", "Batch", "ConfirmTracker", "InFlight", "Outgoing", "Then")

MAYBE = "it may or may not have reached the queue"
NOT_SENT = "it was never sent, so it did not reach the queue"
_UNROUTABLE = (
    "returned as unroutable: no queue is bound for this routing key (declare the queue or a "
    "binding, or publish with mandatory=False)"
)
_NACKED = "nacked by the broker (e.g. the queue is full with overflow=reject-publish)"


Then = Callable[["Outgoing", BaseException | None], None]
"""`Outgoing.then`: called with the record as `InFlight` settles it, once, and what its future
holds: None (confirmed), the record's error, or a `CancelledError` when its owner cancelled
the future first. Called where the settlement happens (a confirm frame's handling): it must
not raise, nor wait."""


@final
class Batch:
    """The outcomes of a batch of messages (`publish_many`): one future for them all, where a
    message sent alone has a future of its own.

    A message of the batch has the batch as its `future`; it is settled like any other (each
    exactly once, by `InFlight`), which counts it here: a failed one's error is kept under its
    message id (the batch's ids are its own, all different). `wait()` gives a future resolved
    once no message counted in `left` is unsettled. On a quorum queue the confirms come in
    many small batches while publish_many runs: a future per message was an object per message
    for the garbage collector to walk for the whole batch, and calls to make and settle (#22).
    """

    __slots__ = ("_loop", "_settled", "errors", "left")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._settled: asyncio.Future[None] | None = None  # made by `wait`
        self.left = 0  # messages sent in the batch and not settled yet
        self.errors: dict[str, WorkqError] = {}  # message id -> its error

    def wait(self) -> asyncio.Future[None]:
        """A future resolved once no message of the batch is unsettled (at once if none is).
        More messages may be sent after it resolved: then wait again."""
        settled = self._settled
        if settled is None or settled.done():
            settled = self._settled = self._loop.create_future()
            if not self.left:
                settled.set_result(None)
        return settled

    def settle(self, out: Outgoing, error: WorkqError | None) -> None:
        """`out`, a message of the batch, is settled (confirmed when `error` is None)."""
        if error is not None:
            self.errors[out.message_id] = error
        self.left -= 1
        if not self.left:
            self.drained()

    def drained(self) -> None:
        """No message of the batch is unsettled now: resolve the waiting future."""
        settled = self._settled
        if settled is not None and not settled.done():
            settled.set_result(None)


class Outgoing:
    """One message on its way: validated and encoded, waiting for its confirm."""

    __slots__ = (
        "body",
        "deadline",
        "encoded",
        "exchange",
        "future",
        "mandatory",
        "message_id",
        "nacks",
        "props",
        "routing_key",
        "sent",
        "settled",
        "size",
        "tag",
        "then",
        "tracker",
    )

    nacks: int  # set only on the rare road: how often it was nacked and sent again

    def __init__(
        self,
        exchange: str,
        routing_key: str,
        mandatory: bool,
        message_id: str,
        encoded: EncodedProperties,
        body: bytes,
        future: asyncio.Future[str] | Batch,
        deadline: float,
        props: Properties | None = None,
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.mandatory = mandatory
        self.message_id = message_id
        self.encoded = encoded
        self.body = body
        self.size = len(body)  # the window's measure (`ConfirmPublisher.send_now` sets these too)
        self.future = future
        self.deadline = deadline
        self.props = props  # for the plain lane, which hands aiormq the properties
        self.sent = False  # set by the lane that hands it on: it may reach the queue
        self.settled = False
        self.tag = 0
        self.tracker: ConfirmTracker | None = None  # the channel's, while written on it
        # Called once the record is settled, after its future (`InFlight`): its owner's
        # next step without a wake-up of the task that sent it (a worker acks the delivery
        # whose handler forwarded this message, #22). See `Then`.
        self.then: Then | None = None

    def error(self, cls: type[PublishError], what: str) -> PublishError:
        """A `cls` error saying `what` happened to this message."""
        return cls(
            f"message {self.message_id} to exchange {self.exchange!r} routing key "
            f"{self.routing_key!r} was {what}",
            message_id=self.message_id,
            exchange=self.exchange,
            routing_key=self.routing_key,
        )

    def unconfirmed(self, cls: type[PublishError], why: str) -> PublishError:
        """A `cls` error: this message was not confirmed because of `why` (e.g. "within its
        timeout: ..."), saying whether it may have reached the queue (it was sent) or not."""
        if self.sent:
            return self.error(cls, f"not confirmed {why}; {MAYBE}")
        return self.error(cls, f"not sent {why}; {NOT_SENT}")


class InFlight:
    """Every unsettled message of one publisher; settles each exactly once.

    Args:
        on_settled: called with the records settled, each record once: one at a time, or
            the records a multiple confirm settled together (the publisher's window release).
    """

    __slots__ = ("by_id", "_on_settled", "send_again")

    def __init__(self, on_settled: Callable[[Sequence[Outgoing]], None]) -> None:
        # Message id -> unsettled mandatory record (`ConfirmPublisher.send_now` admits its
        # records here itself, as `admit` does).
        self.by_id: dict[str, Outgoing] = {}
        self._on_settled = on_settled
        # Called with a nacked record and the tracker of the channel that nacked it: True when
        # the publisher sends it again (a queue still starting), which leaves it unsettled;
        # else it fails with `PublishNackedError`.
        self.send_again: Callable[[Outgoing, ConfirmTracker], bool] | None = None

    def admit(self, out: Outgoing) -> None:
        """Take on a new record, before it is written or queued for a channel.

        Raises:
            ConfigurationError: a mandatory message with the same id is still unconfirmed (a
                return names only the message id, so it could be taken for the other one).
        """
        if out.mandatory:
            if out.message_id in self.by_id:
                raise ConfigurationError(
                    f"message_id {out.message_id!r} is already in flight on this publisher: "
                    "ids of unconfirmed mandatory messages must be unique (leave message_id "
                    "unset for a fresh one, or await the first publish)"
                )
            self.by_id[out.message_id] = out

    def mandatory(self, message_id: str) -> Outgoing | None:
        """The unsettled mandatory record with this id, if any."""
        return self.by_id.get(message_id)

    def settle(self, out: Outgoing, error: WorkqError | None) -> None:
        """Settle `out` (once): confirmed when `error` is None, else failed with it.

        `settled` is set first: whatever happens after, a later confirm changes nothing.
        """
        if out.settled:
            return
        out.settled = True
        tracker = out.tracker
        if tracker is not None:
            tracker.discard(out)
        if out.mandatory and self.by_id.get(out.message_id) is out:
            del self.by_id[out.message_id]
        future = out.future
        outcome: BaseException | None = error
        if type(future) is Batch:
            future.settle(out, error)
        elif not future.done():
            if error is None:
                future.set_result(out.message_id)
            else:
                future.set_exception(error)
        else:  # done already: cancelled by its owner
            outcome = asyncio.CancelledError()
        self._on_settled((out,))
        then = out.then
        if then is not None:
            then(out, outcome)

    def confirmed(self, records: list[Outgoing]) -> None:
        """Settle `records`, taken off their tracker already, as confirmed: `settle(out,
        None)` for each, inline (the hot path: one call for a multiple ack's records), and
        one `on_settled` for them all."""
        by_id = self.by_id
        stale: list[Outgoing] | None = None  # settled before (a tracker holds none: defensive)
        for out in records:
            if out.settled:
                stale = [*(stale or ()), out]
                continue
            out.settled = True
            message_id = out.message_id
            if out.mandatory and message_id in by_id and by_id[message_id] is out:
                del by_id[message_id]
            future = out.future
            if type(future) is Batch:  # `Batch.settle(out, None)`, inline
                future.left -= 1
                if not future.left:
                    future.drained()
            else:
                outcome: BaseException | None = None
                try:
                    future.set_result(message_id)
                except asyncio.InvalidStateError:  # done already: cancelled by its owner
                    outcome = asyncio.CancelledError()
                then = out.then
                if then is not None:  # (before the window's release below: it waits for none)
                    then(out, outcome)
        if stale is not None:
            records = [out for out in records if not any(out is old for old in stale)]
        if records:
            self._on_settled(records)

    def fail(self, out: Outgoing, cls: type[PublishError], what: str) -> None:
        self.settle(out, out.error(cls, what))

    def nacked(self, out: Outgoing, tracker: ConfirmTracker) -> None:
        """The broker nacked `out`, taken off `tracker` (its channel's) already: fail it,
        unless the publisher sends it again (`send_again`)."""
        send_again = self.send_again
        if out.settled or send_again is None or not send_again(out, tracker):
            self.settle(out, out.error(PublishNackedError, _NACKED))


class ConfirmTracker:
    """The records written on one publishing channel, under the channel's delivery tags.

    Args:
        in_flight: the publisher's `InFlight`, which settles them.
    """

    __slots__ = ("_in_flight", "pending", "closed")

    def __init__(self, in_flight: InFlight) -> None:
        self._in_flight = in_flight
        # Delivery tag -> record, in tag order (`FastLane.write` records in it itself).
        self.pending: dict[int, Outgoing] = {}
        self.closed = False

    def __len__(self) -> int:
        return len(self.pending)

    def __iter__(self) -> Iterator[Outgoing]:
        return iter(self.pending.values())

    def record(self, tag: int, out: Outgoing) -> None:
        """`out` was written with delivery tag `tag` (tags strictly increase per channel)."""
        out.tag = tag
        out.tracker = self
        self.pending[tag] = out

    def discard(self, out: Outgoing) -> None:
        """`out` was settled: forget its tag."""
        pending = self.pending
        if pending.get(out.tag) is out:
            del pending[out.tag]
        out.tracker = None

    def on_confirm(self, delivery_tag: int, multiple: bool, ack: bool) -> None:
        """A `Basic.Ack` (ack) or `Basic.Nack` for `delivery_tag` (and all before, if multiple)."""
        pending = self.pending
        if multiple and pending and next(reversed(pending)) <= delivery_tag:
            # Every record written here (the usual multiple ack: the broker confirmed all it
            # got): taken at once, with no test and delete per record (#22 round 9).
            settled = list(pending.values())
            pending.clear()
            for out in settled:
                out.tracker = None
        else:
            if multiple:
                settled = []
                for tag, out in pending.items():  # in tag order: stop at the first later tag
                    if tag > delivery_tag:
                        break
                    settled.append(out)
            else:
                single = pending.get(delivery_tag)
                if single is None:
                    return
                settled = [single]
            for out in settled:
                del pending[out.tag]  # here rather than in settle(): the hot path
                out.tracker = None
        if ack:
            self._in_flight.confirmed(settled)
            return
        nacked = self._in_flight.nacked
        for out in settled:
            nacked(out, self)

    def on_return(self, message_id: str | None) -> bool:
        """A `Basic.Return` of a mandatory message on this channel, found by its id (unique
        among unsettled mandatory records); False when none written here has the id."""
        out = self._in_flight.mandatory(message_id or "")
        if out is None or out.tracker is not self:
            return False
        self.returned(out)
        return True

    def returned(self, out: Outgoing) -> None:
        """`out` itself, written on this channel, was returned as unroutable."""
        self._in_flight.fail(out, UnroutableError, _UNROUTABLE)

    def settle(self, out: Outgoing, ack: bool) -> None:
        """`out` itself, written on this channel, was acked (or nacked); ignored once the
        tracker is closed (it was handed back for a resend or a failure)."""
        if out.tracker is not self:
            return
        if ack:
            self._in_flight.settle(out, None)
        else:
            self.discard(out)
            self._in_flight.nacked(out, self)

    def take_all(self) -> list[Outgoing]:
        """Close the tracker (its channel closed): remove and return every record written on
        it and not settled, oldest first. They stay in flight: each is resent or settled."""
        self.closed = True
        taken = list(self.pending.values())
        self.pending.clear()
        for out in taken:
            out.tracker = None
        return taken
