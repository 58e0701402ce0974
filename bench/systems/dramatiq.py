"""Dramatiq with its RabbitMQ broker (pika), the worker run in-process with threads.

Settings made equal: `RabbitmqBroker(confirm_delivery=True)` (the default is off: publishes
unconfirmed); queues are durable and messages persistent (Dramatiq's defaults); for quorum a
subclass adds `x-queue-type=quorum` to the arguments Dramatiq declares its queue with (Dramatiq has
no setting for it). `Worker(worker_threads=100)` with `queue_prefetch=100` (the default would be
2 x threads), consuming only the work queue (not its delay queue). Default middleware (AgeLimit,
TimeLimit, ShutdownNotifications, Callbacks, Pipelines, Retries); acks after the actor returns.
- publish: `actor.send(body)` from one thread; with confirms on, pika's BlockingChannel waits for
  each confirm before the next publish (Dramatiq has no pipelined publish).
- chain: the actor calls `sink.send(body)` (confirmed, on its worker thread's own connection,
  opened on first use) and returns; the upstream ack follows.
The body travels as a 100-character str argument in Dramatiq's JSON message.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

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

logging.getLogger("dramatiq").setLevel(logging.WARNING)


class _Broker(RabbitmqBroker):
    """Dramatiq's broker, declaring its queues with the queue type under test."""

    queue_type = "classic"

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = super()._build_queue_arguments(queue_name)  # type: ignore[no-untyped-call]
        return {**arguments, **queue_arguments(self.queue_type)}


class Dramatiq(ThreadedSystem):
    name = "dramatiq"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._hook: Hook = lambda body: None
        self._broker = _Broker(url=settings.url, confirm_delivery=True)
        self._broker.queue_type = settings.queue_type
        self._worker: dramatiq.Worker | None = None

        def sink(body: str) -> None:
            """Never runs here: the forward queue is only published to."""

        self._sink = dramatiq.actor(
            actor_name="bench_sink", queue_name=settings.forward_queue, broker=self._broker
        )(sink)
        chain = settings.chain

        def noop(body: str) -> None:
            if chain:
                self._sink.send(body)
            self._hook(body)

        self._actor = dramatiq.actor(
            actor_name="bench_noop", queue_name=settings.queue, broker=self._broker
        )(noop)

    def wire(self, body: bytes) -> Wire:
        message = self._actor.message(body.decode())
        return Wire(message.encode(), persistent_properties())

    def setup_sync(self) -> None:
        self._broker.declare_queue(self.settings.queue, ensure=True)
        if self.settings.chain:
            self._broker.declare_queue(self.settings.forward_queue, ensure=True)

    def publish_sync(self, n: int) -> None:
        send, body = self._actor.send, payload().decode()
        for _ in range(n):
            send(body)

    def start_consumer_sync(self, hook: Hook) -> None:
        self._hook = hook
        worker = dramatiq.Worker(
            self._broker, queues={self.settings.queue}, worker_threads=self.settings.prefetch
        )
        worker.queue_prefetch = self.settings.prefetch
        worker.start()
        self._worker = worker

    def close_sync(self) -> None:
        if self._worker is not None:
            self._worker.stop(timeout=10_000)
        self._broker.close()


if __name__ == "__main__":
    main(Dramatiq)
