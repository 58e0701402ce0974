"""Running a handler: on the event loop, in a thread pool or in a process pool, with a timeout,
and a watchdog that says when a coroutine handler blocks the event loop."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import multiprocessing
import pickle
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Literal, Protocol, runtime_checkable

from .._exceptions import ConfigurationError, qualname
from .._link.settings import check_seconds
from .job import Job, JobData
from .typed import Payload, resolve_payload

__all__ = ("Handler", "HandlerRunner", "NamedHandler")

log = logging.getLogger("aio_workq")

# A coroutine function or plain function of a Job; with executor="process", of a JobData; or of
# a typed payload (the body validated into the type its first parameter is annotated with),
# optionally followed by the Job (or JobData).
Handler = (
    Callable[[Job], Awaitable[Any]]
    | Callable[[Job], Any]
    | Callable[[JobData], Any]
    | Callable[[Any], Any]
    | Callable[[Any, Job], Any]
    | Callable[[Any, JobData], Any]
)


@runtime_checkable
class NamedHandler(Protocol):
    """A handler object that says what it runs, for the logs to name that rather than its
    class: a task registry's queue runner names the task of each job."""

    def __workq_name__(self, job: Job | None) -> str:
        """What runs `job` (e.g. "task 'images.resize'"); with None, what runs any job."""
        ...


_BLOCKED_AFTER = 0.5
_WATCH_INTERVAL = 0.1


class HandlerRunner:
    """Calls one handler the way it asks to be called.

    Args:
        handler: `async def` runs on the loop; a plain `def` in a pool of `concurrency`
            threads, or processes with `executor="process"` (then it gets a `JobData`).
        timeout: seconds a call may take before it fails with `TimeoutError`.
        name: names the threads.
        pydantic: validate typed payloads with pydantic (`None`: where it is installed).

    A handler whose first parameter is annotated with a type other than `Job` (or `JobData`)
    gets the body validated into that type (`_typed`), and the job as its second argument if
    it takes one; a body that does not validate fails with `PayloadError` before the handler
    runs (in the event loop's process, also for `executor="process"`).

    Raises:
        ConfigurationError: the handler can't run the way asked.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        executor: Literal["thread", "process"],
        concurrency: int,
        timeout: float | None,
        name: str,
        pydantic: bool | None = None,
    ) -> None:
        if not callable(handler):
            raise ConfigurationError(f"handler must be callable, got {handler!r}")
        if executor not in ("thread", "process"):
            raise ConfigurationError(f"executor must be 'thread' or 'process', got {executor!r}")
        if timeout is not None:
            check_seconds("handler_timeout", timeout)
        self.is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - async callable objects
        )
        if executor == "process":
            if self.is_async:
                raise ConfigurationError(
                    "executor='process' runs plain def handlers; an async handler runs on the loop"
                )
            try:
                pickle.dumps(handler)
            except Exception as exc:
                raise ConfigurationError(
                    f"executor='process' needs a picklable handler (a module-level function): "
                    f"{handler!r} is not ({exc})"
                ) from exc
        self.handler: Callable[..., Any] = handler
        self._named = handler if isinstance(handler, NamedHandler) else None
        self.payload: Payload | None = resolve_payload(handler, pydantic=pydantic)
        self._kind = executor
        self._concurrency = concurrency
        self._timeout = timeout
        self._name = name
        self._executor: Executor | None = None
        self._free = asyncio.Semaphore(concurrency)  # pool workers not running a call

    @property
    def name(self) -> str:
        """How the logs name the handler: `handler module.function`, or what it says it runs."""
        return self.name_for(None)

    def name_for(self, job: Job | None) -> str:
        """How the logs name what ran `job` (a handler object may name it, see `NamedHandler`)."""
        if self._named is not None:
            return self._named.__workq_name__(job)
        return f"handler {qualname(self.handler)}"

    def caller(self) -> Callable[[Job], Awaitable[Any]]:
        """What to await for each job: `run`, or the handler itself when `run` would do
        nothing but await it (an async handler, no timeout, no payload type, `run` not
        replaced): one coroutine less per delivery on the hot path."""
        run = self.run
        plain = self.payload is None and self.is_async and self._timeout is None
        if plain and getattr(run, "__func__", None) is HandlerRunner.run:
            return self.handler
        return run

    async def run(self, job: Job) -> Any:
        """Call the handler on `job`; its return value, or its exception."""
        if self.payload is not None:
            return await self._run_typed(job, self.payload)
        if not self.is_async:
            argument: Job | JobData = job.snapshot() if self._kind == "process" else job
            return await self._in_executor(argument)
        if self._timeout is None:
            return await self.handler(job)
        return await self._bounded(self.handler(job))

    async def _run_typed(self, job: Job, payload: Payload) -> Any:
        value = payload.validate(job.body, job.content_type)
        if not self.is_async:
            if payload.with_job:
                argument: Job | JobData = job.snapshot() if self._kind == "process" else job
                return await self._in_executor(value, argument)
            return await self._in_executor(value)
        call: Awaitable[Any] = self.handler(value, job) if payload.with_job else self.handler(value)
        if self._timeout is None:
            return await call
        return await self._bounded(call)

    async def _in_executor(self, *args: Any) -> Any:
        """The handler called in the pool; with a timeout, it counts from when a pool worker is
        free to run the call, not from when it was queued behind one still busy."""
        if self._executor is None:
            self._executor = self._make_executor()
        loop = asyncio.get_running_loop()
        if self._timeout is None:
            return await loop.run_in_executor(self._executor, *self._in_pool(self.handler, *args))
        # A call that timed out goes on in its thread or process (neither can be stopped) and
        # holds its pool worker: the next call waits for a free one, then its time starts.
        free = self._free
        await free.acquire()
        try:
            call = loop.run_in_executor(self._executor, *self._in_pool(self.handler, *args))
        except BaseException:
            free.release()
            raise
        call.add_done_callback(self._freed)
        return await self._bounded(asyncio.shield(call))  # its end frees its worker, not ours

    async def _bounded(self, call: Awaitable[Any]) -> Any:
        return await within_handler_timeout(self._timeout, call)

    def _freed(self, call: asyncio.Future[Any]) -> None:
        """`call` ended in its pool worker: the worker is free (what it raised is observed)."""
        self._free.release()
        if not call.cancelled():
            call.exception()

    def _in_pool(self, func: Callable[..., Any], *args: Any) -> tuple[Callable[..., Any], ...]:
        """What the pool runs: in a thread, inside a copy of this task's context, so log lines
        of a plain `def` handler carry the message's fields too (processes get no context)."""
        if self._kind == "thread":
            return (contextvars.copy_context().run, func, *args)
        return (func, *args)

    def _make_executor(self) -> Executor:
        if self._kind == "process":
            context = multiprocessing.get_context("forkserver")
            return ProcessPoolExecutor(self._concurrency, mp_context=context)
        return ThreadPoolExecutor(self._concurrency, thread_name_prefix=f"workq-{self._name}")

    async def watch_loop(
        self, running: Callable[[], int], taken: Callable[[], int], what: str
    ) -> None:
        """Log when a coroutine handler blocks the event loop (heartbeats stop meanwhile);
        runs until cancelled.

        The handler is blamed only if one ran in the blocked stretch: one is `running()`, or
        `taken()` (deliveries so far) moved, so one may have finished already. Every watch on
        an event loop shares one timer (`_LoopWatch`): a thousand workers cost one wake-up per
        interval, not a thousand.
        """
        name = self.name

        def report(lag: float) -> None:
            log.warning(
                "%s of %s blocked the event loop for %.2f s; use a plain def "
                "handler (run in a thread) or await instead of blocking",
                name,
                what,
                lag,
            )

        loop = asyncio.get_running_loop()
        watch = _WATCHES.get(loop)
        if watch is None:
            watch = _WATCHES[loop] = _LoopWatch()
        watched = _Watched(running, taken, report)
        watch.add(watched)
        try:
            await loop.create_future()  # until cancelled (the worker stops)
        finally:
            watch.remove(watched)

    def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


