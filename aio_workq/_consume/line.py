"""The deliveries that wait for their turn: a handler slot (a worker that prefetches beyond
its concurrency), or what a hook's `arrived` returned (a job recorder's claim, #23); and the
worker's stop (`drain`), which sends them back and waits for the rest."""

from __future__ import annotations

import asyncio
from asyncio import Task
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from .._hooks import Hooks, JobView, Settled
from .._wire.acker import Acker
from .job import Job
from .linked import Linked

__all__ = ("Line",)

_Waiting = tuple[Job, Acker, int, bool, "asyncio.Future[Any] | None"]
"""A delivery that waits for its task: the job, its acker and tag, whether it is an RPC
request, and what its hooks' `arrived` returned (`None` once done)."""


class Line:
    """The `Dispatcher`'s deliveries that wait for their turn, in arrival order, and the
    handler slots they wait for: each one's task is made only once it can run (nothing waits
    before it, what its hooks' `arrived` returned is done, a slot is free), so no task,
    future or wake-up is spent on the wait itself (#23). A slot freed as a handler ends goes
    to the next one there. `in_flight`, `idle` and `drain` count every delivery not settled
    yet: these, the running tasks, and the chain steps that wait for their confirm without
    a task (`Linked`). The state is the dispatcher's, set in its `__init__`."""

    _loop: asyncio.AbstractEventLoop
    _hooks: Hooks | None
    _task_name: str
    queue_name: str
    tasks: set[asyncio.Task[None]]
    stopping: bool
    _limited: bool
    """Whether the handler slots are counted (a prefetch beyond the concurrency)."""
    _free: int
    _arrive: Callable[[JobView, str], asyncio.Future[Any] | None] | None
    _begin: Callable[[JobView, str], Any] | None
    _waits: bool
    """Whether a delivery may have to wait (`_admit`), or always starts at once."""
    _waiting: deque[_Waiting]
    _watched: asyncio.Future[Any] | None
    _linked: Linked
    """The deliveries that wait for their confirm without a task (settled, not waiting for a
    turn: counted here in `in_flight` and awaited by `idle`)."""

    def _line(self, concurrency: int, prefetch: int, hooks: Hooks | None) -> None:
        """The line's state, set by the dispatcher's `__init__`."""
        # The handler slots, with a prefetch beyond the concurrency: `free` of `concurrency`.
        self._limited = prefetch > concurrency
        self._free = concurrency
        self._arrive = hooks.arriving() if hooks is not None and hooks.arrives else None
        # `begin` only for a hook with a `handling` (a job recorder has none: a call less).
        self._begin = hooks.begin if hooks is not None and hooks.handles else None
        # Deliveries may wait for their task (`_admit`): in arrival order.
        self._waits = self._limited or self._arrive is not None
        self._waiting = deque()
        self._watched = None

    def _process(self, job: Job, acker: Acker, tag: int, reply: bool) -> Coroutine[Any, Any, None]:
        raise NotImplementedError  # the dispatcher's: a delivery's task

    def _requeue(self, acker: Acker, tag: int) -> Settled:
        raise NotImplementedError  # the dispatcher's: back to the queue, unrun

    @property
    def in_flight(self) -> int:
        """Deliveries here not settled yet: handled, waiting for their turn, or for the
        confirm of what they forwarded."""
        return len(self.tasks) + len(self._waiting) + len(self._linked.pending)

    async def idle(self) -> None:
        """Return once every delivery dispatched so far is settled, those waiting for their
        turn or their confirm included (the testing kit's)."""
        while self.tasks or self._waiting or self._linked.pending:
            if self.tasks:
                await asyncio.wait(set(self.tasks))
            elif self._linked.pending:
                await self._linked.emptied()
            else:  # the first one waits for what its `arrived` returned (not cancelled here)
                wait = self._waiting[0][4]
                if wait is not None:
                    await asyncio.wait({wait})
                else:  # its done callback ran (`_pump` is next), or the worker stops
                    await asyncio.sleep(0)

    async def drain(self, timeout: float, hurry: asyncio.Event) -> None:
        """Let running handlers finish, and chain steps' confirms arrive, within `timeout`
        (or until `hurry` is set), then cancel the rest: their deliveries go back to the
        queue. Call once `stopping` is set."""
        self._pump()  # the deliveries waiting for their turn: back to the queue, unrun
        tasks, linked = self.tasks, self._linked
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        hurried = asyncio.ensure_future(hurry.wait())
        try:
            while (
                (tasks or linked.pending)
                and not hurried.done()
                and (left := deadline - loop.time()) > 0
            ):
                waits: set[asyncio.Future[Any]] = {*tasks, hurried}
                if linked.pending:
                    waits.add(linked.emptied())
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()
        linked.requeue()  # disarmed: a confirm from now on settles nothing
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        # A task cancelled before its first step never ran `_process` to take itself out.
        tasks.difference_update([task for task in tasks if task.done()])

    def _admit(self, job: Job, acker: Acker, tag: int, reply: bool) -> None:
        """A delivery that may have to wait: its hooks' `arrived` called (here, outside its
        task), and its task started now if nothing is in the way (nothing waits before it,
        `arrived` returned nothing or what is done already, a handler slot is free), else
        once it is (`_pump`)."""
        arrive = self._arrive
        wait = None
        if arrive is not None:
            try:
                wait = arrive(job, self.queue_name)
            except Exception as exc:  # the one hook's own `arrived` (`Hooks.arriving`)
                assert self._hooks is not None
                self._hooks.arrival_failed(job, self.queue_name, exc)
        waiting = self._waiting
        if waiting:  # behind the others: the first one's turn comes first (`_pump`)
            waiting.append((job, acker, tag, reply, wait))
            if self.stopping:
                self._pump()
            return
        if (wait is None or wait.done()) and not self.stopping:
            if self._limited:
                if self._free <= 0:
                    waiting.append((job, acker, tag, reply, None))
                    return  # a handler ending frees one (`_process`)
                self._free -= 1
            process = self._process(job, acker, tag, reply)
            loop = self._loop  # as `_start`, inline: the usual
            if loop.get_task_factory() is None:
                task = Task(process, loop=loop, name=self._task_name)
                job._task = task
                self.tasks.add(task)
            else:
                self._start_by_factory(job, process)
            return
        waiting.append((job, acker, tag, reply, wait))
        self._pump()

    def _pump(self, _: object = None) -> None:
        """Start the waiting deliveries that can run now, in arrival order: the first one
        waits for what its `arrived` returned (this is its done callback, then) and for a
        free handler slot, and the rest behind it. Once the worker stops they go back to the
        queue, their handlers not run (`_turn_back`)."""
        waiting = self._waiting
        while waiting:
            job, acker, tag, reply, wait = waiting[0]
            if self.stopping:
                waiting.popleft()
                self._start(job, self._turn_back(job, acker, tag))
                continue
            if wait is not None and not wait.done():
                if self._watched is not wait:
                    self._watched = wait
                    wait.add_done_callback(self._pump)
                return
            if self._limited:
                if self._free <= 0:
                    return  # a handler ending frees one (`_process`)
                self._free -= 1
            waiting.popleft()
            process = self._process(job, acker, tag, reply)
            loop = self._loop  # as `_start`, inline: once per job that waited
            if loop.get_task_factory() is None:
                task = Task(process, loop=loop, name=self._task_name)
                job._task = task
                self.tasks.add(task)
            else:
                self._start_by_factory(job, process)

    def _start(self, job: Job, process: Coroutine[Any, Any, None]) -> None:
        """Start a delivery's task (as `dispatch` does inline)."""
        loop = self._loop
        if loop.get_task_factory() is None:
            task = Task(process, loop=loop, name=self._task_name)
            job._task = task
            self.tasks.add(task)
        else:
            self._start_by_factory(job, process)

    async def _turn_back(self, job: Job, acker: Acker, tag: int) -> None:
        """The task of a delivery that waited for its turn when the worker began to stop:
        back to the queue, its handler not run, and its hooks told so as a delivery that
        found the worker stopping in `_process` (their `handling` entered in this task)."""
        task = job._task or asyncio.current_task(self._loop)
        hooks = self._hooks
        try:
            begin = self._begin
            entered = begin(job, self.queue_name) if begin is not None else None
            settled = self._requeue(acker, tag)
            if hooks is not None:
                hooks.end(job, self.queue_name, entered, settled, None)
        finally:
            job._task = None
            if task is not None:
                self.tasks.discard(task)

    def _start_by_factory(self, job: Job, process: Coroutine[Any, Any, None]) -> None:
        """Start a delivery's task with the application's task factory. An eager one (Python
        3.12+) may have run it by now, even to its end: `_process` then found its task with
        `current_task()`, and a task that ended is not kept."""
        task = self._loop.create_task(process, name=self._task_name)
        if not task.done():
            job._task = task
            self.tasks.add(task)

    def _release(self) -> None:
        """A handler slot is free: the next waiting delivery's, if it can run."""
        self._free += 1
        if self._waiting:
            self._pump()
