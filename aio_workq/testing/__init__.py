"""Testing your handlers: without a broker (`run_handler`), or against a throwaway one.

- `run_handler(handler, body, ...)` runs a handler on one message through the worker's own
  dispatch and failure routing, and returns its `Outcome`: acked, retried (with the delay),
  deferred, dead-lettered (with the reason), what it forwarded, its RPC reply.
- The pytest plugin (installed with the package, `-p no:aio_workq` turns it off) gives the
  session fixtures `workq_amqp_url` (a local RabbitMQ node started once per session, or
  `AIO_WORKQ_AMQP_URL`) and `workq_broker` (the node itself, to stop and start it).
- `run_worker(url, queue=, handler=, count=N)` and `wait_handled(worker, N)` run a real worker
  until it has handled N messages.
- `run_task(task.s(...))` runs a task of `aio_workq.jobs` on one job the same way (its
  arguments typed as `enqueue()`'s), and returns the status and result its worker would
  record (in a store in memory).
- `LocalBroker` starts and stops an isolated RabbitMQ node (Debian's `rabbitmq-server`).
"""

from __future__ import annotations

from ._broker import BrokerError as BrokerError
from ._broker import LocalBroker as LocalBroker
from ._kit import Forwarded as Forwarded
from ._kit import Outcome as Outcome
from ._kit import run_handler as run_handler
from ._kit import run_worker as run_worker
from ._kit import wait_handled as wait_handled
from ._tasks import TaskRun as TaskRun
from ._tasks import run_task as run_task

AMQP_URL_ENV = "AIO_WORKQ_AMQP_URL"

__all__ = [
    "AMQP_URL_ENV",
    "BrokerError",
    "Forwarded",
    "LocalBroker",
    "Outcome",
    "run_handler",
    "run_task",
    "run_worker",
    "TaskRun",
    "wait_handled",
]
