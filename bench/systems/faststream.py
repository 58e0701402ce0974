"""FastStream (`faststream[rabbit]`, on aio-pika), as its documentation shows it.

Settings made equal: `RabbitBroker(default_channel=Channel(prefetch_count=100))` (publisher
confirms are on by default: `Channel.publisher_confirms=True`); `RabbitQueue(durable=True)` with
`queue_type` CLASSIC or QUORUM; `broker.publish(..., persist=True)` (FastStream's default is
*not* persistent). The handler is `async def handle(body: bytes)` with FastStream's default
`REJECT_ON_ERROR` ack policy (ack after the handler) and its default FastDepends argument
validation. `logger=None` turns off its per-message "Received"/"Processed" INFO log lines: with
them on, consume ran about a quarter slower here (4,650 against 6,060 msg/s, 3 runs each).
- publish: `broker.publish` gathered in batches of 1,000 (up to 1,000 unconfirmed).
- chain: the handler awaits `broker.publish(body, forward_queue, persist=True)` (confirmed).
FastStream has no concurrency setting for RabbitMQ: aio-pika runs each delivery's handler in a
task of its own, so the prefetch (100) bounds the handlers in flight.
"""

from __future__ import annotations

import logging

from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue

from bench.systems._common import Hook, System, gather_batches, main, payload

logging.getLogger("faststream").setLevel(logging.WARNING)


class FastStream(System):
    name = "faststream"

    _broker: RabbitBroker

    def _queue(self, name: str) -> RabbitQueue:
        queue_type = QueueType.QUORUM if self.settings.queue_type == "quorum" else QueueType.CLASSIC
        queue: RabbitQueue = RabbitQueue(name, durable=True, queue_type=queue_type)  # type: ignore[call-overload]
        return queue

    async def setup(self) -> None:
        s = self.settings
        self._broker = RabbitBroker(
            s.url, default_channel=Channel(prefetch_count=s.prefetch), logger=None
        )
        await self._broker.connect()
        await self._broker.declare_queue(self._queue(s.queue))
        if s.chain:
            await self._broker.declare_queue(self._queue(s.forward_queue))

    async def publish(self, n: int) -> None:
        broker, queue, body = self._broker, self.settings.queue, payload()
        await gather_batches(n, lambda: broker.publish(body, queue=queue, persist=True))

    async def start_consumer(self, hook: Hook) -> None:
        broker, forward_queue, chain = (
            self._broker,
            self.settings.forward_queue,
            self.settings.chain,
        )

        @broker.subscriber(self._queue(self.settings.queue))
        async def handle(body: bytes) -> None:
            if chain:
                await broker.publish(body, queue=forward_queue, persist=True)
            hook(body)

        await broker.start()

    async def close(self) -> None:
        await self._broker.stop()


if __name__ == "__main__":
    main(FastStream)
