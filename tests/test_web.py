"""The FastAPI and aiohttp integrations and their examples, through real HTTP servers."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import signal
import ssl
import sys
import time
import typing
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import psycopg
import pytest
from aiohttp import web
from fastapi import FastAPI, HTTPException
from yarl import URL

from aio_workq import (
    Backoff,
    BrokerConnectionError,
    ConfigurationError,
    Connection,
    HandleInfo,
    Hook,
    Job,
    Producer,
    PublishInfo,
    PublishTimeoutError,
    TLSError,
    TopologyError,
)
from aio_workq import aiohttp as workq_aiohttp
from aio_workq import fastapi as workq_fastapi
from aio_workq._web import IntegrationError, ProducerView
from aio_workq.jobs import TaskArgumentError, Tasks
from aio_workq.jobs.postgres import PostgresStore, migrate
from aio_workq.sync import SyncProducer
from scripts.broker import LocalBroker, free_port
from scripts.postgres import LocalPostgres
from scripts.tls import PKI
from tests.faultproxy import FaultProxy
from tests.helpers import Counter, connection_names, queue_consumers, queue_depth, wait_until
from tests.servers import EXAMPLES, load_example, serve_aiohttp, serve_asgi, serve_wsgi

aiohttp_app = load_example("aiohttp_app")
fastapi_app = load_example("fastapi_app")
flask_app = load_example("flask_app")

FRAMEWORKS = ("fastapi", "aiohttp")


def serve_example(
    framework: str, url: str, queue: str, request_timeout: float = 3
) -> AbstractAsyncContextManager[str]:
    """The framework's example app on a free port, its workers running in-process."""
    if framework == "fastapi":
        return serve_asgi(fastapi_app.create_app(url, queue=queue, request_timeout=request_timeout))
    return serve_aiohttp(aiohttp_app.create_app(url, queue=queue, request_timeout=request_timeout))


def results(framework: str) -> dict[str, dict[str, str]]:
    module = fastapi_app if framework == "fastapi" else aiohttp_app
    done: dict[str, dict[str, str]] = module.RESULTS
    return done


def image(name: str) -> dict[str, Any]:
    return {"name": name, "width": 64, "height": 48}


async def wait_done(client: httpx.AsyncClient, job_id: str, timeout: float = 15) -> dict[str, Any]:
    """Poll the status endpoint (an RPC to the in-process worker) until the job is done."""
    async with asyncio.timeout(timeout):
        while True:
            response = await client.get(f"/images/{job_id}")
            assert response.status_code == 200, response.text
            status: dict[str, Any] = response.json()
            if status["status"] == "done":
                return status
            assert status == {"job_id": job_id, "status": "pending"} or "thumbnail" not in status
            await asyncio.sleep(0.05)


