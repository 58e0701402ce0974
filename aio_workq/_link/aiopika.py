"""A robust aio-pika connection that someone else opened, as a `LinkSource`; and choosing
between the connection a producer or worker opens itself and the one it was given."""

from __future__ import annotations

import asyncio
import ssl

from aio_pika.abc import AbstractRobustConnection

from .._exceptions import BrokerConnectionError, ConfigurationError
from .._hooks import Hooks
from . import quiet
from .connection import Connection
from .settings import URLs, resolve_url
from .source import Link, LinkSource

__all__ = ("link_source", "open_source", "own_connection")


class _RobustLinks:
    """A robust aio-pika connection opened by someone else, as a `LinkSource` (the plain path:
    aio-workq then uses aiormq's public API for every frame on it)."""

    def __init__(self, robust: AbstractRobustConnection) -> None:
        self._robust = robust
        quiet.install()

    @property
    def is_connected(self) -> bool:
        transport = self._robust.transport
        return transport is not None and not transport.connection.is_closed

    @property
    def is_closed(self) -> bool:
        return bool(self._robust.is_closed)

    def trouble(self) -> str | None:
        transport = self._robust.transport
        if self._robust.is_closed:
            return "the shared aio-pika connection is closed"
        if transport is None or transport.connection.is_closed:
            return "the connection to the broker is down (shared aio-pika connection), reconnecting"
        reason = quiet.blocked_reason(transport.connection)
        if reason is not None:
            return f"the broker blocked publishers: memory/disk alarm ({reason})"
        return None

    async def link(self, timeout: float | None = None) -> Link:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    transport = self._robust.transport
                    if transport is not None and not transport.connection.is_closed:
                        return Link(transport.connection, None)
                    if self._robust.is_closed:
                        raise BrokerConnectionError("the shared aio-pika connection is closed")
                    await self._robust.connected.wait()
                    await asyncio.sleep(0)
        except TimeoutError:
            raise BrokerConnectionError(
                f"the shared aio-pika connection is still reconnecting after {timeout:g} s"
            ) from None


def link_source(connection: Connection | AbstractRobustConnection) -> LinkSource:
    """`connection` as a `LinkSource`: an aio-workq `Connection` as it is, an aio-pika one adapted.

    Raises:
        ConfigurationError: `connection` is neither.
    """
    if isinstance(connection, Connection):
        return connection
    if isinstance(connection, AbstractRobustConnection):
        return _RobustLinks(connection)
    raise ConfigurationError(
        "connection= takes an aio_workq.Connection (from aio_workq.connect()) or a robust "
        f"aio-pika connection (aio_pika.connect_robust()), got {type(connection).__name__}"
    )


def own_connection(
    url: URLs | None,
    shared: Connection | AbstractRobustConnection | None,
    *,
    ssl_context: ssl.SSLContext | None,
    name: str | None,
    connect_timeout: float,
    hooks: Hooks | None,
    wait_for_broker: float,
) -> tuple[str | None, Connection | None]:
    """The URL (`resolve_url`) and the `Connection` (not open yet) a producer or worker makes
    itself; neither when it was given one (`shared`).

    Raises:
        ConfigurationError: the URL or a setting is invalid.
    """
    if shared is not None:
        return None, None
    resolved = resolve_url(url)
    own = Connection(
        resolved,
        ssl_context=ssl_context,
        name=name,
        connect_timeout=connect_timeout,
        hooks=hooks,
        wait_for_broker=wait_for_broker,
    )
    return resolved, own


async def open_source(
    own: Connection | None,
    shared: Connection | AbstractRobustConnection | None,
    wait_for_broker: float | None = None,
) -> LinkSource:
    """Open the connection a producer or worker made itself (waiting up to `wait_for_broker`
    seconds for a broker, by default its own setting), or adapt the one it was given."""
    if own is not None:
        await own.open(wait_for_broker=wait_for_broker)
        return own
    assert shared is not None
    return link_source(shared)
