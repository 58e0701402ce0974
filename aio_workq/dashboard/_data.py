"""Where the pages' data comes from, fetched once per interval whoever asks.

Every client polls the same snapshot: the broker (or its management API) is asked at most once
per `ttl` seconds however many tabs are open, and concurrent requests wait for the one fetch
under way instead of starting their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import aio_pika
import aio_pika.exceptions

from aio_workq import WorkqError, redact_url
from aio_workq.admin import ManagementAPIError
from aio_workq.admin.queues import (
    QueueRow,
    RawQueue,
    amqp_raws,
    connect,
    default_management_url,
    group_rows,
    management_raws,
    vhost_of,
)

__all__ = ("Cached", "QueueData", "QueueSnapshot", "Sample", "visible")

T = TypeVar("T")

_MANAGEMENT_RETRY = 60.0
_HISTORY = 10 * 60.0


def visible(raws: Iterable[RawQueue]) -> list[RawQueue]:
    """The queues a page lists: not the server-named `amq.*` ones (exclusive reply and
    listener queues, the dashboard's own presence watcher among them)."""
    return [raw for raw in raws if not raw.name.startswith("amq.")]


class Cached(Generic[T]):
    """The value of `fetch`, fetched at most once per `ttl` seconds (single flight)."""

    def __init__(self, fetch: Callable[[], Awaitable[T]], *, ttl: float) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._value: T | None = None
        self._at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self) -> T:
        """The cached value while fresh, else a new one."""
        if self._value is not None and time.monotonic() - self._at < self._ttl:
            return self._value
        async with self._lock:
            if self._value is None or time.monotonic() - self._at >= self._ttl:
                self._value = await self._fetch()
                self._at = time.monotonic()
            return self._value


@dataclass(frozen=True, slots=True)
class Sample:
    """Totals over the work queues at one moment (rates `None` when the source has none)."""

    at: float
    ready: int
    publish_rate: float | None
    deliver_rate: float | None
    handled: int | None = None
    """The live workers' handled count (their own counters), when the dashboard watches them."""


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """The queues at one moment, where they were read from, and why not (`error`)."""

    rows: list[QueueRow]
    source: str
    management: bool
    taken: float = field(default_factory=time.time)
    error: str | None = None

    def row(self, queue: str) -> QueueRow | None:
        """The row of this work queue."""
        return next((row for row in self.rows if row.queue == queue), None)