# --- the examples, broker up ----------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_example_enqueues_processes_and_reports(
    framework: str, amqp_url: str, queue_name: str
) -> None:
    async with (
        serve_example(framework, amqp_url, queue_name) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        assert await queue_consumers(amqp_url, queue_name) == 1  # the in-process worker
        names = [f"photo-{i}.jpg" for i in range(8)]
        posted = await asyncio.gather(*(client.post("/images", json=image(n)) for n in names))
        assert [r.status_code for r in posted] == [202] * len(names), [r.text for r in posted]
        job_ids = [r.json()["job_id"] for r in posted]
        assert len(set(job_ids)) == len(names)

        statuses = await asyncio.gather(*(wait_done(client, job_id) for job_id in job_ids))

        for name, job_id, status in zip(names, job_ids, statuses, strict=True):
            checksum = hashlib.sha256(f"{name}:64x48".encode()).hexdigest()
            assert status["checksum"] == checksum
            assert status["thumbnail"] == f"{name.removesuffix('.jpg')}_64x48.png"
            assert results(framework)[job_id]["name"] == name
        bad = await client.post("/images", json={"name": "x.png", "width": 0, "height": 1})
        assert bad.status_code == 422
        assert await queue_depth(amqp_url, queue_name) == 0

    # Shutdown stopped the in-process workers.
    assert await queue_consumers(amqp_url, queue_name) == 0
    assert await queue_consumers(amqp_url, f"{queue_name}.status") == 0


# --- the integrations' contracts ------------------------------------------------------------


@pytest.mark.broker
async def test_shutdown_waits_for_outstanding_confirms(amqp_url: str, queue_name: str) -> None:
    workq = workq_fastapi.Workq(amqp_url, close_timeout=20)
    app = FastAPI(lifespan=workq.lifespan)
    async with serve_asgi(app):
        confirms = [await workq.producer.send({"n": n}, queue=queue_name) for n in range(2000)]
        assert not all(confirm.done() for confirm in confirms)  # still in flight at shutdown
    # The lifespan's shutdown waited for them: all confirmed, none failed by the close.
    assert all(confirm.done() and confirm.exception() is None for confirm in confirms)
    assert await queue_depth(amqp_url, queue_name) == 2000
    with pytest.raises(IntegrationError, match="not running"):
        workq.producer  # noqa: B018


@pytest.mark.broker
async def test_fastapi_dependency_and_error_handlers(amqp_url: str, queue_name: str) -> None:
    workq = workq_fastapi.Workq(amqp_url, request_timeout=2)
    app = FastAPI(lifespan=workq.lifespan)
    workq.add_exception_handlers(app)
    seen: list[ProducerView] = []

    @app.post("/publish")
    async def publish(producer: workq_fastapi.ProducerDep) -> dict[str, str]:
        seen.append(producer)
        return {"id": await producer.publish({"x": 1}, queue=queue_name)}

    @app.post("/unroutable")
    async def unroutable(producer: workq_fastapi.ProducerDep) -> dict[str, str]:
        return {"id": await producer.publish({}, exchange="amq.direct", routing_key="nobody")}

    async with serve_asgi(app) as base, httpx.AsyncClient(base_url=base) as client:
        ok = await client.post("/publish")
        assert ok.status_code == 200 and ok.json()["id"]
        assert seen == [workq.producer] and seen[0].timeout == 2
        failed = await client.post("/unroutable")
        assert failed.status_code == 503
        assert failed.headers["retry-after"] == "2"
        assert failed.json() == {
            "detail": "the job queue is unavailable, try again later (UnroutableError)"
        }
    assert await queue_depth(amqp_url, queue_name) == 1


async def test_fastapi_dependency_without_lifespan_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI()  # no lifespan=workq.lifespan

    @app.get("/")
    async def route(producer: workq_fastapi.ProducerDep) -> None:
        raise AssertionError("not reached")

    async with serve_asgi(app) as base, httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/")).status_code == 500
    errors = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert any(
        isinstance(e, IntegrationError) and "lifespan=workq.lifespan" in str(e) for e in errors
    ), caplog.text


@pytest.mark.broker
async def test_aiohttp_app_key_and_middleware(amqp_url: str, queue_name: str) -> None:
    workq = workq_aiohttp.Workq(amqp_url, request_timeout=2)
    app = web.Application()
    workq.setup(app)

    async def publish(request: web.Request) -> web.Response:
        producer: ProducerView = request.app[workq_aiohttp.PRODUCER]  # typed by the AppKey
        return web.json_response({"id": await producer.publish({"x": 1}, queue=queue_name)})

    async def unroutable(request: web.Request) -> web.Response:
        await request.app[workq_aiohttp.PRODUCER].publish({}, exchange="amq.direct")
        raise AssertionError("not reached")

    app.router.add_post("/publish", publish)
    app.router.add_post("/unroutable", unroutable)
    async with serve_aiohttp(app) as base, httpx.AsyncClient(base_url=base) as client:
        assert app[workq_aiohttp.PRODUCER] is workq.producer
        assert (await client.post("/publish")).status_code == 200
        failed = await client.post("/unroutable")
        assert failed.status_code == 503, failed.text
        assert failed.headers["retry-after"] == "2"
        assert "UnroutableError" in failed.json()["detail"]
    assert await queue_depth(amqp_url, queue_name) == 1


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_app_fails_to_start_without_a_broker(framework: str) -> None:
    url = f"amqp://guest:secret@127.0.0.1:{free_port()}/"  # nothing listens there
    with pytest.raises(BrokerConnectionError) as caught:
        if framework == "fastapi":
            workq = workq_fastapi.Workq(url, connect_timeout=2)
            async with workq.lifespan(FastAPI()):
                pass
        else:
            app = web.Application()
            workq_aiohttp.Workq(url, connect_timeout=2).setup(app)
            runner = web.AppRunner(app)
            try:
                await runner.setup()
            finally:
                await runner.cleanup()
    assert "secret" not in str(caught.value)


@pytest.mark.broker
async def test_view_bounds_each_call(producer: Producer, queue_name: str) -> None:
    view = ProducerView(producer, timeout=4)
    assert view.timeout == 4 and view.with_timeout(1).timeout == 1
    assert view.with_timeout(1).producer is producer
    # Concurrent first publishes to a fresh (quorum) queue: one declaration, none nacked.
    first = await asyncio.gather(*(view.publish({"n": n}, queue=queue_name) for n in range(8)))
    ids = await view.publish_many([{"n": n} for n in range(50)], queue=queue_name)
    assert len(set(first + ids)) == 58
    assert await view.declare(queue_name) == queue_name
    # An exchange that doesn't exist fails fast with the producer's own typed error.
    with pytest.raises(TopologyError, match="does not exist"):
        await view.publish({}, exchange="no-such-exchange", routing_key="x")


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "3", True])
def test_bad_timeouts_are_configuration_errors(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        workq_fastapi.Workq("amqp://127.0.0.1/", request_timeout=bad)
    with pytest.raises(ConfigurationError, match="timeout"):
        ProducerView(Producer("amqp://127.0.0.1/"), timeout=bad)


def test_worker_options_are_checked_when_added() -> None:
    workq = workq_aiohttp.Workq("amqp://127.0.0.1/")

    async def handler(job: Job) -> None: ...

    with pytest.raises(ConfigurationError, match="concurrency"):
        workq.add_worker(handler, queue="q", concurrency=0)
    with pytest.raises(TypeError):
        workq.worker(queue="q", no_such_option=1)(handler)
    registered: Callable[[Job], Any] = workq.worker(queue="q", concurrency=2)(handler)
    assert registered is handler
    assert workq.workers == ()  # built when the app starts


@pytest.mark.broker
async def test_a_shutdown_cancelled_while_the_workers_drain_still_closes_every_connection(
    amqp_url: str, local_broker: LocalBroker, queue_name: str
) -> None:
    """The app's shutdown is cancelled (a second Ctrl-C, a timeout around it) while an
    in-process worker waits for its handler: the workers' connections and the producer's are
    closed all the same, not left open until the process ends."""
    started, shutdown = asyncio.Event(), asyncio.Event()
    workq = workq_fastapi.Workq(amqp_url, name=f"{queue_name} producer")

    @workq.worker(queue=queue_name, shutdown_timeout=60, name=f"{queue_name} worker")
    async def handle(job: Job) -> None:
        started.set()
        await asyncio.Event().wait()  # still running at shutdown

    async def app() -> None:
        async with workq.lifespan(FastAPI()):
            await workq.producer.publish("x", queue=queue_name)
            await shutdown.wait()

    def connections() -> list[str]:
        return [name for name in connection_names(local_broker) if name.startswith(queue_name)]

    running = asyncio.create_task(app())
    async with asyncio.timeout(30):
        await started.wait()
        assert sorted(await asyncio.to_thread(connections)) == [
            f"{queue_name} producer",
            f"{queue_name} worker",
        ]
        [worker] = workq.workers
        shutdown.set()
        while worker.state.consuming:  # noqa: ASYNC110 - the stop has no event to wait on
            await asyncio.sleep(0.01)
    running.cancel()  # the workers are draining: their handler would hold them for 60 s
    with pytest.raises(asyncio.CancelledError):
        await running

    async def all_closed() -> bool:
        return not await asyncio.to_thread(connections)

    await wait_until(all_closed, timeout=15)


# --- broker outage --------------------------------------------------------------------------


@pytest.fixture
async def three_apps(
    amqp_url: str, queue_name: str
) -> AsyncIterator[dict[str, tuple[httpx.AsyncClient, str]]]:
    """The FastAPI, aiohttp and Flask examples served at once, each with a client and queue.

    The first two run their workers in-process; Flask publishes with a `SyncProducer`.
    """
    queues = {name: f"{queue_name}-{name}" for name in ("fastapi", "aiohttp", "flask")}
    flask = flask_app.create_app(amqp_url, queue=queues["flask"], timeout=2)
    try:
        with serve_wsgi(flask) as flask_base:
            async with (
                serve_example("fastapi", amqp_url, queues["fastapi"], request_timeout=2) as f,
                serve_example("aiohttp", amqp_url, queues["aiohttp"], request_timeout=2) as a,
                httpx.AsyncClient(base_url=f, timeout=30) as fastapi_client,
                httpx.AsyncClient(base_url=a, timeout=30) as aiohttp_client,
                httpx.AsyncClient(base_url=flask_base, timeout=30) as flask_client,
            ):
                yield {
                    "fastapi": (fastapi_client, queues["fastapi"]),
                    "aiohttp": (aiohttp_client, queues["aiohttp"]),
                    "flask": (flask_client, queues["flask"]),
                }
    finally:
        flask.extensions["aio_workq"].close()


@pytest.mark.broker
async def test_broker_down_answers_503_then_recovers(
    local_broker: LocalBroker, three_apps: dict[str, tuple[httpx.AsyncClient, str]]
) -> None:
    loop = asyncio.get_running_loop()
    accepted: dict[str, list[str]] = {app: [] for app in three_apps}
    refused: dict[str, list[str]] = {app: [] for app in three_apps}

    async def post(app: str, name: str) -> httpx.Response:
        client, _ = three_apps[app]
        response = await client.post("/images", json=image(name))
        assert response.status_code in (202, 503), response.text
        (accepted if response.status_code == 202 else refused)[app].append(name)
        return response

    for app in three_apps:
        assert (await post(app, "before.png")).status_code == 202

    await asyncio.to_thread(local_broker.stop)

    async def refused_in_time(app: str) -> float:
        started = loop.time()
        response = await post(app, "during.png")
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "2"
        assert "PublishTimeoutError" in response.json()["detail"]
        return loop.time() - started

    elapsed = await asyncio.gather(*(refused_in_time(app) for app in three_apps))
    # The request timeout is 2 s (the producer's own default is 30 s).
    assert all(1.5 < seconds < 10 for seconds in elapsed), elapsed

    await asyncio.to_thread(local_broker.start)

    async def recovers(app: str) -> None:
        async with asyncio.timeout(60):  # the connection comes back with backoff
            attempt = 0
            while (await post(app, f"after-{attempt}.png")).status_code != 202:
                attempt += 1
                await asyncio.sleep(0.2)

    await asyncio.gather(*(recovers(app) for app in three_apps))

    # Nothing half-sent: each accepted job is processed (or queued, for Flask, whose workers
    # run elsewhere), and a refused request left no message behind.
    for app in FRAMEWORKS:
        client, _ = three_apps[app]
        done = {result["name"] for result in results(app).values()}
        async with asyncio.timeout(30):
            while not done >= set(accepted[app]):
                await asyncio.sleep(0.05)
                done = {result["name"] for result in results(app).values()}
        assert not done & set(refused[app]), (done, refused)
    url = local_broker.url
    depths = {app: await queue_depth(url, queue) for app, (_, queue) in three_apps.items()}
    assert depths == {"fastapi": 0, "aiohttp": 0, "flask": len(accepted["flask"])}
    assert len(accepted["flask"]) == 2  # before.png and the first after-N that got through
    assert all("during.png" in names for names in refused.values()), refused


@pytest.mark.broker
async def test_view_publish_times_out_while_broker_paused(
    local_broker: LocalBroker, producer: Producer, queue_name: str
) -> None:
    view = ProducerView(producer, timeout=1)
    await view.declare(queue_name)
    await asyncio.to_thread(local_broker.pause)  # TCP stays open, nothing answers
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(PublishTimeoutError):
            await view.publish({"n": 1}, queue=queue_name)
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        await asyncio.to_thread(local_broker.resume)


@pytest.mark.broker
@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_example_runs_as_a_script(framework: str, amqp_url: str, queue_name: str) -> None:
    """`python examples/<framework>_app.py` serves, and SIGTERM shuts it down cleanly."""
    port = free_port()
    env = {**os.environ, "AMQP_URL": amqp_url, "PORT": str(port), "IMAGES_QUEUE": queue_name}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / f"{framework}_app.py"),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            async with asyncio.timeout(30):
                while True:  # poll until the server listens (its startup includes the broker)
                    try:
                        posted = await client.post("/images", json=image("script.png"))
                        break
                    except httpx.ConnectError:
                        assert proc.returncode is None, "the example exited during startup"
                        await asyncio.sleep(0.1)
            assert posted.status_code == 202, posted.text
            status = await wait_done(client, posted.json()["job_id"])
            assert status["thumbnail"] == "script_64x48.png"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = output.decode()
    # uvicorn re-raises SIGTERM after its graceful shutdown; aiohttp exits 0.
    assert proc.returncode in (0, -signal.SIGTERM), text
    assert "Traceback" not in text
    if framework == "fastapi":
        assert "Application shutdown complete." in text
    assert await queue_consumers(amqp_url, queue_name) == 0


