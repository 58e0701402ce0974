"""lapinmq (on pika): its asynchronous Publisher and its threaded Consumer.

lapinmq reads the broker's address from RABBITMQ_HOST / RABBITMQ_PORT / RABBITMQ_USERNAME /
RABBITMQ_PASSWORD, set here from `--url`. It declares no named queue, so `setup` declares it
with pika (durable; `x-queue-type=quorum` for quorum). Its messages are persistent and
published `mandatory`, its publisher always has confirms on.
- publish: `Publisher("async")` (pika `SelectConnection` in a thread of its own), every
  message handed over at once (lapinmq has no window), each confirm counted by its ack
  callback.
- consume: `Consumer(worker_threads=100)`; lapinmq's prefetch is its thread count, so 100. The
  task function returns `MessageStatus.SUCCESS`; the ack goes back through the connection's
  thread.
- chain: the task publishes with the async publisher and returns `HANDLED_VIA_CALLBACK`; the
  publisher's ack callback acks upstream (lapinmq's documented way to chain).
lapinmq `print`s every message several times (send, confirm, receive, process); that is
silenced (its modules' `print` shadowed), like the per-message logging of FastStream, taskiq and
Celery. `lapinmq_sync` is the same module with the synchronous publisher.
"""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import unquote, urlsplit

import lapinmq.consumer
import lapinmq.publisher
import lapinmq.utils
import pika
from lapinmq.consumer import Consumer
from lapinmq.message import InMemoryMessage, MessageStatus
from lapinmq.publisher import Publisher

from bench.systems._common import (
    Hook,
    Settings,
    ThreadedSystem,
    main,
    payload,
    queue_arguments,
)


def _quiet(*args: Any, **kwargs: Any) -> None:
    """Stands in for `print` in lapinmq's modules."""


for _module in (lapinmq.consumer, lapinmq.publisher, lapinmq.utils):
    _module.print = _quiet


def _configure(url: str) -> None:
    parts = urlsplit(url)
    os.environ.update(
        RABBITMQ_HOST=parts.hostname or "localhost",
        RABBITMQ_PORT=str(parts.port or 5672),
        RABBITMQ_USERNAME=unquote(parts.username or "guest"),
        RABBITMQ_PASSWORD=unquote(parts.password or "guest"),
    )


class Lapinmq(ThreadedSystem):
    name = "lapinmq"
    publisher_kind = "async"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        _configure(settings.url)
        self._publisher: Publisher | None = None
        self._consumer: Consumer | None = None

    def setup_sync(self) -> None:
        s = self.settings
        connection = pika.BlockingConnection(pika.URLParameters(s.url))
        try:
            channel = connection.channel()
            for name in (s.queue, s.forward_queue) if s.chain else (s.queue,):
                channel.queue_declare(name, durable=True, arguments=queue_arguments(s.queue_type))
        finally:
            connection.close()
        if s.workload in ("publish", "chain"):
            self._publisher = Publisher(self.publisher_kind)
            self._publisher.start()

    def publish_sync(self, n: int) -> None:
        assert self._publisher is not None
        send, queue, body = self._publisher.send_message_to_queue, self.settings.queue, payload()
        confirmed = threading.Semaphore(0)
        callbacks = {"ack_callback": confirmed.release}
        for _ in range(n):
            send(queue, body, callbacks=callbacks)
        for _ in range(n):
            confirmed.acquire()

    def start_consumer_sync(self, hook: Hook) -> None:
        publisher, forward_queue = self._publisher, self.settings.forward_queue

        def task(message: InMemoryMessage) -> MessageStatus:
            if publisher is None:
                hook(message.body)
                return MessageStatus.SUCCESS

            def confirmed() -> None:
                message.ack()
                hook(message.body)

            publisher.send_message_to_queue(
                forward_queue, message.body, callbacks={"ack_callback": confirmed}
            )
            return MessageStatus.HANDLED_VIA_CALLBACK

        self._consumer = Consumer(self.settings.queue, task, worker_threads=self.settings.prefetch)
        self._consumer.start()

    def close_sync(self) -> None:
        if self._consumer is not None:
            self._consumer.stop()
        if self._publisher is not None:
            self._publisher.stop()


if __name__ == "__main__":
    main(Lapinmq)
