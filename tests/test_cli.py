"""The `aio-workq` command end to end, in subprocesses against the session's broker."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aio_pika.exceptions
import pytest

from aio_workq import Job, Producer, Reject, RetryPolicy, Worker
from tests.helpers import queue_depth, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.cli]


class Cli:
    """A running `python -m aio_workq ...`; its output lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = asyncio.Event()
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(proc.stdout, self.out)),
            asyncio.create_task(self._read(proc.stderr, self.err)),
        ]

    async def _read(self, stream: asyncio.StreamReader, lines: list[str]) -> None:
        while line := await stream.readline():
            lines.append(line.decode().rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = ""
    ) -> Any:
        """Wait until `predicate()` is truthy (checked on each new line of output)."""
        try:
            async with asyncio.timeout(timeout):
                while not (result := predicate()):
                    self._changed.clear()
                    await self._changed.wait()
                return result
        except TimeoutError:
            raise AssertionError(
                f"timed out waiting for {what or predicate}\nstdout: {self.out}\nstderr: {self.err}"
            ) from None

    def lines(self, pattern: str, stream: str = "out") -> list[re.Match[str]]:
        source = self.out if stream == "out" else self.err
        return [m for line in source if (m := re.search(pattern, line))]

    async def exit_code(self, timeout: float = 30.0) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await asyncio.gather(*self._readers)
        return code


@asynccontextmanager
async def cli(*args: str, env: dict[str, str], stdin: bytes | None = None) -> AsyncIterator[Cli]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aio_workq", *args,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        await proc.stdin.drain()
        proc.stdin.close()
    running = Cli(proc)
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def run_cli(
    *args: str, env: dict[str, str], stdin: bytes | None = None
) -> tuple[int, str, str]:
    async with cli(*args, env=env, stdin=stdin) as proc:
        code = await proc.exit_code()
    return code, "\n".join(proc.out), "\n".join(proc.err)


