"""The recorder's writes to the store: batched, up to `LANES` batches in flight, kept while
the store is down and caught up once it answers again.

`WriteBatches` commits what has gathered in one store transaction, with up to `LANES` such
batches in flight at once: a claim does not wait behind a batch being written, and a batch never
holds a job that one in flight holds (a job's writes reach the store in the order they were
made). While the store is unreachable the queue does not wait for it: claims are granted, and
the latest state of each job is kept here (at most `buffer` jobs) and written once the store
answers again: the status catches up.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import time
from typing import Any

from ._errors import StoreError
from ._status import JobState, Withdrawal, Write
from ._store import JobStore, Withdrawals

__all__ = ("LANES", "WriteBatches", "ids")

log = logging.getLogger("aio_workq.jobs")

_RETRY_FIRST, _RETRY_CAP = 0.5, 2.0  # a retry while down costs a store attempt, little else
LANES = 2
"""Store transactions a recorder (or an enqueue's `GroupCommit`) has in flight at once."""
_JOB_ID = operator.attrgetter("job_id")


class _Handover:
    """`WriteBatches`' rarer parts: an enqueue's withdrawal, closing, and what is left of it
    for another event loop's batches (a class of its own: one would be over 250 lines)."""

    _closed: bool
    _flusher: asyncio.Task[None] | None
    _lanes: set[asyncio.Task[Any]]
    _wake: asyncio.Event
    _idle: asyncio.Event
    _pending: dict[str, Write]
    _queued: list[Write]
    _withdraws: bool
    _futures: list[asyncio.Future[bool] | None]
    down: bool

    def _keep(self, write: Write, *, older: bool = False) -> None:
        raise NotImplementedError

    def write(self, write: Write) -> None:
        raise NotImplementedError

    def withdraw(self, withdrawal: Withdrawal) -> None:
        """Send `withdrawal` (an enqueue's record taken back, its publish failed) soon, after
        the writes before it; never waits. Only for a store that declares `Withdrawals`: it
        goes to `withdraw()`, never to `record()`."""
        self._withdraws = True  # from now on, batches are looked through for withdrawals
        self.write(withdrawal)

    def adopt(self, writes: list[Write]) -> None:
        """Keep `writes` (another event loop's, left when it closed) and record them soon."""
        if Withdrawal in map(type, writes):
            self._withdraws = True  # withdrawals among them (`withdraw()`)
        for write in writes:
            self._keep(write, older=True)

    def left(self) -> list[Write]:
        """Take the writes not recorded (kept, queued): its loop is closed or closing."""
        left = [*self._pending.values(), *map(_kept, self._queued)]
        self._pending, self._queued, self._futures = {}, [], []
        return left

    async def close(self, timeout: float = 5.0, *, lost: bool = True) -> list[Write]:
        """Record what is pending, waiting at most `timeout` seconds; the writes left then
        are returned (and logged as lost, with `lost`)."""
        self._closed = True
        flusher = self._flusher
        if flusher is not None:
            self._wake.set()
            try:
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
            except TimeoutError:
                pass
        stuck = [task for task in (flusher, *self._lanes) if task and not task.done()]
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)  # a lane keeps its writes
        left = self.left()
        if left and lost:
            log.error(
                "job store unreachable at shutdown: the states of %d job(s) were not recorded "
                "(their status stays at what was recorded before): %s", len(left), ids(left),
            )  # fmt: skip
        return left


