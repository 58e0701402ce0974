"""The whole aio-workq error tree.

```
WorkqError(Exception)
├── ConfigurationError(WorkqError, ValueError)   invalid settings or URL
├── BrokerConnectionError(WorkqError, ConnectionError)
│   ├── AuthenticationError                      wrong user name or password
│   ├── AccessRefusedError                       no such vhost, or the user may not use it
│   ├── TLSError                                 the TLS handshake failed (certificate, host name)
│   └── BrokerUnavailableError                   the connection is down (`fail_fast=True`)
├── PublishError                                 .message_id, .exchange, .routing_key
│   ├── PublishNackedError                       the broker nacked the publish
│   ├── UnroutableError                          a mandatory publish was returned
│   ├── PublishTimeoutError(PublishError, TimeoutError)
│   └── ConnectionLostError                      the connection died before the confirm
├── TopologyError                                406 PRECONDITION_FAILED or 404 on declare
├── SerializationError(WorkqError, TypeError)    the body cannot be encoded
│   └── MessageTooLargeError                     .size over .limit (max_message_size)
├── IntegrationError(WorkqError, RuntimeError)   used the wrong way (e.g. not started)
├── RPCError                                     .remote_type: the remote handler raised
└── RPCTimeoutError(WorkqError, TimeoutError)    no reply in time

Retry, Defer, Reject (Exception)                 handler signals, outside WorkqError
```

aio-pika and aiormq errors are translated in one place,
`aio_workq._link.errors.translate_errors`,
with `raise ... from exc`, so users only ever catch the classes above.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

__all__ = (
    "AccessRefusedError",
    "AuthenticationError",
    "BrokerConnectionError",
    "BrokerUnavailableError",
    "ConfigurationError",
    "ConnectionLostError",
    "PayloadError",
    "Defer",
    "IntegrationError",
    "MessageTooLargeError",
    "PublishError",
    "PublishNackedError",
    "PublishTimeoutError",
    "RPCError",
    "RPCTimeoutError",
    "Reject",
    "Retry",
    "SerializationError",
    "TLSError",
    "TopologyError",
    "UnroutableError",
    "WorkqError",
    "qualname",
    "text_of",
)


class WorkqError(Exception):
    """Base class of every error aio-workq raises."""


class ConfigurationError(WorkqError, ValueError):
    """A setting or URL is invalid; the message names it and what is allowed."""


class BrokerConnectionError(WorkqError, ConnectionError):
    """The broker cannot be reached, or the connection was refused or lost."""


class AuthenticationError(BrokerConnectionError):
    """The broker refused the user name or password (never retried)."""


class AccessRefusedError(BrokerConnectionError):
    """The broker refused the virtual host: it does not exist, or the user may not use it."""


class TLSError(BrokerConnectionError):
    """The TLS handshake failed: an unknown CA, a wrong host name, or a missing client certificate.

    aio-workq never falls back to plain text.
    """


class PublishError(WorkqError):
    """A message was not confirmed by the broker: it must be considered not sent."""

    def __init__(
        self,
        message: str,
        *,
        message_id: str | None = None,
        exchange: str = "",
        routing_key: str = "",
    ) -> None:
        super().__init__(message)
        self.message_id = message_id
        self.exchange = exchange
        self.routing_key = routing_key


class PublishNackedError(PublishError):
    """The broker answered the publish with a nack (e.g. a full queue with reject-publish)."""


class UnroutableError(PublishError):
    """The broker returned a mandatory publish: no queue is bound for its routing key."""


class PublishTimeoutError(PublishError, TimeoutError):
    """No confirm arrived in time (connection down, or the broker blocks publishers)."""


class ConnectionLostError(PublishError):
    """The connection or channel closed before the confirm arrived."""


class TopologyError(WorkqError):
    """A queue or exchange declaration failed: it exists with other arguments, or not at all."""


class SerializationError(WorkqError, TypeError):
    """The body cannot be encoded; nothing was sent."""


class MessageTooLargeError(SerializationError):
    """The body is over RabbitMQ's `max_message_size` (128 MiB by default, or a broker's lower
    limit, learned from its first refusal); nothing of it reached a queue.

    Attributes:
        message_id: the message's id.
        size: the body's size in bytes.
        limit: the `max_message_size` it is over, in bytes.
    """

    def __init__(self, message: str, *, message_id: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.message_id = message_id
        self.size = size
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with its fields (a process pool's result, a copy)."""
        return _too_large, (str(self), self.message_id, self.size, self.limit)


