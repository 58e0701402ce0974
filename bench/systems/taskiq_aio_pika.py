"""taskiq with taskiq-aio-pika, its worker run in-process the way `taskiq worker` runs it.

Settings made equal: `AioPikaBroker(qos=100)` with one task queue
`Queue(name, type=CLASSIC|QUORUM)` (durable; taskiq-aio-pika's default type is quorum) and a
per-run dead-letter queue of the same type; messages are persistent and its write channel has
publisher confirms on (aio-pika's default); it publishes through its `taskiq` topic exchange.
The worker is taskiq's own `Receiver`, with the `taskiq worker` defaults: `max_async_tasks=100`,
`max_prefetch=0`, ack `WHEN_SAVED` (after the task, no result backend). Its per-task INFO log
line ("Executing task …") is off (WARNING level), as for FastStream.
- publish: `task.kiq(body)` gathered in batches of 1,000 (up to 1,000 unconfirmed).
- chain: the task awaits `sink.kiq(body)` on a second, publish-only broker whose task queue is
  the forward queue (one broker would also consume it); the upstream ack comes after the task.
The body travels as a 100-character str argument inside taskiq's JSON envelope.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from taskiq import AsyncTaskiqDecoratedTask
from taskiq.receiver import Receiver
from taskiq_aio_pika import AioPikaBroker, Queue, QueueType

from bench.systems._common import (
    Hook,
    Settings,
    System,
    Wire,
    gather_batches,
    main,
    payload,
    persistent_properties,
)

logging.getLogger("taskiq").setLevel(logging.WARNING)

TASK = "bench.noop"
SINK = "bench.sink"


class TaskiqAioPika(System):
    name = "taskiq_aio_pika"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        s = settings
        self._hook: Hook = lambda body: None
        self._broker = self._make_broker(s.queue)
        self._sink_broker = self._make_broker(s.forward_queue) if s.chain else None
        self._listener: asyncio.Task[None] | None = None
        self._finish = asyncio.Event()
        self._sink: AsyncTaskiqDecoratedTask[[str], Any] | None = None
        if self._sink_broker is not None:

            @self._sink_broker.task(task_name=SINK)
            async def sink(body: str) -> None:
                """Never runs here: the forward queue is only published to."""

            self._sink = sink

        @self._broker.task(task_name=TASK)
        async def noop(body: str) -> None:
            if self._sink is not None:
                await self._sink.kiq(body)
            self._hook(body)

        self._task = noop

    def _make_broker(self, queue: str) -> AioPikaBroker:
        queue_type = QueueType(self.settings.queue_type)
        return AioPikaBroker(
            self.settings.url,
            qos=self.settings.prefetch,
            task_queues=[Queue(name=queue, type=queue_type)],
            dead_letter_queue=Queue(name=f"{self.settings.queue}.dlq", type=queue_type),
        )

    def wire(self, body: bytes) -> Wire:
        """As `AioPikaBroker.kick` sends it: taskiq's JSON envelope, task id and name in headers."""
        message = self._broker.formatter.dumps(self._task.kicker()._prepare_message(body.decode()))
        headers: dict[str, object] = {
            "task_id": message.task_id,
            "task_name": message.task_name,
            **message.labels,
        }
        return Wire(message.message, persistent_properties(headers=headers))

    async def setup(self) -> None:
        if self.settings.workload != "publish":
            self._broker.is_worker_process = True
        await self._broker.startup()
        if self._sink_broker is not None:
            await self._sink_broker.startup()

    async def publish(self, n: int) -> None:
        task, body = self._task, payload().decode()
        await gather_batches(n, lambda: task.kiq(body))

    async def start_consumer(self, hook: Hook) -> None:
        self._hook = hook
        receiver = Receiver(
            self._broker, max_async_tasks=self.settings.prefetch, max_prefetch=0, run_startup=False
        )
        self._listener = asyncio.create_task(receiver.listen(self._finish))

    async def close(self) -> None:
        self._finish.set()
        if self._listener is not None:
            await self._listener
        await self._broker.shutdown()
        if self._sink_broker is not None:
            await self._sink_broker.shutdown()


if __name__ == "__main__":
    main(TaskiqAioPika)
