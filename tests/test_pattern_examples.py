"""The pattern examples (RabbitMQ tutorials 1, 3-6, seed 004's central consumer) run as documented.

Each example runs as a subprocess against the session's broker. Receivers subscribe to an exchange
through a server-named queue, so a test starts them and waits for their ready line before anything
is emitted; every consumer exits by itself after `--count N` messages.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import aio_pika
import pytest

from aio_workq import Queue, RetryPolicy

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[1]
READY_LOGS = " [*] Waiting for logs"
READY_MESSAGES = " [*] Waiting for messages"

Cleanup = Callable[..., Awaitable[None]]


def queue_family(name: str) -> list[str]:
    """A named work queue with the dead-letter and delay queues a default Worker declares."""
    queue = Queue(name)
    delays = RetryPolicy().levels_ms()
    return [queue.name, queue.dead_letter_queue, *(queue.delay_queue(ms) for ms in delays)]


@pytest.fixture
def env(amqp_url: str) -> dict[str, str]:
    return {**os.environ, "AMQP_URL": amqp_url, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
async def cleanup(amqp_url: str) -> AsyncIterator[Cleanup]:
    """Delete the examples' fixed-name queues and exchanges now (leftovers) and after the test."""
    fixed_queues: list[str] = []
    fixed_exchanges: list[str] = []

    async def delete() -> None:
        async with await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel()
            for name in fixed_queues:
                await channel.queue_delete(name)
            for name in fixed_exchanges:
                await channel.exchange_delete(name)

    async def register(*, queues: Sequence[str] = (), exchanges: Sequence[str] = ()) -> None:
        fixed_queues.extend(queues)
        fixed_exchanges.extend(exchanges)
        await delete()

    yield register
    await delete()


class Example:
    """One example script running as a subprocess; its output is read line by line."""

    def __init__(self, script: str, *args: str) -> None:
        self.script = script
        self.args = args
        self.name = " ".join([script, *args])
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, env: dict[str, str]) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, f"examples/{self.script}", *self.args,
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def wait_for_line(self, text: str, timeout: float = 20) -> None:
        """Read output until a line starts with `text`."""
        assert self.proc is not None and self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while not any(line.startswith(text) for line in self.lines):
                    line = (await self.proc.stdout.readline()).decode()
                    if not line:
                        pytest.fail(f"{self.name} exited before {text!r}:\n{self.output}")
                    self.lines.append(line)
        except TimeoutError:
            pytest.fail(f"{self.name}: no {text!r} within {timeout}s:\n{self.output}")

    async def finish(self, timeout: float = 20, returncode: int = 0) -> str:
        """Wait for the script to exit; its whole output."""
        assert self.proc is not None
        try:
            async with asyncio.timeout(timeout):
                rest, _ = await self.proc.communicate()
        except TimeoutError:
            self.kill()
            pytest.fail(f"{self.name} still running after {timeout}s:\n{self.output}")
        self.lines.extend(rest.decode().splitlines(keepends=True))
        assert self.proc.returncode == returncode, (
            f"{self.name} exited with {self.proc.returncode}:\n{self.output}"
        )
        return self.output

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


@pytest.fixture
async def spawn(env: dict[str, str]) -> AsyncIterator[Callable[..., Awaitable[Example]]]:
    """Start examples; any still running at the end of the test is killed."""
    started: list[Example] = []

    async def start(script: str, *args: str) -> Example:
        example = Example(script, *args)
        started.append(example)
        await example.start(env)
        return example

    yield start
    for example in started:
        if example.proc is not None and example.proc.returncode is None:
            example.kill()
            await example.proc.wait()


@pytest.fixture
def run(
    spawn: Callable[..., Awaitable[Example]],
) -> Callable[..., Awaitable[str]]:
    """Run an example to completion (a producer); its output."""

    async def run_to_end(script: str, *args: str, returncode: int = 0) -> str:
        example = await spawn(script, *args)
        return await example.finish(returncode=returncode)

    return run_to_end


def messages(output: str) -> list[str]:
    """What a receiver printed for the messages it got (` [x] <text>` lines)."""
    return re.findall(r"^ \[x\] (.*)$", output, re.MULTILINE)


def central_messages(output: str) -> list[tuple[str, int]]:
    """(routing key, seq) of each message the central consumer printed, in order."""
    found = re.findall(r"^ \[x\] (\S+) (\{.*\})$", output, re.MULTILINE)
    return [(key, json.loads(data)["seq"]) for key, data in found]


def published(count: int) -> list[tuple[str, int]]:
    """What `central_publisher.py --count N` sends: seq 1..N, alternating the two routing keys."""
    return [("routine1_json" if seq % 2 else "routine2_json", seq) for seq in range(1, count + 1)]


async def test_tutorial1_hello_world(cleanup: Cleanup, run: Callable[..., Awaitable[str]]) -> None:
    await cleanup(queues=queue_family("hello"))

    assert " [x] Sent 'Hello World!'" in await run("tutorial1_send.py")
    out = await run("tutorial1_receive.py", "--count", "1")

    assert messages(out) == ["Received 'Hello World!'"]


