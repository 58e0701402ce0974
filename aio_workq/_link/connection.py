"""Connecting to one of several brokers, and reconnecting with backoff.

A `Connection` owns one aiormq connection at a time. When it is lost, the connection tries the
broker URLs in turn (a shuffled rotation, so that a fleet of workers spreads over a cluster),
waiting after each full round of failures `min(cap, initial * 2**round)` seconds with jitter,
and logs one WARNING per failed attempt with the password hidden. Producers and workers open
their channels on whatever connection is current (`link()`), and reopen them after a reconnect.

`AIO_WORKQ_FAST_PATH=0` in the environment (or `fast_path=False`) opens plain aiormq connections:
every publish, confirm, delivery and ack then goes through aiormq's own public API.

Errors are translated in `errors`; a robust aio-pika connection is adapted in `aiopika`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import aiormq
from yarl import URL

from .._exceptions import (
    AccessRefusedError,
    AuthenticationError,
    BrokerConnectionError,
    ConfigurationError,
    TLSError,
)
from .._hooks import Hook, Hooks
from .._wire.seams import BrokerConnection, Wire, WireFactory
from . import quiet
from .errors import closing_reason, connect_error, translate_errors
from .settings import (
    URLs,
    check_connection_name,
    check_seconds,
    check_wait,
    redact_url,
    resolve_urls,
)
from .source import Link, LinkSource
from .transport import SocketFactory

__all__ = (
    "Backoff",
    "Connection",
    "Link",
    "LinkSource",
    "connect",
    "CLOSE_GRACE",
    "connect_error",
    "fast_path_default",
    "finish_by",
    "translate_errors",
)

log = logging.getLogger("aio_workq")

CLOSE_GRACE = 1.0
"""Seconds a producer's polite close (Channel.Close, Connection.Close) gets after its confirms
wait, before its socket is aborted."""
_ABORTED_GRACE = 1.0  # seconds for aiormq's tasks to end once the socket is aborted


def fast_path_default() -> bool:
    """False when `AIO_WORKQ_FAST_PATH=0` is set: use aiormq's public API for every frame."""
    return os.environ.get("AIO_WORKQ_FAST_PATH", "1").strip().lower() not in ("0", "false", "no")


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Reconnect delays: after the n-th failed round in a row, wait
    `min(cap, initial * 2**(n-1))` seconds (0.5, 1, 2, 4, then 5 s by default), shortened at
    random by up to half (jitter), so reconnecting clients don't move in lock step.

    The cap bounds how long a client takes to notice that the broker is back, whatever the
    length of the outage: with 5 s, a client tries every 2.5 to 5 s (about 0.27 attempts a
    second, one refused TCP connect each while the broker is down), and is publishing again a
    median of about 2 s after the broker answers (`scripts/recovery.py`). A fleet's attempts
    stay spread over the 2.5 s of jitter.
    """

    initial: float = 0.5
    cap: float = 5.0
    settle: float = 1.0
    """Seconds to wait after a lost connection before the first attempt (up to half as much
    again, at random). A cluster re-elects the leaders of the dead node's quorum queues in about
    a second; on RabbitMQ 3.10 a channel that first publishes during that election can have
    every publish nacked for good."""

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ConfigurationError(
                f"Backoff needs 0 < initial <= cap, got initial={self.initial!r} cap={self.cap!r}"
            )
        if self.settle < 0:
            raise ConfigurationError(f"Backoff.settle must be >= 0, got {self.settle!r}")

    def settle_delay(self) -> float:
        """Seconds to wait after a loss before the first reconnect attempt."""
        return random.uniform(self.settle, 1.5 * self.settle)

    def delay(self, failed_rounds: int) -> float:
        """Seconds to wait after `failed_rounds` (>= 1) rounds in a row failed."""
        ceiling = min(self.cap, self.initial * 2 ** min(failed_rounds - 1, 32))
        return random.uniform(ceiling / 2, ceiling)


class Connection:
    """A connection to RabbitMQ (one of several URLs) that reconnects with backoff.

    Producers and workers share it with `connection=`; each opens its own channels on it.

    ```python
    async with await aio_workq.connect(["amqp://a/", "amqp://b/"]) as connection:
        await run_workers(Worker(connection=connection, queue="q", handler=handle))
    ```

    Args:
        url: a broker URL, several separated by commas, or a list (the nodes of a cluster);
            by default from the environment (see `resolve_urls`).
        ssl_context: for `amqps://` URLs: the CA, client certificate and host-name checks.
        name: connection name shown in the management UI.
        connect_timeout: seconds for each connection attempt.
        backoff: delays between rounds of failed reconnect attempts.
        fast_path: take deliveries, confirms and acks off the socket (default, unless
            `AIO_WORKQ_FAST_PATH=0`); False uses aiormq's public API for everything.
        hooks: `Hook`s told when the connection is lost and when it is back.
        wait_for_broker: seconds the first connect (`open()`) keeps retrying, with `backoff`,
            while no broker answers, before it raises; 0 (the default) fails after one round.
            For a client that may start before its broker (containers, systemd).
    """

    def __init__(
        self,
        url: URLs | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        name: str | None = None,
        connect_timeout: float = 10.0,
        backoff: Backoff = Backoff(),
        fast_path: bool | None = None,
        hooks: Iterable[Hook] | Hooks | None = None,
        wait_for_broker: float = 0.0,
    ) -> None:
        self._dialer = _Dialer(
            url, ssl_context=ssl_context, name=name, connect_timeout=connect_timeout
        )
        self._urls = self._dialer.urls
        self._backoff = backoff
        self._fast_path = fast_path_default() if fast_path is None else fast_path
        self._current: Link | None = None
        self._socket: SocketFactory | None = None
        self._down_since: float | None = None  # time.time() of the loss, while reconnecting
        self._url: str | None = None
        self._connected = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self._closing = asyncio.Event()
        self._wait_for_broker = check_seconds(
            "wait_for_broker", wait_for_broker, zero=True, forever=True
        )
        self.hooks: Hooks | None = Hooks.of(hooks)
        """What is told of connection losses and reconnects (set before `open()`)."""
        self.reconnects = 0
        """Connections re-established after a loss since `open()`."""

    def __repr__(self) -> str:
        shown = redact_url(self._url) if self._url else redact_url(",".join(self._urls))
        state = "connected" if self.is_connected else "closed" if self._closed else "connecting"
        return f"<Connection {shown} {state}>"

    @property
    def url(self) -> str | None:
        """The URL connected to, password hidden (`None` while disconnected)."""
        return redact_url(self._url) if self._url and self.is_connected else None

    @property
    def is_connected(self) -> bool:
        current = self._current
        return current is not None and not current.connection.is_closed

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def fast_path(self) -> bool:
        return self._fast_path

    async def __aenter__(self) -> Connection:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self, *, wait_for_broker: float | None = None) -> None:
        """Connect: one round over the URLs, each attempt bounded by `connect_timeout`; with
        `wait_for_broker` (by default the constructor's), more rounds with the reconnect backoff
        for up to that many seconds, for a client that starts before its broker.

        Raises:
            AuthenticationError: the broker refused the credentials (never retried).
            AccessRefusedError: the vhost does not exist or the user may not use it.
            TLSError: the TLS handshake failed.
            BrokerConnectionError: no URL answered (within `wait_for_broker`); the message says
                why for the last one.
        """
        if self._supervisor is not None:
            return
        if self._closed:
            raise BrokerConnectionError("the connection is closed; open a new one")
        wait = (
            self._wait_for_broker
            if wait_for_broker is None
            else check_seconds("wait_for_broker", wait_for_broker, zero=True, forever=True)
        )
        quiet.install()
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + wait
        failed_rounds = 0
        while True:
            last, url = await self._first_round()
            if last is None:
                self._supervisor = loop.create_task(self._supervise())
                return
            failed_rounds += 1
            now = loop.time()
            left = deadline - now
            if self._closed:
                raise _closed_while_opening() from last
            if left <= 0:
                if not wait:
                    raise last
                raise BrokerConnectionError(
                    f"{last}; gave up after waiting {_duration(now - started)} for the broker "
                    f"(wait_for_broker={wait:g})"
                ) from last
            pause = min(self._backoff.delay(failed_rounds), left)
            limit = "no limit" if math.isinf(wait) else f"{_duration(wait)} allowed"
            _log_failure(
                url,
                last,
                f"waiting for the broker: trying again in {_duration(pause)} "
                f"({_duration(now - started)} waited, {limit})",
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._closing.wait()  # close() ends the wait at once

    async def _first_round(self) -> tuple[BrokerConnectionError | None, str]:
        """One round over the URLs: `(None, url)` once connected, else the last error.

        Raises:
            AuthenticationError, AccessRefusedError, TLSError: never retried.
            BrokerConnectionError: closed meanwhile.
        """
        last: BrokerConnectionError | None = None
        url = ""
        for url in self._dialer.rotation():
            if self._closed:
                raise _closed_while_opening()
            try:
                await self._attempt(url)
            except (AuthenticationError, AccessRefusedError, TLSError):
                raise
            except BrokerConnectionError as exc:
                last = exc
                if self._closed:
                    raise _closed_while_opening() from exc
                if len(self._urls) > 1:  # the last one is raised or logged by open()
                    _log_failure(url, exc, "trying the next URL")
                continue
            return None, url
        assert last is not None
        return last, url

    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection and stop reconnecting. Channels on it close too.

        The polite AMQP close gets `timeout` seconds; a broker that does not answer by then
        (paused, or no longer reading a full socket) has the socket aborted instead, so this
        returns within about `timeout`.

        Raises:
            ConfigurationError: `timeout` is not a number of seconds (or is NaN); the
                connection is left as it was.
        """
        timeout = check_wait("timeout", timeout)
        self._closed = True
        self._closing.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        current, self._current = self._current, None
        socket, self._socket = self._socket, None
        self._connected.clear()
        if current is not None:
            await _close_or_abort(current.connection, socket, timeout, self._url or "")

    def trouble(self) -> str | None:
        """What is known to keep messages from getting through: the connection is down (since
        when), or the broker blocked publishers; None when nothing is known."""
        if self._closed:
            return "the connection is closed"
        current = self._current
        if current is None or current.connection.is_closed:
            return _down(self._down_since)
        reason = quiet.blocked_reason(current.connection)
        if reason is not None:
            return f"the broker blocked publishers: memory/disk alarm ({reason})"
        return None

    async def link(self, timeout: float | None = None) -> Link:
        """The current connection, waiting up to `timeout` seconds while reconnecting.

        Raises:
            BrokerConnectionError: closed, or still reconnecting after `timeout`.
        """
        while True:
            current = self._current
            if current is not None and not current.connection.is_closed:
                return current
            if self._closed or self._supervisor is None:
                raise BrokerConnectionError("the connection is closed (or was never opened)")
            try:
                async with asyncio.timeout(timeout):
                    await self._connected.wait()
            except TimeoutError:
                raise BrokerConnectionError(
                    f"still reconnecting to {redact_url(','.join(self._urls))} after {timeout:g} s"
                ) from None
            if self._current is None:  # set and cleared within one iteration
                await asyncio.sleep(0)

    async def channel(
        self, *, publisher_confirms: bool = False, timeout: float | None = 10.0
    ) -> aiormq.abc.AbstractChannel:
        """A plain aiormq channel on the current connection, for what aio-workq does not wrap
        (deleting queues, reading counts). It is not reopened after a reconnect: close it when
        done (`await channel.close()`).

        Raises:
            BrokerConnectionError: no connection within `timeout`.
        """
        link = await self.link(timeout)
        with translate_errors("opening a channel"):
            return await link.connection.channel(publisher_confirms=publisher_confirms)

    def sibling_key(self) -> tuple[object, ...]:
        """What `sibling()` copies that decides where and how it connects (the URLs and the TLS
        context): connections with equal keys may share one sibling."""
        return (tuple(self._urls), self._dialer.ssl_context)

    def sibling(self, *, name: str | None = None) -> Connection:
        """A new connection, not opened, to the same brokers with the same TLS context, timeout
        and backoff, on aiormq's plain path and without hooks: for traffic that must not share
        this connection's fate (a worker's presence beats: publishing during a memory alarm
        gets a connection blocked, its acks unread)."""
        return Connection(
            self._urls,
            ssl_context=self._dialer.ssl_context,
            name=name,
            connect_timeout=self._dialer.connect_timeout,
            backoff=self._backoff,
            fast_path=False,
        )

    # -- attempts ----------------------------------------------------------------------------

    async def _attempt(self, url: str) -> None:
        connection, socket, wire = await self._dialer.dial(url, self._fast_path)
        if self._closed:  # close() ran while this attempt was under way
            with contextlib.suppress(Exception):
                await connection.close()
            raise _closed_while_opening()
        self._url = url
        self._socket = socket
        self._down_since = None
        self._current = Link(connection, wire)
        self._connected.set()

    async def _supervise(self) -> None:
        """Wait for the connection to close; reconnect round after round until it comes back."""
        try:
            while not self._closed:
                current = self._current
                assert current is not None
                await asyncio.wait([current.connection.closing])
                if self._closed:
                    return
                self._connected.clear()
                self._current = None
                self._down_since = time.time()
                log.warning(
                    "lost the connection to %s (%s); reconnecting",
                    redact_url(self._url or ""),
                    closing_reason(current.connection.closing),
                )
                if self.hooks is not None:
                    self.hooks.connection_lost(redact_url(self._url or ""))
                failed_rounds = 0
                await asyncio.sleep(self._backoff.settle_delay())
                while not self._closed:
                    failed = await self._dialer.reconnect_round(self._attempt)
                    if failed is None:
                        self.reconnects += 1
                        log.info("reconnected to %s", redact_url(self._url or ""))
                        if self.hooks is not None:
                            self.hooks.reconnected(redact_url(self._url or ""))
                        break
                    failed_rounds += 1
                    pause = self._backoff.delay(failed_rounds)
                    url, exc = failed
                    down = time.time() - (self._down_since or time.time())
                    _log_failure(
                        url, exc, f"trying again in {_duration(pause)} (down for {_duration(down)})"
                    )
                    await asyncio.sleep(pause)
        except asyncio.CancelledError:  # not by close(): the event loop's end (asyncio.run()
            self._closed = True  # cancels what is left): no reconnect, channels stand down
            raise


class _Dialer:
    """Where and how a `Connection` connects: its URLs, tried in a rotation that starts at
    random (a fleet spreads over a cluster), and the TLS context, name and timeout of each
    attempt.

    Raises:
        ConfigurationError: a bad URL, timeout or TLS context, or TLS with a plain URL.
    """

    def __init__(
        self,
        url: URLs | None,
        *,
        ssl_context: ssl.SSLContext | None,
        name: str | None,
        connect_timeout: float,
    ) -> None:
        check_seconds("connect_timeout", connect_timeout)
        check_connection_name(name)
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise ConfigurationError(
                f"ssl_context must be an ssl.SSLContext, got {type(ssl_context).__name__}"
            )
        self.urls = resolve_urls(url)
        if ssl_context is not None and not all(u.startswith("amqps://") for u in self.urls):
            plain = next(u for u in self.urls if not u.startswith("amqps://"))
            raise ConfigurationError(
                f"ssl_context= is given but {redact_url(plain)!r} is not an amqps:// URL: it "
                "would connect in plain text; use amqps://"
            )
        self._next = random.randrange(len(self.urls))
        self.ssl_context = ssl_context
        self.name = name
        self.connect_timeout = connect_timeout

    def rotation(self) -> Iterator[str]:
        """Every URL once, starting after the last one tried."""
        for _ in range(len(self.urls)):
            url = self.urls[self._next]
            self._next = (self._next + 1) % len(self.urls)
            yield url

    async def reconnect_round(
        self, attempt: Callable[[str], Awaitable[None]]
    ) -> tuple[str, BrokerConnectionError] | None:
        """One round of `attempt` over the URLs after a lost connection: None once one
        connected, else the last URL and its error (the caller logs it with the pause before
        the next round)."""
        urls = list(self.rotation())
        for index, url in enumerate(urls):
            try:
                await attempt(url)
            except BrokerConnectionError as exc:
                if index == len(urls) - 1:
                    return url, exc
                _log_failure(url, exc, "trying the next URL")
                continue
            return None
        raise AssertionError("a rotation has at least one URL")

    async def dial(
        self, url: str, fast_path: bool
    ) -> tuple[aiormq.Connection, SocketFactory, Wire | None]:
        """One attempt to `url` (see `dial`).

        Raises:
            BrokerConnectionError: no answer within `connect_timeout`, or the broker refused.
        """
        return await dial(
            url,
            ssl_context=self.ssl_context,
            name=self.name,
            connect_timeout=self.connect_timeout,
            fast_path=fast_path,
        )


def _closed_while_opening() -> BrokerConnectionError:
    return BrokerConnectionError("the connection was closed while it was being opened")


def _duration(seconds: float) -> str:
    """Seconds as a log line says them: hundredths under a second, tenths under a minute
    (0.4 s is not "0 s")."""
    if seconds < 1:
        return f"{seconds:.2f} s"
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds:.0f} s"


