"""Observability: JSON log lines that name the message, Prometheus metrics, and one trace.

Run it with a broker URL in AMQP_URL (needs `pip install 'aio-workq[prometheus,otel]'
opentelemetry-sdk`):
`AMQP_URL=amqp://guest:guest@localhost:5672/ python docs/examples/observability.py`.
It declares two fresh queues, finishes within seconds and deletes what it declared.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import aio_workq
from aio_workq import Job, MessageFields, Producer, Queue, RetryPolicy, Worker
from aio_workq.metrics import PrometheusHook, render
from aio_workq.tracing import TracingHook

URL = os.environ.get("AMQP_URL")  # None: RABBITMQ_* variables, else amqp://guest:guest@localhost/
ORDERS = f"docs-orders-{uuid.uuid4().hex[:8]}"
EMAILS = f"docs-emails-{uuid.uuid4().hex[:8]}"
POLICY = RetryPolicy(max_attempts=3, initial_delay=0.2, jitter=0.0)


# --8<-- [start:logging]
class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the message fields when the line is about a message."""

    FIELDS = ("queue", "message_id", "attempt")

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({key: record.__dict__[key] for key in self.FIELDS if key in record.__dict__})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(MessageFields())  # your handlers' lines get the fields too
    logging.basicConfig(level=logging.INFO, handlers=[handler])


# --8<-- [end:logging]

log = logging.getLogger("shop")


async def main() -> None:
    # --8<-- [start:hooks]
    exporter = InMemorySpanExporter()  # in production: an OTLP exporter, BatchSpanProcessor
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hooks = [PrometheusHook(), TracingHook(tracer_provider=provider)]
    # --8<-- [end:hooks]
    sent = asyncio.Event()

    async def take_order(job: Job) -> None:
        log.info("taking order %s", job.data["order"])
        if job.attempt == 1:
            raise ConnectionError("the payment service timed out")  # retried in 0.2 s
        await job.forward({"to": "ada@example.com"}, queue=EMAILS)

    async def send_email(job: Job) -> None:
        log.info("emailing %s", job.data["to"])
        sent.set()

    async with Producer(URL, hooks=hooks) as producer:
        orders = Worker(URL, queue=ORDERS, handler=take_order, retry=POLICY, hooks=hooks)
        emails = Worker(URL, queue=EMAILS, handler=send_email, hooks=hooks)
        async with orders, emails:
            with provider.get_tracer("shop").start_as_current_span("POST /orders"):
                await producer.publish({"order": 42}, queue=ORDERS)
            await sent.wait()

    for line in render().decode().splitlines():
        if line.startswith("aio_workq_handled_total"):
            print(line)
    spans = exporter.get_finished_spans()
    print(f"{len({s.context.trace_id for s in spans if s.context})} trace, {len(spans)} spans:")
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        print(f"  {span.name}")


async def delete_queues() -> None:
    """Delete the queues this example declared: the work queues, their .dlq and delay queues."""
    names = []
    for name, policy in ((ORDERS, POLICY), (EMAILS, RetryPolicy())):  # each worker's policy
        queue = Queue(name)
        names += [name, queue.dead_letter_queue]
        names += [queue.delay_queue(ms) for ms in policy.levels_ms()]
    async with await aio_workq.connect(URL) as connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)


async def run() -> None:
    try:
        async with asyncio.timeout(30):
            await main()
    finally:
        await delete_queues()


if __name__ == "__main__":
    setup_logging()
    asyncio.run(run())