async def test_tutorial3_every_subscriber_gets_every_log(
    cleanup: Cleanup, spawn: Callable[..., Awaitable[Example]], run: Callable[..., Awaitable[str]]
) -> None:
    await cleanup(exchanges=["logs"])
    # Nobody subscribed yet: the log is dropped, and that is not an error (mandatory=False).
    assert " [x] Sent 'info: nobody hears this'" in await run(
        "tutorial3_emit_log.py", "info: nobody hears this"
    )
    receivers = [await spawn("tutorial3_receive_logs.py", "--count", "2") for _ in range(2)]
    for receiver in receivers:
        await receiver.wait_for_line(READY_LOGS)

    await run("tutorial3_emit_log.py", "info: one")
    await run("tutorial3_emit_log.py", "warning: two")

    for receiver in receivers:
        assert messages(await receiver.finish()) == ["info: one", "warning: two"]


async def test_tutorial4_routing_by_severity(
    cleanup: Cleanup, spawn: Callable[..., Awaitable[Example]], run: Callable[..., Awaitable[str]]
) -> None:
    await cleanup(exchanges=["direct_logs"])
    errors = await spawn("tutorial4_receive_logs_direct.py", "--count", "1", "error")
    everything = await spawn(
        "tutorial4_receive_logs_direct.py", "--count", "3", "info", "warning", "error"
    )
    await errors.wait_for_line(READY_LOGS)
    await everything.wait_for_line(READY_LOGS)

    for severity in ["debug", "info", "warning", "error"]:  # nobody listens to debug
        sent = await run("tutorial4_emit_log_direct.py", severity, f"a {severity} message")
        assert f" [x] Sent {severity}:'a {severity} message'" in sent

    assert messages(await errors.finish()) == ["error:a error message"]
    assert messages(await everything.finish()) == [
        "info:a info message",
        "warning:a warning message",
        "error:a error message",
    ]


async def test_tutorial5_topics_match_binding_patterns(
    cleanup: Cleanup, spawn: Callable[..., Awaitable[Example]], run: Callable[..., Awaitable[str]]
) -> None:
    await cleanup(exchanges=["topic_logs"])
    kern = await spawn("tutorial5_receive_logs_topic.py", "--count", "2", "kern.*")
    critical = await spawn("tutorial5_receive_logs_topic.py", "--count", "2", "*.critical")
    await kern.wait_for_line(READY_LOGS)
    await critical.wait_for_line(READY_LOGS)

    # kern.critical comes last and matches both: anything routed wrongly before it would be
    # among the two messages each receiver prints before exiting.
    for key in ["kern.info", "app.critical", "app.info", "kern.disk.full", "kern.critical"]:
        await run("tutorial5_emit_log_topic.py", key, f"from {key}")

    assert messages(await kern.finish()) == [
        "kern.info:from kern.info",
        "kern.critical:from kern.critical",
    ]
    assert messages(await critical.finish()) == [
        "app.critical:from app.critical",
        "kern.critical:from kern.critical",
    ]


async def test_tutorial6_rpc_reply_and_remote_error(
    cleanup: Cleanup, spawn: Callable[..., Awaitable[Example]], run: Callable[..., Awaitable[str]]
) -> None:
    await cleanup(queues=queue_family("rpc_queue"))
    server = await spawn("tutorial6_rpc_server.py", "--count", "2")
    await server.wait_for_line(" [x] Awaiting RPC requests")

    out = await run("tutorial6_rpc_client.py", "30")
    assert out.splitlines() == [" [x] Requesting fib(30)", " [.] Got 832040"]

    failed = await run("tutorial6_rpc_client.py", "-1", returncode=1)
    assert " [!] The server failed: builtins.ValueError: fib(-1): n must be >= 0" in failed
    assert "Traceback" not in failed  # the caller gets the type and message, not the stack

    served = await server.finish()
    assert re.findall(r"^ \[\.\] (.*)$", served, re.MULTILINE) == ["fib(30)", "fib(-1)"]


async def test_tutorial6_rpc_timeout_without_a_server(
    cleanup: Cleanup, run: Callable[..., Awaitable[str]]
) -> None:
    await cleanup(queues=queue_family("rpc_queue"))  # also drops the request left unanswered

    out = await run("tutorial6_rpc_client.py", "5", "--timeout", "0.5", returncode=1)

    assert " [!] no reply within 0.5 s to the call on 'rpc_queue'" in out


async def test_central_consumer_in_order_with_a_standby(
    cleanup: Cleanup, spawn: Callable[..., Awaitable[Example]], run: Callable[..., Awaitable[str]]
) -> None:
    await cleanup(queues=queue_family("central"), exchanges=["test_exchange"])
    active = await spawn("central_consumer.py", "--count", "4")
    await active.wait_for_line(READY_MESSAGES)
    standby = await spawn("central_consumer.py", "--count", "6")
    await standby.wait_for_line(READY_MESSAGES)

    # The first consumer is the single active one: it gets every message, in publish order.
    sent = await run("central_publisher.py", "--count", "4")
    assert sent.count(" [x] Sent ") == 4
    assert central_messages(await active.finish()) == published(4)

    # It is gone: the standby takes over and gets the next messages, in order.
    await run("central_publisher.py", "--count", "6")
    assert central_messages(await standby.finish()) == published(6)

    # A routing key nobody is bound to is an error, not a silently dropped message.
    out = await run("central_publisher.py", "test_json_topic", returncode=1)
    assert " [!] No queue is bound to 'test_json_topic': message 1 not sent" in out