class WriteBatches(_Handover):
    """The queue of a recorder's writes to `store`, and the batches in flight.

    Args:
        store: the job store.
        buffer: most jobs whose latest state is kept while the store is unreachable; beyond
            it the oldest is dropped (logged), and its status stays at what was recorded.
        timeout: seconds one store transaction may take before the store counts as down.
    """

    def __init__(self, store: JobStore, *, buffer: int, timeout: float) -> None:
        self.store = store
        self._buffer = buffer
        self._timeout = timeout
        # What is queued: the writes, and beside each its claim's future (None for a plain
        # write); two lists, not a tuple per write (#23: fewer objects for the GC to follow).
        self._queued: list[Write] = []
        self._futures: list[asyncio.Future[bool] | None] = []
        self._pending: dict[str, Write] = {}  # catch-up: the latest write per job
        self._wake = asyncio.Event()
        self._kicked = False  # _wake set for what was queued, not yet seen by the flusher
        self._flusher: asyncio.Task[None] | None = None
        self._lanes: set[asyncio.Task[Any]] = set()  # batches in flight
        self._busy: set[str] = set()  # the jobs they hold
        self._idle = asyncio.Event()
        self._idle.set()
        self.down = False
        self._backoff = _RETRY_FIRST
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._withdraws = False  # `withdraw()` was called: a batch may hold withdrawals

    def commit(self, write: Write) -> asyncio.Future[bool]:
        """Send `write` with the next batch; the future is the store's answer: for a claim
        (`claim=True`) whether it is granted, for a plain write whether it was applied. While
        the store is down or after `close()` it is True at once: the write is kept and caught
        up (a claim is granted, and kept as a plain write)."""
        loop = self._loop
        if loop is None:  # bound to its loop on first use, as its asyncio.Event are
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        if self.down:
            self._keep(_plain(write))
            future.set_result(True)
        elif self._closed:
            self._enqueue(_plain(write), None)
            future.set_result(True)
        else:  # as `_enqueue`, a call less per job (#23)
            self._queued.append(write)
            self._futures.append(future)
            if not self._kicked:
                self._kick()
        return future

    def write(self, write: Write) -> None:
        """Record `write` soon (batched with others); never waits: with the next batch that
        has a write someone waits for (a claim), else once no batch is in flight."""
        if self.down:
            self._keep(write)
        else:
            self._queued.append(write)
            self._futures.append(None)
            if not self._kicked and not self._lanes:  # else a lane's end wakes the flusher
                self._kick()

    def _enqueue(self, write: Write, future: asyncio.Future[bool] | None) -> None:
        self._queued.append(write)
        self._futures.append(future)
        self._kick()

    def _kick(self) -> None:
        if self._kicked:  # the flusher is woken already and has not looked yet (#23)
            return
        self._kicked = True
        self._idle.clear()
        self._wake.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_loop())

    def _keep(self, write: Write, *, older: bool = False) -> None:
        """Keep `write` for the catch-up: the latest write of each job is kept (`older`: a
        write made before the one kept, if any, which then stays)."""
        pending = self._pending
        if older and write.job_id in pending:
            return
        pending.pop(write.job_id, None)
        pending[write.job_id] = write  # the latest last: the oldest go first when full
        if len(pending) > self._buffer:
            dropped = next(iter(pending))
            del pending[dropped]
            log.error(
                "job store unreachable and %d job states waiting: job %s's state is dropped "
                "(its status stays at what was recorded before)", self._buffer, dropped,
            )  # fmt: skip
        self._idle.clear()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_loop())
        if not self.down:
            self._wake.set()

    async def _flush_loop(self) -> None:
        """Start batches while there is room; while the store is down, retry what is kept in
        one batch at a time, backing off."""
        try:
            await self._flushing()
        finally:
            self._kicked = False

    async def _flushing(self) -> None:
        while True:
            self._wake.clear()
            self._kicked = False
            if self.down:
                if self._lanes:
                    await self._wake.wait()  # the batches in flight settle first
                    continue
                if not await self._send():
                    if self._closed:
                        self._idle.set()
                        return
                    try:  # wait before trying again, unless close() hurries us
                        async with asyncio.timeout(self._backoff):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                    self._backoff = min(self._backoff * 2, _RETRY_CAP)
                continue
            while len(self._lanes) < LANES and (self._queued or self._pending):
                if self._lanes and not self._awaited():
                    break  # no one waits for these: they go with the next batch (#23)
                if not self._start():
                    break  # what is left waits for its job's batch in flight
            if not self._lanes and not self._queued and not self._pending:
                self._idle.set()
                return  # all written: the next write starts a flusher again (`_kick`)
            await self._wake.wait()

    def _awaited(self) -> bool:
        """Whether a write someone waits for is queued (a claim, an enqueue's record): only
        such a write opens a batch beside one in flight. Writes no one waits for (outcomes,
        a catch-up) wait for that batch's end or ride with the next claims: a worker's
        outcomes came in a statement of their own about one time in three, each a commit
        on the server and a round trip in the client (#23)."""
        futures = self._futures
        return futures.count(None) < len(futures)

    def _start(self) -> bool:
        """Start a batch of what is kept and queued, leaving out the jobs a batch in flight
        holds (and so their later writes); False if there was nothing to send."""
        busy = self._busy
        caught_up = [w for job_id, w in self._pending.items() if job_id not in busy]
        queued, futures = self._queued, self._futures
        if busy and not busy.isdisjoint(map(_JOB_ID, queued)):
            batch: list[Write] = []
            answers: list[asyncio.Future[bool] | None] = []
            held: list[Write] = []
            waiting: list[asyncio.Future[bool] | None] = []
            for write, future in zip(queued, futures, strict=True):
                if write.job_id in busy:
                    held.append(write)
                    waiting.append(future)
                else:
                    batch.append(write)
                    answers.append(future)
        else:  # no job of theirs in flight: all of them
            batch, answers, held, waiting = queued, futures, [], []
        if not caught_up and not batch:
            return False
        self._queued, self._futures = held, waiting
        ids = set(map(_JOB_ID, caught_up))
        ids.update(map(_JOB_ID, batch))
        busy |= ids
        self._lanes.add(asyncio.ensure_future(self._send(caught_up, batch, answers, ids)))
        return True

    async def _send(
        self,
        caught_up: list[Write] | None = None,
        batch: list[Write] | None = None,
        answers: list[asyncio.Future[bool] | None] | None = None,
        ids: set[str] | None = None,
    ) -> bool:
        """Record one batch (a lane's: the jobs `ids` are busy until it settles); False if
        the store failed it (then it is kept for the catch-up, and the store counts as down);
        `answers`: beside each write of `batch`, its claim's future or None.
        Without arguments: everything kept and queued, the retry while the store is down."""
        if caught_up is None:
            caught_up = list(self._pending.values())
        if batch is None or answers is None:
            batch, answers = self._queued, self._futures
            self._queued, self._futures = [], []
        writes = caught_up + batch
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    if self._withdraws and Withdrawal in map(type, writes):
                        applied = await _withdrawing(self.store, writes)
                    else:
                        applied = await self.store.record(writes)
            except Exception as exc:
                self._store_down(exc, caught_up, batch, answers)
                return False
            except asyncio.CancelledError:  # closing: kept for `left()`, not lost unsaid
                for write in writes:
                    self._pending.setdefault(write.job_id, _kept(write))
                raise
            if self.down and ids is None:
                log.warning("job store reachable again: %d job state(s) caught up", len(caught_up))
                self.down = False
                self._backoff = _RETRY_FIRST
            for write in caught_up:
                if self._pending.get(write.job_id) is write:
                    del self._pending[write.job_id]
            granted = applied[len(caught_up) :]
            for future, answer in zip(answers, granted, strict=True):
                if future is not None and not future.done():
                    future.set_result(answer)
            if not all(granted):
                for write, answer in zip(batch, granted, strict=True):
                    if write.claim and not answer and write.state is JobState.RUNNING:
                        # cancelled, done, a cancel requested, or a second message of a run
                        self._enqueue(_cancelled(write), None)
            return True
        finally:
            if ids is not None:  # a lane's batch: the flusher may start the next one
                self._busy -= ids
                task = asyncio.current_task()
                if task is not None:
                    self._lanes.discard(task)
                self._wake.set()
            # (the retry while down runs in the flusher itself, which then waits for its
            # backoff: a wake-up set here ended that wait at once, and a store failing
            # without waiting was retried in a loop that never yielded)

    def _store_down(
        self,
        exc: Exception,
        caught_up: list[Write],
        batch: list[Write],
        answers: list[asyncio.Future[bool] | None],
    ) -> None:
        if not self.down:
            _log_down(self.store, exc, self._buffer)
        self.down = True
        # What failed is older than what was kept since the store went down (kept: newer
        # wins); the writes queued behind it are newer, and replace it.
        held, waiting = self._queued, self._futures
        self._queued, self._futures = [], []
        for write in caught_up:
            self._keep(write, older=True)
        # (the failed batch from its last write back: the latest write of each job in it is
        # the one kept, an earlier one of the same job is older still)
        failed = (batch[::-1], answers[::-1], True)
        for writes, futures, older in (failed, (held, waiting, False)):
            for write, future in zip(writes, futures, strict=True):
                if future is not None and not future.done():
                    future.set_result(True)  # the job runs: the queue does not wait for it
                plain = not write.claim or write.state is JobState.CANCELLED  # a follow-up's
                self._keep(write if plain else _plain(write), older=older)


