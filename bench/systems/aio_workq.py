"""aio-workq, this project, with its defaults except where the bench makes settings equal.

Settings: `Producer(queue_type=…)` and `Worker(queue_type=…, concurrency=100, prefetch=100)`;
everything else is the library's default (persistent messages, confirms always on, mandatory
publishes, a window of 10,000 unconfirmed messages or 64 MiB, its retry policy and dead-letter
queue). The queues are declared by the library (`Producer.declare`), with whatever arguments
it gives its work queues.
- publish: `producer.publish_many([body] * n)`: pipelined within the window, returns once every
  message is confirmed.
- consume: a `Worker` whose handler does nothing; the library acks.
- chain: the handler calls `job.send(body, queue=forward)` (in older commits the same call was
  `job.forward`), which ties the upstream ack to the downstream confirm; the message counts as
  done when that confirm arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from aio_workq import Job, Producer, Worker
from bench.systems._common import Hook, System, Wire, main, payload, persistent_properties


class AioWorkq(System):
    name = "aio_workq"
    channels = 1
    """`Producer(channels=…)`; passed only when not 1 (older commits have no such argument)."""
    widen = 1
    """The worker's concurrency and prefetch: the bench's `--prefetch` times this."""

    _producer: Producer
    _stack: contextlib.AsyncExitStack

    def wire(self, body: bytes) -> Wire:
        """As `Producer.send(bytes)` puts it on the wire: raw body, a fresh message id."""
        return Wire(body, persistent_properties(message_id=uuid.uuid4().hex))

    async def setup(self) -> None:
        s = self.settings
        self._stack = contextlib.AsyncExitStack()
        wide: dict[str, Any] = {"channels": self.channels} if self.channels != 1 else {}
        producer = Producer(s.url, queue_type=s.queue_type, **wide)
        self._producer = await self._stack.enter_async_context(producer)
        await self._producer.declare(s.queue)
        if s.chain:
            await self._producer.declare(s.forward_queue)

    async def publish(self, n: int) -> None:
        await self._producer.publish_many([payload()] * n, queue=self.settings.queue)

    async def start_consumer(self, hook: Hook) -> None:
        s = self.settings

        async def handle(job: Job) -> None:
            hook(job.body)

        # `Job.send` (returns the confirm future) was `Job.forward` before it was renamed; the
        # bench measures older commits too (`python -m bench --against REV`). Chosen once.
        send = getattr(Job, "send" if "send" in vars(Job) else "forward")

        async def handle_chain(job: Job) -> None:
            body = job.body
            confirm = await send(job, body, queue=s.forward_queue)

            def confirmed(future: asyncio.Future[str]) -> None:
                if not future.cancelled() and future.exception() is None:
                    hook(body)

            confirm.add_done_callback(confirmed)

        worker = Worker(
            s.url,
            queue=s.queue,
            handler=handle_chain if s.chain else handle,
            queue_type=s.queue_type,
            concurrency=s.prefetch * self.widen,
            prefetch=s.prefetch * self.widen,
        )
        await self._stack.enter_async_context(worker)

    async def close(self) -> None:
        await self._stack.aclose()  # the worker first (settles in-flight jobs), then the producer


if __name__ == "__main__":
    main(AioWorkq)