class QueueData:
    """Queue depths from the management API (every queue of the vhost, with rates) when it
    answers, else passive declares of the queues the dashboard knows by name (those it was
    given, and those the workers' beats and the schedules name).

    Args:
        url: the broker.
        management_url: the management API; when given, it is the only source (its failure is
            shown). Without it, the API next to the broker is tried, then every minute again;
            `""` turns it off (passive declares only).
        names: queues to look at without the management API.
        ttl: seconds a snapshot is served before the next fetch.
        connect_timeout: seconds a connection attempt to the broker may take.
    """

    def __init__(
        self,
        *,
        url: str,
        management_url: str | None,
        names: Iterable[str] = (),
        ttl: float = 2.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self._url = url
        self._connect_timeout = connect_timeout
        self._off = management_url == ""
        self._explicit = bool(management_url)
        self._mgmt = management_url or default_management_url(url)
        self._names = list(dict.fromkeys(names))
        self._extra: Callable[[], Iterable[str]] = list
        self._listening: Callable[[], bool] = lambda: False
        self._unheard: Callable[[], str | None] = lambda: None
        self._handled: Callable[[], int | None] = lambda: None
        self._mgmt_failed_at = float("-inf")
        self._mgmt_reason = ""
        self._cache: Cached[QueueSnapshot] = Cached(self._fetch, ttl=ttl)
        self.history: deque[Sample] = deque()
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def close(self) -> None:
        """Close the connection kept for passive declares (opened again when needed)."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):  # one the broker closed already: nothing to do
                await connection.close()

    def also_watch(
        self,
        names: Callable[[], Iterable[str]],
        *,
        listening: Callable[[], bool] | None = None,
        unheard: Callable[[], str | None] | None = None,
    ) -> None:
        """Queue names learnt elsewhere (workers' beats, schedules), asked on each fetch;
        `listening()` is true while the first beats may still be on their way (then a page
        without queue names says it is waiting for them rather than asking for `--queue`), and
        `unheard()` says why the beats can't be read (the broker refused or is not reachable)."""
        self._extra = names
        if listening is not None:
            self._listening = listening
        if unheard is not None:
            self._unheard = unheard

    def count_handled(self, handled: Callable[[], int | None]) -> None:
        """The workers' handled count, sampled with each snapshot (a rate without the API)."""
        self._handled = handled

    def names(self) -> list[str]:
        """The queues looked at without the management API."""
        return list(dict.fromkeys([*self._names, *self._extra()]))

    async def snapshot(self) -> QueueSnapshot:
        """The current snapshot (at most `ttl` seconds old)."""
        return await self._cache.get()

    async def _fetch(self) -> QueueSnapshot:
        shown = redact_url(self._mgmt)
        if self._off:
            self._mgmt_reason = " (turned off)"
        elif self._explicit or time.monotonic() - self._mgmt_failed_at > _MANAGEMENT_RETRY:
            try:
                raws = await asyncio.to_thread(management_raws, self._mgmt, vhost_of(self._url))
            except ManagementAPIError as exc:
                if self._explicit:
                    return QueueSnapshot([], f"the management API at {shown}", True, error=str(exc))
                self._mgmt_failed_at = time.monotonic()
                self._mgmt_reason = (
                    f" ({exc}; if it listens elsewhere, give its address: "
                    "--management-url http://HOST:PORT/, or Dashboard(management_url=...) in "
                    'an app; management_url="" turns it off)'
                )
            else:
                snap = QueueSnapshot(
                    self._with_missing(group_rows(visible(raws))),
                    f"the management API at {shown}",
                    True,
                )
                self._record(snap)
                return snap
        names = self.names()
        source = (
            "passive declares of the queues the dashboard knows by name (no rates, no unacked "
            f"counts); the management API is not used{self._mgmt_reason}"
        )
        unheard = None if names else self._unheard()
        if unheard:
            return QueueSnapshot(
                [], source, False,
                error=f"no management API, and the workers' presence beats (which name their "
                f"queues) can't be read: {unheard}",
            )  # fmt: skip
        if not names and self._listening():
            return QueueSnapshot(
                [], source, False,
                error="no management API, and no queue names yet: listening for the workers' "
                "presence beats, which name their queues (a worker beats every 5 s by default)",
            )  # fmt: skip
        if not names:
            return QueueSnapshot(
                [], source, False,
                error="no management API, and no worker has named a queue in a presence beat: "
                "start the dashboard with --queue NAME, or Dashboard(queues=[...]) in an app "
                "(or enable the management plugin, or give its address with --management-url)",
            )  # fmt: skip
        try:
            if not _usable(self._connection):
                await self.close()
                self._connection = await connect(self._url, timeout=self._connect_timeout)
            raws = await amqp_raws(self._url, names, require=False, connection=self._connection)
        except WorkqError as exc:
            return QueueSnapshot([], source, False, error=str(exc))
        except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            # the connection dropped (aiormq says so with a RuntimeError when a channel is
            # asked of a closed one): a new one next time
            await self.close()
            return QueueSnapshot([], source, False, error=f"the broker connection failed: {exc}")
        snap = QueueSnapshot(self._with_missing(group_rows(raws, names)), source, False)
        self._record(snap)
        return snap

    def _with_missing(self, rows: list[QueueRow]) -> list[QueueRow]:
        """`rows`, and a row of kind `"missing"` for each queue named by the dashboard's user
        (`queues=`, `--queue`) that the broker does not have."""
        have = {row.queue for row in rows}
        missing = [name for name in self._names if name not in have]
        return [*rows, *(QueueRow(queue=n, present=False, kind="missing") for n in missing)]

    def _record(self, snap: QueueSnapshot) -> None:
        work = [row for row in snap.rows if row.kind == "work"]
        sample = Sample(
            at=snap.taken,
            ready=sum(row.ready or 0 for row in work),
            publish_rate=sum(row.publish_rate or 0.0 for row in work) if snap.management else None,
            deliver_rate=sum(row.deliver_rate or 0.0 for row in work) if snap.management else None,
            handled=self._handled(),
        )
        self.history.append(sample)
        while self.history and self.history[0].at < sample.at - _HISTORY:
            self.history.popleft()


def _usable(connection: aio_pika.abc.AbstractConnection | None) -> bool:
    """Open and still connected: aio-pika's `is_closed` only says whether `close()` was called,
    not whether the broker closed it (a restart, `rabbitmqctl close_connection`)."""
    return connection is not None and not connection.is_closed and connection.connected.is_set()