async def _withdrawing(store: JobStore, writes: list[Write]) -> list[bool]:
    """`store.record()` of a batch holding withdrawals (`Withdrawal`), each its job's last
    write in it: the other writes with `record()`, then the withdrawals with `withdraw()`
    (`Withdrawals`); for each write, whether it was applied. A withdrawal is never sent to
    `record()`, where a store would take it for a `queued` record: for a store without
    `withdraw()` (never sent one: `GroupCommit.overlaps`) it is dropped. Two transactions: a
    `withdraw()` that fails after `record()` fails the batch, kept whole for the catch-up (a
    `queued` write applied twice changes nothing the second time)."""
    rest = [write for write in writes if type(write) is not Withdrawal]
    answers = iter(await store.record(rest) if rest else ())
    gone: set[str] = set()
    if isinstance(store, Withdrawals):
        gone = await store.withdraw([w.job_id for w in writes if type(w) is Withdrawal])
    return [
        write.job_id in gone if type(write) is Withdrawal else next(answers) for write in writes
    ]


def ids(writes: list[Write], most: int = 20) -> str:
    """The job ids of `writes`, for a log line (the first `most`)."""
    shown = ", ".join(w.job_id for w in writes[:most])
    return shown if len(writes) <= most else f"{shown} and {len(writes) - most} more"


