"""The examples in examples/ run as the README says, against the session's broker."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aiormq
import pytest

from aio_workq import Queue, RetryPolicy

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL_QUEUE = Queue("task_queue", type="classic")
DEMO_QUEUE = "workq-demo"


def queue_family(queue: Queue) -> list[str]:
    """A work queue with the dead-letter and delay queues a default Worker declares."""
    delays = RetryPolicy().levels_ms()
    return [queue.name, queue.dead_letter_queue, *(queue.delay_queue(ms) for ms in delays)]


async def delete_queues(url: str, names: list[str]) -> None:
    async with await aio_pika.connect(url) as connection, connection.channel() as channel:
        for name in names:
            await channel.queue_delete(name)


async def message_count(url: str, name: str) -> int | None:
    """Messages ready in queue `name`, or None if it doesn't exist."""
    async with await aio_pika.connect(url) as connection, connection.channel() as channel:
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        return queue.declaration_result.message_count


@pytest.fixture
def env(amqp_url: str) -> dict[str, str]:
    return {**os.environ, "AMQP_URL": amqp_url, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
async def tutorial_queue(amqp_url: str) -> AsyncIterator[str]:
    """The tutorial's fixed queue, deleted before (leftovers) and after the test."""
    names = queue_family(TUTORIAL_QUEUE)
    await delete_queues(amqp_url, names)
    yield TUTORIAL_QUEUE.name
    await delete_queues(amqp_url, names)


async def run(script: str, *args: str, env: dict[str, str], timeout: float = 60) -> str:
    """Run examples/<script> to completion; its output (stdout and stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, f"examples/{script}", *args,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        pytest.fail(f"{script} {args} still running after {timeout}s:\n{out.decode()}")
    text = out.decode()
    assert proc.returncode == 0, f"{script} {args} exited with {proc.returncode}:\n{text}"
    return text


def received(output: str) -> list[str]:
    return re.findall(r"^ \[x\] Received '(.*)'$", output, re.MULTILINE)


async def test_new_task_and_worker(amqp_url: str, env: dict[str, str], tutorial_queue: str) -> None:
    tasks = ["First message.", "Second..", "Third"]
    for task in tasks:
        sent = await run("new_task.py", *task.split(), env=env)
        assert f" [x] Sent {task!r}" in sent
    assert await message_count(amqp_url, tutorial_queue) == len(tasks)

    out = await run("worker.py", "--count", str(len(tasks)), env=env)

    assert received(out) == tasks
    assert out.count(" [x] Done") == len(tasks)
    assert await message_count(amqp_url, tutorial_queue) == 0  # every task acknowledged


async def test_worker_finishes_its_task_on_ctrl_c(
    amqp_url: str, env: dict[str, str], tutorial_queue: str
) -> None:
    await run("new_task.py", "slow..", env=env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "examples/worker.py",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not lines or not lines[-1].startswith(" [x] Received"):
                line = (await proc.stdout.readline()).decode()
                assert line, "worker.py exited early:\n" + "".join(lines)
                lines.append(line)
            proc.send_signal(signal.SIGINT)  # mid-task: the worker finishes it, then exits
            rest, _ = await proc.communicate()
    except BaseException:
        proc.kill()
        await proc.communicate()
        raise
    out = "".join(lines) + rest.decode()

    assert proc.returncode == 0, out
    assert received(out) == ["slow.."]
    assert out.rstrip().endswith(" [x] Done"), out
    assert await message_count(amqp_url, tutorial_queue) == 0


async def test_demo(amqp_url: str, env: dict[str, str]) -> None:
    out = await run("demo.py", env=env, timeout=60)

    tally = re.search(
        r"^Tally: worker 1 did (\d+), worker 2 did (\d+): all (\d+) tasks done, nothing lost",
        out,
        re.MULTILINE,
    )
    assert tally, out
    first, second, total = map(int, tally.groups())
    assert total == 10 and first + second == total and first > 0 and second > 0, out
    assert len(re.findall(r"^ +[\d.]+ s  worker [12] took 'task \d+", out, re.MULTILINE)) == total
    assert await message_count(amqp_url, DEMO_QUEUE) is None  # the demo cleans up after itself
    # The README's sample output of `make demo` starts as the demo does.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sample = readme[readme.index("- **`make demo`**") :].split("```text\n", 1)[1]
    assert sample.split("\n", 1)[0].strip() == out.splitlines()[0], out