# --- the producer's settings pass through (#21.4) --------------------------------------------


class Recorder(Hook):
    """Records what it sees: publishes (message ids), handled jobs, reconnects."""

    def __init__(self) -> None:
        self.published: list[str] = []
        self.handled = Counter()
        self.reconnects = Counter()

    def before_publish(self, message: PublishInfo) -> None:
        self.published.append(message.message_id)

    def after_handle(self, info: HandleInfo) -> None:
        self.handled.add(info.job.message_id)

    def on_reconnect(self, url: str) -> None:
        self.reconnects.add(url)


def accepted_names(cls: type) -> set[str]:
    """The keyword arguments a constructor takes, those of a `**options: Unpack[...]` too."""
    names = set()
    for name, parameter in inspect.signature(cls).parameters.items():
        if parameter.kind is parameter.VAR_KEYWORD:
            init = next(vars(base)["__init__"] for base in cls.__mro__ if "__init__" in vars(base))
            hint = typing.get_type_hints(init, include_extras=True)[name]
            names |= set(typing.get_type_hints(typing.get_args(hint)[0]))
        else:
            names.add(name)
    return names


@pytest.mark.parametrize(
    "integration", [workq_fastapi.Workq, workq_aiohttp.Workq, SyncProducer], ids=repr
)
def test_integrations_take_every_producer_and_connection_setting(integration: type) -> None:
    """What a `Producer` or its `Connection` can be given, the integrations can be given too."""
    producer = set(inspect.signature(Producer).parameters) - {"connection", "timeout"}
    connection = set(inspect.signature(Connection).parameters) - {"fast_path"}
    missing = (producer | connection) - accepted_names(integration)
    assert not missing, f"{integration.__qualname__} does not take {sorted(missing)}"


