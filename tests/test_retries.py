"""Retries held by the broker and dead letters (issue 3), against a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import Callable

import aio_pika
import pytest

import aio_workq
from aio_workq import (
    Defer,
    Job,
    Producer,
    Queue,
    Reject,
    Retry,
    RetryPolicy,
    RPCError,
    TopologyError,
    Worker,
)
from scripts.broker import LocalBroker
from tests.helpers import Counter, header_room, negotiated_frame_max, queue_depth, wait_until

pytestmark = pytest.mark.broker


async def test_poison_message_runs_max_attempts_then_is_dead_lettered_with_reasons(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter,
    amqp_url: str,
) -> None:  # fmt: skip
    policy = RetryPolicy(max_attempts=5, initial_delay=0.1, multiplier=2, jitter=0)

    async def poison(job: Job) -> None:
        counter.add(job.attempt)
        raise ValueError(f"bad input on attempt {job.attempt}")

    worker = make_worker(queue=queue_name, handler=poison, retry=policy)
    await worker.start()
    await producer.publish({"id": 7}, queue=queue_name, message_id="poison-1")
    dead = producer.dead_letters(queue_name)

    async def one_dead_letter() -> bool:
        return await dead.count() == 1

    await wait_until(one_dead_letter, timeout=15)
    assert counter.items == [1, 2, 3, 4, 5]
    [letter] = await dead.read()
    assert letter.body == b'{"id":7}' and letter.message_id == "poison-1"
    assert letter.headers["x-workq-original-queue"] == queue_name
    assert letter.headers["x-workq-attempts"] == 5
    assert letter.headers["x-workq-exception-type"] == "builtins.ValueError"
    assert letter.headers["x-workq-exception-message"] == "bad input on attempt 5"
    assert "ValueError" in letter.headers["x-workq-traceback"]
    assert letter.headers["x-workq-first-failure"] <= letter.headers["x-workq-last-failure"]
    assert letter.reason == "builtins.ValueError: bad input on attempt 5"
    assert await queue_depth(amqp_url, queue_name) == 0
    for level in policy.levels_ms():
        assert await queue_depth(amqp_url, Queue(queue_name).delay_queue(level)) == 0
    assert worker.state.dead_lettered == 1 and worker.state.retried == 4


async def test_backoff_gaps_are_at_least_the_delays_and_at_most_two_seconds_more(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    policy = RetryPolicy(max_attempts=4, initial_delay=0.5, multiplier=2, jitter=0)

    async def failing(job: Job) -> None:
        counter.add(time.monotonic())
        raise RuntimeError("again")

    await make_worker(queue=queue_name, handler=failing, retry=policy).start()
    await producer.publish("x", queue=queue_name)
    times = await counter.wait_for(4, timeout=20)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    for attempt, gap in enumerate(gaps, start=1):
        assert policy.delay(attempt) <= gap <= policy.delay(attempt) + 2, (attempt, gaps)


async def test_explicit_retry_delay_and_reject(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    async def handler(job: Job) -> None:
        counter.add((job.data, job.attempt, time.monotonic()))
        if job.data == "later" and job.attempt == 1:
            raise Retry(delay=1)
        if job.data == "never":
            raise Reject("malformed")

    await make_worker(queue=queue_name, handler=handler).start()
    await producer.publish("never", queue=queue_name)
    await producer.publish("later", queue=queue_name)
    seen = await counter.wait_for(3, timeout=10)
    dead = producer.dead_letters(queue_name)
    [letter] = await dead.read()
    assert letter.body == b"never" and letter.headers["x-workq-rejected"] is True
    assert letter.headers["x-workq-attempts"] == 1
    assert [(d, a) for d, a, _ in seen] == [("never", 1), ("later", 1), ("later", 2)]
    assert seen[2][2] - seen[1][2] >= 1.0


async def test_an_integration_error_is_dead_lettered_on_its_first_attempt(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    """A handler that raises `IntegrationError` (aio-workq used the wrong way: a registry with
    no producer) was retried 5 times before it was dead-lettered: no retry fixes a
    configuration. It goes to the dead-letter queue at once, with its reason."""

    async def handler(job: Job) -> None:
        counter.add(job.attempt)
        raise aio_workq.IntegrationError("the tasks are not bound to a producer")

    worker = make_worker(queue=queue_name, handler=handler, retry=RetryPolicy(initial_delay=0.1))
    await worker.start()
    await producer.publish("chain", queue=queue_name)

    async def moved() -> bool:  # retried or dead-lettered: the first failure is settled
        return worker.state.retried + worker.state.dead_lettered > 0

    await wait_until(moved, timeout=15)
    [letter] = await producer.dead_letters(queue_name).read()
    assert counter.items == [1] and letter.headers["x-workq-attempts"] == 1
    assert letter.headers["x-workq-exception-type"] == "aio_workq.IntegrationError"
    assert letter.headers["x-workq-exception-message"] == "the tasks are not bound to a producer"
    assert worker.state.dead_lettered == 1 and worker.state.retried == 0


async def test_a_pending_retry_survives_a_broker_restart(
    amqp_url: str, local_broker: LocalBroker, queue_name: str, counter: Counter
) -> None:
    async def handler(job: Job) -> None:
        counter.add(job.attempt)
        if job.attempt == 1:
            raise Retry(delay=5)

    # Classic queues: a broker holding the suite's hundreds of quorum queues can take longer
    # than this test to recover them all after a restart; durability is the same.
    queue = Queue(queue_name, type="classic")
    async with Producer(amqp_url) as producer:
        async with Worker(amqp_url, queue=queue, handler=handler):
            await producer.publish("x", queue=queue)
            await counter.wait_for(1)
    delay_queue = queue.delay_queue(5000)

    async def waiting_in_delay_queue() -> bool:
        return await queue_depth(amqp_url, delay_queue) == 1

    await wait_until(waiting_in_delay_queue)
    local_broker.stop()
    local_broker.start()
    async with Worker(amqp_url, queue=queue, handler=handler):
        assert await counter.wait_for(2, timeout=60) == [1, 2]


async def test_crash_loop_message_reaches_the_dead_letter_queue_by_delivery_limit(
    amqp_url: str, producer: Producer, queue_name: str
) -> None:
    spec = Queue(queue_name, delivery_limit=2)
    for body in ("a", "poison", "b", "c"):
        await producer.publish(body, queue=spec)
    done: set[str] = set()
    crashes = 0
    dead = producer.dead_letters(spec)
    for _ in range(8):  # restart the worker after each crash, like a supervisor would
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.worker_proc", amqp_url, queue_name, "crash-on-poison",
            "2", stdout=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            while line := (await proc.stdout.readline()).decode():
                if line.startswith("DONE"):
                    done.add(line.split()[1])
                if line.strip() == "STARTED poison":
                    crashes += 1  # the process exits hard right after this line
                if done == {"a", "b", "c"} and await dead.count() == 1:
                    break
        if proc.returncode is None:
            # A stop, not a kill: "DONE c" is printed before c's ack, which the stop sends.
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        async with asyncio.timeout(30):
            await proc.wait()
        if done == {"a", "b", "c"} and await dead.count() == 1:
            break
    [letter] = await producer.dead_letters(spec).read()
    assert letter.body == b"poison"
    assert letter.reason == "delivery_limit"
    assert done == {"a", "b", "c"}
    assert crashes == 3  # first delivery + 2 redeliveries, then the broker dead-letters it
    assert await queue_depth(amqp_url, queue_name) == 0


async def test_replay_moves_dead_letters_back_and_they_are_processed(
    amqp_url: str, producer: Producer, make_worker: Callable[..., Worker], queue_name: str,
    counter: Counter,
) -> None:  # fmt: skip
    fixed = asyncio.Event()

    async def handler(job: Job) -> None:
        if not fixed.is_set():
            raise Reject("not yet")
        counter.add((job.data, job.attempt))

    await make_worker(queue=queue_name, handler=handler, concurrency=10).start()
    await producer.publish_many(range(30), queue=queue_name)
    dead = producer.dead_letters(queue_name)

    async def all_dead() -> bool:
        return await dead.count() == 30

    await wait_until(all_dead, timeout=15)
    fixed.set()
    assert await dead.replay() == 30
    received = await counter.wait_for(30)
    assert sorted(d for d, _ in received) == list(range(30))
    assert {a for _, a in received} == {1}
    assert await dead.count() == 0


async def test_dead_letters_of_a_queue_that_does_not_exist_say_to_check_its_name(
    producer: Producer, queue_name: str
) -> None:
    """A misspelt queue: every call names the dead-letter queue missing and the fix."""
    dead_letters = producer.dead_letters(f"{queue_name}-misspelt")
    calls = [dead_letters.count(), dead_letters.read(), dead_letters.replay(),
             dead_letters.purge()]  # fmt: skip
    for call in calls:
        with pytest.raises(TopologyError) as caught:
            await call
        message = str(caught.value)
        assert f"no queue '{queue_name}-misspelt.dlq'" in message, message
        assert f"check the work queue's name ('{queue_name}-misspelt')" in message, message


async def test_replay_killed_midway_loses_nothing(
    amqp_url: str, producer: Producer, queue_name: str
) -> None:
    spec = Queue(queue_name)
    await producer.declare(spec)
    dlq = spec.dead_letter_queue
    await producer.publish_many(range(3000), routing_key=dlq)
    code = (
        "import asyncio, sys\n"
        "from aio_workq import Producer\n"
        "async def main():\n"
        "    async with Producer(sys.argv[1]) as p:\n"
        "        print('REPLAYING', flush=True)\n"
        "        await p.dead_letters(sys.argv[2]).replay()\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, amqp_url, queue_name, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"REPLAYING"

    async def first_batch_acked() -> bool:  # copies confirmed, originals acked: mid-way
        return await queue_depth(amqp_url, dlq) < 3000

    await wait_until(first_batch_acked)
    proc.kill()
    await proc.wait()

    async def none_lost() -> bool:  # the unacked batch returns to the DLQ once the broker sees
        work = await queue_depth(amqp_url, queue_name)  # the connection gone
        return work + await queue_depth(amqp_url, dlq) >= 3000

    await wait_until(none_lost)
    assert await queue_depth(amqp_url, dlq) > 0  # killed before it finished


async def test_existing_queue_without_dead_letter_arguments_says_how_to_migrate(
    amqp_url: str, make_worker: Callable[..., Worker], queue_name: str
) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        await channel.default_exchange.publish(aio_pika.Message(b"old"), routing_key=queue_name)
        worker = make_worker(queue=queue_name, handler=lambda job: None, queue_type="classic")
        with pytest.raises(TopologyError) as info:
            await worker.start()
        text = str(info.value)
        assert queue_name in text and "x-dead-letter-exchange" in text
        assert "To migrate" in text
        await queue.declare()  # still there, untouched
        assert queue.declaration_result.message_count == 1


async def test_undecodable_json_goes_straight_to_the_dead_letter_queue(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    async def handler(job: Job) -> None:
        counter.add(job.attempt)
        job.data  # noqa: B018 - decoding is what fails

    await make_worker(queue=queue_name, handler=handler).start()
    await producer.publish(b"{not json", queue=queue_name, content_type="application/json")
    dead = producer.dead_letters(queue_name)

    async def dead_lettered() -> bool:
        return await dead.count() == 1

    await wait_until(dead_lettered)
    [letter] = await dead.read()
    assert letter.headers["x-workq-rejected"] is True and "does not decode" in letter.reason
    assert counter.items == [1]


async def test_a_message_deferred_past_max_defers_is_dead_lettered_saying_so(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    async def always_later(job: Job) -> None:
        counter.add(job.headers.get("x-workq-defers", 0))
        raise Defer(0.05)

    worker = make_worker(queue=queue_name, handler=always_later, max_defers=2)
    await worker.start()
    await producer.publish("x", queue=queue_name)
    dead = producer.dead_letters(queue_name)

    async def dead_lettered() -> bool:
        return await dead.count() == 1

    await wait_until(dead_lettered, timeout=20)
    assert counter.items == [0, 1, 2]  # ran three times: deferred twice, the third refused
    [letter] = await dead.read()
    assert letter.exception_type == "aio_workq.Defer"
    assert "max_defers=2" in letter.reason and letter.headers["x-workq-defers"] == 2
    assert worker.state.deferred == 2 and worker.state.dead_lettered == 1


async def test_a_retry_delay_between_ladder_steps_is_not_rounded_up_to_the_step(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter
) -> None:
    async def handler(job: Job) -> None:
        counter.add(time.monotonic())
        if job.attempt == 1:
            raise Retry(delay=2.1)  # waits in the 5 s delay queue, with its own 2.1 s TTL

    policy = RetryPolicy(max_attempts=2, initial_delay=0.1, jitter=0)  # levels: 0.1 s, ladder
    await make_worker(queue=queue_name, handler=handler, retry=policy).start()
    await producer.publish("x", queue=queue_name)
    first, second = await counter.wait_for(2, timeout=20)
    assert 2.1 <= second - first < 5.0


@pytest.mark.parametrize("attempts", [1, 3])
async def test_a_failed_message_whose_copy_cant_be_sent_is_dead_lettered_not_run_forever(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter,
    amqp_url: str, attempts: int,
) -> None:  # fmt: skip
    # Headers that fill the content header almost to frame_max: the copy with the failure's
    # headers added can never be sent. It was returned to its queue and ran again at once,
    # forever on a classic queue (about 1,000 runs a second, two log lines each).
    spec = Queue(queue_name, type="classic")
    room = header_room(await negotiated_frame_max(amqp_url), "too-full")
    await producer.publish(b"x", queue=spec, message_id="too-full", headers={"h": "x" * room})

    async def fails(job: Job) -> None:
        counter.add(job.attempt)
        raise ValueError("it fails")

    policy = RetryPolicy(max_attempts=attempts, initial_delay=0.1, jitter=0)
    worker = make_worker(queue=spec, handler=fails, retry=policy)
    await worker.start()
    dead = producer.dead_letters(spec)

    async def one_dead_letter() -> bool:
        return await dead.count() == 1

    await wait_until(one_dead_letter, timeout=15)
    assert counter.items == [1]  # the copy can't be sent, so there is no next attempt
    assert await queue_depth(amqp_url, queue_name) == 0
    assert worker.state.dead_lettered == 1


class _Unprintable(Exception):
    """An exception whose str() and repr() raise (a typo in a custom __str__)."""

    def __str__(self) -> str:
        raise AttributeError("'_Unprintable' object has no attribute 'cod'")

    def __repr__(self) -> str:
        raise AttributeError("'_Unprintable' object has no attribute 'cod'")


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (_Unprintable, "_Unprintable: str() failed"),
        # a lone surrogate, as in a file name decoded with surrogateescape: not UTF-8
        (lambda: OSError("no such file: 'caf\udce9.txt'"), "caf\\udce9.txt"),
    ],
    ids=["str-raises", "surrogate"],
)
async def test_an_exception_that_cant_be_printed_is_retried_and_answered_like_any_other(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, counter: Counter,
    error: Callable[[], Exception], shown: str,
) -> None:  # fmt: skip
    # Its str() raised (or was not UTF-8) while the failure's headers or the RPC error reply
    # were made: the delivery was never settled and went straight back to the queue, to fail
    # the same way again at once, forever on a classic queue; an RPC caller waited for its
    # whole timeout.
    spec = Queue(queue_name, type="classic")

    async def fails_once(job: Job) -> str:
        counter.add(job.attempt)
        if job.attempt == 1:
            raise error()
        return "done"

    policy = RetryPolicy(max_attempts=3, initial_delay=0.1, jitter=0)
    worker = make_worker(queue=spec, handler=fails_once, retry=policy)
    await worker.start()
    await producer.publish("x", queue=spec)
    assert await counter.wait_for(2, timeout=15) == [1, 2]  # retried as attempt 2
    async with asyncio.timeout(5):  # well within the call's 20 s
        with pytest.raises(RPCError) as info:
            await producer.call("y", queue=spec, timeout=20)
    assert shown in str(info.value)
    assert worker.state.retried == 1 and worker.state.processed == 1


async def test_a_dead_letter_too_large_to_copy_is_reported_and_the_others_are_read_and_replayed(
    producer: Producer, make_worker: Callable[..., Worker], queue_name: str, amqp_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    # The broker's x-death headers grew a dead letter past frame_max: reading it copies it,
    # and that copy made the broker close the whole connection (FRAME_ERROR), the producer's
    # own included, at every read. Then (leftovers) the read raised SerializationError for
    # the whole queue: no other dead letter could be listed, nor replayed past it.
    spec = Queue(queue_name, type="classic")
    room = header_room(await negotiated_frame_max(amqp_url), "near-full") - 100
    await producer.publish(b"a", queue=spec, message_id="before")
    await producer.publish(b"x", queue=spec, message_id="near-full", headers={"h": "x" * room})
    await producer.publish(b"b", queue=spec, message_id="after")

    async def fails(job: Job) -> None:
        raise ValueError("it fails")

    worker = make_worker(queue=spec, handler=fails, retry=None)
    await worker.start()
    dead = producer.dead_letters(spec)

    async def three_dead_letters() -> bool:
        return await dead.count() == 3

    await wait_until(three_dead_letters, timeout=15)
    await worker.stop()
    caplog.set_level("WARNING", logger="aio_workq")
    connection = await aio_workq.connect(amqp_url)  # shared: its reconnects are counted
    try:
        async with Producer(connection=connection) as shared:
            letters = await shared.dead_letters(spec).find()
            assert sorted(d.message_id or "" for d in letters) == ["after", "before", "near-full"]
            # leftovers2: the letter says it too, for a page or a script to show
            too_large = {d.message_id: d.too_large for d in letters}
            assert too_large["before"] is None and too_large["after"] is None
            assert "--id near-full" in (too_large["near-full"] or "")
            assert connection.reconnects == 0 and shared.connected
            assert await shared.publish("after", queue=f"{queue_name}-other")
    finally:
        await connection.close()
    [warning] = [r.getMessage() for r in caplog.records if "keeping near-full" in r.getMessage()]
    assert "frame_max" in warning
    assert f"aio-workq dlq replay {queue_name} --id near-full" in warning
    assert "purge" in warning
    assert await dead.count() == 3  # a read leaves every one of them
    # A replay of the others passes it by; it stays, the others are moved.
    assert await dead.replay(where=lambda d: d.message_id != "near-full") == 2
    assert [d.message_id for d in await dead.find()] == ["near-full"]
    assert await queue_depth(amqp_url, queue_name) == 2
    assert await dead.replay() == 1  # without the broker's headers, it fits again
    assert await dead.count() == 0
    assert await queue_depth(amqp_url, queue_name) == 3


async def test_a_dead_letter_move_nacked_by_a_new_dead_letter_queue_is_sent_again(
    producer: Producer,
    make_worker: Callable[..., Worker],
    queue_name: str,
    local_broker: LocalBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker declares its queue with its dead-letter and retry queues, quorum queues all:
    a nack from one of them right after (two workers starting at once on a new queue: the
    queue may still be starting) is sent again, as a nack from the work queue itself is.
    Before, only the work queue's nacks were: a retry or dead-letter move nacked then failed at
    once and its message ran again at once, without its delay. Here a policy makes the new
    dead-letter queue nack (full): the move is sent again for 1.55 s before it fails."""
    name = f"{queue_name}-full-dlq"
    definition = '{"max-length": 0, "overflow": "reject-publish"}'
    local_broker.ctl(
        "set_policy", name, f"^{queue_name}\\.dlq$", definition, "--apply-to", "queues",
        "--priority", "100",
    )  # fmt: skip
    failed_at: dict[str, float] = {}
    loop = asyncio.get_running_loop()

    async def failing(job: Job) -> None:
        failed_at.setdefault(str(job.message_id), loop.time())
        raise ValueError("dead-letter me")

    try:
        worker = make_worker(queue=queue_name, handler=failing, retry=RetryPolicy(max_attempts=1))
        with caplog.at_level(logging.ERROR, logger="aio_workq"):
            await worker.start()
            for n in range(3):  # the dead-letter queue takes one past its length (0)
                await producer.publish(n, queue=queue_name, message_id=f"m{n}")
            async with asyncio.timeout(15):
                while not (said := _logged(caplog, "could not move")):  # noqa: ASYNC110 - a log record has no event
                    await asyncio.sleep(0.01)
            said_at = loop.time()
        message_id = next(m for m in failed_at if m in said[0].getMessage())
        assert said_at - failed_at[message_id] >= 1.4, (message_id, said[0].getMessage())
        await worker.stop()
    finally:
        local_broker.ctl("clear_policy", name)


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if text in record.getMessage()]
