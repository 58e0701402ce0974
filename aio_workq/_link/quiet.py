"""What aio-workq reads from aiormq's connection logger.

aiormq logs an ERROR for each failed connection attempt; aio-workq logs its own WARNING. And
aiormq tells of the broker's `Connection.Blocked` (a memory or disk alarm) and
`Connection.Unblocked` only in a WARNING: it offers no public state for it.

`install()` puts a filter on aiormq's connection logger that drops the per-attempt records while
aio-workq is the one connecting (`connecting()`; other users of aiormq in the process keep
theirs), and hands the block records to `_wire.seams.note_block` (reliance 9 there), which
notes which connections the broker blocked, and why (`blocked_reason()`). It is
installed when the first `Connection` opens, not at import, and only once. The notes need that
logger enabled for WARNING (the default); raised above it, a block is not known.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from .._wire.seams import blocked_reason, note_block

__all__ = ("blocked_reason", "connecting", "install")

_connecting: contextvars.ContextVar[bool] = contextvars.ContextVar("aio_workq_connecting")
_AIORMQ_LOGGER = "aiormq.connection"


class QuietAttempts(logging.Filter):
    """Drops aiormq's per-attempt ERROR ("error when creating transport") while aio-workq is the
    one connecting: aio-workq logs one WARNING per attempt itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        note_block(record)
        return not (
            _connecting.get(False) and str(record.msg).startswith("error when creating transport")
        )


def install() -> None:
    """Put the filter on aiormq's connection logger, once per process."""
    logger = logging.getLogger(_AIORMQ_LOGGER)
    if not any(isinstance(f, QuietAttempts) for f in logger.filters):
        logger.addFilter(QuietAttempts())


@contextmanager
def connecting() -> Iterator[None]:
    """Within: aio-workq is connecting (aiormq's per-attempt error is dropped)."""
    token = _connecting.set(True)
    try:
        yield
    finally:
        _connecting.reset(token)
