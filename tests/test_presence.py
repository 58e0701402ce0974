"""Worker presence: beats over the `workq.presence` exchange, and the watcher that reads them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aio_pika
import pytest
from aiohttp import web
from fastapi import FastAPI

import aio_workq
from aio_workq import ConfigurationError, Job, PresenceWatcher, WorkerBeat, WorkerPresence
from aio_workq import aiohttp as workq_aiohttp
from aio_workq import fastapi as workq_fastapi
from aio_workq.testing import LocalBroker
from tests.helpers import Counter, connection_names, wait_until
from tests.servers import serve_aiohttp, serve_asgi
from tests.test_cli import cli

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


async def wait_for_records(caplog: pytest.LogCaptureFixture, text: str, count: int) -> None:
    """Wait until `count` log records contain `text` (told by a handler as they are logged)."""
    logged = asyncio.Event()

    class Tell(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.set()

    def seen() -> int:
        return len([r for r in caplog.records if text in r.getMessage()])

    tell = Tell()
    logging.getLogger("aio_workq").addHandler(tell)
    try:
        async with asyncio.timeout(20):
            while seen() < count:
                logged.clear()
                await logged.wait()
    finally:
        logging.getLogger("aio_workq").removeHandler(tell)


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
        b"[" * 60_000,
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


# --- processes ----------------------------------------------------------------------------


@pytest.fixture
def env(amqp_url: str, queue_name: str) -> dict[str, str]:
    return {
        **os.environ,
        "AMQP_URL": amqp_url,
        "PRESENCE_TEST_QUEUE": queue_name,
        "PYTHONUNBUFFERED": "1",
    }


@pytest.mark.broker
async def test_a_worker_killed_is_gone_after_three_intervals(
    amqp_url: str, queue_name: str, env: dict[str, str]
) -> None:
    mine = of_queue(queue_name)
    async with PresenceWatcher(amqp_url) as watcher:
        async with cli("worker", "tests.presence_app:workers", env=env) as proc:
            [seen] = mine(await watcher.wait_for(lambda ws: bool(mine(ws)), timeout=20))
            assert seen.beat.pid == proc.proc.pid and seen.beat.interval == INTERVAL
            proc.proc.kill()  # -9: no goodbye
            await proc.proc.wait()
        killed = time.time()
        [gone] = mine(await watcher.wait_for(lambda ws: not mine(ws)[0].alive, timeout=10))
    assert not gone.beat.stopping
    # Gone 3 intervals after its last beat (sent at most one interval before the kill).
    assert time.time() - killed >= 3 * INTERVAL - INTERVAL - 0.1


@pytest.mark.broker
async def test_processes_2_shows_two_pids(
    amqp_url: str, queue_name: str, env: dict[str, str]
) -> None:
    mine = of_queue(queue_name)
    async with PresenceWatcher(amqp_url) as watcher:
        args = ("worker", "tests.presence_app:workers", "--processes", "2")
        async with cli(*args, env=env) as supervisor:
            found = await watcher.wait_for(
                lambda ws: len({w.beat.pid for w in mine(ws) if w.alive}) == 2, timeout=30
            )
            pids = {w.beat.pid for w in mine(found)}
            assert supervisor.proc.pid not in pids  # the children beat, not the supervisor
            supervisor.proc.send_signal(signal.SIGTERM)
            assert await supervisor.exit_code() == 0
        # Both said goodbye on their clean stop.
        await watcher.wait_for(lambda ws: not any(w.alive for w in mine(ws)), timeout=5)


# --- a broker that refuses the beats --------------------------------------------------------


@pytest.fixture
def vhost(local_broker: LocalBroker) -> Iterator[tuple[LocalBroker, str]]:
    """A vhost of its own (its exchanges don't disturb other tests'), guest allowed all."""
    name = f"presence-{uuid.uuid4().hex[:8]}"
    local_broker.ctl("add_vhost", name)
    local_broker.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield local_broker, name
    local_broker.ctl("delete_vhost", name)


async def _declare_exchange(url: str, kind: aio_pika.ExchangeType) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange("workq.presence", kind, durable=True)


async def _keeps_working(url: str, queue: str, caplog: pytest.LogCaptureFixture) -> None:
    """A worker on `url` handles messages and stops in time although its beats fail; the
    failure is logged once, as a warning."""
    counter = Counter()

    async def handler(job: Job) -> None:
        counter.add(job.data)

    caplog.set_level(logging.DEBUG, logger="aio_workq")
    worker = aio_workq.Worker(url, queue=queue, handler=handler, presence_interval=0.2)
    await worker.start()
    try:
        async with aio_workq.Producer(url) as producer:
            for n in range(20):
                await producer.publish(n, queue=queue)
            await counter.wait_for(20, timeout=20)
            # More beats fail meanwhile (0.2 s each); one warning says so.
            await wait_for_records(caplog, "presence beat failed again", count=3)
    finally:
        began = time.monotonic()
        await worker.stop()
        took = time.monotonic() - began
    assert took < 3, f"stop() took {took:.1f} s"
    warnings = [r for r in caplog.records if "could not send its presence beat" in r.message]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert worker.state.processed == 20


@pytest.mark.broker
async def test_an_exchange_of_another_type_does_not_stop_the_worker(
    vhost: tuple[LocalBroker, str], queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker, name = vhost
    url = f"amqp://guest:guest@127.0.0.1:{broker.amqp_port}/{name}"
    await _declare_exchange(url, aio_pika.ExchangeType.DIRECT)
    await _keeps_working(url, queue_name, caplog)
    warning = next(r for r in caplog.records if "could not send its presence" in r.message)
    assert "another type" in warning.message and "delete_exchange" in warning.message


@pytest.mark.broker
@pytest.mark.parametrize("exists", [True, False], ids=["exchange-exists", "no-exchange"])
async def test_a_user_who_may_not_use_the_exchange_keeps_working(
    vhost: tuple[LocalBroker, str],
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
    exists: bool,
) -> None:
    broker, name = vhost
    user = f"u{uuid.uuid4().hex[:8]}"
    broker.ctl("add_user", user, "pw")
    others = r"^(?!workq\.presence$).*"  # everything but the presence exchange
    broker.ctl("set_permissions", "-p", name, user, others, others, ".*")
    try:
        if exists:  # declared by someone allowed to: the passive check passes, publishes fail
            await _declare_exchange(
                f"amqp://guest:guest@127.0.0.1:{broker.amqp_port}/{name}",
                aio_pika.ExchangeType.FANOUT,
            )
        url = f"amqp://{user}:pw@127.0.0.1:{broker.amqp_port}/{name}"
        await _keeps_working(url, queue_name, caplog)
    finally:
        broker.ctl("delete_user", user)
    assert not [r for r in caplog.records if "pw@" in r.getMessage()]


# --- aio-workq workers ----------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.cli
async def test_the_workers_command_lists_a_worker_as_json(
    amqp_url: str,
    queue_name: str,
    env: dict[str, str],
    make_worker: Callable[..., aio_workq.Worker],
    producer: aio_workq.Producer,
) -> None:
    worker = make_worker(queue=queue_name, handler=_noop, concurrency=2, retry=None,
                         presence_interval=INTERVAL)  # fmt: skip
    await worker.start()
    await producer.publish("ok", queue=queue_name)
    await producer.publish("fail", queue=queue_name)
    async with cli("workers", "--json", "--wait", "2", env=env) as proc:
        code = await proc.exit_code()
    assert code == 0, proc.err
    out = "\n".join(proc.out)
    [row] = [row for row in json.loads(out) if queue_name in row["queues"]]
    assert row["pid"] == os.getpid() and row["alive"] is True
    assert row["concurrency"] == 2 and row["queues"] == [queue_name]
    assert row["handled"] == 2 and row["failed"] == 1
    assert row["version"] == aio_workq.__version__ and row["uptime"] >= 0
    await worker.stop()


@pytest.mark.broker
@pytest.mark.cli
async def test_the_workers_table_shows_a_gone_worker_and_no_password(
    amqp_url: str,
    queue_name: str,
    env: dict[str, str],
    make_worker: Callable[..., aio_workq.Worker],
) -> None:
    worker = make_worker(queue=queue_name, handler=_noop, presence_interval=INTERVAL)
    await worker.start()
    async with cli("workers", "--wait", "3", env={**env, "COLUMNS": "200"}) as proc:
        await proc.wait_for(lambda: proc.lines("^listening", "err"), what="listening")
        async with PresenceWatcher(amqp_url) as watcher:  # a beat, heard by the command too
            await watcher.wait_for(lambda ws: bool(of_queue(queue_name)(ws)), timeout=10)
        await worker.stop()  # its goodbye, while the command listens
        code = await proc.exit_code()
    assert code == 0, proc.err
    out = "\n".join(proc.out)
    [line] = [line for line in proc.out if queue_name in line]
    assert str(os.getpid()) in line and "gone" in line
    assert "workers at amqp://guest:***@" in out and "guest:guest" not in out


# --- a memory alarm -------------------------------------------------------------------------


@pytest.mark.broker
async def test_beats_during_a_memory_alarm_do_not_block_the_workers_connection(
    local_broker: LocalBroker, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The broker blocks a connection that publishes during an alarm, and then reads nothing
    # more from it, acks included: beats on the worker's own connection would stop its work
    # (and a consumer's work is what frees memory). They go on a connection of their own.
    url = local_broker.url
    go = asyncio.Event()
    counter = Counter()

    async def handler(job: Job) -> None:
        await go.wait()
        counter.add(job.data)

    async with aio_workq.Producer(url) as producer:
        await producer.declare(queue_name)
        for n in range(10):
            await producer.publish(n, queue=queue_name)
    mine = of_queue(queue_name)
    caplog.set_level(logging.INFO, logger="aio_workq")
    async with PresenceWatcher(url) as watcher:
        worker = aio_workq.Worker(url, queue=queue_name, handler=handler, presence_interval=0.2)
        await worker.start()
        try:
            await watcher.wait_for(lambda ws: bool(mine(ws)), timeout=10)
            await asyncio.to_thread(local_broker.ctl, "set_vm_memory_high_watermark", "0.0000001")
            try:
                # A beat was sent during the alarm: the broker blocked its connection.
                await wait_for_records(caplog, "blocked publishers: memory", count=1)
                go.set()
                await counter.wait_for(10, timeout=15)  # the acks are read: work goes on
            finally:
                await asyncio.to_thread(local_broker.ctl, "set_vm_memory_high_watermark", "0.4")
        finally:
            await worker.stop()


# --- the web integrations -------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("framework", ["fastapi", "aiohttp"])
async def test_a_web_apps_worker_beats_and_says_goodbye(
    amqp_url: str, queue_name: str, framework: str
) -> None:
    mine = of_queue(queue_name)
    async with PresenceWatcher(amqp_url, gone_after=60) as watcher:
        if framework == "fastapi":
            fastapi_workq = workq_fastapi.Workq(amqp_url)
            fastapi_workq.add_worker(_noop, queue=queue_name, presence_interval=INTERVAL)
            serving: Any = serve_asgi(FastAPI(lifespan=fastapi_workq.lifespan))
        else:
            aiohttp_workq = workq_aiohttp.Workq(amqp_url)
            aiohttp_workq.add_worker(_noop, queue=queue_name, presence_interval=INTERVAL)
            app = web.Application()
            aiohttp_workq.setup(app)
            serving = serve_aiohttp(app)
        async with serving:
            [seen] = mine(await watcher.wait_for(lambda ws: bool(mine(ws)), timeout=10))
            assert seen.alive and seen.beat.pid == os.getpid()
        await watcher.wait_for(lambda ws: not mine(ws)[0].alive, timeout=5)  # its goodbye


@pytest.mark.broker
@pytest.mark.cli
async def test_the_workers_command_watches_until_interrupted(
    queue_name: str, env: dict[str, str], make_worker: Callable[..., aio_workq.Worker]
) -> None:
    worker = make_worker(queue=queue_name, handler=_noop, presence_interval=INTERVAL)
    await worker.start()

    def listed() -> bool:
        return any(queue_name in line for line in proc.out)

    async with cli("workers", "--watch", "--json", env=env) as proc:
        await proc.wait_for(listed, what="the worker in a refresh")
        rows = json.loads(next(line for line in proc.out if queue_name in line))
        assert [row["pid"] for row in rows if queue_name in row["queues"]] == [os.getpid()]
        proc.proc.send_signal(signal.SIGINT)
        assert await proc.exit_code() == 0, proc.err


def test_a_sibling_connection_has_the_same_settings_on_the_plain_path() -> None:
    context = ssl.create_default_context()
    urls = ["amqps://u:p@a/", "amqps://u:p@b/"]
    connection = aio_workq.Connection(urls, ssl_context=context, connect_timeout=3)
    sibling = connection.sibling(name="beats")
    assert sibling is not connection and not sibling.fast_path and not sibling.is_connected
    assert repr(sibling) == repr(connection)  # the same URLs, password hidden


def _presence_connections(node: LocalBroker) -> list[str]:
    """The names of the node's client connections that carry presence beats."""
    return [name for name in connection_names(node) if name.endswith(" presence")]


