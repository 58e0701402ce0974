"""The socket under an aiormq connection, kept so that a close that cannot finish can abort it.

`SocketFactory` plugs into aiormq through its public `TransportFactory` (a constructor argument
of `aiormq.Connection`), around aio-workq's `WireFactory` on the fast path or aiormq's own
TCP/TLS factory on the plain path, and keeps the `StreamWriter` it opened: every frame still goes
through aiormq (or the wire) as before. `abort()` drops the socket without the polite AMQP close:
what a close does when the broker stopped reading (SIGSTOP, a full send buffer), instead of
waiting for aiormq's heartbeat grace of 3 × (heartbeat + 1) s.

A forked child lets go of every socket its parent opened this way (`os.register_at_fork`): it
can't use them (a producer started before `fork()` refuses to publish in the child), and its
copies would keep the parent's connections open after the parent died, so the broker would
hold the parent's unacked messages, its exclusive queues and its scheduler lease until its
heartbeat timeout (minutes) instead of seeing the connection close at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
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
        _opened.add(self)
        return reader, writer

    def abort(self) -> None:
        """Drop the socket now: buffered bytes are discarded, the peer sees a reset."""
        if self.writer is not None:
            self.writer.transport.abort()  # also ends a polite close() stuck on a full buffer


_opened: weakref.WeakSet[SocketFactory] = weakref.WeakSet()


def _let_go_in_child() -> None:
    """In a forked child: point each inherited broker socket's descriptor at /dev/null. The
    socket stays open in the parent alone (the child sends nothing on it: no FIN, no close),
    and the descriptor number stays taken, so nothing of the child's that still holds it
    closes another file by that number."""
    factories = list(_opened)
    _opened.clear()
    if not factories:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for factory in factories:
            transport = None if factory.writer is None else factory.writer.transport
            sock = None if transport is None else transport.get_extra_info("socket")
            fd = -1 if sock is None else sock.fileno()
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.dup2(null, fd)
    finally:
        os.close(null)


os.register_at_fork(after_in_child=_let_go_in_child)