def test_connection_settings_are_checked_at_construction() -> None:
    context = ssl.create_default_context()
    for make in (workq_fastapi.Workq, workq_aiohttp.Workq, SyncProducer):
        with pytest.raises(ConfigurationError, match="not an amqps:// URL"):
            make("amqp://127.0.0.1/", ssl_context=context)
        with pytest.raises(ConfigurationError, match="hooks must be"):
            make("amqp://127.0.0.1/", hooks=[object()])  # type: ignore[list-item]
        with pytest.raises(ConfigurationError, match="on_reconnect"):
            make("amqp://127.0.0.1/", on_reconnect="never")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            make("amqp://127.0.0.1/", no_such_setting=1)  # type: ignore[call-arg]


@pytest.mark.broker
async def test_fastapi_hooks_see_the_routes_publishes_and_the_workers_jobs(
    amqp_url: str, queue_name: str
) -> None:
    recorder = Recorder()
    workq = workq_fastapi.Workq(amqp_url, hooks=[recorder], name="hooked app")

    @workq.worker(queue=queue_name)
    async def handle(job: Job) -> None: ...

    app = FastAPI(lifespan=workq.lifespan)

    @app.post("/jobs")
    async def enqueue(producer: workq_fastapi.ProducerDep) -> dict[str, str]:
        return {"job_id": await producer.publish({"n": 1}, queue=queue_name)}

    async with serve_asgi(app) as base, httpx.AsyncClient(base_url=base) as client:
        job_id = (await client.post("/jobs")).json()["job_id"]
        assert await recorder.handled.wait_for(1) == [job_id]  # the in-process worker's hooks
    assert recorder.published == [job_id]


