"""Raw aio-pika, used the way its documentation shows.

Settings: `connect_robust`, one channel (`publisher_confirms=True`, aio-pika's default);
`declare_queue(durable=True)` (quorum: `x-queue-type=quorum`); `Message(delivery_mode=PERSISTENT)`.
- publish: `default_exchange.publish` gathered in batches of 1,000 (up to 1,000 unconfirmed).
- consume: `set_qos(prefetch_count=100)`, `queue.consume(callback)`, the handler inside
  `async with message.process()` (ack on success, one settle per delivery).
- chain: inside `process()`, `default_exchange.publish` to the forward queue (awaits the confirm).
"""

from __future__ import annotations

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from bench.systems._common import (
    Hook,
    Settled,
    System,
    gather_batches,
    main,
    payload,
    queue_arguments,
)


class AioPika(System):
    name = "aiopika"

    _connection: AbstractRobustConnection
    _channel: AbstractChannel
    _queue: AbstractQueue
    _settled: Settled | None = None

    async def setup(self) -> None:
        s = self.settings
        self._connection = await aio_pika.connect_robust(s.url)
        self._channel = await self._connection.channel(publisher_confirms=True)
        arguments = queue_arguments(s.queue_type)
        self._queue = await self._channel.declare_queue(s.queue, durable=True, arguments=arguments)
        if s.chain:
            await self._channel.declare_queue(s.forward_queue, durable=True, arguments=arguments)

    @staticmethod
    def _message(body: bytes) -> aio_pika.Message:
        return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

    async def publish(self, n: int) -> None:
        exchange, queue, body = self._channel.default_exchange, self.settings.queue, payload()
        await gather_batches(n, lambda: exchange.publish(self._message(body), routing_key=queue))

    async def start_consumer(self, hook: Hook) -> None:
        exchange, forward_queue = self._channel.default_exchange, self.settings.forward_queue
        chain = self.settings.chain
        self._settled = settled = Settled(self.settings.n)

        async def on_message(message: AbstractIncomingMessage) -> None:
            async with message.process():
                if chain:
                    await exchange.publish(self._message(message.body), routing_key=forward_queue)
                hook(message.body)
            settled.add()

        await self._channel.set_qos(prefetch_count=self.settings.prefetch)
        await self._queue.consume(on_message)

    async def close(self) -> None:
        if self._settled is not None:
            await self._settled.wait()
        await self._connection.close()


if __name__ == "__main__":
    main(AioPika)
