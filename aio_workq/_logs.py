"""Log lines about a message carry its queue, message id and attempt as record attributes.

The worker sets the message being handled in a context variable for the task that handles it
(`handling`); `MessageFields`, a logging filter, copies it onto every record logged meanwhile
that does not have the fields already. aio-workq's own logger has the filter; add it to your
log handler to get the fields on your handlers' lines too (coroutine handlers; a plain `def`
handler runs in a thread that does not see the variable).
"""

from __future__ import annotations

import contextvars
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._hooks import JobView

__all__ = ("FIELDS", "MessageFields", "handling", "set_handling")

FIELDS = ("queue", "message_id", "attempt")
"""The record attributes set for a line about a message."""

_current: contextvars.ContextVar[tuple[str, JobView] | None] = contextvars.ContextVar(
    "aio_workq_message", default=None
)


def handling(queue: str, job: JobView) -> None:
    """The current task handles `job` from `queue` (each delivery has a task of its own)."""
    _current.set((queue, job))


set_handling = _current.set
"""`handling` as one C call, `set_handling((queue, job))`: the worker's hot path."""


class MessageFields(logging.Filter):
    """Adds `queue`, `message_id` and `attempt` to records logged while a message is handled.

    ```python
    handler = logging.StreamHandler()
    handler.addFilter(aio_workq.MessageFields())
    ```

    Records that carry the fields already (aio-workq's own lines pass them as `extra=`) are
    left as they are. Lines logged outside a handler get nothing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "message_id" not in record.__dict__:
            current = _current.get()
            if current is not None:
                queue, job = current
                record.queue = queue
                record.message_id = job.message_id
                record.attempt = job.attempt
        return True


logging.getLogger("aio_workq").addFilter(MessageFields())
