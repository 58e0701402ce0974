"""Every code block of README.md and docs/**/*.md compiles; the ones that can run, run.

Each ```python block (with its `--8<--` includes expanded, as mkdocs shows it) is compiled, so a
snippet that does not parse fails with its file and line. The blocks listed in `RUNS` are also
run as a reader would paste them: offline ones in this process, the others as scripts against
the test broker (each listed with the queues it declares, deleted before and after).
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiormq
import httpx
import pytest

import aio_workq
from aio_workq import Producer, PublishTimeoutError, Queue, RetryPolicy
from scripts.broker import LocalBroker
from tests.helpers import queue_consumers, queue_depth, wait_until
from tests.servers import serve_asgi

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)")
INCLUDE = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"\s*$')


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page, as mkdocs renders it."""

    page: str  # relative to the repository
    line: int  # the block's first line in the page
    lang: str
    source: str  # dedented, includes expanded
    origins: tuple[str, ...] = field(default=())  # "file:line" of each source line

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def include(path: str, section: str | None) -> list[tuple[str, str]]:
    """The lines of `path` (or of its `section`), each with its "file:line"."""
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    numbered = [(text, f"{path}:{n}") for n, text in enumerate(lines, 1)]
    if section is not None:
        start = next(
            (i for i, (t, _) in enumerate(numbered) if f"--8<-- [start:{section}]" in t), None
        )
        end = next((i for i, (t, _) in enumerate(numbered) if f"--8<-- [end:{section}]" in t), None)
        assert start is not None and end is not None, f"{path}: no section {section!r}"
        numbered = numbered[start + 1 : end]
        # mkdocs.yml sets `dedent_subsections`: a section from inside a function is shown dedented
        texts = textwrap.dedent("\n".join(t for t, _ in numbered)).split("\n")
        numbered = [(t, w) for t, (_, w) in zip(texts, numbered, strict=True)]
    return [(t, w) for t, w in numbered if "--8<-- [" not in t]


def blocks_of(page: Path) -> list[Block]:
    rel = page.relative_to(ROOT).as_posix()
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent = len(fence["indent"])
        first = i + 2
        body: list[tuple[str, str]] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            text = lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip()
            included = INCLUDE.match(text.strip())
            if included:
                body += include(included["path"], included["section"])
            else:
                body.append((text, f"{rel}:{i + 1}"))
            i += 1
        source = textwrap.dedent("\n".join(t for t, _ in body))
        found.append(Block(rel, first, fence["lang"], source, tuple(w for _, w in body)))
        i += 1
    return found


BLOCKS = [block for page in PAGES for block in blocks_of(page)]
PYTHON = [b for b in BLOCKS if b.lang in ("python", "py")]


def test_the_pages_have_python_blocks() -> None:
    assert len(PYTHON) > 50, [b.where for b in PYTHON]
    assert {"README.md", "docs/quickstart.md", "docs/guides/web-apps.md"} <= {
        b.page for b in PYTHON
    }


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.where)
def test_python_block_compiles(block: Block) -> None:
    try:  # top-level await is allowed: many snippets are the inside of an async function
        compile(block.source, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    except SyntaxError as exc:
        line = block.origins[(exc.lineno or 1) - 1] if block.origins else block.where
        pytest.fail(f"{line}: {exc.msg}: {(exc.text or '').strip()}", pytrace=False)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "json"], ids=lambda b: b.where)
def test_json_block_parses(block: Block) -> None:
    try:
        json.loads(block.source)
    except json.JSONDecodeError as exc:
        pytest.fail(f"{block.origins[exc.lineno - 1]}: {exc.msg}", pytrace=False)


# --- the blocks that run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """How one block runs; `marker` is a line of it, so the entry follows the block around.

    - offline: exec'd in this process, no broker;
    - script: run to completion with AMQP_URL set; `expect` must be in its output;
    - until: run with AMQP_URL set until `expect` is printed (or, without `expect`, until its
      `queues` have consumers), then stopped with `stop` (Ctrl-C or SIGTERM);
    - asgi: exec'd here, its `app` served by uvicorn, and `POST /images?path=cat.png` sent.
    """

    page: str
    marker: str
    how: Literal["offline", "script", "until", "asgi"]
    expect: str = ""
    queues: tuple[str, ...] = ()
    stop: signal.Signals = signal.SIGINT
    then: str = ""  # appended to the block (a block that defines main() without running it)
    defines: tuple[str, ...] = ()  # names an offline block must leave defined (for the text)
    left: int = 0  # messages each of `queues` holds afterwards (published, not consumed)

    @property
    def id(self) -> str:
        return f"{self.page}[{self.marker[:30]}]"


TASKS_ENQUEUE = """

import asyncio


async def main() -> None:  # what `aio-workq worker myapp.images:tasks.workers` runs, no bind
    workers = tasks.workers()
    for worker in workers:
        await worker.start()
    try:
        job = await resize.enqueue("cat.png")  # through the producer the workers brought
        await job.result(timeout=30)  # once it ran, its child is recorded
        print(await tasks.job(f"{job.job_id}-upload").result(timeout=30))
    finally:
        for worker in workers:
            await worker.stop()


