"""The confirm tracker: which unconfirmed message each broker confirm, nack or return is about.

Every message becomes an `Outgoing` record. The tracker holds the records of the current channel
under their delivery tags (in tag order) and, for mandatory messages, under their message id
(returns name only the message id). It settles each record exactly once: the future gets the
message id (confirmed), or a `PublishError` saying what happened. A confirm for a tag it does not
hold changes nothing. When the channel closes, `take_all()` hands back every unsettled record,
for the publisher to resend or fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from .._exceptions import (
    ConfigurationError,
    PublishError,
    PublishNackedError,
    PublishTimeoutError,
    UnroutableError,
    WorkqError,
)
from .frames import EncodedProperties, Properties

__all__ = ("MAYBE", "ConfirmTracker", "Outgoing")

MAYBE = "it may or may not have reached the queue"
_UNROUTABLE = (
    "returned as unroutable: no queue is bound for this routing key (declare the queue or a "
    "binding, or publish with mandatory=False)"
)
_NACKED = "nacked by the broker (e.g. the queue is full with overflow=reject-publish)"
_TIMED_OUT = (
    "not confirmed within its timeout (connection down, or the broker blocks publishers on a "
    f"memory or disk alarm); {MAYBE}"
)


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
        "props",
        "routing_key",
        "settled",
        "tag",
    )

    def __init__(
        self,
        exchange: str,
        routing_key: str,
        mandatory: bool,
        message_id: str,
        encoded: EncodedProperties,
        body: bytes,
        future: asyncio.Future[str],
        deadline: float,
        props: Properties | None = None,
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.mandatory = mandatory
        self.message_id = message_id
        self.encoded = encoded
        self.body = body
        self.future = future
        self.deadline = deadline
        self.props = props  # for the plain lane, which hands aiormq the properties
        self.settled = False
        self.tag = 0

    def error(self, cls: type[PublishError], what: str) -> PublishError:
        """A `cls` error saying `what` happened to this message."""
        return cls(
            f"message {self.message_id} to exchange {self.exchange!r} routing key "
            f"{self.routing_key!r} was {what}",
            message_id=self.message_id,
            exchange=self.exchange,
            routing_key=self.routing_key,
        )


class ConfirmTracker:
    """Settles the records of one publishing channel by delivery tag and by message id.

    Args:
        on_settled: called once for every record settled (the publisher's window release).
    """

    __slots__ = ("_by_id", "_on_settled", "_pending")

    def __init__(self, on_settled: Callable[[Outgoing], None]) -> None:
        self._pending: dict[int, Outgoing] = {}  # delivery tag -> record, in tag order
        self._by_id: dict[str, Outgoing] = {}  # message id -> mandatory record
        self._on_settled = on_settled

    def __len__(self) -> int:
        return len(self._pending)

    def __iter__(self) -> Iterator[Outgoing]:
        return iter(self._pending.values())

    def admit(self, out: Outgoing) -> None:
        """Take on a new record, before it is written or queued for a channel.

        Raises:
            ConfigurationError: a mandatory message with the same id is still unconfirmed (a
                return names only the message id, so it could be taken for the other one).
        """
        if out.mandatory:
            if out.message_id in self._by_id:
                raise ConfigurationError(
                    f"message_id {out.message_id!r} is already in flight on this publisher: "
                    "ids of unconfirmed mandatory messages must be unique (leave message_id "
                    "unset for a fresh one, or await the first publish)"
                )
            self._by_id[out.message_id] = out

    def record(self, tag: int, out: Outgoing) -> None:
        """`out` was written with delivery tag `tag` (tags strictly increase per channel)."""
        out.tag = tag
        self._pending[tag] = out

    def settle(self, out: Outgoing, error: WorkqError | None) -> None:
        """Settle `out` (once): confirmed when `error` is None, else failed with it."""
        if out.settled:
            return
        out.settled = True
        if self._pending.get(out.tag) is out:
            del self._pending[out.tag]
        if out.mandatory and self._by_id.get(out.message_id) is out:
            del self._by_id[out.message_id]
        if not out.future.done():
            if error is None:
                out.future.set_result(out.message_id)
            else:
                out.future.set_exception(error)
        self._on_settled(out)

    def fail(self, out: Outgoing, cls: type[PublishError], what: str) -> None:
        self.settle(out, out.error(cls, what))

    def on_confirm(self, delivery_tag: int, multiple: bool, ack: bool) -> None:
        """A `Basic.Ack` (ack) or `Basic.Nack` for `delivery_tag` (and all before, if multiple)."""
        pending = self._pending
        if multiple:
            settled = []
            for tag, out in pending.items():  # in tag order: stop at the first later tag
                if tag > delivery_tag:
                    break
                settled.append(out)
        else:
            single = pending.get(delivery_tag)
            settled = [single] if single is not None else []
        for out in settled:
            if ack:
                self.settle(out, None)
            else:
                self.fail(out, PublishNackedError, _NACKED)

    def on_return(self, message_id: str | None) -> bool:
        """A `Basic.Return` of a mandatory message; False when no pending message has the id."""
        out = self._by_id.get(message_id or "")
        if out is None or self._pending.get(out.tag) is not out:
            return False
        self.fail(out, UnroutableError, _UNROUTABLE)
        return True

    def expire(self, now: float, also: Iterator[Outgoing] | None = None) -> None:
        """Fail every record (written, or in `also`) whose deadline has passed."""
        records = list(self._pending.values()) if also is None else [*self._pending.values(), *also]
        for out in records:
            if out.deadline <= now:
                self.fail(out, PublishTimeoutError, _TIMED_OUT)

    def take_all(self) -> list[Outgoing]:
        """Remove and return every record written on the channel that closed, oldest first.

        They stay admitted: each is resent (and recorded again) or settled.
        """
        taken = list(self._pending.values())
        self._pending.clear()
        return taken
