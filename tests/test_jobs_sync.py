"""Tasks from synchronous code: binding a registry to a `SyncProducer` (what a Django or Flask
user reaches for) is refused when bound, naming what works (`producer.enqueue(task, ...)`,
tests/test_sync_tasks.py), not at the first enqueue with a bare TypeError."""

from __future__ import annotations

import pytest

from aio_workq import ConfigurationError
from aio_workq.jobs import MemoryStore, Tasks
from aio_workq.sync import SyncProducer


def test_binding_tasks_to_a_sync_producer_is_refused_naming_the_fix() -> None:
    tasks = Tasks(store=MemoryStore())
    producer = SyncProducer("amqp://guest:s3cret-pass@127.0.0.1:1/")  # connects on first use
    try:
        with pytest.raises(ConfigurationError) as caught:
            tasks.bind(producer)  # type: ignore[arg-type]
        message = str(caught.value)
        assert "SyncProducer" in message and "async" in message and "s3cret" not in message
        assert "docs/guides/web-apps.md#tasks-from-sync-code" in message
        assert "producer.enqueue(task" in message  # what works instead
    finally:
        producer.close()
