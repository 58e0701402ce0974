"""Connecting to the broker, reconnecting with backoff, and the one place errors are translated."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection

from ._demux import DemuxTransportFactory, register
from ._exceptions import (
    AuthenticationError,
    BrokerConnectionError,
    ConfigurationError,
    TopologyError,
)
from ._settings import redact_url, resolve_url

__all__ = ("BackoffConnection", "connect", "translate_errors")

log = logging.getLogger("aio_workq")

_SAME_ATTEMPT = 0.05  # seconds: reads of reconnect_interval closer than this are one attempt


class BackoffConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, reconnecting with capped exponential backoff and jitter.

    aio-pika waits a fixed `reconnect_interval` between attempts; a fleet of workers that lost
    the same broker then reconnects in lock step. Here the n-th consecutive failed attempt waits
    `min(cap, base * 2**n)` seconds, with full jitter, and a successful connection resets n.
    """

    reconnect_cap = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._failures = 0
        self._base_interval = 0.5
        self._delay = 0.5
        self._last_read = 0.0
        super().__init__(*args, **kwargs)
        self.reconnect_callbacks.add(self._reset_backoff)
        self._transports = DemuxTransportFactory()
        self.kwargs["transport_factory"] = self._transports

    @property
    def reconnect_interval(self) -> float:
        # aio-pika reads this for its log line and again for its sleep: one failed attempt is
        # one burst of reads, so the delay advances only when the last read is not recent.
        now = time.monotonic()
        if now - self._last_read > _SAME_ATTEMPT:
            delay = min(self.reconnect_cap, self._base_interval * 2**self._failures)
            self._failures = min(self._failures + 1, 16)
            self._delay = random.uniform(delay / 2, delay)
        self._last_read = now
        return self._delay

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        self._base_interval = max(4 * _SAME_ATTEMPT, float(value))

    async def _on_connected(self) -> None:
        # Before the channels are restored: a worker's restored channel attaches to the demux.
        if self.transport is not None and self._transports.last is not None:
            register(self.transport.connection, self._transports.last)
        await super()._on_connected()

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        await super()._on_connection_close(closing)
        self._reset_backoff()  # its log line read the interval: that was not a failed attempt

    def _reset_backoff(self, *_: Any) -> None:
        self._failures = 0
        self._last_read = 0.0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact_url(str(self.url))}>"


async def connect(
    url: str | None = None,
    *,
    timeout: float = 10.0,
    name: str | None = None,
    reconnect_interval: float = 0.5,
) -> AbstractRobustConnection:
    """Open a robust connection that several producers and workers can share.

    Args:
        url: broker URL; by default from the environment (see `resolve_url`).
        timeout: seconds for the first connection attempt.
        name: connection name shown in the management UI.
        reconnect_interval: the first reconnect delay; it doubles up to 30 s, with jitter.

    Raises:
        AuthenticationError: the broker refused the credentials.
        BrokerConnectionError: the broker cannot be reached within `timeout`.
    """
    url = resolve_url(url)
    if timeout <= 0:
        raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout!r}")
    properties: dict[str, Any] = {"connection_name": name} if name else {}
    target = redact_url(url)
    with translate_errors(f"connecting to {target}"):
        try:
            async with asyncio.timeout(timeout):
                return await aio_pika.connect_robust(
                    url,
                    timeout=timeout,
                    client_properties=properties,
                    connection_class=BackoffConnection,
                    reconnect_interval=reconnect_interval,
                )
        except TimeoutError:
            raise BrokerConnectionError(
                f"cannot connect to {target}: no answer within {timeout:g} s; check the host "
                "and port, and that RabbitMQ is running (make broker-start starts a local one)"
            ) from None


@contextmanager
def translate_errors(doing: str) -> Iterator[None]:
    """Map aio-pika/aiormq errors raised while `doing` to aio-workq's error tree."""
    try:
        yield
    except (aiormq.exceptions.AuthenticationError, aiormq.ProbableAuthenticationError) as exc:
        raise AuthenticationError(
            f"{doing}: the broker refused the user name or password ({_reason(exc)}); "
            "check the credentials in the URL or RABBITMQ_USERNAME/RABBITMQ_PASSWORD"
        ) from exc
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyError(f"{doing}: {_reason(exc)}") from exc
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        raise TopologyError(f"{doing}: {_reason(exc)}") from exc
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise TopologyError(f"{doing}: access refused: {_reason(exc)}") from exc
    except (aiormq.exceptions.AMQPConnectionError, ConnectionError, OSError) as exc:
        raise BrokerConnectionError(f"{doing}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """A short, password-free description of an aiormq/OS error."""
    if isinstance(exc, aiormq.exceptions.AMQPError) and exc.args:
        first = exc.args[0]
        text = getattr(first, "reply_text", None) or str(first)
        return str(text)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
