"""SyncProducer: blocking, thread-safe publishing from sync code; the Flask example."""

from __future__ import annotations

import asyncio
import ssl
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from aio_workq import (
    Backoff,
    BrokerConnectionError,
    ConfigurationError,
    Hook,
    Job,
    PublishInfo,
    RPCError,
    SerializationError,
    TLSError,
    TopologyError,
    UnroutableError,
    Worker,
)
from aio_workq._web import IntegrationError
from aio_workq.sync import SyncProducer
from scripts.broker import LocalBroker, free_port
from scripts.tls import PKI
from tests.helpers import queue_depth, run_script
from tests.servers import load_example, serve_wsgi

flask_app = load_example("flask_app")


@pytest.fixture
def sync_producer(amqp_url: str) -> Iterator[SyncProducer]:
    with SyncProducer(amqp_url, timeout=5) as producer:
        yield producer


@pytest.mark.broker
async def test_many_threads_publish_at_once(
    sync_producer: SyncProducer, amqp_url: str, queue_name: str
) -> None:
    threads, each = 8, 25

    def publish_some(thread: int) -> list[str]:
        return [
            sync_producer.publish({"thread": thread, "n": n}, queue=queue_name) for n in range(each)
        ]

    with ThreadPoolExecutor(threads) as pool:
        batches = await asyncio.gather(
            *(asyncio.wrap_future(pool.submit(publish_some, t)) for t in range(threads))
        )
    ids = [message_id for batch in batches for message_id in batch]
    assert len(set(ids)) == threads * each  # every publish returned its own confirmed id
    assert await queue_depth(amqp_url, queue_name) == threads * each


@pytest.mark.broker
def test_same_typed_errors_as_producer(sync_producer: SyncProducer, queue_name: str) -> None:
    with pytest.raises(UnroutableError):
        sync_producer.publish({}, exchange="amq.direct", routing_key=f"{queue_name}-nobody")
    with pytest.raises(TopologyError):
        sync_producer.publish({}, exchange=f"{queue_name}-missing", routing_key="x")
    with pytest.raises(SerializationError):
        sync_producer.publish(object(), queue=queue_name)
    # The producer still works after errors.
    assert sync_producer.publish_many([1, 2, 3], queue=queue_name, timeout=5)
    assert sync_producer.declare(queue_name) == queue_name


@pytest.mark.broker
async def test_call_from_sync_code(
    sync_producer: SyncProducer, amqp_url: str, queue_name: str
) -> None:
    async def double(job: Job) -> int:
        if job.data < 0:
            raise ValueError("negative")
        return int(job.data) * 2

    async with Worker(amqp_url, queue=queue_name, handler=double, retry=None):
        assert await asyncio.to_thread(sync_producer.call, 21, queue=queue_name) == 42
        with pytest.raises(RPCError, match="negative"):
            await asyncio.to_thread(sync_producer.call, -1, queue=queue_name)


@pytest.mark.broker
async def test_callable_from_a_thread_running_a_loop(
    sync_producer: SyncProducer, amqp_url: str, queue_name: str
) -> None:
    # This test's own loop is running in this thread: the producer runs on its own thread.
    assert sync_producer.publish({"from": "a running loop"}, queue=queue_name)
    assert await queue_depth(amqp_url, queue_name) == 1


@pytest.mark.broker
def test_not_from_its_own_loop_thread(sync_producer: SyncProducer, queue_name: str) -> None:
    sync_producer.start()
    runner = sync_producer._runner
    assert runner is not None

    async def publish_on_the_loop_thread() -> str:
        return sync_producer.publish({}, queue=queue_name)

    with pytest.raises(IntegrationError, match="own event-loop thread"):
        runner.submit(publish_on_the_loop_thread(), 5, "test")


@pytest.mark.broker
def test_close_is_final_and_idempotent(amqp_url: str, queue_name: str) -> None:
    producer = SyncProducer(amqp_url)
    assert "not started" in repr(producer)
    producer.publish({}, queue=queue_name)  # connects on first use
    thread = producer._runner.thread if producer._runner else None
    assert thread is not None and thread.is_alive()
    producer.close()
    producer.close()
    assert not thread.is_alive()
    with pytest.raises(IntegrationError, match="closed"):
        producer.publish({}, queue=queue_name)