def _log_down(store: JobStore, exc: Exception, buffer: int) -> None:
    why = str(exc) or type(exc).__name__
    if isinstance(exc, StoreError) and exc.lasting:  # the tables missing
        log.error(
            "job store %r failing (%s): waiting does not cure this, fix it; jobs go on "
            "running, their states are kept (up to %d) and recorded once it works",
            store, why, buffer,
        )  # fmt: skip
    else:
        log.warning(
            "job store %r unreachable (%s): jobs go on running, their states are kept "
            "and recorded when it answers again", store, why,
        )  # fmt: skip


def _kept(write: Write) -> Write:
    """`write` as kept for the catch-up: a claim as a plain write (its follow-up as it is)."""
    return write if not write.claim or write.state is JobState.CANCELLED else _plain(write)


def _plain(write: Write) -> Write:
    return Write(
        job_id=write.job_id, task=write.task, queue=write.queue, state=write.state,
        at=write.at, attempt=write.attempt, defers=write.defers,
    )  # fmt: skip


def _cancelled(write: Write) -> Write:
    """The follow-up of a refused claim: the job is cancelled if its cancel was requested (a
    claim too: the store applies it only then, not to a job that runs elsewhere)."""
    return Write(
        job_id=write.job_id, task=write.task, queue=write.queue, state=JobState.CANCELLED,
        at=time.time(), attempt=write.attempt, defers=write.defers, claim=True,
    )  # fmt: skip
