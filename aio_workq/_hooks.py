"""Hooks: observe and wrap publishing, handling and reconnecting (metrics, tracing, your own).

A `Hook` subclass overrides the methods it needs; the rest are no-ops. Producers, workers and
connections take `hooks=[...]`. With none installed nothing is called and nothing is allocated
per message: the call sites test `hooks is None` once.

A hook never breaks a message: an exception from a hook method is logged (with the message's
queue, id and attempt) and the message goes on as if the hook were not there. Every delivery is
still settled exactly once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ._exceptions import ConfigurationError

__all__ = (
    "HandleInfo",
    "Hook",
    "Hooks",
    "JobView",
    "Outcome",
    "PublishInfo",
    "Settled",
    "Settling",
)

log = logging.getLogger("aio_workq")


class JobView(Protocol):
    """What a hook reads of the job being handled: the message, not the worker's handle on it.

    The worker's `Job` is one; annotate a `Hook.handling` override's `job` with `JobView`.
    """

    @property
    def body(self) -> bytes: ...

    @property
    def data(self) -> Any: ...

    @property
    def headers(self) -> Mapping[str, Any]: ...

    @property
    def message_id(self) -> str | None: ...

    @property
    def content_type(self) -> str | None: ...

    @property
    def correlation_id(self) -> str | None: ...

    @property
    def reply_to(self) -> str | None: ...

    @property
    def redelivered(self) -> bool: ...

    @property
    def routing_key(self) -> str: ...

    @property
    def exchange(self) -> str: ...

    @property
    def attempt(self) -> int: ...

    @property
    def delivery_tag(self) -> int: ...


class Outcome(enum.StrEnum):
    """How the worker settled a delivery."""

    OK = "ok"
    """The handler returned: acked (an RPC request was answered)."""
    RETRY = "retry"
    """The handler failed: moved to a delay queue as the next attempt."""
    DEFERRED = "deferred"
    """The handler raised `Defer`: moved to a delay queue, same attempt."""
    DEAD_LETTERED = "dead-lettered"
    """Moved to the dead-letter queue (`Reject`, the last attempt, or a `throws` exception)."""
    REJECTED = "rejected"
    """Dropped: it had to be dead-lettered but the queue has none (logged as an error)."""
    FAILED = "failed"
    """The handler of an RPC request failed: the caller got the error, the request was acked."""
    REQUEUED = "requeued"
    """Back to its queue: the worker stopped, or a failed message could not be moved."""


Settled = tuple[Outcome, BaseException | None, float | None]
"""What the dispatcher reports for one delivery: the outcome, the handler's error, and the
seconds until the next run of a retried or deferred message."""
_UNSETTLED: Settled = (Outcome.REQUEUED, None, None)
Entered = Any
"""What `Hooks.begin` entered, for `Hooks.end` (the one hook's context manager, or a list of
(hook, manager) pairs, or `None`): opaque to the caller."""


class PublishInfo:
    """One message being published, as hooks see it.

    `headers` may be changed in `before_publish` (a tracing hook adds its context there): the
    message is sent with them. After the confirm, `error` is `None` (confirmed) or the
    `PublishError` the publish failed with, and `seconds` the time from the send to then.
    """

    __slots__ = ("body_size", "error", "exchange", "headers", "message_id", "routing_key",
                 "seconds", "started", "window")  # fmt: skip

    def __init__(
        self,
        *,
        exchange: str,
        routing_key: str,
        message_id: str,
        headers: dict[str, Any],
        body_size: int,
        window: int,
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.message_id = message_id
        self.headers = headers
        self.body_size = body_size
        self.window = window
        """The publisher's window (most unconfirmed messages)."""
        self.started = time.perf_counter()
        self.error: BaseException | None = None
        self.seconds = 0.0

    @property
    def destination(self) -> str:
        """The queue name for the default exchange, else the exchange name (a bounded label)."""
        return self.exchange or self.routing_key


@dataclass(frozen=True, slots=True, init=False)
class HandleInfo:
    """One delivery the worker has settled."""

    job: JobView
    """The job (a `Job`)."""
    queue: str
    outcome: Outcome
    error: BaseException | None
    """What the handler raised (or the failed confirm of something it forwarded)."""
    seconds: float | None
    """How long the handler ran (`None` if it did not run: the worker was stopping)."""
    delay: float | None = None
    """For `RETRY` and `DEFERRED`: seconds until the message runs again (its wait in the delay
    queue, jitter included; 0 for an immediate retry)."""

    def __init__(
        self,
        job: JobView,
        queue: str,
        outcome: Outcome,
        error: BaseException | None,
        seconds: float | None,
        delay: float | None = None,
    ) -> None:
        # One per handled message: the slots' own setters, a third of what the frozen
        # dataclass's `object.__setattr__` per field costs.
        _set_job(self, job)
        _set_queue(self, queue)
        _set_outcome(self, outcome)
        _set_error(self, error)
        _set_seconds(self, seconds)
        _set_delay(self, delay)