asyncio.run(main())
"""

RUNS = [
    Run("README.md", 'print("resizing", job.data["path"])', "until",
        expect="resizing cat.png", queues=("images",)),
    Run("README.md", "workq.add_exception_handlers(app)  # broker down: 503", "asgi",
        queues=("images",)),
    Run("docs/index.md", "await asyncio.sleep(1)", "script", expect="resizing cat.png",
        queues=("images",)),
    Run("docs/quickstart.md", "TASKS = [", "script", expect="processed 3 tasks",
        queues=("quickstart",)),
    Run("docs/quickstart.md", 'aio_workq.connect(name="media workers")', "until",
        queues=("images", "videos"), stop=signal.SIGTERM),
    Run("docs/guides/workers.md", 'Worker(queue="thumbnails", handler=resize, concurrency=4)',
        "until", queues=("images", "thumbnails"), stop=signal.SIGTERM),
    Run("docs/guides/workers.md", "prefetch=20,", "offline"),
    Run("docs/guides/workers.md", 'Worker(queue="reports", handler=render', "offline"),
    Run("docs/guides/confirms.md", 'print(await producer.call(7, queue="squares"', "script",
        expect="49", queues=("squares",), then="\n\nimport asyncio\n\nasyncio.run(main())\n"),
    Run("docs/guides/web-apps.md", 'job_id = producer.publish({"path": "cat.png"}', "script",
        queues=("images",), left=1),
    Run("docs/guides/web-apps.md", "# myproject/jobs.py", "offline"),
    Run("docs/guides/jobs.md", "producer.enqueue(thumb, \"cat.png\", width=64)", "script",
        expect="queued\nqueued", queues=("thumbs",), left=1),
    Run("docs/guides/jobs.md", 'await upload.options(job_id=f"{job.job_id}-upload")', "script",
        expect="uploaded cat.thumb.png", queues=("images", "uploads"), then=TASKS_ENQUEUE),
    Run("docs/guides/web-apps.md", 'name="images-api",', "offline"),
    Run("docs/guides/web-apps.md", "FastAPIInstrumentor.instrument_app(app)", "offline"),
    Run("docs/operations.md", "class SlowJobs(Hook):", "offline"),
    Run("docs/guides/exactly-once.md", 'consumer = idempotent(pool, name="confirm-order")',
        "offline", defines=("consumer", "confirm_order")),
    Run("docs/operations.md", "ParentBased(TraceIdRatioBased(0.1))", "offline"),
    Run("docs/guides/from-celery.md", "chord = await group([add.s(i, i)", "script",
        expect="sent to user4@example.com\ncancelled", queues=("orders", "mail")),
    Run("docs/guides/from-celery.md", 'Schedule("nightly", cron="0 3 * * *"', "offline",
        defines=("schedules", "daily")),
    Run("docs/guides/from-taskiq.md", "job = await charge.enqueue(Order(", "script",
        expect="queued\n1250", queues=("payments",)),
    Run("docs/guides/from-taskiq.md", 'raise Retry(delay=30)  # NackMessage', "script",
        expect="tested",
        then="\n\nimport asyncio\n\nasyncio.run(test_handle())\nprint('tested')\n"),
]  # fmt: skip


def block_of(run: Run) -> Block:
    found = [b for b in PYTHON if b.page == run.page and run.marker in b.source]
    assert len(found) == 1, f"{run.id}: {len(found)} blocks match (the page changed?)"
    return found[0]


def test_every_run_names_one_block() -> None:
    for run in RUNS:
        block_of(run)


@pytest.mark.parametrize("run", [r for r in RUNS if r.how == "offline"], ids=lambda r: r.id)
def test_offline_block_runs(run: Run) -> None:
    block = block_of(run)
    namespace: dict[str, Any] = {"__name__": "snippet"}
    exec(compile(block.source, block.where, "exec"), namespace)
    assert set(run.defines) <= set(namespace), f"{run.id} does not define {run.defines}"


def test_exactly_once_page_keeps_the_consumer_in_reach() -> None:
    """The page says to read `consumer.skipped` and call `consumer.purge()`: its snippet keeps
    the `IdempotentConsumer` that `idempotent()` returns, which the decorator form would lose."""
    from aio_workq.outbox import IdempotentConsumer

    run = next(r for r in RUNS if r.page == "docs/guides/exactly-once.md")
    namespace: dict[str, Any] = {"__name__": "snippet"}
    exec(compile(block_of(run).source, run.id, "exec"), namespace)
    assert isinstance(namespace["consumer"], IdempotentConsumer)
    assert namespace["consumer"].skipped == 0 and callable(namespace["consumer"].purge)


def test_outbox_recipe_says_what_it_needs() -> None:
    """The FastAPI + SQLAlchemy recipe's async engine needs SQLAlchemy's asyncio extra
    (greenlet); the page and the script say so."""
    page = (ROOT / "docs/guides/exactly-once.md").read_text(encoding="utf-8")
    recipe = page[page.index("## Recipe: FastAPI + SQLAlchemy") :]
    assert "'sqlalchemy[asyncio]'" in recipe[: recipe.index("outbox_app.py")]
    assert "'sqlalchemy[asyncio]'" in (ROOT / "docs/examples/outbox/outbox_app.py").read_text()


def queue_family(name: str) -> list[str]:
    """A queue and what a default worker declares with it: its .dlq and delay queues."""
    queue = Queue(name)
    delays = [queue.delay_queue(ms) for ms in RetryPolicy().levels_ms()]
    return [name, queue.dead_letter_queue, *delays]


async def delete_queues(url: str, names: tuple[str, ...]) -> None:
    async with await aio_workq.connect(url) as connection:
        channel = await connection.channel()
        for name in names:
            for member in queue_family(name):
                await channel.queue_delete(member)
        await channel.close()


@pytest.fixture
async def cleanup(amqp_url: str) -> AsyncIterator[list[str]]:
    """Names of queues to delete (with their families) before the block runs and after."""
    names: list[str] = []
    yield names
    await delete_queues(amqp_url, tuple(names))


async def has_consumers(url: str, names: tuple[str, ...]) -> bool:
    try:
        return all([await queue_consumers(url, name) > 0 for name in names])
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False


async def run_script(run: Run, path: Path, url: str, tmp_path: Path) -> tuple[int | None, str]:
    env = {**os.environ, "AMQP_URL": url, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(path), cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    output: list[str] = []
    try:
        async with asyncio.timeout(60):
            if run.how == "until":
                if run.expect:
                    while not any(run.expect in line for line in output):
                        line = (await proc.stdout.readline()).decode()
                        assert line, f"{run.id} exited early:\n" + "".join(output)
                        output.append(line)
                # Consuming (consume-ok), not only handling: a Ctrl-C during Worker.start()
                # closes the channel before the ack of a delivery handled meanwhile.
                await wait_until(lambda: has_consumers(url, run.queues), timeout=30)
                proc.send_signal(run.stop)
            rest, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, "".join(output) + rest.decode()


@pytest.mark.broker
@pytest.mark.parametrize(
    "run", [r for r in RUNS if r.how in ("script", "until")], ids=lambda r: r.id
)
async def test_block_runs_against_the_broker(
    run: Run, amqp_url: str, tmp_path: Path, cleanup: list[str]
) -> None:
    block = block_of(run)
    cleanup += run.queues
    await delete_queues(amqp_url, run.queues)  # what an earlier run may have left
    script = tmp_path / "snippet.py"
    script.write_text(block.source + run.then, encoding="utf-8")

    returncode, output = await run_script(run, script, amqp_url, tmp_path)

    if run.how == "until" and run.stop == signal.SIGINT:
        # Ctrl-C: asyncio.run cancels main() (the worker stops gracefully), then re-raises
        # KeyboardInterrupt, as any asyncio program does.
        assert returncode in (1, -signal.SIGINT), output
        assert output.rstrip().endswith("KeyboardInterrupt"), output
    else:
        assert returncode == 0, output
        assert "Traceback" not in output, output
    assert run.expect in output, output
    for name in run.queues:
        assert await queue_depth(amqp_url, name) == run.left, name


@pytest.mark.broker
async def test_readme_fastapi_block_serves(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch, cleanup: list[str]
) -> None:
    [run] = [r for r in RUNS if r.how == "asgi"]
    block = block_of(run)
    cleanup += run.queues
    await delete_queues(amqp_url, run.queues)
    monkeypatch.setenv("AMQP_URL", amqp_url)
    namespace: dict[str, Any] = {"__name__": "snippet"}
    exec(compile(block.source, block.where, "exec"), namespace)

    async with serve_asgi(namespace["app"]) as base, httpx.AsyncClient(base_url=base) as client:
        response = await client.post("/images", params={"path": "cat.png"})

    assert response.status_code == 202, response.text
    assert response.json()["job_id"]
    assert await queue_depth(amqp_url, "images") == 1


# --- documented bounds ------------------------------------------------------------------------


@pytest.mark.broker
async def test_publish_many_timeout_bounds_the_whole_batch(
    local_broker: LocalBroker, amqp_url: str, queue_name: str
) -> None:
    """docs/guarantees.md: `publish_many()`'s `timeout` is one deadline for the batch. Twenty
    messages through a window of two on a broker that answers nothing: each message bounded on
    its own would take about ten timeouts; the batch ends after one."""
    async with Producer(amqp_url, window=2) as producer:
        await producer.declare(queue_name)
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(local_broker.pause)  # TCP stays open, nothing answers
        try:
            started = loop.time()
            results = await producer.publish_many(
                range(20), queue=queue_name, timeout=1, return_exceptions=True
            )
            elapsed = loop.time() - started
        finally:
            await asyncio.to_thread(local_broker.resume)
    assert all(isinstance(r, PublishTimeoutError) for r in results), results
    assert elapsed < 5, f"{elapsed:.1f} s: the timeout bounded each message, not the batch"
