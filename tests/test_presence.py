"""Worker presence: beats over the `workq.presence` exchange, and the watcher that reads them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest

import aio_workq
from aio_workq import ConfigurationError, Job, PresenceWatcher, WorkerBeat, WorkerPresence

INTERVAL = 0.5


def _beat(**changes: Any) -> WorkerBeat:
    fields: dict[str, Any] = {
        "id": "h:1:abc",
        "host": "h",
        "pid": 1,
        "queues": ("q",),
        "concurrency": 2,
        "in_flight": 0,
        "handled": 3,
        "failed": 1,
        "started_at": 100.0,
        "sent_at": 105.5,
        "version": aio_workq.__version__,
        "interval": 5.0,
        "stopping": False,
    }
    fields.update(changes)
    return WorkerBeat(**fields)


def of_queue(queue: str) -> Callable[[list[WorkerPresence]], list[WorkerPresence]]:
    def pick(workers: list[WorkerPresence]) -> list[WorkerPresence]:
        return [w for w in workers if queue in w.beat.queues]

    return pick


# --- offline ------------------------------------------------------------------------------


def test_a_beat_round_trips_through_json_with_its_version() -> None:
    beat = _beat()
    body = beat.encode()
    assert json.loads(body)["v"] == 1
    assert WorkerBeat.decode(body) == beat


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"id": "x"}',
        json.dumps({**json.loads(_beat().encode()), "v": None}).encode(),
        json.dumps({**json.loads(_beat().encode()), "pid": "12"}).encode(),
        json.dumps({**json.loads(_beat().encode()), "queues": [1]}).encode(),
        json.dumps({**json.loads(_beat().encode()), "interval": 0}).encode(),
        json.dumps({**json.loads(_beat().encode()), "stopping": 1}).encode(),
        b"{" + b" " * 70_000 + b"}",
    ],
)
def test_a_message_that_is_not_a_beat_raises_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        WorkerBeat.decode(body)


def test_fields_of_a_later_format_are_ignored() -> None:
    data = {**json.loads(_beat().encode()), "v": 2, "new": {"x": 1}}
    assert WorkerBeat.decode(json.dumps(data).encode()) == _beat()


@pytest.mark.parametrize("interval", [0, -1, float("nan"), float("inf"), "5", True])
def test_a_bad_presence_interval_is_refused_by_name(interval: Any) -> None:
    async def handler(job: Job) -> None:
        pass

    with pytest.raises(ConfigurationError, match="presence_interval"):
        aio_workq.Worker("amqp://localhost/", queue="q", handler=handler,
                         presence_interval=interval)  # fmt: skip


def test_bad_watcher_settings_are_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match="gone_after"):
        PresenceWatcher("amqp://localhost/", gone_after=0)
    with pytest.raises(ConfigurationError, match="forget_after"):
        PresenceWatcher("amqp://localhost/", forget_after=-1)


# --- on the broker ------------------------------------------------------------------------


async def _noop(job: Job) -> None:
    if job.data == "fail":
        raise RuntimeError("fails on purpose")


@pytest.mark.broker
async def test_a_worker_appears_with_its_queue_and_concurrency(
    amqp_url: str, queue_name: str, make_worker: Callable[..., aio_workq.Worker]
) -> None:
    mine = of_queue(queue_name)
    async with PresenceWatcher(amqp_url) as watcher:
        worker = make_worker(queue=queue_name, handler=_noop, concurrency=3,
                             presence_interval=INTERVAL)  # fmt: skip
        await worker.start()
        found = mine(await watcher.wait_for(lambda ws: bool(mine(ws)), timeout=INTERVAL + 5))
    [seen] = found
    assert seen.alive
    assert seen.beat.queues == (queue_name,)
    assert seen.beat.concurrency == 3
    assert seen.beat.pid == os.getpid()
    assert seen.beat.version == aio_workq.__version__
    assert seen.beat.interval == INTERVAL
    assert not seen.beat.stopping


@pytest.mark.broker
async def test_handled_and_failed_counts_move(
    amqp_url: str,
    queue_name: str,
    make_worker: Callable[..., aio_workq.Worker],
    producer: aio_workq.Producer,
) -> None:
    mine = of_queue(queue_name)
    async with PresenceWatcher(amqp_url) as watcher:
        worker = make_worker(queue=queue_name, handler=_noop, retry=None,
                             presence_interval=INTERVAL)  # fmt: skip
        await worker.start()
        for body in ("ok", "ok", "fail"):
            await producer.publish(body, queue=queue_name)

        def counted(workers: list[WorkerPresence]) -> bool:
            return any(w.beat.handled == 3 and w.beat.failed == 1 for w in mine(workers))

        await watcher.wait_for(counted, timeout=20)


@pytest.mark.broker
async def test_a_worker_stopped_cleanly_is_gone_at_once(
    amqp_url: str, queue_name: str, make_worker: Callable[..., aio_workq.Worker]
) -> None:
    mine = of_queue(queue_name)
    async with PresenceWatcher(amqp_url, gone_after=60) as watcher:  # silence alone: too slow
        worker = make_worker(queue=queue_name, handler=_noop, presence_interval=INTERVAL)
        await worker.start()
        await watcher.wait_for(lambda ws: any(w.alive for w in mine(ws)), timeout=INTERVAL + 5)
        await worker.stop()
        [gone] = mine(await watcher.wait_for(lambda ws: not mine(ws)[0].alive, timeout=5))
    assert gone.beat.stopping


@pytest.mark.broker
async def test_presence_false_sends_no_beat(
    amqp_url: str, queue_name: str, make_worker: Callable[..., aio_workq.Worker]
) -> None:
    mine = of_queue(queue_name)
    other = f"{queue_name}-beating"
    async with PresenceWatcher(amqp_url) as watcher:
        quiet = make_worker(queue=queue_name, handler=_noop, presence=False)
        await quiet.start()
        beating = make_worker(queue=other, handler=_noop, presence_interval=INTERVAL)
        await beating.start()
        # Two beats of the other worker arrived: the quiet one, started first, sent none.
        await watcher.wait_for(
            lambda ws: any(w.beat.queues == (other,) and w.beat.sent_at > w.beat.started_at
                           + INTERVAL for w in ws), timeout=10,
        )  # fmt: skip
        assert not mine(watcher.workers())


@pytest.mark.broker
async def test_a_message_that_is_not_a_beat_is_skipped(
    amqp_url: str, queue_name: str, make_worker: Callable[..., aio_workq.Worker]
) -> None:
    mine = of_queue(queue_name)
    async with PresenceWatcher(amqp_url) as watcher:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange("workq.presence")
            for body in (b"not json", b"{}", b'{"v": 1, "id": 3}', b"\x00" * 10):
                await exchange.publish(aio_pika.Message(body), routing_key="")
        worker = make_worker(queue=queue_name, handler=_noop, presence_interval=INTERVAL)
        await worker.start()
        await watcher.wait_for(lambda ws: bool(mine(ws)), timeout=INTERVAL + 5)