@pytest.fixture
def env(amqp_url: str) -> dict[str, str]:
    return {**os.environ, "AMQP_URL": amqp_url, "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
    except OSError:
        return 0, {}


async def wait_health(
    port: int,
    status: int,
    timeout: float = 20.0,
    where: Callable[[dict[str, Any]], bool] = lambda body: True,
) -> dict[str, Any]:
    body: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal body
        code, body = await asyncio.to_thread(healthz, port)
        return code == status and where(body)

    await wait_until(reached, timeout=timeout)
    return body


async def make_dead_letters(amqp_url: str, queue: str, bodies: list[str]) -> list[str]:
    """Dead-letter `bodies` through a worker whose handler raises the exception each names."""
    errors: dict[str, type[Exception]] = {"ValueError": ValueError, "KeyError": KeyError}

    async def fail(job: Job) -> None:
        raise errors.get(str(job.data).split(":")[0], Reject)(job.data)

    async with Producer(amqp_url) as producer:
        ids = await producer.publish_many(bodies, queue=queue)
        async with Worker(amqp_url, queue=queue, handler=fail, retry=None, concurrency=10):
            letters = producer.dead_letters(queue)
            await wait_until(lambda: _has(letters, len(bodies)), timeout=20)
    return [str(i) for i in ids]


async def _has(letters: Any, count: int) -> bool:
    return bool(await letters.count() >= count)


async def ids_in(amqp_url: str, name: str) -> list[str]:
    """Message ids in a queue, all left in place."""
    ids: list[str] = []
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            ids.append(str(message.message_id))
    return ids


# --- errors and the extra ------------------------------------------------------------------


def test_core_imports_without_click_and_cli_says_how_to_install() -> None:
    code = (
        "import sys; sys.modules['click'] = None; import aio_workq, aio_workq.cli; "
        "assert 'rich' not in sys.modules; aio_workq.cli.main(['--help'])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "pip install 'aio-workq[cli]'" in result.stderr
    assert "Traceback" not in result.stderr


async def test_errors_are_one_line_without_traceback_or_password(env: dict[str, str]) -> None:
    code, out, err = await run_cli("worker", "tests.no_such_module:worker", env=env)
    assert code == 1 and out == ""
    assert err.startswith("aio-workq: error: cannot import 'tests.no_such_module'")
    assert len(err.splitlines()) == 1

    code, _, err = await run_cli("worker", "tests.cli_app:quick", env=env)  # no --queue
    assert code == 1 and "looks like a handler: pass --queue QUEUE" in err

    dead = f"amqp://user:s3cret-pw@127.0.0.1:{free_port()}/"
    code, out, err = await run_cli("publish", "q", "x", "--url", dead, env=env)
    assert code == 1 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "s3cret-pw" not in out + err and "user:***@127.0.0.1" in err
    # No management API and no broker: the broker is what is down, not only the API.
    code, out, err = await run_cli("queues", "--url", dead, env=env)
    assert code == 1 and len(err.splitlines()) == 1 and "s3cret-pw" not in out + err
    assert "cannot connect to amqp://user:***@127.0.0.1" in err, err


# --- publish and queues --------------------------------------------------------------------


async def test_publish_from_stdin_counts_confirmed_messages(
    env: dict[str, str], amqp_url: str, queue_name: str
) -> None:
    code, out, err = await run_cli("publish", queue_name, "-", env=env, stdin=b"a\n\nb\nc\n")
    assert (code, out) == (0, f"published 3 messages to {queue_name!r}, all confirmed"), err
    assert await queue_depth(amqp_url, queue_name) == 3

    lines = b'{"n": 1}\n[2, 3]\n'
    code, out, err = await run_cli("publish", queue_name, "--json", env=env, stdin=lines)
    assert (code, out) == (0, f"published 2 messages to {queue_name!r}, all confirmed"), err
    bodies = []
    async with await aio_pika.connect(amqp_url) as connection:
        queue = await (await connection.channel()).declare_queue(queue_name, passive=True)
        while (message := await queue.get(fail=False)) is not None:
            bodies.append((message.content_type, message.body))
    assert bodies[3:] == [("application/json", b'{"n":1}'), ("application/json", b"[2,3]")]

    code, _, err = await run_cli("publish", queue_name, "--json", env=env, stdin=b"{}\nnot json\n")
    assert code == 1 and "line 2 is not JSON" in err
    assert "the 1 message before it was published" in err
    code, _, err = await run_cli("publish", queue_name, "not json", "--json", env=env)
    assert code == 1 and "BODY is not JSON" in err and "nothing was published" in err
    code, _, err = await run_cli("publish", queue_name, "x", "--url", " ", env=env)
    assert code == 1 and "--url is empty" in err and "AMQP_URL" in err


async def test_publish_stops_at_a_line_that_cannot_be_sent_and_counts_what_was_published(
    env: dict[str, str], amqp_url: str, queue_name: str
) -> None:
    # A line that is not UTF-8 (or --json's NaN) stopped the batch with "0 earlier messages
    # were confirmed" while the lines before it in the batch were published: a rerun sent
    # them twice.
    stdin = b"a\nb\ncaf\xe9\nd\n"
    code, _, err = await run_cli("publish", queue_name, "-", env=env, stdin=stdin)
    assert code == 1 and "line 3 cannot be sent" in err and "UTF-8" in err, err
    assert "the 2 messages before it were published and confirmed" in err
    assert await queue_depth(amqp_url, queue_name) == 2

    stdin = b'{"n": 1}\nNaN\n'
    code, _, err = await run_cli("publish", queue_name, "--json", env=env, stdin=stdin)
    assert code == 1 and "line 2 cannot be sent" in err, err
    assert "the 1 message before it was published and confirmed" in err
    assert await queue_depth(amqp_url, queue_name) == 3
    code, _, err = await run_cli("publish", queue_name, "NaN", "--json", env=env)
    assert code == 1 and "BODY cannot be sent" in err and "nothing was published" in err, err
    assert await queue_depth(amqp_url, queue_name) == 3


async def test_queues_table_and_json(env: dict[str, str], amqp_url: str, queue_name: str) -> None:
    await make_dead_letters(amqp_url, queue_name, ["ValueError: x"])
    async with Producer(amqp_url) as producer:
        await producer.publish_many(["a", "b"], queue=queue_name)

    code, out, err = await run_cli("queues", queue_name, "--json", env=env)
    assert code == 0, err
    [row] = json.loads(out)
    assert row["queue"] == queue_name
    assert (row["ready"], row["consumers"], row["dead_letters"], row["retry"]) == (2, 0, 1, 0)

    code, out, err = await run_cli("queues", queue_name, env=env)
    assert code == 0, err
    [line] = [line for line in out.splitlines() if queue_name in line]
    assert line.split() == [queue_name, "2", "-", "0", "0", "1"]
    assert "passive declares" in out

    watch = ("queues", queue_name, "--watch", "--json", "--interval", "0.2")
    async with cli(*watch, env=env) as watching:
        await watching.wait_for(lambda: len(watching.out) >= 2)
        watching.proc.send_signal(signal.SIGINT)
        assert await watching.exit_code() == 0
    assert all(json.loads(line)[0]["ready"] == 2 for line in watching.out)

    code, _, err = await run_cli("queues", f"{queue_name}-missing", env=env)
    assert code == 1 and f"queue '{queue_name}-missing' does not exist" in err


async def test_queues_delete_removes_the_queue_with_its_dlq_and_retry_queues(
    env: dict[str, str], amqp_url: str, queue_name: str
) -> None:
    await make_dead_letters(amqp_url, queue_name, ["ValueError: x"])
    async with Producer(amqp_url) as producer:
        await producer.publish_many(["a", "b"], queue=queue_name)
        await producer.declare(queue_name)
    retry = f"{queue_name}.retry.1000ms"
    async with await aio_pika.connect(amqp_url) as connection:
        args: dict[str, Any] = {"x-queue-type": "quorum", "x-message-ttl": 1000}
        await (await connection.channel()).declare_queue(retry, durable=True, arguments=args)

    code, _, err = await run_cli("queues", "delete", queue_name, env=env, stdin=b"n\n")
    assert code == 1 and "aborted" in err
    assert await queue_depth(amqp_url, queue_name) == 2
    code, _, err = await run_cli("queues", "delete", f"{queue_name}.dlq", "--yes", env=env)
    assert code == 1 and "name its work queue instead" in err

    code, out, err = await run_cli("queues", "delete", queue_name, "--yes", env=env)
    assert code == 0, err
    assert out.splitlines() == [
        f"deleted {queue_name} (2 messages)",
        f"deleted {queue_name}.dlq (1 message)",
        f"deleted {retry} (0 messages)",
    ]
    for name in (queue_name, f"{queue_name}.dlq", retry):
        with pytest.raises(aio_pika.exceptions.ChannelClosed):
            await queue_depth(amqp_url, name)
    code, _, err = await run_cli("queues", "delete", queue_name, "--yes", env=env)
    assert code == 1 and "does not exist" in err


async def test_queues_delete_without_the_management_api_finds_a_policys_retry_queues(
    env: dict[str, str], amqp_url: str, queue_name: str
) -> None:
    # Without the management API the retry queues are found by name: those of the default
    # RetryPolicy and of Retry(delay=...) always, another policy's with --retry-delays; the
    # output says which were looked for and how to find the others.
    async def handler(job: Job) -> None:
        pass

    policy = RetryPolicy(initial_delay=0.5, max_attempts=3)  # retry.500ms and retry.1000ms
    async with Worker(amqp_url, queue=queue_name, handler=handler, retry=policy):
        pass
    ladder = f"{queue_name}.retry.5000ms"  # where a Retry(delay=5) waits
    async with await aio_pika.connect(amqp_url) as connection:
        args: dict[str, Any] = {"x-queue-type": "quorum", "x-message-ttl": 5000}
        await (await connection.channel()).declare_queue(ladder, durable=True, arguments=args)

    code, out, err = await run_cli("queues", "delete", queue_name, "--yes", env=env)
    assert code == 0, err
    assert out.splitlines() == [
        f"deleted {queue_name} (0 messages)",
        f"deleted {queue_name}.dlq (0 messages)",
        f"deleted {queue_name}.retry.1000ms (0 messages)",
        f"deleted {ladder} (0 messages)",
    ]
    assert "--retry-delays" in err and f"{queue_name}.retry.<ms>ms" in err
    assert await queue_depth(amqp_url, f"{queue_name}.retry.500ms") == 0  # still there

    code, out, err = await run_cli(
        "queues", "delete", queue_name, "--yes", "--retry-delays", "0.5,1", env=env
    )
    assert code == 0, err
    assert out.splitlines() == [f"deleted {queue_name}.retry.500ms (0 messages)"]
    with pytest.raises(aio_pika.exceptions.ChannelClosed):
        await queue_depth(amqp_url, f"{queue_name}.retry.500ms")


# --- dead letters --------------------------------------------------------------------------


async def test_dlq_list_show_replay_with_filter_and_purge(
    env: dict[str, str], amqp_url: str, queue_name: str
) -> None:
    bodies = ["ValueError: 1", "KeyError: 2", "ValueError: 3", "KeyError: 4", "Reject: 5"]
    ids = await make_dead_letters(amqp_url, queue_name, bodies)

    code, out, err = await run_cli("dlq", "list", queue_name, "--json", env=env)
    assert code == 0, err
    listed = json.loads(out)
    assert sorted(item["message_id"] for item in listed) == sorted(ids)
    code, out, _ = await run_cli("dlq", "list", queue_name, "--json", "-e", "KeyError", env=env)
    assert sorted(item["body"] for item in json.loads(out)) == ["KeyError: 2", "KeyError: 4"]

    code, out, err = await run_cli("dlq", "show", queue_name, ids[1], "--json", env=env)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["exception_type"] == "builtins.KeyError" and shown["body"] == "KeyError: 2"
    code, _, err = await run_cli("dlq", "show", queue_name, "nope", env=env)
    assert code == 1 and "no dead letter with message id 'nope'" in err

    dry = ("dlq", "replay", queue_name, "-e", "KeyError", "--dry-run")
    code, out, _ = await run_cli(*dry, env=env)
    assert (code, out) == (0, f"would replay 2 dead letters of {queue_name!r} (dry run)")
    assert await queue_depth(amqp_url, queue_name) == 0

    code, out, err = await run_cli("dlq", "replay", queue_name, "--exception", "KeyError", env=env)
    assert (code, out) == (0, f"replayed 2 dead letters into {queue_name!r}, all confirmed"), err
    assert sorted(await ids_in(amqp_url, queue_name)) == sorted([ids[1], ids[3]])
    # The others stay, in their order.
    assert await ids_in(amqp_url, f"{queue_name}.dlq") == [ids[0], ids[2], ids[4]]

    code, _, err = await run_cli("dlq", "purge", queue_name, env=env, stdin=b"n\n")
    assert code == 1 and "aborted" in err
    assert await queue_depth(amqp_url, f"{queue_name}.dlq") == 3
    code, out, _ = await run_cli("dlq", "purge", queue_name, "--yes", env=env)
    assert (code, out) == (0, f"purged 3 dead letters from '{queue_name}.dlq'")

    await make_dead_letters(amqp_url, f"{queue_name}-2", ["ValueError"] * 3)
    code, out, err = await run_cli("dlq", "replay", f"{queue_name}-2", "--limit", "2", env=env)
    assert (code, out) == (0, f"replayed 2 dead letters into '{queue_name}-2', all confirmed"), err
    assert await queue_depth(amqp_url, f"{queue_name}-2.dlq") == 1


async def test_replay_interrupted_by_sigint_loses_nothing(
    env: dict[str, str], amqp_url: str, queue_name: str
) -> None:
    ids = await make_dead_letters(amqp_url, queue_name, [f"ValueError: {i}" for i in range(200)])
    async with cli(
        "dlq", "replay", queue_name, "-e", "ValueError", "--rate", "50", env=env
    ) as replay:
        await wait_until(lambda: _depth_at_least(amqp_url, queue_name, 20), timeout=20)
        replay.proc.send_signal(signal.SIGINT)
        assert await replay.exit_code() == 130
    assert "interrupted" in replay.err[-1]
    moved = await ids_in(amqp_url, queue_name)
    left = await ids_in(amqp_url, f"{queue_name}.dlq")
    assert 20 <= len(moved) < 200 and left  # it was interrupted half-way
    # Nothing lost, nothing doubled: the message under way was settled before it stopped.
    assert sorted(moved + left) == sorted(ids)


async def _depth_at_least(amqp_url: str, name: str, count: int) -> bool:
    return await queue_depth(amqp_url, name) >= count


# --- worker and supervisor -----------------------------------------------------------------


async def test_processes_drain_on_sigterm_and_lose_nothing(
    env: dict[str, str], amqp_url: str, queue_name: str
) -> None:
    env = {**env, "CLI_TEST_QUEUE": queue_name}
    async with Producer(amqp_url) as producer:
        await producer.declare(queue_name)
    async with cli("worker", "tests.cli_app:slow_workers", "--processes", "2", env=env) as sup:
        await sup.wait_for(lambda: len(sup.lines(r"worker consuming", "err")) == 2)
        async with Producer(amqp_url) as producer:
            await producer.publish_many([f"m{i}" for i in range(10)], queue=queue_name)
        # Two processes, two handlers each: four messages under way.
        await sup.wait_for(lambda: len(sup.lines(r"^STARTED")) >= 4, what="4 handlers running")
        sup.proc.send_signal(signal.SIGTERM)
        assert await sup.exit_code() == 0, sup.err
    begun = {m[1] for m in sup.lines(r"^STARTED \d+ (\S+)")}
    done = {m[1] for m in sup.lines(r"^DONE \d+ (\S+)")}
    assert begun == done  # every handler that started finished before its process exited
    assert len({m[1] for m in sup.lines(r"^STARTED (\d+)")}) == 2  # in two processes
    left = await ids_in(amqp_url, queue_name)
    assert len(done) + len(left) == 10  # the rest wait on the broker


async def test_second_sigterm_stops_fast_and_messages_go_back(
    env: dict[str, str], amqp_url: str, queue_name: str
) -> None:
    args = ["worker", "tests.cli_app:hold_unless_redelivered", "-q", queue_name, "-p", "2"]
    async with Producer(amqp_url) as producer:
        await producer.declare(queue_name)
    async with cli(*args, env=env) as sup:
        await sup.wait_for(lambda: len(sup.lines(r"worker consuming", "err")) == 2)
        async with Producer(amqp_url) as producer:
            await producer.publish_many(["a", "b"], queue=queue_name)
        await sup.wait_for(lambda: len(sup.lines(r"^STARTED")) == 2)
        sup.proc.send_signal(signal.SIGTERM)  # drain: the handlers hold for a minute...
        await sup.wait_for(lambda: len(sup.lines(r"stopping 1 worker\(s\) gracefully", "err")) == 2)
        sup.proc.send_signal(signal.SIGTERM)  # ...so stop them now
        assert await sup.exit_code(timeout=15) == 0
    assert sup.lines(r"received again: stopping the children fast", "err")
    assert not sup.lines(r"^DONE")
    assert await queue_depth(amqp_url, queue_name) == 2  # both back on the queue


async def test_killed_child_is_restarted_and_its_message_redelivered(
    env: dict[str, str], amqp_url: str, queue_name: str
) -> None:
    port = free_port()
    args = [
        "worker", "tests.cli_app:hold_unless_redelivered", "--queue", queue_name,
        "--processes", "2", "--metrics-port", str(port), "--health-grace", "0",
    ]  # fmt: skip
    async with Producer(amqp_url) as producer:
        await producer.declare(queue_name)
    async with cli(*args, env=env) as sup:
        await wait_health(port, 200)
        async with Producer(amqp_url) as producer:
            await producer.publish("held", queue=queue_name)
        [first] = await sup.wait_for(lambda: sup.lines(r"^STARTED (\d+) held False"))
        os.kill(int(first[1]), signal.SIGKILL)
        await sup.wait_for(lambda: sup.lines(r"was killed by SIGKILL; restarting in", "err"))
        await wait_health(port, 503)  # one process short (no grace)
        await wait_health(port, 200, where=lambda body: _restarts(body) == [0, 1])
        # Redelivered (to either process), and finished this time.
        await sup.wait_for(lambda: sup.lines(r"^DONE \d+ held"), what="the redelivery")
        sup.proc.send_signal(signal.SIGTERM)
        assert await sup.exit_code() == 0
    assert sup.lines(r"^STARTED \d+ held True")
    assert await queue_depth(amqp_url, queue_name) == 0


def _restarts(body: dict[str, Any]) -> list[int]:
    return sorted(p["restarts"] for p in body["processes"])


async def test_children_drain_when_the_supervisor_is_killed(
    env: dict[str, str], queue_name: str
) -> None:
    args = ["worker", "tests.cli_app:quick", "-q", queue_name, "-p", "2"]
    async with cli(*args, env=env) as sup:
        await sup.wait_for(lambda: len(sup.lines(r"worker consuming", "err")) == 2)
        sup.proc.kill()
        # The children hold the output pipes: they close once both have drained and exited.
        assert await sup.exit_code() == -signal.SIGKILL
    assert len(sup.lines(r"the supervisor \(pid \d+\) is gone: draining", "err")) == 2
    assert len(sup.lines(r"stopping 1 worker\(s\) gracefully", "err")) == 2
    assert len(sup.lines(r"stopped: ", "err")) == 2


async def test_a_target_the_children_cant_run_fails_once_in_the_supervisor(
    env: dict[str, str],
) -> None:
    """`--processes 2` with a target of the wrong kind (the Tasks registry, not its factory;
    --concurrency for a Worker): the children each failed and were restarted until the
    supervisor gave up, 20 s later. Now the supervisor says it once, at once."""
    for args, said in (
        (["tests.cli_app:tasks"], r"is a Tasks registry: name its workers factory"),
        (["tests.cli_app:slow_workers", "--concurrency", "2"], r"--concurrency applies to"),
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with cli("worker", *args, "--processes", "2", env=env) as sup:
            assert await sup.exit_code() == 1
        assert loop.time() - started < 10
        assert len(sup.lines(said, "err")) == 1
        assert not sup.lines(r"child \d started|crashes in", "err")


async def test_supervisor_gives_up_when_children_keep_crashing(env: dict[str, str]) -> None:
    args = ["worker", "tests.cli_app:broken_factory", "--processes", "2", "--max-restarts", "1"]
    async with cli(*args, env=env) as sup:
        assert await sup.exit_code() == 1
    assert sup.lines(r"2 crashes in 60 s, giving up", "err")
    assert sup.lines(r"no workers today", "err")


# ~17 s: `make test-cli` and `make test-slow`. In the default run: 503 while the broker is down
# (the --processes test below), the health rule's recovery (tests/test_cli_offline.py) and a
# worker's reconnect (tests/chaos/test_broker_kill.py, kill -9 once).
@pytest.mark.slow
async def test_healthz_flips_to_503_while_the_broker_is_down(
    env: dict[str, str], local_broker: Any, queue_name: str
) -> None:
    port = free_port()
    args = [
        "worker", "tests.cli_app:quick", "--queue", queue_name,
        "--metrics-port", str(port), "--health-grace", "0",
    ]  # fmt: skip
    async with cli(*args, env=env) as worker:
        body = await wait_health(port, 200)
        assert body["workers"][0]["queue"] == queue_name and body["workers"][0]["consuming"]
        await asyncio.to_thread(local_broker.stop)
        body = await wait_health(port, 503)
        assert body["status"] == "unavailable" and not body["workers"][0]["connected"]
        await asyncio.to_thread(local_broker.start)
        await wait_health(port, 200, timeout=30)  # reconnects every 5 s
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.exit_code() == 0


async def test_a_producer_the_factory_never_closed_ends_quietly_with_the_worker(
    env: dict[str, str], queue_name: str
) -> None:
    """asyncio.run() ends by cancelling what is left, the producer's connection included: its
    channel closing then is no broker trouble, and nothing tries to reopen it."""
    env = {**env, "CLI_TEST_QUEUE": queue_name}
    async with cli("worker", "tests.cli_app:workers_with_a_producer_left_open", env=env) as worker:
        await worker.wait_for(lambda: worker.lines("consuming", "err"), what="consuming")
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.exit_code() == 0
    err = "\n".join(worker.err)
    assert "stopped:" in err, err
    for wrong in ("reopen its channel", "lost the connection", "Task was destroyed", "Traceback"):
        assert wrong not in err, err


# ~13 s: `make test-cli` and `make test-slow`; wait_for_broker itself is in the default run
# (tests/test_link_startup.py).
@pytest.mark.slow
async def test_wait_for_broker_lets_the_worker_start_before_its_broker(
    env: dict[str, str], local_broker: Any, queue_name: str
) -> None:
    await asyncio.to_thread(local_broker.stop)
    try:
        # By default a worker whose broker is not up exits at once, saying so.
        code, _, err = await run_cli("worker", "tests.cli_app:quick", "-q", queue_name, env=env)
        assert code != 0 and "Traceback" not in err
        port = free_port()
        args = [
            "worker", "tests.cli_app:quick", "--queue", queue_name, "--wait-for-broker", "120",
            "--metrics-port", str(port), "--health-grace", "0",
        ]  # fmt: skip
        async with cli(*args, env=env) as worker:
            await wait_health(port, 503, timeout=30)  # up, and still waiting for its broker
            assert worker.proc.returncode is None
            await asyncio.to_thread(local_broker.start)
            body = await wait_health(port, 200, timeout=60)
            assert body["workers"][0]["consuming"]
            worker.proc.send_signal(signal.SIGTERM)
            assert await worker.exit_code() == 0
    finally:
        if not local_broker.running():
            await asyncio.to_thread(local_broker.start)


async def test_healthz_under_processes_turns_503_after_the_grace_not_twice_it(
    env: dict[str, str], local_broker: Any, queue_name: str
) -> None:
    port, grace = free_port(), 6.0
    args = [
        "worker", "tests.cli_app:quick", "--queue", queue_name, "--processes", "2",
        "--metrics-port", str(port), "--health-grace", str(grace),
    ]  # fmt: skip
    async with cli(*args, env=env) as sup:
        await wait_health(port, 200, timeout=30)
        lost = asyncio.get_running_loop().time()  # the connections drop as the stop begins
        await asyncio.to_thread(local_broker.stop)
        await wait_health(port, 503, timeout=30)
        waited = asyncio.get_running_loop().time() - lost
        await asyncio.to_thread(local_broker.start)
        sup.proc.send_signal(signal.SIGTERM)
        assert await sup.exit_code() == 0
    # The children notice the lost connection at once; the grace is counted once, by the
    # supervisor (it was counted by each child and then again by the supervisor: ~12 s).
    assert grace - 0.5 <= waited < grace + 4, waited


async def test_metrics_are_served_beside_healthz_with_the_counts_of_known_traffic(
    env: dict[str, str], amqp_url: str, queue_name: str
) -> None:
    port = free_port()
    args = ["worker", "tests.cli_app:quick", "--queue", queue_name, "--metrics-port", str(port)]
    async with cli(*args, env=env) as worker:
        await wait_health(port, 200)
        async with Producer(amqp_url) as producer:
            await producer.publish_many(["a", "b", "c"], queue=queue_name)
        wanted = f'aio_workq_handled_total{{outcome="ok",queue="{queue_name}"}} 3.0'

        def scrape() -> str:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as response:
                assert response.headers["Content-Type"].startswith("text/plain")
                return str(response.read().decode())

        async with asyncio.timeout(20):
            while wanted not in (text := await asyncio.to_thread(scrape)):  # noqa: ASYNC110 - an HTTP endpoint has no event
                await asyncio.sleep(0.2)  # polling an HTTP endpoint: nothing to wait on
        assert "aio_workq_handler_duration_seconds" in text
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.exit_code() == 0


# --- with the management plugin (a node of its own: slow) ----------------------------------


@pytest.mark.slow
async def test_queues_from_the_management_api_with_rates_and_watch(
    management_broker: Any, queue_name: str
) -> None:
    env = {
        **os.environ,
        "AMQP_URL": management_broker.url,
        "AIO_WORKQ_MANAGEMENT_URL": management_broker.management_url,
    }
    await make_dead_letters(management_broker.url, queue_name, ["ValueError: 1"])
    async with Producer(management_broker.url) as producer:
        await producer.publish_many(["a", "b", "c"], queue=queue_name)

    rows: dict[str, Any] = {}

    async def listed() -> bool:  # the API refreshes its figures every 5 s
        nonlocal rows
        code, out, err = await run_cli("queues", "--json", env=env)
        assert code == 0, err
        rows = {row["queue"]: row for row in json.loads(out)}
        return queue_name in rows and rows[queue_name]["ready"] == 3

    await wait_until(listed, timeout=30)
    row = rows[queue_name]
    assert (row["unacked"], row["consumers"], row["dead_letters"]) == (0, 0, 1)
    assert isinstance(row["publish_rate"], float) and isinstance(row["deliver_rate"], float)
    assert f"{queue_name}.dlq" not in rows  # folded into its work queue's row

    code, out, _ = await run_cli("queues", queue_name, env={**env, "COLUMNS": "200"})
    assert code == 0 and "pub/s" in out and "from the management API" in out
    code, out, _ = await run_cli("queues", queue_name, env={**env, "COLUMNS": "80"})
    assert code == 0 and "pub/s" not in out and "rates: widen or" in out

    watch = ("queues", queue_name, "--watch", "--json", "--interval", "0.5")
    async with cli(*watch, env=env) as watching:
        await watching.wait_for(lambda: len(watching.out) >= 2)
        watching.proc.send_signal(signal.SIGINT)
        assert await watching.exit_code() == 0
    assert all(json.loads(line)[0]["queue"] == queue_name for line in watching.out)

    bad = {**env, "AIO_WORKQ_MANAGEMENT_URL": f"http://127.0.0.1:{free_port()}/"}
    code, _, err = await run_cli("queues", env=bad)
    assert code == 1 and "management API at http://127.0.0.1:" in err