_set_job, _set_queue, _set_outcome, _set_error, _set_seconds, _set_delay = (
    HandleInfo.__dict__[name].__set__
    for name in ("job", "queue", "outcome", "error", "seconds", "delay")
)


class Settling:
    """A context manager `Hook.handling` may return (a subclass) to be told how the delivery
    was settled, just before it is exited: what a hook needs that reads only the outcome of
    some deliveries (a tracing span that records), without overriding `after_handle`, which
    has every delivery build a `HandleInfo` and call it."""

    __slots__ = ()

    def settled(self, outcome: Outcome, error: BaseException | None) -> None:
        """The delivery was settled (`Outcome.REQUEUED` if settling it raised): its outcome
        and what the handler raised (or the failed confirm of something it forwarded)."""


class Hook:
    """Observes and wraps publishes, deliveries and reconnects; override what you need.

    ```python
    class SlowJobs(Hook):
        def after_handle(self, info: HandleInfo) -> None:
            if info.seconds and info.seconds > 5:
                log.warning("%s took %.1f s", info.job.message_id, info.seconds)

    Worker(queue="images", handler=resize, hooks=[SlowJobs()])
    ```

    Methods run on the event loop, in the task that publishes or handles: keep them quick. An
    exception from one is logged and ignored.
    """

    def before_publish(self, message: PublishInfo) -> Any:
        """A message is about to be sent; may change `message.headers`.

        Returns a value handed back to `after_publish` (e.g. a span).
        """
        return None

    def after_publish(self, message: PublishInfo, state: Any) -> None:
        """The message was confirmed (`message.error is None`) or failed."""

    def arrived(self, job: JobView, queue: str) -> asyncio.Future[Any] | None:
        """A delivery arrived, before it waits for a free handler: called by the worker as
        it takes the delivery, outside the delivery's task (its context variables are not the
        handler's: set those in `handling`). May return a future the delivery waits for
        before its handler starts (e.g. a job store's answer to a claim); deliveries still
        start in the order they arrived. A future that fails does not stop the delivery (its
        handler starts; what it makes of the future is its own)."""
        return None

    def handling(self, job: JobView, queue: str) -> AbstractContextManager[Any] | None:
        """A context manager entered before the handler runs and exited once the delivery
        is settled (after `after_handle`): e.g. a tracing span, current while the handler runs.
        """
        return None

    def after_handle(self, info: HandleInfo) -> None:
        """A delivery was settled: its outcome, the handler's error and duration."""

    def on_connection_lost(self, url: str) -> None:
        """The connection to `url` (password hidden) was lost; reconnecting."""

    def on_reconnect(self, url: str) -> None:
        """Connected again, to `url` (password hidden)."""