@pytest.mark.broker
async def test_workers_on_the_same_brokers_share_one_presence_connection(
    amqp_url: str,
    local_broker: LocalBroker,
    queue_name: str,
    make_worker: Callable[..., aio_workq.Worker],
) -> None:
    """Three workers on one connection and two with their own: one presence connection, kept
    while a worker beats on it and closed with the last one."""

    def alive(ws: list[WorkerPresence]) -> list[WorkerPresence]:
        return [w for w in ws if w.alive and w.beat.queues[0].startswith(queue_name)]

    async def presence_connections() -> int:
        return len(await asyncio.to_thread(_presence_connections, local_broker))

    async with aio_workq.Connection(amqp_url, name="shared") as shared:
        workers = [
            make_worker(
                queue=f"{queue_name}-{i}",
                handler=_noop,
                presence_interval=INTERVAL,
                **({"connection": shared} if i < 3 else {}),
            )  # fmt: skip
            for i in range(5)
        ]
        async with PresenceWatcher(amqp_url) as watcher:
            for worker in workers:
                await worker.start()
            await watcher.wait_for(lambda ws: len(alive(ws)) == 5, timeout=INTERVAL + 10)
            assert await presence_connections() == 1
            for worker in workers[:4]:
                await worker.stop()
            after = time.time()
            # The last worker still beats: the link stayed open for it.
            await watcher.wait_for(
                lambda ws: [w.beat.sent_at > after for w in alive(ws)] == [True], timeout=5
            )
            assert await presence_connections() == 1
            await workers[4].stop()

    async def none_left() -> bool:
        return await presence_connections() == 0

    await wait_until(none_left)  # the last one let go: closed


@pytest.mark.broker
async def test_a_worker_stopped_while_its_first_beat_is_on_its_way_leaves_no_warning(
    amqp_url: str, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopped a few loop steps after start, the beacon may be opening its channel or declaring
    the exchange: aiormq warns "Closing channel ... because RPC call ... cancelled" when such a
    call is cancelled half way; the beacon lets it finish (bounded) instead."""
    caplog.set_level(logging.WARNING)
    async with aio_workq.Producer(amqp_url) as producer:
        await producer.declare(queue_name)
    for steps in range(0, 60, 2):
        worker = aio_workq.Worker(
            amqp_url, queue=queue_name, handler=_noop, presence_interval=INTERVAL
        )
        await worker.start()
        for _ in range(steps):
            await asyncio.sleep(0)
        await worker.stop()
    cancelled = [r.getMessage() for r in caplog.records if "cancelled" in r.getMessage()]
    assert cancelled == []
