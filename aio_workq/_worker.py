"""Worker: consume a queue, run the handler, settle every delivery exactly once.

The hot path takes aiormq deliveries directly (no aio-pika `IncomingMessage` per message) and
settles them through an `_Acker`, which coalesces the acks of one event-loop iteration into a
single write: one `multiple=True` ack for the completed prefix of delivery tags, single acks for
completed deliveries behind one that is still running.

Outcomes: the handler returns → ack (after the confirms of `job.forward()`); raises `Reject`
→ dead-letter queue; raises anything else → a delayed retry through a delay queue, or the
dead-letter queue after the last attempt. A failure is moved by publishing a copy with publisher
confirms and acking the original only once the copy is confirmed, so a crash at any point
leaves the message in the broker (possibly twice, never zero times).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import multiprocessing
import pickle
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, cast

import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import ChannelFrame, DeliveredMessage

from ._confirms import ConfirmPublisher, make_properties
from ._connection import connect, translate_errors
from ._demux import Delivery, demux_of
from ._exceptions import ConfigurationError, Reject, Retry, WorkqError
from ._job import ATTEMPT_HEADER, BROKER_HEADERS, Job, JobData
from ._producer import Router
from ._retry import RetryPolicy
from ._serialization import encode_body
from ._settings import redact_url, resolve_url
from ._topology import Exchange, Queue, QueueType, declare_exchange, raw_channel
from ._wire import Properties, ack_frame, nack_frame

__all__ = ("Handler", "Worker", "WorkerState")

log = logging.getLogger("aio_workq")

# A coroutine function or plain function of a Job; with executor="process", of a JobData.
Handler = Callable[[Job], Awaitable[Any]] | Callable[[Job], Any] | Callable[[JobData], Any]

_ERROR_TEXT_LIMIT = 1000
_TRACEBACK_LIMIT = 4000
_BLOCKED_AFTER = 0.5


@dataclass(frozen=True, slots=True)
class WorkerState:
    """A snapshot of a worker, for health checks."""

    queue: str
    connected: bool
    consuming: bool
    in_flight: int
    processed: int
    failed: int
    retried: int
    dead_lettered: int


class _Acker:
    """Settles the deliveries of one channel, coalescing acks per event-loop iteration."""

    __slots__ = ("_buffer", "_handle", "_loop", "_unsettled", "channel")

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self._loop = asyncio.get_running_loop()
        self._unsettled: dict[int, bool] = {}  # delivery tag -> completed, in delivery order
        self._buffer: list[bytes] = []
        self._handle: asyncio.Handle | None = None

    def track(self, tag: int) -> None:
        self._unsettled[tag] = False

    def ack(self, tag: int) -> None:
        if tag in self._unsettled:
            self._unsettled[tag] = True
            if self._handle is None:
                self._handle = self._loop.call_soon(self.flush)

    def nack(self, tag: int, *, requeue: bool) -> None:
        if self._unsettled.pop(tag, None) is not None:
            self._buffer.append(nack_frame(self.channel.number, tag, requeue))
            if self._handle is None:
                self._handle = self._loop.call_soon(self.flush)

    @property
    def unsettled(self) -> int:
        return len(self._unsettled)

    def flush(self) -> None:
        self._handle = None
        channel = self.channel
        if channel.is_closed:
            # The broker requeues everything unacked on a closed channel: the documented
            # duplicate case, never a loss.
            self._unsettled.clear()
            self._buffer.clear()
            return
        unsettled = self._unsettled
        last = 0
        for tag, done in unsettled.items():
            if not done:
                break
            last = tag
        frames = self._buffer
        if last:
            for tag in [tag for tag in unsettled if tag <= last]:
                del unsettled[tag]
            frames.append(ack_frame(channel.number, last, True))
        if any(unsettled.values()):
            for tag in [tag for tag, done in unsettled.items() if done]:
                del unsettled[tag]
                frames.append(ack_frame(channel.number, tag, False))
        if not frames:
            return
        frame = ChannelFrame(payload=b"".join(frames), should_close=False)
        self._buffer = []
        try:
            channel.write_queue.put_nowait(frame)  # type: ignore[attr-defined]
        except asyncio.QueueFull:
            self._loop.create_task(channel.write_queue.put(frame))  # type: ignore[attr-defined]


class Worker:
    """Consumes a queue and runs `handler` for each message.

    ```python
    async def resize(job: Job) -> None:
        await make_thumbnail(job.data["path"])

    await Worker(queue="images", handler=resize, concurrency=10).run()
    ```

    Args:
        url: broker URL (see `Producer`).
        connection: share a robust connection; each worker opens its own channel on it.
        queue: the queue name or `Queue`; `""` for a server-named subscriber queue.
        handler: `async def handler(job)` runs on the event loop; a plain `def` runs in a thread
            pool of `concurrency` threads. Its return value becomes the reply to RPC requests.
        concurrency: handlers running at once.
        prefetch: unacked deliveries the broker may send ahead (>= concurrency; default equal).
            Deliveries waiting for `job.forward()` confirms hold a prefetch slot, not a
            concurrency slot.
        retry: the retry policy; `None` dead-letters on the first failure.
        queue_type: the type of a queue given by name: `"quorum"` (default) or `"classic"`.
        exchange: bind the queue to this exchange (declared durable when an `Exchange`, checked
            when a name) with `binding_keys`.
        binding_keys: routing keys or patterns to bind with (default: the queue name).
        binding_arguments: arguments of each binding: for a headers exchange, the headers to
            match and `"x-match": "all"` or `"any"` (routing keys are then ignored).
        handler_timeout: seconds a handler may run before it counts as failed.
        shutdown_timeout: seconds `stop()` lets running handlers finish; the rest go back to
            the queue.
        executor: where a plain `def` handler runs: `"thread"` (a pool of `concurrency`
            threads) or `"process"` (a pool of `concurrency` processes, for CPU-bound work: the
            handler must be a module-level function and gets a picklable `JobData`).
        name: connection name shown in the management UI.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        queue: str | Queue,
        handler: Handler,
        concurrency: int = 1,
        prefetch: int | None = None,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, immutable
        queue_type: QueueType | Literal["quorum", "classic"] = QueueType.QUORUM,
        connection: AbstractRobustConnection | None = None,
        exchange: str | Exchange | None = None,
        binding_keys: Sequence[str] = (),
        binding_arguments: Mapping[str, Any] | None = None,
        handler_timeout: float | None = None,
        shutdown_timeout: float = 30.0,
        executor: Literal["thread", "process"] = "thread",
        name: str | None = None,
    ) -> None:
        if connection is not None and url is not None:
            raise ConfigurationError("pass url= or connection=, not both")
        if not callable(handler):
            raise ConfigurationError(f"handler must be callable, got {handler!r}")
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {concurrency!r}")
        prefetch = concurrency if prefetch is None else prefetch
        if not concurrency <= prefetch <= 65535:
            raise ConfigurationError(
                f"prefetch must be between concurrency ({concurrency}) and 65535, got {prefetch!r}"
            )
        if handler_timeout is not None and handler_timeout <= 0:
            raise ConfigurationError(f"handler_timeout must be > 0, got {handler_timeout!r}")
        if shutdown_timeout < 0:
            raise ConfigurationError(f"shutdown_timeout must be >= 0, got {shutdown_timeout!r}")
        if executor not in ("thread", "process"):
            raise ConfigurationError(f"executor must be 'thread' or 'process', got {executor!r}")
        if isinstance(binding_keys, str):
            raise ConfigurationError("binding_keys must be a list of keys, not one string")
        if (binding_keys or binding_arguments) and exchange is None:
            raise ConfigurationError("binding_keys and binding_arguments need an exchange=")
        try:
            queue_type = QueueType(queue_type)
        except ValueError:
            raise ConfigurationError(
                f"queue_type must be 'quorum' or 'classic', got {queue_type!r}"
            ) from None
        self._queue = queue if isinstance(queue, Queue) else Queue(queue, type=queue_type)
        self._url = None if connection is not None else resolve_url(url)
        self._connection = connection
        self._owns_connection = connection is None
        self._handler = cast(Callable[[Any], Any], handler)
        self._is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - async callable objects
        )
        if executor == "process":
            if self._is_async:
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
        self._executor_kind = executor
        self._concurrency = concurrency
        self._prefetch = prefetch
        self._retry = retry
        self._exchange = exchange
        self._binding_keys = tuple(binding_keys)
        self._binding_arguments = dict(binding_arguments or {})
        self._handler_timeout = handler_timeout
        self._shutdown_timeout = shutdown_timeout
        self._name = name
        self._queue_type = queue_type

        self._channel: AbstractRobustChannel | None = None
        self._publisher: ConfirmPublisher | None = None
        self._router: Router | None = None
        self._acker: _Acker | None = None
        self._queue_name = self._queue.name
        self._consumer_tag: str | None = None
        self._slots = asyncio.Semaphore(concurrency) if prefetch > concurrency else None
        self._executor: Executor | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._delay_levels: set[int] = set()
        self._background: set[asyncio.Future[Any]] = set()
        self._resuming: asyncio.Future[None] | None = None
        self._started = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._hurry = asyncio.Event()
        self._processed = 0
        self._deliveries = 0
        self._failed = 0
        self._retried = 0
        self._dead_lettered = 0

    def __repr__(self) -> str:
        where = redact_url(self._url) if self._url else "shared connection"
        return f"<Worker queue={self._queue_name!r} {where} concurrency={self._concurrency}>"

    @property
    def queue_name(self) -> str:
        """The queue consumed (the broker's name for a server-named queue)."""
        return self._queue_name

    @property
    def state(self) -> WorkerState:
        """Connected, consuming, in flight, and the counters since start."""
        channel = self._acker.channel if self._acker else None
        connected = bool(
            self._connection is not None
            and not self._connection.is_closed
            and channel is not None
            and not channel.is_closed
        )
        return WorkerState(
            queue=self._queue_name,
            connected=connected,
            consuming=connected and self._consumer_tag is not None and not self._stopping,
            in_flight=len(self._tasks),
            processed=self._processed,
            failed=self._failed,
            retried=self._retried,
            dead_lettered=self._dead_lettered,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def run(self) -> None:
        """Consume until `stop()` is called or this task is cancelled (then stops gracefully)."""
        await self.start()
        try:
            await self._stopped.wait()
        except asyncio.CancelledError:
            await self.stop()
            raise

    async def start(self) -> None:
        """Connect, declare the queues, and start consuming in the background."""
        if self._started:
            return
        self._started = True
        try:
            await self._open()
        except BaseException:
            await self._teardown()
            task = asyncio.current_task()
            if self._stopping and task is not None and not task.cancelling():
                return  # stop() was called while starting: nothing is left running
            raise
        if self._stopping:  # stop() ran while we were starting: undo what we opened
            await self._cancel_consumer()
            await self._teardown()
            return
        assert self._channel is not None
        self._channel.reopen_callbacks.add(self._on_reopen)
        if self._is_async:
            self._spawn(self._watch_loop())
        log.info("worker consuming %r (concurrency %d)", self._queue_name, self._concurrency)

    async def _open(self) -> None:
        if self._connection is None:
            self._connection = await connect(
                self._url, name=self._name or f"aio-workq worker {self._queue.name}"
            )
        with translate_errors(f"opening a channel for worker {self._queue.name!r}"):
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._channel = channel
            self._router = Router(self._connection, self._queue_type)
            self._publisher = ConfirmPublisher(
                channel,
                window=max(1000, 4 * self._prefetch),
                timeout=30.0,
                resend=False,  # the upstream delivery is redelivered instead
            )
            await self._publisher.start()
        await self._setup()

    async def _setup(self) -> None:
        """Declare, bind, set QoS and consume on the current channel (also after a reopen)."""
        assert self._channel is not None and self._router is not None
        retries = self._retry is not None and not self._queue.server_named
        delays = self._retry.levels_ms() if self._retry is not None and retries else ()
        self._queue_name = await self._router.declare(self._queue, delays_ms=delays)
        self._delay_levels = set(delays)
        if self._exchange is not None:
            await self._bind()
        with translate_errors(f"consuming {self._queue_name!r}"):
            channel = await self._channel.get_underlay_channel()
            if self._acker is None or self._acker.channel is not channel:
                # A new channel: the old channel's deliveries are the broker's to redeliver.
                self._acker = _Acker(channel)
                channel.on_consumer_cancel_callbacks.add(self._on_consumer_cancelled)
                channel.closing.add_done_callback(self._on_channel_closed)
                demux = demux_of(channel.connection)
                if demux is not None:  # the lean path: deliveries skip aiormq's frame parsing
                    demux.attach(channel, on_delivery=self._on_delivery)
                await channel.basic_qos(prefetch_count=self._prefetch)
            ok = await channel.basic_consume(self._queue_name, self._on_message, no_ack=False)
        self._consumer_tag = ok.consumer_tag

    async def _bind(self) -> None:
        assert self._connection is not None
        exchange = self._exchange
        if isinstance(exchange, str):
            exchange = Exchange(exchange, passive=True)
        assert exchange is not None
        keys = self._binding_keys or (self._queue_name,)
        async with raw_channel(self._connection) as channel:
            await declare_exchange(channel, exchange)
            for key in keys:
                with translate_errors(f"binding {self._queue_name!r} to {exchange.name!r}"):
                    await channel.queue_bind(
                        self._queue_name, exchange.name, routing_key=key,
                        arguments=self._binding_arguments,
                    )  # fmt: skip

    def _on_channel_closed(self, closing: asyncio.Future[Any]) -> None:
        reason = None if closing.cancelled() else closing.exception()
        self._consumer_tag = None
        if reason is not None and not self._stopping:
            log.warning(
                "worker %r lost its channel (%s); unacked deliveries go back to the queue, "
                "consuming resumes when the channel reopens",
                self._queue_name,
                reason,
            )

    def _on_reopen(self, *_: Any) -> None:
        self._schedule_resume()

    def _on_consumer_cancelled(self, frame: Any) -> None:
        if not self._stopping:
            log.warning("the broker cancelled the consumer of %r; re-declaring", self._queue_name)
            self._consumer_tag = None
            self._schedule_resume()

    def _schedule_resume(self) -> None:
        if not self._stopping and (self._resuming is None or self._resuming.done()):
            self._resuming = asyncio.ensure_future(self._resume())
            self._background.add(self._resuming)
            self._resuming.add_done_callback(self._background.discard)

    async def _resume(self) -> None:
        delay = 0.2
        while not self._stopping:
            try:
                await self._setup()
            except Exception as exc:  # a background loop: log, back off, try again
                log.warning("worker %r can't resume yet (%s); retrying", self._queue_name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)
            else:
                log.info("worker %r consuming again", self._queue_name)
                return

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop consuming, let running handlers finish, and close.

        New deliveries stop at once. Handlers running get `timeout` seconds (default:
        `shutdown_timeout`) to finish and be acked; the rest are cancelled and their messages go
        back to the queue. Calling `stop(0)` while a stop is under way hurries it.
        """
        if self._stopping:
            if timeout == 0:
                self._hurry.set()
            await self._stopped.wait()
            return
        self._stopping = True
        timeout = self._shutdown_timeout if timeout is None else timeout
        try:
            if not self._queue.single_active_consumer:
                await self._cancel_consumer()
            # A single-active-consumer queue is not cancelled: the broker would make the next
            # consumer active before our unfinished deliveries are back in the queue, and order
            # would break. Closing the channel at the end returns them first, then hands over.
            await self._wait_for_handlers(timeout)
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=5)
            if self._acker is not None:
                self._acker.flush()
        finally:
            await self._teardown()
            self._stopped.set()

    async def _wait_for_handlers(self, timeout: float) -> None:
        """Wait until no handler runs, `timeout` passes, or `stop(0)` hurries the stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            while self._tasks and not hurry.done() and (left := deadline - loop.time()) > 0:
                await asyncio.wait(
                    {*self._tasks, hurry}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            hurry.cancel()

    async def _cancel_consumer(self) -> None:
        acker, tag = self._acker, self._consumer_tag
        if acker is None or tag is None or acker.channel.is_closed:
            return
        with contextlib.suppress(Exception):
            await acker.channel.basic_cancel(tag, timeout=5)

    async def _teardown(self) -> None:
        """Close what this worker opened; safe to call more than once."""
        for task in self._background:
            task.cancel()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.close(timeout=5)
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        connection = self._connection
        if self._owns_connection and connection is not None:
            self._connection = None
            await connection.close()

    # -- the hot path ---------------------------------------------------------------------

    def _on_delivery(self, delivery: Delivery) -> None:
        acker = self._acker
        if acker is None or acker.channel is not delivery.channel or acker.channel.is_closed:
            return  # from a channel closed or replaced: the broker redelivers it
        tag = delivery.delivery_tag
        acker.track(tag)
        self._deliveries += 1
        task = asyncio.ensure_future(self._process(Job(delivery, self), acker, tag))
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)

    async def _on_message(self, message: DeliveredMessage) -> None:
        """aiormq's consumer callback, used on a connection aio-workq did not open (no demux)."""
        self._on_delivery(Delivery.of(message))

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("worker %r failed to settle a message: %r", self._queue_name, exc)

    async def _process(self, job: Job, acker: _Acker, tag: int) -> None:
        slots = self._slots
        if slots is not None:
            await slots.acquire()
        try:
            if self._stopping:
                if not self._queue.single_active_consumer:
                    acker.nack(tag, requeue=True)
                # else: left unacked; closing the channel returns it in order (see stop())
                return
            try:
                result = await self._call(job)
            except Exception as exc:
                failure: BaseException | None = exc
            else:
                failure = None
        finally:
            if slots is not None:
                slots.release()
        if failure is None and job.links:
            failure = await _first_failure(job.links)
        if failure is None:
            if job.reply_to:
                await self._reply(job, result, None)
            acker.ack(tag)
            self._processed += 1
        else:
            await self._on_failure(job, acker, tag, failure)

    async def _call(self, job: Job) -> Any:
        if self._is_async:
            if self._handler_timeout is None:
                return await self._handler(job)
            async with asyncio.timeout(self._handler_timeout):
                return await self._handler(job)
        if self._executor is None:
            self._executor = self._make_executor()
        argument: Job | JobData = job.snapshot() if self._executor_kind == "process" else job
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._handler, argument)
        if self._handler_timeout is None:
            return await future
        async with asyncio.timeout(self._handler_timeout):
            return await future

    def _make_executor(self) -> Executor:
        if self._executor_kind == "process":
            context = multiprocessing.get_context("forkserver")
            return ProcessPoolExecutor(self._concurrency, mp_context=context)
        return ThreadPoolExecutor(self._concurrency, thread_name_prefix=f"workq-{self._queue.name}")

    # -- failures ---------------------------------------------------------------------------

    async def _on_failure(self, job: Job, acker: _Acker, tag: int, exc: BaseException) -> None:
        self._failed += 1
        if job.reply_to:
            # An RPC caller gets the error; retrying would answer a caller that gave up.
            await self._reply(job, None, exc)
            acker.ack(tag)
            return
        retry = self._retry
        attempt = job.attempt
        final = isinstance(exc, Reject) or retry is None or attempt >= retry.max_attempts
        if self._queue.server_named or (final and not self._queue.dead_letter):
            # No dead-letter queue (a subscriber queue, or dead_letter=False): say so loudly.
            log.error(
                "dropping message %s from %r after %d attempt(s): %r (the queue has no "
                "dead-letter queue)", job.message_id, self._queue_name, attempt, exc,
            )  # fmt: skip
            acker.nack(tag, requeue=False)
            return
        headers = {k: v for k, v in job.headers.items() if k not in BROKER_HEADERS}
        now = datetime.now(UTC).isoformat()
        headers.setdefault("x-workq-first-failure", now)
        headers["x-workq-last-failure"] = now
        headers["x-workq-exception-type"] = _qualname(exc)
        headers["x-workq-exception-message"] = str(exc)[:_ERROR_TEXT_LIMIT]
        target = self._queue_name
        try:
            target, expiration = await self._failure_target(job, exc, final, headers)
            await self._republish(job, target, headers, expiration)
        except (WorkqError, aiormq.exceptions.AMQPError) as error:
            log.error(
                "could not move failed message %s to %r (%s); returning it to the queue",
                job.message_id, target, error,
            )  # fmt: skip
            acker.nack(tag, requeue=True)
            return
        acker.ack(tag)
        if final:
            self._dead_lettered += 1
            log.warning(
                "message %s dead-lettered to %r after %d attempt(s): %s",
                job.message_id, target, attempt, headers["x-workq-exception-type"],
            )  # fmt: skip
        else:
            self._retried += 1

    async def _failure_target(
        self, job: Job, exc: BaseException, final: bool, headers: dict[str, Any]
    ) -> tuple[str, str | None]:
        """The queue a failed message moves to and its per-message TTL; adds reason headers."""
        if final:
            headers["x-workq-original-queue"] = self._queue_name
            headers["x-workq-attempts"] = job.attempt
            headers["x-workq-traceback"] = _traceback(exc)
            if isinstance(exc, Reject):
                headers["x-workq-rejected"] = True
            return self._queue.dead_letter_queue, None
        retry = self._retry
        assert retry is not None
        headers[ATTEMPT_HEADER] = job.attempt + 1
        requested = exc.delay if isinstance(exc, Retry) else None
        if requested == 0:
            return self._queue_name, None
        if requested is not None:
            level = retry.level_for(requested)
            await self._ensure_delay_level(level)
            return self._queue.delay_queue(level), None
        level = retry.delay_ms(job.attempt)
        await self._ensure_delay_level(level)
        return self._queue.delay_queue(level), str(retry.jittered_ms(level))

    async def _ensure_delay_level(self, level: int) -> None:
        if level in self._delay_levels:
            return
        assert self._router is not None
        await self._router.declare(self._queue, delays_ms=(level,))
        self._delay_levels.add(level)

    async def _republish(
        self, job: Job, target: str, headers: dict[str, Any], expiration: str | None
    ) -> None:
        assert self._publisher is not None
        original = job._delivery.properties
        props = Properties(
            message_id=original.message_id or "",
            content_type=original.content_type,
            headers=headers,
            priority=original.priority,
            correlation_id=original.correlation_id,
            reply_to=original.reply_to,
            expiration=expiration,
            timestamp=int(original.timestamp.timestamp()) if original.timestamp else None,
            type=original.message_type,
        )
        confirm = await self._publisher.send("", target, job.body, props, mandatory=True)
        await confirm

    async def _reply(self, job: Job, result: Any, error: BaseException | None) -> None:
        assert self._publisher is not None
        if error is None:
            try:
                body, content_type = encode_body(result)
            except WorkqError as exc:
                error = exc
        headers: dict[str, Any] = {"x-workq-status": "ok"}
        if error is not None:
            headers = {
                "x-workq-status": "error",
                "x-workq-exception-type": _qualname(error),
            }
            body, content_type = str(error)[:_ERROR_TEXT_LIMIT].encode(), "text/plain"
        props = make_properties(
            message_id=None,
            content_type=content_type,
            headers=headers,
            persistent=False,
            correlation_id=job.correlation_id,
        )
        try:
            # The caller may be gone: not mandatory, and a lost reply is the caller's timeout.
            await self._publisher.send("", job.reply_to or "", body, props, mandatory=False)
        except WorkqError as exc:
            log.warning("could not send the RPC reply to %s: %s", job.reply_to, exc)

    async def _forward(
        self,
        body: Any,
        queue: str | Queue | None,
        *,
        exchange: str | Exchange,
        routing_key: str | None,
        headers: Any,
        message_id: str | None,
    ) -> asyncio.Future[str]:
        assert self._publisher is not None and self._router is not None
        data, content_type = encode_body(body)
        target_exchange, key = await self._router.destination(queue, exchange, routing_key)
        props = make_properties(message_id=message_id, content_type=content_type, headers=headers)
        return await self._publisher.send(target_exchange, key, data, props)

    async def _watch_loop(self) -> None:
        """Log when a coroutine handler blocks the event loop (heartbeats stop meanwhile)."""
        loop = asyncio.get_running_loop()
        interval = 0.1
        while True:
            before, deliveries = loop.time(), self._deliveries
            await asyncio.sleep(interval)
            lag = loop.time() - before - interval
            # Blame the handler only if one ran meanwhile (it may have finished already).
            if lag > _BLOCKED_AFTER and (self._tasks or self._deliveries != deliveries):
                log.warning(
                    "handler %s of worker %r blocked the event loop for %.2f s; use a plain "
                    "def handler (run in a thread) or await instead of blocking",
                    _qualname(self._handler),
                    self._queue_name,
                    lag,
                )


async def _first_failure(links: list[asyncio.Future[str]]) -> BaseException | None:
    results = await asyncio.gather(*links, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            return result
    return None


def _qualname(obj: Any) -> str:
    """`module.Name` of a function or class, or of an instance's class."""
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    return f"{target.__module__}.{target.__qualname__}"


def _traceback(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(exc))
    return text[-_TRACEBACK_LIMIT:]