class _Watched:
    """One worker's watch: its handlers' counters and what it logs."""

    __slots__ = ("report", "running", "seen", "taken")

    def __init__(
        self,
        running: Callable[[], int],
        taken: Callable[[], int],
        report: Callable[[float], None],
    ) -> None:
        self.running = running
        self.taken = taken
        self.report = report
        self.seen = taken()


class _LoopWatch:
    """The one timer of an event loop's watches: every interval, how late it woke (the loop was
    blocked that long) is checked against every watch's counters of that interval."""

    __slots__ = ("_task", "_watched")

    def __init__(self) -> None:
        # No reference to the loop: it keys `_WATCHES`, which must not keep it alive.
        self._watched: dict[_Watched, None] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, watched: _Watched) -> None:
        self._watched[watched] = None
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._tick())

    def remove(self, watched: _Watched) -> None:
        self._watched.pop(watched, None)  # the timer stops once none is left

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._watched:
                before = loop.time()
                await asyncio.sleep(_WATCH_INTERVAL)
                lag = loop.time() - before - _WATCH_INTERVAL
                for watched in list(self._watched):
                    taken = watched.taken()
                    if lag > _BLOCKED_AFTER and (watched.running() or taken != watched.seen):
                        watched.report(lag)
                    watched.seen = taken
        finally:
            self._task = None


_WATCHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWatch] = (
    weakref.WeakKeyDictionary()
)


async def within_handler_timeout(timeout: float | None, call: Awaitable[Any]) -> Any:
    """`call` within `timeout`; running over it raises a `TimeoutError` that says so (a job's
    status and log line show its message), one the handler raised stays as it is."""
    scope = asyncio.timeout(timeout)
    try:
        async with scope:
            return await call
    except TimeoutError:
        if not scope.expired():
            raise
        raise TimeoutError(f"the handler ran over its handler_timeout of {timeout:g} s") from None
