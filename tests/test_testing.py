"""The test kit: a handler's outcome without a broker, through the worker's own dispatch and
failure routing; the pytest plugin's broker fixtures; running a worker until N are handled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest

import aio_workq
from aio_workq import ConfigurationError, Defer, Job, Queue, Reject, Retry, RetryPolicy
from aio_workq.testing import run_handler, run_worker


class Resize(pydantic.BaseModel):
    path: str
    width: int


async def ok(job: Job) -> str:
    await job.forward({"thumb": job.data["path"]}, queue="thumbnails", delay=2.5)
    return "done"


async def fails(job: Job) -> None:
    raise KeyError("width")


async def typed(task: Resize, job: Job) -> int:
    return task.width * 2


async def test_a_handler_that_returns_is_acked_with_what_it_forwarded() -> None:
    outcome = await run_handler(ok, {"path": "cat.png"})
    assert outcome.acked and outcome.result == "done" and outcome.error is None
    [forwarded] = outcome.forwarded
    assert (forwarded.queue, forwarded.data) == ("thumbnails", {"thumb": "cat.png"})
    assert forwarded.options["delay"] == 2.5


async def test_a_failure_is_retried_with_the_policy_backoff_then_dead_lettered() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay=4, jitter=0)
    outcome = await run_handler(fails, {"x": 1}, retry=policy)
    assert outcome.retried and outcome.delay == 4.0
    assert outcome.headers["x-workq-attempt"] == 2
    assert isinstance(outcome.error, KeyError)
    outcome = await run_handler(fails, {"x": 1}, retry=policy, attempt=2)
    assert outcome.retried and outcome.delay == 8.0
    outcome = await run_handler(fails, {"x": 1}, retry=policy, attempt=3)
    assert outcome.dead_lettered and outcome.reason == "builtins.KeyError: 'width'"
    outcome = await run_handler(fails, {"x": 1}, retry=None)
    assert outcome.dead_lettered


async def test_retry_defer_and_reject_from_the_handler() -> None:
    async def retry(job: Job) -> None:
        raise Retry(delay=5)

    async def defer(job: Job) -> None:
        raise Defer(3)

    async def reject(job: Job) -> None:
        raise Reject("no such image")

    outcome = await run_handler(retry, b"x")
    assert outcome.retried and outcome.delay == 5.0
    outcome = await run_handler(defer, b"x", attempt=2)
    assert outcome.deferred and outcome.delay is not None and outcome.delay >= 3
    assert outcome.headers["x-workq-attempt"] == 2  # the attempt is not used up
    outcome = await run_handler(reject, b"x")
    assert outcome.dead_lettered and outcome.reason == "aio_workq.Reject: no such image"
    assert outcome.headers["x-workq-rejected"] is True


async def test_a_queue_without_dead_letters_drops_the_failed_message() -> None:
    outcome = await run_handler(fails, b"x", queue=Queue("q", dead_letter=False), retry=None)
    assert outcome.kind == "dropped"


async def test_typed_handlers_get_their_payload_or_dead_letter_it() -> None:
    outcome = await run_handler(typed, Resize(path="a.png", width=10))
    assert outcome.acked and outcome.result == 20
    outcome = await run_handler(typed, {"path": "a.png"})
    assert outcome.dead_lettered
    assert "width" in outcome.headers["x-workq-validation-error"]


async def test_an_rpc_request_gets_the_reply_or_the_error() -> None:
    outcome = await run_handler(typed, {"path": "a.png", "width": 4}, rpc=True)
    assert outcome.acked and outcome.replied and outcome.reply == 8
    outcome = await run_handler(fails, b"x", rpc=True)
    assert outcome.acked and outcome.reply_error == "builtins.KeyError"  # the caller got it
    assert outcome.reply == "'width'"


async def test_a_bad_forward_fails_the_job_like_on_a_broker() -> None:
    async def bad(job: Job) -> None:
        await job.forward(b"x", exchange="amq.topic", routing_key="k", delay=1)

    outcome = await run_handler(bad, b"x")
    assert outcome.retried and isinstance(outcome.error, ConfigurationError)


async def test_options_reach_the_job() -> None:
    seen: list[Any] = []

    async def look(job: Job) -> None:
        seen.append((job.headers["tenant"], job.message_id, job.redelivered, job.attempt))

    await run_handler(look, b"x", headers={"tenant": "t1"}, message_id="m1", redelivered=True)
    assert seen == [("t1", "m1", True, 1)]
    with pytest.raises(ConfigurationError, match="unknown publish option"):
        await run_handler(look, b"x", colour="red")
    # An attempt that is not a delivery's number (it ran as attempt 1, silently)
    for attempt in (0, -3, 1.5, True):
        with pytest.raises(ConfigurationError, match="attempt must be an int >= 1"):
            await run_handler(look, b"x", attempt=attempt)  # type: ignore[arg-type]
    assert len(seen) == 1


def test_the_pytest_plugin_is_registered(request: pytest.FixtureRequest) -> None:
    assert request.config.pluginmanager.has_plugin("aio_workq")


@pytest.mark.broker
async def test_run_worker_handles_n_messages_on_the_session_broker(
    workq_amqp_url: str, queue_name: str
) -> None:
    seen: list[int] = []

    async def handle(task: Resize) -> None:
        seen.append(task.width)

    async with aio_workq.Producer(workq_amqp_url) as producer:
        await producer.publish_many([Resize(path="p", width=n) for n in range(5)], queue=queue_name)
    state = await run_worker(workq_amqp_url, queue=queue_name, handler=handle, count=5)
    assert state.processed == 5 and sorted(seen) == [0, 1, 2, 3, 4]


def test_the_broker_script_needs_no_dependencies_of_the_package() -> None:
    """`make broker-start` runs `python3 -m scripts.broker` outside the venv."""
    code = (
        "import sys; sys.modules['aio_pika'] = None\n"  # as if not installed
        "import scripts.broker as b; print(b.LocalBroker.__module__)\n"
        "import scripts.cluster, scripts.postgres\n"  # on the same stdlib-only node helpers
        "sys.argv = ['x', '--help']; b.main()"
    )
    root = Path(__file__).parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.startswith("_aio_workq_testing._broker\n"), done.stderr
    assert "start,stop,status" in done.stdout
