"""Publishing from synchronous code: Django, Flask, scripts, thread pools.

`SyncProducer` runs one `Producer` (one connection) on a background thread with an event loop of
its own. Its `publish()` blocks the calling thread until the broker confirms the message, or
raises the same typed errors as `Producer.publish` within its timeout. Any number of threads may
publish at once: their messages are pipelined on the one connection.

```python
from aio_workq.sync import SyncProducer

producer = SyncProducer(timeout=5, connect_timeout=5)  # connects on first use; closed at exit


def resize_view(request):  # a Django view, a Flask route, a thread...
    job_id = producer.publish({"path": request.POST["path"]}, queue="images")
    job = producer.enqueue(resize, request.POST["path"], width=400)  # a task (@tasks.task)
```
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Literal, TypeVar, Unpack

from ._exceptions import (
    BrokerConnectionError,
    PublishTimeoutError,
    RPCTimeoutError,
    WorkqError,
)
from ._link.settings import URLs, check_seconds, redact_url, resolve_url
from ._link.specs import Exchange, Queue, QueueType
from ._synctasks import SLACK, Closeable, SyncJobHandle, SyncTaskCalls
from ._web import (
    DEFAULT_REQUEST_TIMEOUT,
    IntegrationError,
    OwnedProducer,
    ProducerOptions,
    ProducerSettings,
    ProducerView,
)

__all__ = ("SyncJobHandle", "SyncProducer")

log = logging.getLogger("aio_workq")

T = TypeVar("T")


class _LoopThread:
    """An event loop on a daemon thread, running one started `Producer` behind a view.

    Holds no reference to its `SyncProducer`, so that a finaliser can close it.
    """

    def __init__(self, producer: OwnedProducer, timeout: float) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="aio-workq SyncProducer", daemon=True)
        self._producer = producer
        self._timeout = timeout
        self.view: ProducerView | None = None
        self.closed = False
        self._close_lock = threading.Lock()
        self._held: dict[int, Closeable] = {}  # job stores used on this loop, closed with it
        self._waits: set[concurrent.futures.Future[Any]] = set()  # handles waiting for jobs

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    def start(self, connect_timeout: float) -> None:
        self.thread.start()

        async def start() -> ProducerView:
            await self._producer.start()
            return ProducerView(self._producer.producer, timeout=self._timeout)

        try:
            self.view = self.submit(
                start(), connect_timeout + SLACK, "connecting", BrokerConnectionError
            )
        except BaseException:
            self.close(0)
            raise

    def hold(self, resource: Closeable) -> None:
        """Close `resource` (a job store whose connections live on this loop, a registry's
        batches of writes there) with the loop, after those held since."""
        self._held.setdefault(id(resource), resource)

    async def _shut(self, timeout: float) -> None:
        try:
            await self._producer.close(timeout)
        finally:
            for resource in reversed(list(self._held.values())):  # the last held first
                try:
                    async with asyncio.timeout(SLACK):
                        await resource.close()
                except Exception as exc:
                    log.warning("closing %r with the SyncProducer failed: %r", resource, exc)

    def submit(
        self,
        coro: Coroutine[Any, Any, T],
        bound: float | None,
        doing: str,
        stuck: Callable[[str], WorkqError] = PublishTimeoutError,
        interruptible: bool = False,
    ) -> T:
        """Run `coro` on the loop thread; its result, or its exception, in this thread.

        An `interruptible` call (a handle waiting for its job) is ended by `close()`, which
        does not wait for it.

        Raises:
            WorkqError: `stuck` when no answer came within `bound` (a blocked loop; `None`:
                no bound).
            IntegrationError: an interruptible call ended by `close()`.
        """
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        if interruptible:
            self._waits.add(future)
            future.add_done_callback(self._waits.discard)
            if self.closed:  # close() may have passed over it
                future.cancel()
        try:
            return future.result(timeout=bound)
        except concurrent.futures.CancelledError:
            raise IntegrationError(f"{doing}: the SyncProducer was closed meanwhile") from None
        except TimeoutError as exc:
            if isinstance(exc, WorkqError):  # the call's own typed timeout
                raise
            future.cancel()
            raise stuck(
                f"{doing}: no answer from the SyncProducer's event-loop thread within "
                f"{bound or 0:g} s (is that loop blocked?)"
            ) from None

    def close(self, timeout: float) -> None:
        """Wait up to `timeout` for outstanding confirms, close, stop the loop thread."""
        if self.pid != os.getpid():
            # a forked child: the thread (and its connection) belong to the parent, and so
            # may the lock (held by a parent's thread at the fork, it is never released here)
            self.closed = True
            return
        if threading.current_thread() is self.thread:  # before anything is marked closed
            raise IntegrationError("a SyncProducer cannot be closed from its own event loop")
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        if not self.thread.is_alive():
            return
        for waiting in list(self._waits):  # their coroutines are cancelled on the loop
            waiting.cancel()
        try:
            self.submit(self._shut(timeout), timeout + 2 * SLACK, "closing")
        except Exception as exc:  # closing at exit: say what happened, never raise there
            log.warning("closing the SyncProducer failed: %r", exc)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=SLACK)


class SyncProducer(SyncTaskCalls):
    """A thread-safe, blocking producer for synchronous code: plain messages (`publish()`)
    and typed tasks (`enqueue(task, ...)`, `job(task, job_id)`).

    It connects on first use (or `start()`), on a background thread of its own, and is closed by
    `close()`, by `with SyncProducer(...)`, when it is garbage-collected, or at interpreter exit
    (outstanding confirms are awaited up to `close_timeout`). A process forked after it
    started (e.g. by a pre-forking server) opens a connection of its own on first use.

    Call it from any thread except its own event-loop thread (e.g. not from a coroutine that
    the producer itself runs). A thread that runs an event loop of its own may call it: the call
    blocks that loop while it waits, so async code should use `aio_workq.Producer` instead.

    Args:
        url: broker URL(s) (see `Producer`).
        timeout: the default bound, in seconds, of each `publish()` or `call()`.
        connect_timeout: seconds for connecting on first use.
        close_timeout: seconds `close()` waits for outstanding confirms.
        queue_type: the type of queues declared from a plain name.
        **options: `Producer` and `Connection` settings, passed on as they are: `ssl_context`
            (for `amqps://`), `name` (connection name), `backoff` (reconnect delays), `hooks`
            (metrics, tracing), `window`, `window_bytes`, `on_reconnect`.

    Raises:
        ConfigurationError: a setting is invalid.
        TypeError: an unknown setting.
    """

    def __init__(
        self,
        url: URLs | None = None,
        *,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
        connect_timeout: float = 10.0,
        close_timeout: float = 10.0,
        queue_type: QueueType | Literal["quorum", "classic"] = QueueType.QUORUM,
        **options: Unpack[ProducerOptions],
    ) -> None:
        self._timeout = check_seconds("timeout", timeout)
        self._close_timeout = check_seconds("close_timeout", close_timeout)
        self._url = resolve_url(url)
        self._settings = ProducerSettings(
            url, queue_type=queue_type, connect_timeout=connect_timeout, options=options
        )
        self._connect_timeout = self._settings.connect_timeout
        self._lock = threading.Lock()
        self._runner: _LoopThread | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._closed = False
        _producers.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "started" if self._runner else "not started"
        return f"<SyncProducer {redact_url(self._url)} {state}>"

    def __enter__(self) -> SyncProducer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Connect now instead of on first use.

        Raises:
            BrokerConnectionError: the broker can't be reached within `connect_timeout`.
            IntegrationError: the producer is closed.
        """
        self._running()

    def _running(self) -> _LoopThread:
        runner = self._runner
        if runner is not None and runner.pid == os.getpid() and not runner.closed:
            if threading.current_thread() is runner.thread:
                raise IntegrationError(
                    "SyncProducer called from its own event-loop thread: it would wait for "
                    "itself; in async code use aio_workq.Producer"
                )
            return runner
        with self._lock:
            if self._closed:
                raise IntegrationError("this SyncProducer is closed")
            runner = self._runner
            if runner is None or runner.pid != os.getpid() or runner.closed:
                if self._finalizer is not None:
                    self._finalizer.detach()  # a parent's thread, or a failed start
                runner = _LoopThread(self._settings.producer(), self._timeout)
                runner.start(self._connect_timeout)
                self._finalizer = weakref.finalize(self, runner.close, self._close_timeout)
                self._runner = runner
            return runner

    def _do(
        self,
        doing: str,
        timeout: float | None,
        make: Callable[[ProducerView], Coroutine[Any, Any, Any]],
        stuck: type[WorkqError] = PublishTimeoutError,
    ) -> Any:
        return self._submit(make, self._seconds(timeout), doing, stuck)

    def publish(
        self,
        body: Any,
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        mandatory: bool = True,
        timeout: float | None = None,
        **properties: Any,
    ) -> str:
        """Publish one message and block until its confirm; returns the message id.

        Takes the arguments of `Producer.publish`; `timeout` defaults to the producer's.

        Raises:
            PublishTimeoutError: not confirmed within the timeout (e.g. the broker is down);
                the message says whether it was sent at all.
            PublishError: nacked, unroutable or connection lost (see `Producer.publish`).
            SerializationError: the body can't be encoded; nothing was sent.
            TopologyError: the queue exists with other arguments, or the exchange doesn't.
            BrokerConnectionError: connecting on first use failed (that attempt is bounded by
                `connect_timeout`, not `timeout`: give both for a short bound while it is down).
            IntegrationError: called from the producer's own loop thread, or after `close()`.
        """
        return str(
            self._do(
                "publishing",
                timeout,
                lambda view: view.publish(
                    body,
                    queue,
                    exchange=exchange,
                    routing_key=routing_key,
                    headers=headers,
                    message_id=message_id,
                    mandatory=mandatory,
                    timeout=timeout,
                    **properties,
                ),
            )  # fmt: skip
        )

    def publish_many(
        self,
        bodies: Iterable[Any],
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> list[Any]:
        """Publish many messages pipelined, one timeout for the batch; the message ids in order.

        Raises:
            PublishError: the first failure once all are settled (unless `return_exceptions`).
            SerializationError: a body can't be encoded (unless `return_exceptions`).
            BrokerConnectionError: connecting on first use failed.
            IntegrationError: see `publish()`.
        """
        items = list(bodies)  # consumed here, not on the loop thread
        result: list[Any] = self._do(
            "publishing a batch",
            timeout,
            lambda view: view.publish_many(
                items, queue, exchange=exchange, routing_key=routing_key, headers=headers,
                return_exceptions=return_exceptions, timeout=timeout,
            ),
        )  # fmt: skip
        return result

    def call(
        self,
        body: Any,
        queue: str | Queue | None = None,
        *,
        exchange: str | Exchange = "",
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send an RPC request and block until the worker's reply.

        Raises:
            RPCError: the remote handler raised.
            RPCTimeoutError: no reply within the timeout.
            PublishError: the request was not confirmed.
            BrokerConnectionError: connecting on first use failed.
            IntegrationError: see `publish()`.
        """
        return self._do(
            "calling",
            timeout,
            lambda view: view.call(
                body, queue, exchange=exchange, routing_key=routing_key, headers=headers,
                timeout=timeout,
            ),
            RPCTimeoutError,
        )  # fmt: skip

    def declare(self, queue: str | Queue, *, timeout: float | None = None) -> str:
        """Declare a queue (with its dead-letter queue) now; returns its name.

        Raises:
            BrokerConnectionError: no answer within the timeout.
            TopologyError: the queue exists with other arguments.
        """
        return str(
            self._do(
                "declaring",
                timeout,
                lambda view: view.declare(queue, timeout=timeout),
                BrokerConnectionError,
            )
        )

    def close(self, timeout: float | None = None) -> None:
        """Wait up to `timeout` (default `close_timeout`) for outstanding confirms, then close.

        Idempotent; later calls to `publish()` raise `IntegrationError`.

        Raises:
            ConfigurationError: `timeout` is not a finite number of seconds (0 or less: no
                wait); nothing is closed.
            IntegrationError: called from its own event-loop thread (a hook); nothing is
                closed.
        """
        if timeout is not None:
            if isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout < 0:
                timeout = 0.0  # as Producer.close: no wait
            timeout = check_seconds("timeout", timeout, zero=True)
        runner = self._runner
        if runner is not None and threading.current_thread() is runner.thread:
            raise IntegrationError("a SyncProducer cannot be closed from its own event loop")
        with self._lock:
            self._closed = True
            runner, self._runner = self._runner, None
            finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer.detach()
        if runner is not None:
            runner.close(self._close_timeout if timeout is None else timeout)


_producers: weakref.WeakSet[SyncProducer] = weakref.WeakSet()


def _unlock_in_child() -> None:
    """After `fork()`, in the child: a fresh lock for every SyncProducer. Another thread of
    the parent (connecting on first use, up to `connect_timeout`) may have held one at the
    fork, and in the child nothing would ever release it: its first call would hang."""
    for producer in list(_producers):
        producer._lock = threading.Lock()


os.register_at_fork(after_in_child=_unlock_in_child)