class Hooks:
    """Calls a list of hooks, each guarded: what a hook raises is logged and ignored."""

    __slots__ = ("_after_handle", "_arrived", "_handling", "_infos", "_one", "_settled",
                 "anywhere", "arrives", "durations", "handles", "hooks", "publishes",
                 "times")  # fmt: skip

    def __init__(self, hooks: tuple[Hook, ...]) -> None:
        self.hooks = hooks
        self.durations: dict[JobView, float] = {}
        """How long each delivery's handler ran, from its end until `end` reports it (the
        dispatcher times the handler), when `times`."""
        # Per delivery only the hooks that override a method are called (a hook that counts
        # deliveries need not be asked for a context manager).
        self._arrived = tuple(hook for hook in hooks if _overrides(hook, "arrived"))
        self.arrives = bool(self._arrived)
        """Whether a hook has an `arrived` (the dispatcher calls `arrive` only then)."""
        self._handling = tuple(hook for hook in hooks if _overrides(hook, "handling"))
        self.handles = bool(self._handling)
        """Whether a hook has a `handling` (else `begin` enters nothing)."""
        self._after_handle = tuple(hook for hook in hooks if _overrides(hook, "after_handle"))
        self._one = self._handling[0].handling if len(self._handling) == 1 else None
        """The `handling` of the one hook that overrides it, if only one does (a tracing hook
        alone): `begin` hands `end` its context manager itself, no list of them."""
        # aio-workq's own job recorder is told the outcome without a `HandleInfo` (#23: one
        # object, its seven calls, per job); `after_handle` for every other hook.
        self._settled: tuple[tuple[Hook, Callable[..., None]], ...] = tuple(
            (hook, hook._workq_settled) for hook in self._after_handle
            if isinstance(hook, _Settles)
        )  # fmt: skip
        self._infos = tuple(h for h in self._after_handle if not isinstance(h, _Settles))
        self.times = any(not getattr(hook, "_workq_untimed", False) for hook in self._after_handle)
        """Whether the handlers are timed (into `durations`): only `after_handle` reads it, and
        not aio-workq's own job recorder (`_workq_untimed`: two clock reads a job less)."""
        self.publishes = any(
            _overrides(hook, "before_publish") or _overrides(hook, "after_publish")
            for hook in hooks
        )
        """Whether a hook sees publishes (else a publish takes no road through `publish`)."""
        self.anywhere = not self._handling and not self._infos and not self.times
        """Whether `end` may be called outside the delivery's task (the worker then settles a
        chain step from its confirm, #22): no hook's `handling` was entered in the task, and
        no `after_handle` is called but aio-workq's own job recorder's, which reads nothing
        of the task's (a user's runs in the task that handled the delivery, as `Hook` says)."""

    @classmethod
    def of(cls, hooks: Iterable[Hook] | Hooks | None) -> Hooks | None:
        """`None` when there are no hooks (the call sites then skip them altogether).

        Raises:
            ConfigurationError: an item is not a `Hook`.
        """
        if hooks is None or isinstance(hooks, Hooks):
            return hooks
        if isinstance(hooks, Hook):
            raise ConfigurationError("hooks must be a list of Hook objects: hooks=[hook]")
        items = tuple(hooks)
        for hook in items:
            if not isinstance(hook, Hook):
                raise ConfigurationError(
                    f"hooks must be Hook instances (subclass aio_workq.Hook), got {hook!r}"
                )
        return cls(items) if items else None

    def _failed(self, hook: Hook, what: str, exc: Exception, extra: dict[str, Any]) -> None:
        log.error("hook %r failed in %s: %r", hook, what, exc, exc_info=exc, extra=extra)

    # -- publishing --------------------------------------------------------------------------

    async def publish(
        self,
        send: Callable[[dict[str, Any]], Awaitable[asyncio.Future[str]]],
        message: PublishInfo,
    ) -> asyncio.Future[str]:
        """Run `before_publish`, `send(headers)`, then `after_publish` once it settles."""
        states = []
        for hook in self.hooks:
            try:
                states.append(hook.before_publish(message))
            except Exception as exc:
                states.append(None)
                self._failed(hook, "before_publish", exc, {"message_id": message.message_id})
        try:
            confirm = await send(message.headers)
        except BaseException as exc:
            self._published(message, states, exc)
            raise
        if confirm.done():
            self._confirmed(message, states, confirm)
        else:
            confirm.add_done_callback(lambda future: self._confirmed(message, states, future))
        return confirm

    def _confirmed(
        self, message: PublishInfo, states: list[Any], confirm: asyncio.Future[str]
    ) -> None:
        error = confirm.exception() if not confirm.cancelled() else None
        self._published(message, states, error)

    def _published(
        self, message: PublishInfo, states: list[Any], error: BaseException | None
    ) -> None:
        message.seconds = time.perf_counter() - message.started
        message.error = error
        for hook, state in zip(self.hooks, states, strict=True):
            try:
                hook.after_publish(message, state)
            except Exception as exc:
                self._failed(hook, "after_publish", exc, {"message_id": message.message_id})

    # -- handling ----------------------------------------------------------------------------

    def arriving(self) -> Callable[[JobView, str], asyncio.Future[Any] | None]:
        """What the dispatcher calls as a delivery arrives: the one hook's `arrived` itself
        (a call less per job, #23; what it raises goes to `arrival_failed`), else `arrive`."""
        return self._arrived[0].arrived if len(self._arrived) == 1 else self.arrive

    def arrival_failed(self, job: JobView, queue: str, exc: Exception) -> None:
        """The one hook's `arrived` (`arriving`) raised `exc`: logged, the delivery goes on."""
        self._failed(self._arrived[0], "arrived", exc, _fields(queue, job))

    def arrive(self, job: JobView, queue: str) -> asyncio.Future[Any] | None:
        """A delivery arrived (the dispatcher calls this outside its task, through `arriving`
        when more than one hook has `arrived`): call each; the future to wait for before its
        handler starts, if any hook returned one."""
        futures = []
        for hook in self._arrived:
            try:
                future = hook.arrived(job, queue)
            except Exception as exc:
                self._failed(hook, "arrived", exc, _fields(queue, job))
                continue
            if future is not None:
                futures.append(future)
        if not futures:
            return None
        if len(futures) == 1:
            return futures[0]
        return asyncio.gather(*futures, return_exceptions=True)

    def begin(self, job: JobView, queue: str) -> Entered:
        """Before the handler runs: call `handling` and enter what it returns; pass the result
        to `end` (the dispatcher calls the two around a delivery, in its own coroutine)."""
        one = self._one
        if one is not None:  # one hook's manager (or None), not in a list
            try:
                manager = one(job, queue)
                if manager is not None:
                    manager.__enter__()
            except Exception as exc:
                self._failed(self._handling[0], "handling", exc, _fields(queue, job))
                return None
            return manager
        entered: list[tuple[Hook, AbstractContextManager[Any]]] | None = None
        for hook in self._handling:
            try:
                manager = hook.handling(job, queue)
                if manager is not None:
                    manager.__enter__()
                    if entered is None:
                        entered = []
                    entered.append((hook, manager))
            except Exception as exc:
                self._failed(hook, "handling", exc, _fields(queue, job))
        return entered

    def end(
        self,
        job: JobView,
        queue: str,
        entered: Entered,
        settled: Settled | None,
        raised: BaseException | None,
    ) -> None:
        """Once the delivery is settled (`settled`), or settling it raised (`raised`): call
        `after_handle`, then leave what `begin` entered (a `Settling` told the outcome first)."""
        outcome, error, delay = settled if settled is not None else _UNSETTLED
        for hook, told in self._settled:
            try:
                told(job, outcome, error, delay)
            except Exception as exc:
                self._failed(hook, "after_handle", exc, _fields(queue, job))
        if self._infos:
            seconds = self.durations.pop(job, None) if self.times else None
            info = HandleInfo(job, queue, outcome, error, seconds, delay)
            for hook in self._infos:
                try:
                    hook.after_handle(info)
                except Exception as exc:
                    self._failed(hook, "after_handle", exc, _fields(queue, job))
        if entered is None:
            return
        if self._one is None:
            for hook, manager in reversed(entered):
                self._leave(hook, manager, job, queue, outcome, error, raised)
            return
        # The one hook's manager itself (as `_leave`, inline: once per delivery).
        if isinstance(entered, Settling):
            try:
                entered.settled(outcome, error)
            except Exception as exc:
                self._failed(self._handling[0], "handling (settled)", exc, _fields(queue, job))
        try:
            if raised is None:
                entered.__exit__(None, None, None)
            else:
                entered.__exit__(type(raised), raised, raised.__traceback__)
        except Exception as exc:
            self._failed(self._handling[0], "handling (exit)", exc, _fields(queue, job))

    def _leave(
        self,
        hook: Hook,
        manager: AbstractContextManager[Any],
        job: JobView,
        queue: str,
        outcome: Outcome,
        error: BaseException | None,
        raised: BaseException | None,
    ) -> None:
        """Tell a `Settling` manager the outcome, then exit it."""
        if isinstance(manager, Settling):
            try:
                manager.settled(outcome, error)
            except Exception as exc:
                self._failed(hook, "handling (settled)", exc, _fields(queue, job))
        try:
            if raised is None:
                manager.__exit__(None, None, None)
            else:
                manager.__exit__(type(raised), raised, raised.__traceback__)
        except Exception as exc:
            self._failed(hook, "handling (exit)", exc, _fields(queue, job))

    # -- connections -------------------------------------------------------------------------

    def connection_lost(self, url: str) -> None:
        for hook in self.hooks:
            try:
                hook.on_connection_lost(url)
            except Exception as exc:
                self._failed(hook, "on_connection_lost", exc, {})

    def reconnected(self, url: str) -> None:
        for hook in self.hooks:
            try:
                hook.on_reconnect(url)
            except Exception as exc:
                self._failed(hook, "on_reconnect", exc, {})


@runtime_checkable
class _Settles(Protocol):
    """A hook of aio-workq's own told how a delivery was settled without a `HandleInfo`."""

    def _workq_settled(
        self, job: JobView, outcome: Outcome, error: BaseException | None, delay: float | None
    ) -> None: ...


def _overrides(hook: Hook, method: str) -> bool:
    """Whether `hook` does something in `method` (the base class's does nothing)."""
    return getattr(type(hook), method, None) is not getattr(Hook, method)


def _fields(queue: str, job: JobView) -> dict[str, Any]:
    return {"queue": queue, "message_id": job.message_id, "attempt": job.attempt}
