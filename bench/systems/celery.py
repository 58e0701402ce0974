"""Celery (kombu + py-amqp), its worker embedded in-process with the threads pool.

Settings made equal: `broker_transport_options={"confirm_publish": True}` (each publish waits
for its confirm; the default is unconfirmed), `task_acks_late=True` (ack after the task; the
default acks before it), `worker_prefetch_multiplier=1` with `concurrency=100` threads, so the
prefetch is 100; `task_ignore_result=True` (no result backend). Queues are kombu `Queue`s,
durable, bound to a direct exchange of the same name (Celery's default routing), with
`x-queue-type=quorum` for quorum (Celery then switches to per-consumer QoS by itself); messages
are persistent (Celery's default). The worker is `celery.contrib.testing.worker.start_worker`
(a `WorkController` in a thread: no mingle, gossip or heartbeat) at WARNING log level, so its
per-task "received"/"succeeded" INFO lines are off, as for FastStream and taskiq.
- publish: `task.apply_async((body,))` from one thread, each waiting for its confirm (Celery
  has no pipelined publish).
- chain: the task calls `sink.apply_async((body,), queue=forward)` (confirmed; Celery's default
  producer pool of 10 connections shared by the 100 threads) and returns; the ack follows.
The body travels as a 100-character str argument in Celery's task protocol 2 (JSON).
"""

from __future__ import annotations

import contextlib
import logging
import uuid

from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu import Exchange, Queue
from kombu.serialization import dumps

from bench.systems._common import (
    Hook,
    Settings,
    ThreadedSystem,
    Wire,
    main,
    payload,
    persistent_properties,
    queue_arguments,
)

logging.getLogger("celery").setLevel(logging.WARNING)

TASK = "bench.noop"
SINK = "bench.sink"


def _queue(name: str, queue_type: str) -> Queue:
    return Queue(
        name,
        Exchange(name, type="direct", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments=queue_arguments(queue_type),
    )


class CelerySystem(ThreadedSystem):
    name = "celery"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._hook: Hook = lambda body: None
        self._worker: contextlib.ExitStack | None = None
        s = settings
        self._app = app = Celery("bench", broker=s.url, set_as_current=False)
        app.conf.update(
            broker_transport_options={"confirm_publish": True},
            broker_connection_retry_on_startup=True,
            task_acks_late=True,
            worker_prefetch_multiplier=1,
            task_ignore_result=True,
            task_default_queue=s.queue,
            task_queues=[_queue(s.queue, s.queue_type), _queue(s.forward_queue, s.queue_type)],
            worker_hijack_root_logger=False,
        )

        @app.task(name=SINK)
        def sink(body: str) -> None:
            """Never runs here: the forward queue is only published to."""

        chain, forward_queue = s.chain, s.forward_queue

        @app.task(name=TASK)
        def noop(body: str) -> None:
            if chain:
                sink.apply_async((body,), queue=forward_queue)
            self._hook(body)

        self._task = noop

    def wire(self, body: bytes) -> Wire:
        """Task protocol 2, as `apply_async` builds it."""
        task_id = str(uuid.uuid4())
        message = self._app.amqp.as_task_v2(task_id, TASK, args=(body.decode(),))
        content_type, encoding, data = dumps(message.body, serializer="json")
        properties = persistent_properties(
            content_type=content_type,
            content_encoding=encoding,
            headers=message.headers,
            correlation_id=task_id,
        )
        return Wire(data.encode() if isinstance(data, str) else data, properties)

    def setup_sync(self) -> None:
        s = self.settings
        with self._app.connection_for_write() as connection:
            for name in (s.queue, s.forward_queue) if s.chain else (s.queue,):
                _queue(name, s.queue_type)(connection.default_channel).declare()

    def publish_sync(self, n: int) -> None:
        apply_async, args = self._task.apply_async, (payload().decode(),)
        for _ in range(n):
            apply_async(args)

    def start_consumer_sync(self, hook: Hook) -> None:
        self._hook = hook
        stack = contextlib.ExitStack()
        stack.enter_context(
            start_worker(
                self._app,
                pool="threads",
                concurrency=self.settings.prefetch,
                loglevel="WARNING",
                perform_ping_check=False,
                shutdown_timeout=30,
                queues=[self.settings.queue],
            )
        )
        self._worker = stack

    def close_sync(self) -> None:
        if self._worker is not None:
            self._worker.close()
        self._app.close()


if __name__ == "__main__":
    main(CelerySystem)