def _too_large(message: str, message_id: str, size: int, limit: int) -> MessageTooLargeError:
    return MessageTooLargeError(message, message_id=message_id, size=size, limit=limit)


class IntegrationError(WorkqError, RuntimeError):
    """A producer, web integration or sync producer is used the wrong way: before it was
    started (`async with Producer(...)`, the app's lifespan), or after it was closed."""


class RPCError(WorkqError):
    """The remote handler raised; `remote_type` names its exception class."""

    def __init__(self, message: str, *, remote_type: str) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_message = message


class RPCTimeoutError(WorkqError, TimeoutError):
    """No reply arrived within the call's timeout."""


class Retry(Exception):
    """Raise in a handler to run the job again after `delay` seconds (counts as an attempt).

    Args:
        delay: seconds to wait before the next attempt; `None` uses the worker's
            `RetryPolicy` backoff. The copy waits on the broker in the smallest delay queue at
            least that long (the policy's delays, and a ladder of 1, 2, 5, 10, 30 s, 1, 2, 5,
            10, 30 min, 1, 6, 24 h) with `delay` as its own TTL: `Retry(delay=3)` waits 3 s in
            a 4 s or 5 s queue, longer (up to that queue's delay) only behind a copy with
            longer to wait. At most 24 h.
    """

    def __init__(self, delay: float | None = None) -> None:
        if delay is not None and delay < 0:
            raise ConfigurationError(f"Retry(delay=...) must be >= 0 seconds, got {delay!r}")
        super().__init__(delay)
        self.delay = delay


class Defer(Exception):
    """Raise in a handler to run the job again after `delay` seconds *without* using an attempt.

    For "not yet, ask me later" (a resource is busy, a rate limit): the message waits on the
    broker in a delay queue, and `job.attempt` stays the same. Deferrals are counted instead
    (the `x-workq-defers` header): past the worker's `max_defers` (100 by default) the next
    `Defer` dead-letters the message.

    Args:
        delay: seconds to wait before the job runs again (> 0); waits like `Retry(delay=...)`.
    """

    def __init__(self, delay: float) -> None:
        if not delay > 0:
            raise ConfigurationError(f"Defer(delay=...) must be > 0 seconds, got {delay!r}")
        super().__init__(delay)
        self.delay = delay


class Reject(Exception):
    """Raise in a handler to send the message straight to the dead-letter queue, never retried."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class PayloadError(Reject, WorkqError):
    """The body does not validate as the handler's payload type: the message goes straight to
    the dead-letter queue, with the validation error in its `x-workq-validation-error` header."""


def qualname(obj: Any) -> str:
    """`module.Name` of a function or class, or of an instance's class (error headers, reasons,
    log lines).

    aio-workq's own classes are named by the public path they are imported from,
    `aio_workq.PayloadError` rather than `aio_workq._exceptions.PayloadError`; everything else,
    a user's exception included, by its module's path.
    """
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    module, name = target.__module__, target.__qualname__
    if module.startswith("aio_workq.") and "._" in module:
        parts = module.split(".")
        public = ".".join(parts[: next(i for i, p in enumerate(parts) if p.startswith("_"))])
        # Looked up, not imported: the package of a module that defined `target` is loaded.
        if getattr(sys.modules.get(public), name, None) is target:
            return f"{public}.{name}"
    return f"{module}.{name}"


class BrokerUnavailableError(BrokerConnectionError):
    """The connection to the broker is down (reconnecting): a `Producer(fail_fast=True)` raises
    this at once instead of waiting for the publish timeout; nothing was sent."""


def text_of(exc: BaseException, *, as_repr: bool = False) -> str:
    """`str(exc)` (or `repr(exc)`) as text UTF-8 can carry (a lone surrogate, as in a file name
    decoded with `surrogateescape`, escaped), or a stand-in naming its class when that raises:
    a custom `__str__` with a bug must not keep a failed message from being settled."""
    try:
        text = repr(exc) if as_repr else str(exc)
    except Exception:
        return f"<{qualname(exc)}: {'repr' if as_repr else 'str'}() failed>"
    if not isinstance(text, str):  # pragma: no cover - str() and repr() return str or raise
        return f"<{qualname(exc)}>"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