def test_unreachable_broker_is_a_typed_error_and_retried_later() -> None:
    producer = SyncProducer(f"amqp://guest:secret@127.0.0.1:{free_port()}/", connect_timeout=2)
    try:
        for _ in range(2):  # a failed start leaves nothing behind; the next call tries again
            with pytest.raises(BrokerConnectionError) as caught:
                producer.publish({}, queue="q")
            assert "secret" not in str(caught.value)
        assert "aio-workq SyncProducer" not in {t.name for t in threading.enumerate()}
    finally:
        producer.close()


@pytest.mark.parametrize("bad", [0, -2, float("inf"), "5"])
def test_bad_settings_are_configuration_errors(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        SyncProducer("amqp://127.0.0.1/", timeout=bad)
    with pytest.raises(ConfigurationError, match="scheme"):
        SyncProducer("http://127.0.0.1/")


@pytest.mark.broker
async def test_closed_at_exit_without_close(amqp_url: str, queue_name: str) -> None:
    script = textwrap.dedent(
        f"""
        import threading
        from aio_workq.sync import SyncProducer

        producer = SyncProducer({amqp_url!r})
        publish = lambda n: producer.publish({{"n": n}}, queue={queue_name!r})
        threads = [threading.Thread(target=publish, args=(n,)) for n in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        print("published; exiting without close()")
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "published; exiting without close()"
    assert err.decode() == ""  # no traceback, no "unclosed" or "Task was destroyed" noise
    assert await queue_depth(amqp_url, queue_name) == 4


# --- the Flask example ----------------------------------------------------------------------


@pytest.mark.broker
async def test_flask_example_through_a_threaded_server(amqp_url: str, queue_name: str) -> None:
    app = flask_app.create_app(amqp_url, queue=queue_name)
    try:
        with serve_wsgi(app) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                posted = await asyncio.gather(
                    *(
                        client.post("/images", json={"name": f"{n}.png", "width": 8, "height": 8})
                        for n in range(20)
                    )
                )
                bad = await client.post("/images", json={"name": "x.png"})
    finally:
        app.extensions["aio_workq"].close()
    assert [r.status_code for r in posted] == [202] * 20, [r.text for r in posted]
    assert len({r.json()["job_id"] for r in posted}) == 20
    assert bad.status_code == 422
    assert await queue_depth(amqp_url, queue_name) == 20


@pytest.mark.broker
async def test_a_forked_child_opens_its_own_connection(amqp_url: str, queue_name: str) -> None:
    script = textwrap.dedent(
        f"""
        import os
        from aio_workq.sync import SyncProducer

        producer = SyncProducer({amqp_url!r})
        producer.publish("parent, before the fork", queue={queue_name!r})
        pid = os.fork()
        if pid == 0:  # the child: the parent's loop thread did not survive the fork
            producer.publish("child", queue={queue_name!r})
            producer.close()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        producer.publish("parent, after the fork", queue={queue_name!r})
        print("child exit status", os.waitstatus_to_exitcode(status))
        """
    )
    code, out = await run_script(script)
    assert code == 0, out
    assert "child exit status 0" in out, out
    assert await queue_depth(amqp_url, queue_name) == 3


@pytest.mark.broker
def test_hooks_see_the_publishes(amqp_url: str, queue_name: str) -> None:
    class Recorder(Hook):
        def __init__(self) -> None:
            self.published: list[str] = []

        def before_publish(self, message: PublishInfo) -> None:
            self.published.append(message.message_id)

    recorder = Recorder()
    with SyncProducer(amqp_url, hooks=[recorder], name="sync app", on_reconnect="fail") as p:
        job_id = p.publish({"n": 1}, queue=queue_name)
    assert recorder.published == [job_id]


@pytest.mark.broker
async def test_publishes_to_a_private_ca_amqps_broker(
    tls_broker: LocalBroker, tls_pki: PKI, queue_name: str
) -> None:
    context = ssl.create_default_context(cafile=str(tls_pki.ca_cert))
    with SyncProducer(tls_broker.tls_url, ssl_context=context, backoff=Backoff(initial=0.1)) as p:
        assert await asyncio.to_thread(p.publish, "secure", queue=queue_name)
    assert await queue_depth(tls_broker.url, queue_name) == 1
    untrusted = SyncProducer(tls_broker.tls_url, connect_timeout=5)
    with pytest.raises(TLSError):
        await asyncio.to_thread(untrusted.start)


async def test_a_child_forked_while_a_thread_connects_gets_an_answer_within_its_bound() -> None:
    # The parent's thread held the producer's lock (connecting, up to connect_timeout) when
    # the process forked: the child's copy of that lock stayed held forever, and its first
    # call hung without a bound. The broker here accepts and never answers.
    script = textwrap.dedent(
        """
        import os, signal, socket, threading, time
        from aio_workq import BrokerConnectionError
        from aio_workq.sync import SyncProducer

        mute = socket.create_server(("127.0.0.1", 0))
        port = mute.getsockname()[1]
        producer = SyncProducer(f"amqp://127.0.0.1:{port}/", connect_timeout=3, timeout=1)

        def first_use():
            try:
                producer.publish("x", queue="q")
            except BrokerConnectionError:
                pass

        connecting = threading.Thread(target=first_use)
        connecting.start()
        deadline = time.monotonic() + 10  # its loop thread exists once it is connecting
        while "aio-workq SyncProducer" not in {t.name for t in threading.enumerate()}:
            assert time.monotonic() < deadline, "never connected"
            threading.Event().wait(0.01)
        pid = os.fork()
        if pid == 0:
            signal.alarm(15)  # the hang, as an exit code
            started = time.monotonic()
            try:
                producer.publish("child", queue="q")
            except BrokerConnectionError as exc:
                print("child:", type(exc).__name__, round(time.monotonic() - started), flush=True)
            producer.close()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        connecting.join()
        producer.close()
        print("child exit status", os.waitstatus_to_exitcode(status))
        """
    )
    code, out = await run_script(script, timeout=40)
    assert code == 0, out
    assert "child exit status 0" in out, out
    assert "child: BrokerConnectionError" in out, out


@pytest.mark.broker
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "5", True])
def test_close_with_a_timeout_that_is_not_seconds_is_refused_and_closes_nothing(
    amqp_url: str, queue_name: str, bad: Any
) -> None:
    # It logged "closing the SyncProducer failed" (a TypeError, an OverflowError, a "no answer
    # within nan s"), stopped the loop thread under the open connection without waiting for
    # any confirm, and said closed.
    producer = SyncProducer(amqp_url, timeout=5)
    try:
        producer.publish("before", queue=queue_name)
        with pytest.raises(ConfigurationError, match="timeout"):
            producer.close(bad)
        producer.publish("after", queue=queue_name)  # still open
    finally:
        producer.close()
    assert asyncio.run(queue_depth(amqp_url, queue_name)) == 2
    assert "aio-workq SyncProducer" not in {t.name for t in threading.enumerate()}


class _ClosesItsProducer(Hook):
    """Calls its producer's `close()` from a hook: on the producer's own loop thread."""

    def __init__(self) -> None:
        self.producer: SyncProducer | None = None
        self.refused: list[BaseException] = []

    def after_publish(self, message: PublishInfo, state: Any) -> None:
        assert self.producer is not None
        try:
            self.producer.close()
        except IntegrationError as exc:
            self.refused.append(exc)


@pytest.mark.broker
def test_a_close_refused_on_its_own_loop_thread_leaves_the_producer_closable(
    amqp_url: str, queue_name: str
) -> None:
    # The refused close had already marked the producer closed and dropped its loop thread:
    # the real close() after it returned at once, the thread and its connection left running
    # (no finaliser either), the confirms never awaited.
    hook = _ClosesItsProducer()
    producer = SyncProducer(amqp_url, timeout=5, hooks=[hook])
    hook.producer = producer
    producer.publish("x", queue=queue_name)
    assert [type(e) for e in hook.refused] == [IntegrationError]
    producer.publish("y", queue=queue_name)  # still open
    producer.close()
    assert "aio-workq SyncProducer" not in {t.name for t in threading.enumerate()}
    assert asyncio.run(queue_depth(amqp_url, queue_name)) == 2