@pytest.mark.broker
async def test_aiohttp_backoff_and_hooks_reach_every_connection(
    amqp_url: str, queue_name: str
) -> None:
    settles = Counter()

    class Quick(Backoff):
        def settle_delay(self) -> float:
            settles.add(1)
            return 0.0

    async def handle(job: Job) -> None: ...

    recorder = Recorder()
    async with FaultProxy(upstream_port=URL(amqp_url).port or 5672) as proxy:
        workq = workq_aiohttp.Workq(proxy.url(amqp_url), backoff=Quick(), hooks=[recorder])
        workq.add_worker(handle, queue=queue_name)
        app = web.Application()
        workq.setup(app)
        async with serve_aiohttp(app):
            await proxy.wait_accepted(2)  # the producer's connection and the worker's
            proxy.cut()
            await settles.wait_for(2)  # both reconnect with the app's backoff...
            await recorder.reconnects.wait_for(2)  # ... and tell the app's hooks
            job_id = await workq.producer.publish({"n": 1}, queue=queue_name)
            assert await recorder.handled.wait_for(1) == [job_id]


@pytest.mark.broker
async def test_fastapi_app_on_a_private_ca_amqps_broker(
    tls_broker: LocalBroker, tls_pki: PKI, queue_name: str
) -> None:
    context = ssl.create_default_context(cafile=str(tls_pki.ca_cert))
    workq = workq_fastapi.Workq(tls_broker.tls_url, ssl_context=context, connect_timeout=5)
    seen = Counter()

    async def handle(job: Job) -> None:
        seen.add(job)

    workq.add_worker(handle, queue=queue_name)
    app = FastAPI(lifespan=workq.lifespan)

    @app.post("/jobs")
    async def enqueue(producer: workq_fastapi.ProducerDep) -> dict[str, str]:
        return {"job_id": await producer.publish("secure", queue=queue_name)}

    async with serve_asgi(app) as base, httpx.AsyncClient(base_url=base) as client:
        response = await client.post("/jobs")
        assert response.status_code == 200, response.text
        [job] = await seen.wait_for(1)
        assert job.message_id == response.json()["job_id"] and job.data == "secure"

    # Without the CA the same app does not start: the context above was what verified the broker.
    untrusted = workq_fastapi.Workq(tls_broker.tls_url, connect_timeout=5)
    with pytest.raises(TLSError):
        async with untrusted.lifespan(FastAPI()):
            pass


