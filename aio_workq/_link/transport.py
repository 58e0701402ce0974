"""The socket under an aiormq connection, kept so that a close that cannot finish can abort it.

`SocketFactory` plugs into aiormq through its public `TransportFactory` (a constructor argument
of `aiormq.Connection`), around aio-workq's `WireFactory` on the fast path or aiormq's own
TCP/TLS factory on the plain path, and keeps the `StreamWriter` it opened: every frame still goes
through aiormq (or the wire) as before. `abort()` drops the socket without the polite AMQP close:
what a close does when the broker stopped reading (SIGSTOP, a full send buffer), instead of
waiting for aiormq's heartbeat grace of 3 × (heartbeat + 1) s.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

__all__ = ("SocketFactory",)


class SocketFactory(TransportFactory):
    """Opens the socket with `inner` (by default aiormq's TCP/TLS factory for the URL's scheme)
    and keeps its writer; one per connection attempt."""

    def __init__(self, inner: TransportFactory | None = None) -> None:
        self._inner = inner
        self.writer: asyncio.StreamWriter | None = None

    async def create(self, url: URL, **kwargs: Any) -> tuple[Any, asyncio.StreamWriter]:
        inner = self._inner
        if inner is None:
            inner = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await inner.create(url, **kwargs)
        self.writer = writer
        return reader, writer

    def abort(self) -> None:
        """Drop the socket now: buffered bytes are discarded, the peer sees a reset."""
        if self.writer is not None:
            self.writer.transport.abort()  # also ends a polite close() stuck on a full buffer
