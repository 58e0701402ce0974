"""Raw aiormq: the baseline every ratio is taken against.

Settings: one connection, one channel with publisher confirms; queues durable (classic: no
arguments; quorum: `x-queue-type=quorum`); delivery mode 2 (persistent).
- publish: `basic_publish` gathered in batches of 1,000 (up to 1,000 unconfirmed).
- consume: `basic_qos(prefetch_count=100)`, `basic_consume`, one `basic_ack` per message after the
  handler (aiormq runs each delivery's callback in a task of its own).
- chain: the handler `basic_publish`es to the forward queue on the same channel, awaits the
  confirm, then acks upstream.
"""

from __future__ import annotations

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage

from bench.systems._common import (
    Hook,
    Settled,
    System,
    gather_batches,
    main,
    payload,
    persistent_properties,
    queue_arguments,
)


class AiormqRaw(System):
    name = "aiormq_raw"

    _connection: AbstractConnection
    _channel: AbstractChannel
    _settled: Settled | None = None

    async def setup(self) -> None:
        s = self.settings
        self._connection = await aiormq.connect(s.url)
        self._channel = await self._connection.channel(publisher_confirms=True)
        for queue in (s.queue, s.forward_queue) if s.chain else (s.queue,):
            await self._channel.queue_declare(
                queue, durable=True, arguments=queue_arguments(s.queue_type)
            )

    async def publish(self, n: int) -> None:
        body, properties, queue = payload(), persistent_properties(), self.settings.queue
        channel = self._channel
        await gather_batches(
            n, lambda: channel.basic_publish(body, routing_key=queue, properties=properties)
        )

    async def start_consumer(self, hook: Hook) -> None:
        channel = self._channel
        properties = persistent_properties()
        forward_queue = self.settings.forward_queue
        self._settled = settled = Settled(self.settings.n)

        async def on_message(message: DeliveredMessage) -> None:
            hook(message.body)
            await channel.basic_ack(message.delivery_tag)  # type: ignore[arg-type]
            settled.add()

        async def on_message_chain(message: DeliveredMessage) -> None:
            await channel.basic_publish(
                message.body, routing_key=forward_queue, properties=properties
            )
            hook(message.body)
            await channel.basic_ack(message.delivery_tag)  # type: ignore[arg-type]
            settled.add()

        await channel.basic_qos(prefetch_count=self.settings.prefetch)
        await channel.basic_consume(
            self.settings.queue, on_message_chain if self.settings.chain else on_message
        )

    async def close(self) -> None:
        if self._settled is not None:
            await self._settled.wait()
        await self._connection.close()


if __name__ == "__main__":
    main(AiormqRaw)