# --- one trace from the request to the forwarded job (#20.3) ----------------------------------


@pytest.mark.broker
async def test_one_trace_from_the_request_through_its_job_to_the_forwarded_job(
    amqp_url: str, queue_name: str
) -> None:
    """The documented FastAPI set-up: `Workq(hooks=[TracingHook()])` and the app instrumented."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from aio_workq.tracing import TracingHook

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    thumbnails = f"{queue_name}.thumbnails"
    workq = workq_fastapi.Workq(amqp_url, hooks=[TracingHook(tracer_provider=provider)])
    done = Counter()

    @workq.worker(queue=queue_name)
    async def resize(job: Job) -> None:
        await job.forward({"thumbnail": job.data["path"]}, queue=thumbnails)

    @workq.worker(queue=thumbnails)
    async def thumbnail(job: Job) -> None:
        done.add(job.message_id)

    app = FastAPI(lifespan=workq.lifespan)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)

    @app.post("/images", status_code=202)
    async def enqueue(path: str, producer: workq_fastapi.ProducerDep) -> dict[str, str]:
        return {"job_id": await producer.publish({"path": path}, queue=queue_name)}

    async with serve_asgi(app) as base, httpx.AsyncClient(base_url=base) as client:
        response = await client.post("/images", params={"path": "cat.png"})
        assert response.status_code == 202, response.text
        await done.wait_for(1)
    # The app has stopped: its workers settled their deliveries and ended their spans.

    spans = {(s.kind, s.name): s for s in exporter.get_finished_spans()}
    server = spans[SpanKind.SERVER, "POST /images"]
    chain = [
        spans[SpanKind.PRODUCER, f"publish {queue_name}"],
        spans[SpanKind.CONSUMER, f"process {queue_name}"],
        spans[SpanKind.PRODUCER, f"publish {thumbnails}"],
        spans[SpanKind.CONSUMER, f"process {thumbnails}"],
    ]
    assert server.context is not None
    assert {s.context.trace_id for s in chain if s.context} == {server.context.trace_id}
    # Each step is the child of the one before: the publish is inside the request's span.
    ancestors = {s.context.span_id: s.parent for s in exporter.get_finished_spans() if s.context}
    parent = chain[0].parent
    while parent is not None and parent.span_id != server.context.span_id:
        parent = ancestors[parent.span_id]
    assert parent is not None, "the publish is not inside the request's span"
    for child, step in zip(chain[1:], chain, strict=False):
        assert child.parent is not None and step.context is not None
        assert child.parent.span_id == step.context.span_id, (child.name, step.name)


# --- leftovers2: the job store's errors ---------------------------------------------------------


def _store_app(framework: str, store: PostgresStore) -> Any:
    """A route that reads a job's record from `store`, with aio-workq's error handling."""
    if framework == "fastapi":
        app = FastAPI()
        workq_fastapi.Workq("amqp://localhost/", request_timeout=2).add_exception_handlers(app)

        @app.get("/jobs/{job_id}")
        async def status(job_id: str) -> dict[str, str]:
            return {"found": str(await store.get(job_id) is not None)}

        return app

    async def aiohttp_status(request: web.Request) -> web.Response:
        found = await store.get(request.match_info["job_id"]) is not None
        return web.json_response({"found": str(found)})

    aiohttp_app = web.Application(middlewares=[workq_aiohttp.error_middleware])
    aiohttp_app.router.add_get("/jobs/{job_id}", aiohttp_status)
    return aiohttp_app


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_an_unreachable_job_store_answers_503_and_names_no_dsn(
    framework: str, own_postgres: LocalPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """A status route whose store is down was a 500 with a traceback under the handlers that
    answer the broker's errors with 503. A store that can't be reached (`StoreError.unreachable`)
    is 503 with `Retry-After` now, its address and password in neither the body nor the log;
    a store error that waiting does not cure (the tables missing) stays a 500, the app's."""
    password = "hunter2-secret"
    dsn = own_postgres.dsn.replace("postgres@", f"postgres:{password}@")  # trust: not checked
    port = str(URL(own_postgres.dsn).port)
    store = PostgresStore(dsn, timeout=1)
    serve = serve_asgi if framework == "fastapi" else serve_aiohttp
    try:
        async with (
            serve(_store_app(framework, store)) as base,
            httpx.AsyncClient(base_url=base, timeout=30) as client,
        ):
            missing = await client.get("/jobs/a")  # no tables: not cured by waiting
            assert missing.status_code == 500, missing.text
            async with await psycopg.AsyncConnection.connect(own_postgres.dsn) as conn:
                await migrate(conn)
            assert (await client.get("/jobs/a")).json() == {"found": "False"}
            await asyncio.to_thread(own_postgres.stop)
            down = await client.get("/jobs/a")
            assert down.status_code == 503, down.text
            assert down.headers["retry-after"] == ("2" if framework == "fastapi" else "5")
            assert down.json() == {
                "detail": "the job store is unavailable, try again later (StoreError)"
            }
            for text in (down.text, str(down.headers), caplog.text):
                assert password not in text
            assert port not in down.text
            assert "answering 503: StoreError" in caplog.text  # the full error, for the operator
    finally:
        await store.close()


