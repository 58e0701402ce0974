"""`PostgresStore`'s connections: a psycopg pool, each operation on it within the store's
`timeout`, the pool's errors as `StoreError`s that say what to do, and a pool of its own for a
forked child.

A server that stops answering with its connections open (a partition, a stopped host) does not
hang a caller: an operation that has not answered within `timeout` raises `StoreError`, and
psycopg gives the query up (it cancels it, then closes the connection: up to 10 s more) in the
background, or in place for the workers' batches of writes, which the queue does not wait for.

A pool of the store's own catches up within seconds of a long outage's end: psycopg_pool backs
its reconnect attempts off, doubling the delay between them (1, 2, 4, 8, 16 s ... up to its
`reconnect_timeout`), and `check()` does not reset that; so while the pool can't connect, the
server is probed directly every second, and once it answers after having refused, a fresh pool
takes the old one's place (the old one is closed in the background).

A psycopg async pool belongs to the event loop it was opened on (its locks, its workers), so
the store opens a pool of its own on each loop it is used from: an app's loop and a
`SyncProducer`'s thread each have theirs, and `close()` closes the running loop's. A pool
given to the store serves the loop it was first used on; another loop gets a
`ConfigurationError` that says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from psycopg import AsyncConnection, OperationalError
from psycopg import Error as PsycopgError
from psycopg.errors import UndefinedTable
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from .._exceptions import ConfigurationError, text_of
from ._errors import StoreError

__all__ = ("StorePool",)

_IDLE_CHECK = 2.0
"""A pooled connection idle this long (s) is checked (an empty query) before it is used."""


class _IdleCheck:
    """The `check` and `reset` callbacks of the store's own pool: a connection that sat in the
    pool for `_IDLE_CHECK` s or more is checked before use, so one a server restart (or a
    proxy) closed meanwhile is replaced instead of failing the caller's query; a connection in
    steady use costs nothing more."""

    def __init__(self) -> None:
        self._since: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    async def idle(self, conn: Any) -> None:
        """A connection made, or given back to the pool: idle from now."""
        self._since[conn] = time.monotonic()

    async def check(self, conn: Any) -> None:
        since = self._since.get(conn)
        if since is None or time.monotonic() - since >= _IDLE_CHECK:
            await AsyncConnectionPool.check_connection(conn)  # raises: the pool replaces it


T = TypeVar("T")

log = logging.getLogger("aio_workq.jobs")

PROBE_EVERY = 1.0
"""Seconds between direct connection attempts while the store's pool can't connect."""
FIRST_LOOK = 0.1
"""With `fail_fast`, a call still without a connection after this many seconds has the server
probed at once (a refusal is known in milliseconds, not after the call's `timeout`)."""

# The parent's pools, in a forked child: their tasks (the pool's workers, the guard that
# closes it) belong to a loop that never runs here. Collected, each would be destroyed
# pending ("Task was destroyed but it is pending!") and the guard's `finally` would try to
# close the pool without a loop ("Exception ignored ... no running event loop"), at every
# exit of a pre-forking server's worker; kept here, they are never collected.
_INHERITED: list[object] = []


class StorePool:
    """The connections of one `PostgresStore`.

    Args:
        dsn: the DSN of a pool of `max_size` connections this opens on first use ...
        pool: ... or a pool of the caller's (opened and closed by the caller).
        timeout: seconds an operation may take, a connection and the answer together.
        where: how errors name the store (no password).
        schema: the store's schema (a missing table's error names it).
        fail_fast: raise at once while the probe finds the server refusing, the first call
            too (its probe starts after `FIRST_LOOK` s without a connection); a given pool's
            server is probed with the pool's own conninfo (the pool is never replaced).
    """

    def __init__(
        self,
        *,
        dsn: str | None,
        pool: AsyncConnectionPool[Any] | None,
        max_size: int,
        timeout: float,
        where: str,
        schema: str,
        fail_fast: bool = False,
    ) -> None:
        self._dsn, self._max_size, self._timeout = dsn or "", max_size, timeout
        self._fail_fast = fail_fast
        self._where, self._schema = where, schema
        self._own = pool is None
        self._given = pool
        self._pid = os.getpid()
        self._loops: dict[asyncio.AbstractEventLoop, _LoopPool] = {}  # a pool per event loop
        self._target = _probe_target(self._dsn, pool)  # how to probe the server, if it can be

    def _new_pool(self) -> AsyncConnectionPool[Any]:
        # The pool this store opens has autocommit connections: a batch of one round is one
        # statement, without toggling its connection (what a given pool's get, then get back).
        idle = _IdleCheck()
        return AsyncConnectionPool(
            self._dsn, min_size=1, max_size=self._max_size, open=False, timeout=self._timeout,
            kwargs={"autocommit": True}, configure=idle.idle, check=idle.check, reset=idle.idle,
        )  # fmt: skip

    async def run(
        self, what: str, operation: Callable[[Any], Awaitable[T]], *, detach: bool = True
    ) -> T:
        """`operation(conn)` on a connection of the pool, within `timeout`.

        Raises:
            StoreError: no connection, an error, or no answer within `timeout`. The operation
                is then cancelled: psycopg cancels the query, then closes the connection, which
                can take it 10 s more; with `detach` that happens in the background (a task of
                its own, which a call costs), else before this raises (the workers' batches of
                writes, which the queue does not wait for).
        """
        here = self._here()
        if here.refused and self._fail_fast:
            raise _refusing(self._where, what, here)
        if not here.opened:
            here.opened = True
            await here.pool.open(wait=False)
            if self._own:
                here.guard = _close_when_cancelled(here)
        acquired: list[bool] = []  # a connection was had: the server is slow, not unreachable

        async def use() -> T:
            while True:
                pool = here.pool
                try:
                    async with pool.connection(timeout=self._timeout) as conn:
                        acquired.append(True)
                        here.stuck = False
                        return await operation(conn)
                except PoolClosed:
                    if acquired or here.pool is pool:
                        raise
                    # A fresh pool replaced the one this waited on (`_probe`): the server
                    # answers again, so wait on the fresh one (within the caller's bound).
                except BaseException:  # a caller's timeout too (the recorder's is the store's)
                    if not acquired:
                        self._unreachable(here)
                    raise

        if not detach:
            try:
                async with asyncio.timeout(self._timeout):
                    return await use()
            except TimeoutError:
                raise self._unanswered(what) from None
            except (PsycopgError, PoolTimeout, OSError) as exc:
                raise self.failed(what, exc) from exc

        task = asyncio.ensure_future(use())
        try:
            watch = self._unreachable if self._fail_fast and self._target is not None else None
            done = await _wait(here, task, acquired, self._timeout, watch)
        except asyncio.CancelledError:
            task.cancel()
            task.add_done_callback(_retrieve)
            raise
        if not done and self._fail_fast and here.refused and not acquired:  # a probe found it
            task.cancel()
            task.add_done_callback(_retrieve)
            raise _refusing(self._where, what, here)
        if not done:
            task.cancel()
            task.add_done_callback(_retrieve)
            if not acquired:  # as the pool says it (its timeout is the same)
                late = PoolTimeout(f"couldn't get a connection after {self._timeout:g} sec")
                raise self.failed(what, late) from None
            raise self._unanswered(what)
        try:
            return task.result()
        except (PsycopgError, PoolTimeout, OSError) as exc:
            raise self.failed(what, exc) from exc

    def _here(self) -> _LoopPool:
        """The pool of the running event loop, made (not opened) on the loop's first use.

        Raises:
            ConfigurationError: a pool given to the store, used from another loop than the
                one it was first used on.
        """
        loop = asyncio.get_running_loop()
        if self._pid != os.getpid():
            # A forked child: the parent's connections stay the parent's (psycopg does not
            # close them on collection in another process); the child opens its own.
            self._pid = os.getpid()
            if self._own:
                _INHERITED.append(self._loops)
                self._loops = {}
        here = self._loops.get(loop)
        if here is not None:
            return here
        if self._given is not None:
            if self._loops:
                raise ConfigurationError(
                    f"{self._where}: a pool given to PostgresStore(pool=...) belongs to the "
                    "event loop it was first used on, and this call runs on another one (a "
                    "SyncProducer's thread, another asyncio.run()): give the store a dsn "
                    "instead (it opens a pool on each event loop it is used from), or give "
                    "each loop a store of its own"
                )
            here = _LoopPool(self._given, opened=True)
        else:
            for gone in [other for other in self._loops if other.is_closed()]:
                del self._loops[gone]  # its pool went with its loop
            here = _LoopPool(self._new_pool(), opened=False)
        self._loops[loop] = here
        return here

    def _unreachable(self, here: _LoopPool) -> None:
        """No connection was had: a pool of the store's own is watched until it has one."""
        here.stuck = True
        watched = self._own or (self._fail_fast and self._target is not None)
        if watched and (here.prober is None or here.prober.done()):
            here.refused = None  # until the probe says
            here.refusal.clear()
            here.prober = asyncio.ensure_future(self._probe(here))
            here.prober.add_done_callback(_retrieve)

    async def _probe(self, here: _LoopPool) -> None:
        """Connects to the server directly every `PROBE_EVERY` s while the pool can't; once it
        answers after having refused, and the pool still has no connection, a fresh pool
        replaces it: the old one's next attempt may be many seconds away (its backoff)."""
        refused = False
        target = self._target
        assert target is not None  # `_unreachable` probes only a server it can reach
        connection_class, conninfo, kwargs = target
        while here.stuck:
            try:
                async with asyncio.timeout(self._timeout):
                    probe = await connection_class.connect(conninfo, **kwargs)
                await probe.close()
            except (PsycopgError, OSError, TimeoutError) as exc:
                refused = True
                if here.refused is None:
                    here.refused = (time.monotonic(), " ".join(text_of(exc).split())[:300])
                    here.refusal.set()
                await asyncio.sleep(PROBE_EVERY)
                continue
            here.refused = None  # calls go to the pool again
            here.refusal.clear()
            if refused and here.stuck and self._own:  # a given pool is its owner's
                log.info(
                    "%s answers again: a fresh pool replaces the reconnecting one", self._where
                )
                fresh = self._new_pool()
                await fresh.open(wait=False)
                old, here.pool = here.pool, fresh
                closing = asyncio.ensure_future(old.close())
                here.closing.add(closing)
                closing.add_done_callback(here.closing.discard)
                closing.add_done_callback(_retrieve)
            return

    def failed(self, what: str, exc: Exception) -> StoreError:
        """The `StoreError` of `what` failing with `exc`, with what to do where that is known."""
        failed = f"{self._where}: {what} failed"
        if isinstance(exc, UndefinedTable):
            schema = self._schema
            return StoreError(
                f"{failed}; the store's tables are missing in schema {schema!r}: create them "
                f"with `await aio_workq.jobs.postgres.migrate(conn, schema={schema!r})` (or "
                f"schema_sql() in your migrations): {exc}",
                lasting=True,
            )
        if isinstance(exc, PoolTimeout) and self._own:
            return StoreError(
                f"{failed}: {exc} (why it could not connect, e.g. the server down, a wrong host "
                "or port, user, password or database, is logged by psycopg's logger "
                "'psycopg.pool')",
                unreachable=True,
            )
        unreachable = isinstance(exc, OperationalError | PoolTimeout | OSError)
        return StoreError(f"{failed}: {exc}", unreachable=unreachable)

    def _unanswered(self, what: str) -> StoreError:
        return StoreError(
            f"{self._where}: {what} failed: PostgreSQL did not answer within "
            f"{self._timeout:g} s (timeout=)",
            unreachable=True,
        )

    async def close(self) -> None:
        """Closes the running event loop's pool (a given one is the caller's to close); the
        pools of other loops still running stay open: each is closed on its own loop (a
        `SyncProducer` closes its thread's when it closes)."""
        if self._pid != os.getpid():
            return  # a forked child that never used the store: the pools are the parent's
        here = self._loops.get(asyncio.get_running_loop())
        if here is None:
            return
        if here.prober is not None:
            here.prober.cancel()
            await asyncio.gather(here.prober, return_exceptions=True)
        await asyncio.gather(*here.closing, return_exceptions=True)
        if self._own and here.opened:
            await here.pool.close()
        if here.guard is not None:
            here.guard.cancel()
            await asyncio.gather(here.guard, return_exceptions=True)


def _refusing(where: str, what: str, here: _LoopPool) -> StoreError:
    since, why = here.refused or (time.monotonic(), "")
    return StoreError(
        f"{where}: {what} failed at once (fail_fast): PostgreSQL has refused "
        f"connections for {time.monotonic() - since:.1f} s ({why}); the store tries "
        f"one every {PROBE_EVERY:g} s and calls it again once one succeeds",
        unreachable=True,
    )


async def _wait(
    here: _LoopPool,
    task: asyncio.Future[T],
    acquired: list[bool],
    timeout: float,
    watch: Callable[[_LoopPool], None] | None,
) -> bool:
    """Whether `task` finished within `timeout`. With `watch` (`fail_fast`), a call that has
    no connection after `FIRST_LOOK` s has the server watched (probed) at once, not after its
    `timeout`, and stops waiting as soon as the probe finds it refusing connections."""
    if watch is None:
        done, _ = await asyncio.wait((task,), timeout=timeout)
        return bool(done)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    done, _ = await asyncio.wait((task,), timeout=min(FIRST_LOOK, timeout))
    if done or acquired:
        done, _ = await asyncio.wait((task,), timeout=max(0.0, deadline - loop.time()))
        return bool(done)
    watch(here)
    refusal = asyncio.ensure_future(here.refusal.wait())
    waits: list[asyncio.Future[Any]] = [task, refusal]
    try:
        done, _ = await asyncio.wait(
            waits, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        refusal.cancel()
    return task in done


def _probe_target(
    dsn: str, given: AsyncConnectionPool[Any] | None
) -> tuple[Any, str, dict[str, Any]] | None:
    """How to probe the server: the connection class, conninfo and arguments of the store's
    own pools, or of a pool given to it (None when those are callables, psycopg_pool 3.3's,
    to call at each connect)."""
    if given is None:
        return AsyncConnection, dsn, {"autocommit": True}
    conninfo, kwargs = given.conninfo, given.kwargs
    if not isinstance(conninfo, str) or not isinstance(kwargs, dict | None):
        return None
    return given.connection_class, conninfo, dict(kwargs or {})


class _LoopPool:
    """The store's pool on one event loop, and what watches it."""

    __slots__ = ("closing", "guard", "opened", "pool", "prober", "refusal", "refused", "stuck")

    def __init__(self, pool: AsyncConnectionPool[Any], *, opened: bool) -> None:
        self.pool = pool
        self.opened = opened
        self.stuck = False  # the last operation could not get a connection
        # While the probe fails: since when (monotonic) and why; None once it connects.
        self.refused: tuple[float, str] | None = None
        self.refusal = asyncio.Event()  # set while `refused` is
        self.prober: asyncio.Task[None] | None = None
        self.closing: set[asyncio.Task[None]] = set()  # pools replaced, being closed
        self.guard: asyncio.Future[None] | None = None  # closes the pool if the loop ends first


def _close_when_cancelled(here: _LoopPool) -> asyncio.Future[None]:
    """A task that waits until it is cancelled, then closes the pool of `here`.

    `asyncio.run()` ends by cancelling every task and waiting for them. psycopg_pool (3.3)
    catches the cancellation of a connection attempt, so a worker of a pool still connecting
    at that moment goes back to waiting for work, and the run waited for it forever (a script
    that read a status and ended without `store.close()`). Cancelled with the rest, this
    closes the pool, which tells its workers to stop.
    """

    async def wait() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await here.pool.close()

    guard = asyncio.ensure_future(wait())
    guard.add_done_callback(_retrieve)
    return guard


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Reads the outcome of an operation that was given up on (no "never retrieved")."""
    if not task.cancelled():
        task.exception()