def _log_failure(url: str, exc: BaseException, then: str | None) -> None:
    target = redact_url(url)
    said = str(exc).removeprefix(f"cannot connect to {target}: ")  # the URL once
    suffix = f"; {then}" if then else ""
    log.warning("connecting to %s failed: %s%s", target, said, suffix)


async def dial(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None,
    name: str | None,
    connect_timeout: float,
    fast_path: bool,
) -> tuple[aiormq.Connection, SocketFactory, Wire | None]:
    """One connection attempt to one URL: the aiormq connection, the socket it can be aborted
    through, and the fast path's wire (None on the plain path).

    Raises:
        BrokerConnectionError: no answer within `connect_timeout`, or the broker refused.
    """
    factory = WireFactory() if fast_path else None
    socket = SocketFactory(factory)
    connection = BrokerConnection(URL(url), context=ssl_context, transport_factory=socket)
    properties: dict[str, Any] = {"connection_name": name} if name else {}
    with quiet.connecting():
        try:
            async with asyncio.timeout(connect_timeout):
                await connection.connect(client_properties=properties)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await connection.close()
            if isinstance(exc, TimeoutError):
                raise BrokerConnectionError(
                    f"cannot connect to {redact_url(url)}: no answer within "
                    f"{connect_timeout:g} s; check the host and port, and that RabbitMQ "
                    "is running (make broker-start starts a local one)"
                ) from None
            if isinstance(exc, Exception):
                raise connect_error(exc, url) from exc
            raise
    return connection, socket, factory.wire if factory else None


