"""What aio-workq reads from aiormq's connection logger, and what it keeps out of it.

aiormq logs an ERROR for each failed connection attempt; aio-workq logs its own WARNING. When
the broker closes a connection (a restart, an operator's close), aiormq logs an ERROR and a
WARNING with the reader's traceback; aio-workq logs one WARNING with the broker's reason
("lost the connection ... (320 CONNECTION_FORCED - ...); reconnecting"). And aiormq tells of
the broker's `Connection.Blocked` (a memory or disk alarm) and `Connection.Unblocked` only in a
WARNING: it offers no public state for it.

`install()` puts a filter on aiormq's connection logger that drops those records of aio-workq's
own connections: made while aio-workq is connecting (`connecting()`), or later by the tasks
aiormq started then (its reader and their callbacks inherit that context). Other users of aiormq
in the process keep theirs. The filter also hands the block records to
`_wire.seams.note_block` (reliance 9 there), which notes which connections the broker blocked,
and why (`blocked_reason()`). It is installed when the first `Connection` opens, not at import,
and only once. The notes need that logger enabled for WARNING (the default); raised above it, a
block is not known.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import aiormq

from .._wire.seams import blocked_reason, note_block

__all__ = ("blocked_reason", "connecting", "install")

_connecting: contextvars.ContextVar[bool] = contextvars.ContextVar("aio_workq_connecting")
_AIORMQ_LOGGER = "aiormq.connection"


_SAID_BY_US = ("error when creating transport", "Unexpected connection close from remote")


class QuietAttempts(logging.Filter):
    """Drops what aiormq logs about aio-workq's own connections that aio-workq says itself: the
    per-attempt ERROR ("error when creating transport"), and a broker's close of the connection
    (its ERROR, and the reader's WARNING with the traceback of that close)."""

    def filter(self, record: logging.LogRecord) -> bool:
        note_block(record)
        if not _connecting.get(False):
            return True
        message = str(record.msg)
        if message.startswith(_SAID_BY_US):
            return False
        return not (message.startswith("Cancelling cause reader exited") and _closed(record))


def _closed(record: logging.LogRecord) -> bool:
    """The record's exception is the broker's Connection.Close: aiormq raises it as
    `ConnectionClosed(code, text)`, or as a subclass of it with the text alone for the codes it
    maps (541 INTERNAL_ERROR, 504 CHANNEL_ERROR, ...)."""
    exc = record.exc_info[1] if record.exc_info else None
    return isinstance(exc, aiormq.exceptions.ConnectionClosed)


def install() -> None:
    """Put the filter on aiormq's connection logger, once per process."""
    logger = logging.getLogger(_AIORMQ_LOGGER)
    if not any(isinstance(f, QuietAttempts) for f in logger.filters):
        logger.addFilter(QuietAttempts())


@contextmanager
def connecting() -> Iterator[None]:
    """Within: aio-workq is connecting (aiormq's per-attempt error is dropped); the tasks aiormq
    starts meanwhile keep the mark for the connection's life."""
    token = _connecting.set(True)
    try:
        yield
    finally:
        _connecting.reset(token)
