"""An asyncio TCP proxy on loopback that injects network faults between clients and a broker.

```python
async with FaultProxy(upstream_port=broker.amqp_port) as proxy:
    url = proxy.url(broker.url)           # the broker URL, through the proxy
    proxy.cut()                           # drop every connection now (like a reset)
    async with proxy.cutting(every=3.0):  # ... and every 3 s while inside the block
        ...
    proxy.black_hole()                    # accept, forward nothing (held like unacked TCP)
    proxy.heal()                          # forward again, held bytes first
    proxy.latency = 0.05                  # each chunk leaves 50 ms after it arrived
```

RabbitMQ has no fault injection of its own, `tc netem` is not available on these machines and
toxiproxy is not packaged, so the fault suite uses this. It stays in `tests/`: it is a test tool
that needs no broker of its own, not part of the library's API.

A black hole models a partition without resets: connections stay open, bytes that arrive are held
and delivered in order once healed (as TCP retransmission would), new connections are accepted
but only connected upstream once healed. A cut aborts both sides (the client sees a reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

__all__ = ("FaultProxy",)

_CHUNK = 65536


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """Forwards `127.0.0.1:port` to `upstream_host:upstream_port`, with faults on demand.

    Args:
        upstream_port: the port to forward to (the broker's AMQP port).
        upstream_host: the host to forward to; loopback only in tests.
        port: the port to listen on; 0 picks a free one (see `port` after `start()`).
    """

    def __init__(
        self, *, upstream_port: int, upstream_host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.latency = 0.0
        self.accepted = 0  # connections accepted since start
        self.cuts = 0  # connections dropped by cut()
        self._port = port
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._accepted_changed = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()

    @classmethod
    def to(cls, amqp_url: str) -> FaultProxy:
        """A proxy (not started: `async with` it) to the broker of `amqp_url`; connect to it
        with `proxy.url(amqp_url)`."""
        port = urlsplit(amqp_url).port
        assert port is not None, f"no port in {amqp_url!r}"
        return cls(upstream_port=port)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on 127.0.0.1."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        self.heal()
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._handlers:  # let every connection handler see its link end
            await asyncio.wait(self._handlers)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        return self._port

    @property
    def connections(self) -> int:
        """Connections open through the proxy right now."""
        return len(self._links)

    def url(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's (user, password, path kept)."""
        parts = urlsplit(url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@127.0.0.1:{self._port}" if userinfo else f"127.0.0.1:{self._port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # -- faults ----------------------------------------------------------------------------

    def cut(self) -> int:
        """Abort every open connection now (both sides see a reset); returns how many."""
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        self.cuts += len(links)
        return len(links)

    def tell_clients(self, data: bytes) -> int:
        """Write `data` to every client now, as if the broker had sent it (a forged frame: call
        it while nothing else is in flight, so it does not land inside a frame); returns how
        many clients."""
        links = list(self._links)
        for link in links:
            link.client.write(data)
        return len(links)

    @contextlib.asynccontextmanager
    async def cutting(self, *, every: float) -> AsyncIterator[None]:
        """Cut every connection every `every` seconds while inside the block."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(every)
                self.cut()

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def black_holed(self) -> bool:
        """Whether the proxy currently forwards nothing."""
        return not self._open.is_set()

    def black_hole(self) -> None:
        """Forward nothing from now on (connections stay open, new ones are accepted)."""
        self._open.clear()

    def heal(self) -> None:
        """Forward again: held bytes first, in order; held connections connect upstream."""
        self._open.set()

    @contextlib.asynccontextmanager
    async def black_holed_for(self, seconds: float) -> AsyncIterator[None]:
        """Black-hole now, heal after `seconds` (or on leaving the block, if sooner)."""
        self.black_hole()
        handle = asyncio.get_running_loop().call_later(seconds, self.heal)
        try:
            yield
        finally:
            handle.cancel()
            self.heal()

    async def wait_accepted(self, count: int) -> None:
        """Wait until `accepted` reaches `count` (use under `asyncio.timeout`)."""
        while self.accepted < count:
            self._accepted_changed.clear()
            await self._accepted_changed.wait()

    # -- forwarding ------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        link = _Link(client=writer)
        self._links.add(link)
        self.accepted += 1
        self._accepted_changed.set()
        try:
            await self._open.wait()  # a black hole accepts but does not connect on
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
            link.upstream = up_writer
            if link not in self._links:  # cut while connecting
                up_writer.transport.abort()
                return
            tasks = {
                asyncio.create_task(self._pump(reader, up_writer)),
                asyncio.create_task(self._pump(up_reader, writer)),
            }
            link.tasks |= tasks
            # One direction ending (EOF or error) ends the link, as a TCP proxy does.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass
        finally:
            link.abort()
            self._links.discard(link)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction: chunks wait out the latency and the black hole, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    await self._open.wait()
                    if writer.can_write_eof() and not writer.is_closing():
                        writer.write_eof()
                    return
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._open.wait()
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                data = await reader.read(_CHUNK)
                queue.put_nowait((time.monotonic() + self.latency, data))
                if not data:
                    break
            await sender
        except OSError:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