async def _close_or_abort(
    connection: aiormq.abc.AbstractConnection,
    socket: SocketFactory | None,
    timeout: float,
    url: str,
) -> None:
    """The polite AMQP close for up to `timeout` seconds, then the socket aborted."""
    closing = asyncio.ensure_future(connection.close())
    await asyncio.wait({closing}, timeout=max(timeout, 0))
    if not closing.done() and socket is not None:
        log.warning(
            "closing the connection to %s did not finish within %g s (the broker does not "
            "answer); aborting its socket",
            redact_url(url),
            timeout,
        )
        socket.abort()
        await asyncio.wait({closing}, timeout=_ABORTED_GRACE)
    _settle(closing)


def _down(down_since: float | None) -> str:
    if down_since is None:
        return "the connection to the broker was just lost, reconnecting"
    # In UTC, said so: a process's local time (e.g. Django's TZ) would differ from its logs'.
    at = time.strftime("%H:%M:%S UTC", time.gmtime(down_since))
    return (
        f"the connection to the broker is down since {at} "
        f"({time.time() - down_since:.0f} s), reconnecting"
    )


async def connect(
    url: URLs | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    name: str | None = None,
    timeout: float = 10.0,
    backoff: Backoff = Backoff(),
    hooks: Iterable[Hook] | None = None,
    wait_for_broker: float = 0.0,
) -> Connection:
    """Open a `Connection` that several producers and workers can share.

    Args:
        url: a broker URL, several separated by commas, or a list; by default from the
            environment (see `resolve_urls`).
        ssl_context: for `amqps://` URLs.
        name: connection name shown in the management UI.
        timeout: seconds for each connection attempt; the first connect tries each URL once.
        backoff: delays between rounds of failed reconnect attempts.
        hooks: `Hook`s told when the connection is lost and when it is back.
        wait_for_broker: seconds to keep retrying the first connect while no broker answers.

    Raises:
        ConfigurationError: an invalid URL or setting.
        AuthenticationError, AccessRefusedError, TLSError, BrokerConnectionError: see
            `Connection.open`. A failed connect leaves nothing running.
    """
    connection = Connection(
        url,
        ssl_context=ssl_context,
        name=name,
        connect_timeout=timeout,
        backoff=backoff,
        hooks=hooks,
        wait_for_broker=wait_for_broker,
    )
    await connection.open()
    return connection


async def finish_by(deadline: float, step: Awaitable[Any], connection: Connection | None) -> None:
    """Await a closing `step` (a publisher's or channel's close) until `deadline` (loop time);
    if it is still running then, close `connection` at once (its socket aborted) so that the
    step ends too.

    Errors of the step are dropped: it is a close. Without a `connection` of one's own (a shared
    one is not closed for one producer), the step's own bounds apply.
    """
    task = asyncio.ensure_future(step)
    loop = asyncio.get_running_loop()
    if connection is None:
        await asyncio.wait({task})
    else:
        await asyncio.wait({task}, timeout=max(deadline - loop.time(), 0))
        if not task.done():
            await connection.close(0)
            await asyncio.wait({task}, timeout=_ABORTED_GRACE)
    _settle(task)


def _settle(task: asyncio.Future[Any]) -> None:
    """Retrieve `task`'s outcome, now or when it ends (a close's errors are not raised)."""
    if task.done():
        _drop_result(task)
    else:
        task.add_done_callback(_drop_result)


def _drop_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