async def test_a_fail_fast_job_store_answers_503_at_once_while_postgres_refuses(
    own_postgres: LocalPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """`PostgresStore(dsn, fail_fast=True)` behind a status route: once the store found the
    server down, the 503 comes at once (not after the store's `timeout`), and names neither
    the DSN's password nor, in the answer, its address."""
    password = "hunter2-secret"
    dsn = own_postgres.dsn.replace("postgres@", f"postgres:{password}@")  # trust: not checked
    port = str(URL(own_postgres.dsn).port)
    async with await psycopg.AsyncConnection.connect(own_postgres.dsn) as conn:
        await migrate(conn)
    store = PostgresStore(dsn, timeout=2, fail_fast=True)
    try:
        async with (
            serve_asgi(_store_app("fastapi", store)) as base,
            httpx.AsyncClient(base_url=base, timeout=30) as client,
        ):
            assert (await client.get("/jobs/a")).json() == {"found": "False"}
            await asyncio.to_thread(own_postgres.stop)
            async with asyncio.timeout(20):  # the first ones find it down (a broken
                while "fail_fast" not in caplog.text:  # connection, then the timeout)
                    assert (await client.get("/jobs/a")).status_code == 503
            for _ in range(3):
                started = time.monotonic()
                down = await client.get("/jobs/a")
                assert time.monotonic() - started < 0.3  # at once, not the timeout's 2 s
                assert down.status_code == 503, down.text
            for text in (down.text, str(down.headers), caplog.text):
                assert password not in text
            assert port not in down.text
    finally:
        await store.close()


# --- leftovers5: a task's wrong arguments ---------------------------------------------------


def _tasks_app(framework: str, url: str, queue: str) -> Any:
    """Two routes that enqueue the task `t.resize(width: int)` with the request's width: one
    lets `TaskArgumentError` through, one answers it (422) itself."""
    tasks = Tasks()

    @tasks.task(queue=queue, name="t.resize")
    async def resize(width: int) -> int:
        return width

    if framework == "fastapi":
        workq = workq_fastapi.Workq(url, request_timeout=2)

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
            async with workq.lifespan(app) as state:
                tasks.bind(workq.producer)
                yield state

        app = FastAPI(lifespan=lifespan)
        workq.add_exception_handlers(app)

        @app.post("/through")
        async def through(width: str) -> dict[str, str]:
            return {"job_id": (await resize.enqueue(width)).job_id}  # type: ignore[arg-type]

        @app.post("/answered")
        async def answered(width: str) -> dict[str, str]:
            try:
                return {"job_id": (await resize.enqueue(width)).job_id}  # type: ignore[arg-type]
            except TaskArgumentError as exc:
                raise HTTPException(422, str(exc)) from None

        return app

    aiohttp_workq = workq_aiohttp.Workq(url, request_timeout=2)
    aiohttp_app = web.Application()
    aiohttp_workq.setup(aiohttp_app)

    async def bind(app: web.Application) -> None:
        tasks.bind(app[workq_aiohttp.PRODUCER])

    aiohttp_app.on_startup.append(bind)

    async def aiohttp_through(request: web.Request) -> web.Response:
        job = await resize.enqueue(request.query["width"])  # type: ignore[arg-type]
        return web.json_response({"job_id": job.job_id})

    async def aiohttp_answered(request: web.Request) -> web.Response:
        try:
            job = await resize.enqueue(request.query["width"])  # type: ignore[arg-type]
        except TaskArgumentError as exc:
            raise web.HTTPUnprocessableEntity(text=str(exc)) from None
        return web.json_response({"job_id": job.job_id})

    aiohttp_app.router.add_post("/through", aiohttp_through)
    aiohttp_app.router.add_post("/answered", aiohttp_answered)
    return aiohttp_app


@pytest.mark.broker
@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_wrong_task_argument_is_the_apps_500_unless_the_route_answers_it(
    framework: str, amqp_url: str, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`TaskArgumentError` is not one of the errors the integrations answer (those say "try
    again"): let through, it is a 500 with its traceback logged (a wrong call is the app's
    bug); a route whose arguments come from the request answers it, 422. Nothing is sent."""
    serve = serve_asgi if framework == "fastapi" else serve_aiohttp
    async with (
        serve(_tasks_app(framework, amqp_url, queue_name)) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        assert (await client.post("/through", params={"width": "3"})).status_code == 200
        through = await client.post("/through", params={"width": "wide"})
        assert through.status_code == 500, through.text
        assert "t.resize" not in through.text  # a 500 tells the client nothing of the app
        answered = await client.post("/answered", params={"width": "wide"})
        assert answered.status_code == 422, answered.text
        assert "width" in answered.text and "t.resize" in answered.text
    errors = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert any(isinstance(e, TaskArgumentError) for e in errors), caplog.text
    assert "answering" not in caplog.text  # not taken for an outage
    assert await queue_depth(amqp_url, queue_name) == 1  # the good one only


@pytest.mark.broker
def test_a_wrong_task_argument_in_a_flask_route_is_a_500_unless_the_route_answers_it(
    amqp_url: str, queue_name: str
) -> None:
    """The same from Flask with a `SyncProducer` (no integration: the app answers errors)."""
    from flask import Flask, abort, request

    tasks = Tasks()

    @tasks.task(queue=queue_name, name="t.resize")
    def resize(width: int) -> int:
        return width

    app = Flask(__name__)
    with SyncProducer(amqp_url, timeout=5) as producer:

        @app.post("/through")
        def through() -> dict[str, str]:
            width = request.args["width"]
            return {"job_id": producer.enqueue(resize, width).job_id}  # type: ignore[arg-type]

        @app.post("/answered")
        def answered() -> dict[str, str]:
            try:
                job = producer.enqueue(resize, request.args["width"])  # type: ignore[arg-type]
            except TaskArgumentError as exc:
                abort(422, str(exc))
            return {"job_id": job.job_id}

        with serve_wsgi(app) as base, httpx.Client(base_url=base, timeout=30) as client:
            assert client.post("/through", params={"width": "3"}).status_code == 200
            assert client.post("/through", params={"width": "wide"}).status_code == 500
            answered_ = client.post("/answered", params={"width": "wide"})
            assert answered_.status_code == 422 and "t.resize" in answered_.text
    assert asyncio.run(queue_depth(amqp_url, queue_name)) == 1
