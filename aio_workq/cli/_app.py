"""The `aio-workq` Click application."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import click
from rich import box
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aio_workq import DeadLetter, Producer, WorkqError, __version__, redact_url, resolve_url

from ._dlq import DeadLetterFilter, letter_json, replay_matching, scan
from ._errors import CliError
from ._procmetrics import ProcessMetrics
from ._queues import QueueRow, collect
from ._repo import load_broker_script, load_demo
from ._run import HealthOptions, run_in_process
from ._supervisor import RestartPolicy, Supervisor, child_command
from ._target import WorkerOptions, import_target

__all__ = ("cli", "run")

F = TypeVar("F", bound=Callable[..., Any])

_LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)
_REPLAY_CHUNK = 100

_err = Console(stderr=True)


def run(argv: Sequence[str] | None = None) -> None:
    """Run the command line; errors become one line on stderr and a non-zero exit code."""
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="aio-workq",
                        standalone_mode=False)  # fmt: skip
    except click.exceptions.Abort:
        click.echo("aio-workq: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (WorkqError, OSError) as exc:
        click.echo(f"aio-workq: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("aio-workq: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _url_option(func: F) -> F:
    return click.option(
        "--url",
        envvar="AMQP_URL",
        show_envvar=True,
        help="Broker URL (default: AMQP_URL, then RABBITMQ_HOST/..., then localhost as guest).",
    )(func)


def _resolve(url: str | None) -> str:
    return resolve_url(url)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="aio-workq")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Run workers, publish, look at queues and dead letters, and run a local RabbitMQ node.

    Errors are one line on stderr with exit code 1 (2 for a usage error, 130 when
    interrupted); passwords in URLs are always shown as ***.
    """
    if ctx.invoked_subcommand != "worker":  # their errors are ours to report, once
        for name in ("aiormq", "aio_pika"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


# --- worker ------------------------------------------------------------------------------


@cli.command()
@click.argument("target", metavar="MODULE:ATTR")
@click.option("--queue", "-q", help="Run ATTR as a handler on this queue.")
@click.option(
    "--concurrency", "-c", type=click.IntRange(min=1), help="Handlers at once (with --queue)."
)
@click.option(
    "--processes", "-p", type=click.IntRange(min=1), default=1, show_default=True,
    help="Worker processes; more than 1 runs a supervisor that restarts crashed ones.",
)  # fmt: skip
@_url_option
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535),
    help="Serve GET /healthz on this port (200 while every worker consumes, else 503) and, "
    "with aio-workq[prometheus], GET /metrics (summed over all --processes).",
)  # fmt: skip
@click.option(
    "--metrics-host", default="127.0.0.1", show_default=True,
    help="Address for /healthz and /metrics (0.0.0.0 in a container).",
)  # fmt: skip
@click.option(
    "--health-grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
    help="Seconds a worker may be not consuming (e.g. reconnecting) before /healthz says 503.",
)  # fmt: skip
@click.option(
    "--max-restarts", type=click.IntRange(min=0), default=5, show_default=True,
    help="Crashes of one process within --restart-window that are restarted; then exit 1.",
)  # fmt: skip
@click.option(
    "--restart-window", type=click.FloatRange(min=1), default=60.0, show_default=True,
    help="Seconds over which crashes are counted.",
)  # fmt: skip
@click.option("--log-level", type=_LEVELS, default="INFO", show_default=True)
def worker(
    target: str,
    queue: str | None,
    concurrency: int | None,
    processes: int,
    url: str | None,
    metrics_port: int | None,
    metrics_host: str,
    health_grace: float,
    max_restarts: int,
    restart_window: float,
    log_level: str,
) -> None:
    """Run the workers that MODULE:ATTR names until SIGTERM or Ctrl-C.

    ATTR is a Worker, a list of Workers, a function returning them (sync or async), or a
    handler run on --queue. The first SIGTERM/SIGINT drains: running handlers finish, the rest
    of the messages stay on the broker. A second signal stops fast: running handlers are
    cancelled and their messages go back to the queue.
    """
    logging.basicConfig(level=log_level.upper(), format=_LOG_FORMAT, stream=sys.stderr)
    if url is not None:  # module-level Workers read AMQP_URL; so do the children
        os.environ["AMQP_URL"] = _resolve(url)
    health = HealthOptions(port=metrics_port, host=metrics_host, grace=health_grace)
    if processes == 1:
        options = WorkerOptions(target=target, queue=queue, concurrency=concurrency, url=url)
        asyncio.run(run_in_process(options, health))
        return
    # The children's summed /metrics: its directory is checked before the target is imported
    # here (which may write metric files of its own into it).
    metrics = ProcessMetrics.create() if metrics_port is not None else None
    try:
        import_target(target)  # fail here, once, rather than in every child
        args = ["worker", target, "--health-grace", str(health_grace), "--log-level", log_level]
        if queue is not None:
            args += ["--queue", queue]
        if concurrency is not None:
            args += ["--concurrency", str(concurrency)]
        supervisor = Supervisor(
            command=child_command(args),
            processes=processes,
            policy=RestartPolicy(max_restarts=max_restarts, window=restart_window),
            health=health,
            metrics=metrics,
        )
        code = asyncio.run(supervisor.run())
    finally:
        if metrics is not None:
            metrics.close()
    sys.exit(code)


# --- publish -----------------------------------------------------------------------------


@cli.command()
@click.argument("queue")
@click.argument("body", required=False)
@click.option("--json", "as_json", is_flag=True, help="Parse BODY (or each line) as JSON.")
@click.option(
    "--queue-type", type=click.Choice(["quorum", "classic"]), default="quorum",
    show_default=True, help="Type of the queue if it has to be declared.",
)  # fmt: skip
@_url_option
def publish(
    queue: str,
    body: str | None,
    as_json: bool,
    queue_type: Literal["quorum", "classic"],
    url: str | None,
) -> None:
    """Publish BODY to QUEUE, or one message per line of stdin (BODY '-' or omitted).

    Every message is confirmed by the broker; the count is printed at the end. Empty lines
    are skipped.
    """
    if body is None and sys.stdin.isatty():
        raise click.UsageError("give BODY, or pipe messages on stdin (one per line) with '-'")
    source = _stdin_chunks() if body in (None, "-") else _one(body)
    count = asyncio.run(_publish(_resolve(url), queue, source, as_json, queue_type))
    click.echo(f"published {count} message{'s' if count != 1 else ''} to {queue!r}, all confirmed")


def _one(body: str) -> Callable[[], list[tuple[int, str]]]:
    chunks = [[(1, body)]]
    return lambda: chunks.pop() if chunks else []


def _stdin_chunks(size: int = 1000) -> Callable[[], list[tuple[int, str]]]:
    numbered = enumerate(sys.stdin, start=1)

    def read() -> list[tuple[int, str]]:
        chunk: list[tuple[int, str]] = []
        for number, line in numbered:
            if line.strip():
                chunk.append((number, line.rstrip("\r\n")))
                if len(chunk) >= size:
                    break
        return chunk

    return read


async def _publish(
    url: str,
    queue: str,
    source: Callable[[], list[tuple[int, str]]],
    as_json: bool,
    queue_type: Literal["quorum", "classic"],
) -> int:
    total = 0
    async with Producer(url, queue_type=queue_type, name="aio-workq publish") as producer:
        while chunk := await asyncio.to_thread(source):
            bodies: list[Any] = []
            for number, line in chunk:
                if not as_json:
                    bodies.append(line)
                    continue
                try:
                    bodies.append(json.loads(line))
                except ValueError as exc:
                    if bodies:
                        await producer.publish_many(bodies, queue=queue)
                    raise CliError(
                        f"line {number} is not JSON ({exc}); the {total + len(bodies)} messages "
                        "before it were published and confirmed"
                    ) from None
            try:
                await producer.publish_many(bodies, queue=queue)
            except WorkqError as exc:
                raise CliError(
                    f"{exc} (publishing stopped; {total} earlier messages were confirmed)"
                ) from exc
            total += len(bodies)
    return total


# --- queues ------------------------------------------------------------------------------


@cli.command()
@click.argument("names", nargs=-1, metavar="[QUEUE]...")
@_url_option
@click.option(
    "--management-url", envvar="AIO_WORKQ_MANAGEMENT_URL", show_envvar=True,
    help="RabbitMQ management API (default: the broker's host, port 15672, same user).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@click.option("--watch", "-w", is_flag=True, help="Refresh until Ctrl-C.")
@click.option(
    "--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
    help="Seconds between refreshes with --watch.",
)  # fmt: skip
def queues(
    names: tuple[str, ...],
    url: str | None,
    management_url: str | None,
    as_json: bool,
    watch: bool,
    interval: float,
) -> None:
    """Depths of work queues with their retry and dead-letter queues.

    With the management plugin: every queue of the vhost (or those named), ready and unacked
    messages, consumers and rates. Without it: the queues named, over AMQP (ready messages and
    consumers; retry queues of the default RetryPolicy).
    """
    amqp_url = _resolve(url)
    explicit = management_url is not None

    async def snapshot() -> tuple[list[QueueRow], str]:
        return await collect(amqp_url, names, management_url, explicit=explicit)

    if not watch:
        rows, source = asyncio.run(snapshot())
        if as_json:
            click.echo(json.dumps([row.to_json() for row in rows], indent=2))
        else:
            Console().print(_queue_table(rows, source, amqp_url))
        return
    asyncio.run(_watch(snapshot, as_json, interval, amqp_url))


async def _watch(
    snapshot: Callable[[], Any], as_json: bool, interval: float, amqp_url: str
) -> None:
    """Refresh every `interval` seconds until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def pause() -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
        return not stop.is_set()

    try:
        if as_json:
            while not stop.is_set():
                rows, _ = await snapshot()
                click.echo(json.dumps([row.to_json() for row in rows]))
                await pause()
            return
        rows, source = await snapshot()
        with Live(_queue_table(rows, source, amqp_url), auto_refresh=False) as live:
            while await pause():
                rows, source = await snapshot()
                live.update(_queue_table(rows, source, amqp_url), refresh=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _queue_table(rows: list[QueueRow], source: str, amqp_url: str) -> Table:
    rates = any(row.publish_rate is not None for row in rows)
    now = datetime.datetime.now().strftime("%H:%M:%S")
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"queues at {redact_url(amqp_url)}",
        caption=f"{now} · from {source}" + ("" if rates else " (no rates)"),
    )
    table.add_column("queue", style="bold")
    for name in ("ready", "unacked", "consumers"):
        table.add_column(name, justify="right")
    if rates:
        for name in ("pub/s", "deliver/s", "ack/s"):
            table.add_column(name, justify="right")
    table.add_column("retrying", justify="right")
    table.add_column("dlq", justify="right")
    for row in rows:
        cells = [row.queue, _n(row.ready), _n(row.unacked), _n(row.consumers)]
        if rates:
            cells += [_rate(row.publish_rate), _rate(row.deliver_rate), _rate(row.ack_rate)]
        dead = _n(row.dead_letters)
        cells += [_n(row.retry), f"[red]{dead}[/]" if row.dead_letters else dead]
        table.add_row(*cells)
    return table


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


# --- dlq ---------------------------------------------------------------------------------


@cli.group()
def dlq() -> None:
    """List, show, replay and purge a queue's dead letters (QUEUE.dlq)."""


@dlq.command("list")
@click.argument("queue")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--exception", "-e", help="Only dead letters of this exception class.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@_url_option
def dlq_list(queue: str, limit: int, exception: str | None, as_json: bool, url: str | None) -> None:
    """The oldest dead letters of QUEUE, left in place."""
    amqp_url = _resolve(url)
    match = DeadLetterFilter(exception=exception)

    async def read() -> tuple[list[DeadLetter], int]:
        async with Producer(amqp_url, name="aio-workq dlq") as producer:
            letters = producer.dead_letters(queue)
            total = await letters.count()
            if match.empty:
                return await letters.read(limit), total
        return (await scan(amqp_url, queue, match))[:limit], total

    letters, total = asyncio.run(read())
    if as_json:
        click.echo(json.dumps([letter_json(letter) for letter in letters], indent=2))
        return
    table = Table(
        title=f"dead letters of {queue!r}",
        caption=f"{len(letters)} shown of {total} in {queue}.dlq",
    )
    for name in ("message id", "reason", "attempts", "body"):
        table.add_column(name, overflow="fold")
    for letter in letters:
        body = letter.body.decode(errors="replace")
        table.add_row(
            letter.message_id or "-",
            letter.reason,
            _n(letter.attempts),
            body if len(body) <= 60 else body[:57] + "...",
        )
    Console().print(table)


@dlq.command("show")
@click.argument("queue")
@click.argument("message_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
@_url_option
def dlq_show(queue: str, message_id: str, as_json: bool, url: str | None) -> None:
    """One dead letter of QUEUE by message id: why it failed, headers and body."""
    found = asyncio.run(scan(_resolve(url), queue, DeadLetterFilter(message_id=message_id)))
    if not found:
        raise CliError(f"no dead letter with message id {message_id!r} in {queue + '.dlq'!r}")
    data = letter_json(found[0])
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    out = Console()
    for key in ("message_id", "reason", "attempts", "content_type"):
        out.print(f"[bold]{key}[/]: {data[key]}", highlight=False)
    out.print("[bold]headers[/]:")
    for key, value in sorted(data["headers"].items()):
        text = str(value)
        if "\n" in text:  # the traceback
            out.print(f"  {key}:", highlight=False)
            out.print("    " + text.strip().replace("\n", "\n    "), highlight=False, markup=False)
        else:
            out.print(f"  {key}: {text}", highlight=False, markup=False)
    out.print(f"[bold]body[/] ({data['body_encoding']}):")
    out.print(data["body"], highlight=False, markup=False)


@dlq.command("replay")
@click.argument("queue")
@click.option("--limit", "-n", type=click.IntRange(min=1), help="Replay at most this many.")
@click.option("--exception", "-e", help="Only dead letters of this exception class.")
@click.option("--rate", type=click.FloatRange(min=0.1), help="At most this many per second.")
@click.option("--dry-run", is_flag=True, help="Only count what would be replayed.")
@_url_option
def dlq_replay(
    queue: str,
    limit: int | None,
    exception: str | None,
    rate: float | None,
    dry_run: bool,
    url: str | None,
) -> None:
    """Move dead letters back to QUEUE, attempts reset, oldest first.

    Each copy is confirmed by the broker before its dead letter is removed, so nothing is lost.
    Ctrl-C or SIGTERM settles the message under way, then stops (exit 130); a second one stops
    at once (the message in flight may then be in both queues).
    """
    amqp_url = _resolve(url)
    match = DeadLetterFilter(exception=exception)
    if dry_run:
        found = asyncio.run(scan(amqp_url, queue, match))
        selected = found if limit is None else found[:limit]
        click.echo(f"would replay {len(selected)} dead letters of {queue!r} (dry run)")
        return
    moved = [0]
    interrupted = asyncio.run(_replay(amqp_url, queue, match, limit, rate, moved))
    if interrupted:
        click.echo(
            f"aio-workq: interrupted: {moved[0]} dead letters replayed and confirmed; the rest "
            f"are still in {queue + '.dlq'!r}",
            err=True,
        )
        sys.exit(130)
    click.echo(f"replayed {moved[0]} dead letters into {queue!r}, all confirmed")


async def _replay(
    url: str,
    queue: str,
    match: DeadLetterFilter,
    limit: int | None,
    rate: float | None,
    moved: list[int],
) -> bool:
    """Replay; True when a signal stopped it (after the message under way was settled)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None

    def on_signal() -> None:  # the first finishes the message under way; a second cancels
        if stop.is_set():
            main.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        async with Producer(url, name="aio-workq dlq replay") as producer:
            letters = producer.dead_letters(queue)
            total = await letters.count()
            total = min(total, limit) if limit is not None else total
            with Progress(
                TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=_err,
            ) as progress:  # fmt: skip
                task = progress.add_task("replay", total=total)

                def on_moved(count: int) -> None:
                    moved[0] = count
                    progress.update(task, completed=count)

                if match.empty and rate is None:  # the library's own move, chunked for progress
                    while (limit is None or moved[0] < limit) and not stop.is_set():
                        left = _REPLAY_CHUNK if limit is None else limit - moved[0]
                        done = await letters.replay(limit=min(_REPLAY_CHUNK, left))
                        if done == 0:
                            break
                        on_moved(moved[0] + done)
                else:
                    await replay_matching(
                        url, queue, match, limit=limit, rate=rate, on_moved=on_moved, stop=stop
                    )
                progress.update(task, total=moved[0], completed=moved[0])
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return stop.is_set()


@dlq.command("purge")
@click.argument("queue")
@click.option("--yes", "-y", is_flag=True, help="Don't ask.")
@_url_option
def dlq_purge(queue: str, yes: bool, url: str | None) -> None:
    """Delete every dead letter of QUEUE (asks first unless --yes)."""
    amqp_url = _resolve(url)

    async def count() -> int:
        async with Producer(amqp_url, name="aio-workq dlq") as producer:
            return await producer.dead_letters(queue).count()

    async def purge() -> int:
        async with Producer(amqp_url, name="aio-workq dlq") as producer:
            return await producer.dead_letters(queue).purge()

    waiting = asyncio.run(count())
    if waiting == 0:
        click.echo(f"no dead letters in {queue + '.dlq'!r}")
        return
    if not yes:
        click.confirm(
            f"Delete all {waiting} dead letters in {queue + '.dlq'!r}? This cannot be undone",
            abort=True,
        )
    click.echo(f"purged {asyncio.run(purge())} dead letters from {queue + '.dlq'!r}")


# --- broker and demo ---------------------------------------------------------------------


@cli.group()
def broker() -> None:
    """A throwaway local RabbitMQ node (Debian's rabbitmq-server; needs a clone of the repo)."""


def _dir_option(func: F) -> F:
    return click.option(
        "--dir", "state_dir", type=click.Path(file_okay=False), default=".broker/dev",
        show_default=True, envvar="AIO_WORKQ_BROKER_DIR", show_envvar=True,
        help="The node's directory: data, logs, ports (state.json).",
    )(func)  # fmt: skip


@broker.command("start")
@_dir_option
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="AMQP port (default: free).")
@click.option("--management", is_flag=True, help="Enable the management plugin (HTTP API).")
@click.option("--timeout", type=float, default=60.0, show_default=True)
def broker_start(state_dir: str, port: int, management: bool, timeout: float) -> None:
    """Start the node (installs rabbitmq-server with apt-get as root when it is missing)."""
    from pathlib import Path

    script = load_broker_script()
    path = Path(state_dir)
    try:
        script.ensure_installed()
        path.mkdir(parents=True, exist_ok=True)
        try:
            node = script.LocalBroker.from_dir(path)
        except script.BrokerError:
            node = script.LocalBroker(path)
        if port and not node.running():
            node.amqp_port = port
        node.management = node.management or management
        node.start(timeout=timeout)
    except script.BrokerError as exc:
        raise CliError(str(exc)) from None
    click.echo(f"RabbitMQ node {node.node} is up at {redact_url(node.url)}")
    if node.management:
        click.echo(f"management API: {node.management_url}")


@broker.command("stop")
@_dir_option
@click.option("--timeout", type=float, default=30.0, show_default=True)
def broker_stop(state_dir: str, timeout: float) -> None:
    """Stop the node (its data is kept for the next start)."""
    from pathlib import Path

    script = load_broker_script()
    if not (Path(state_dir) / "state.json").exists():
        click.echo(f"no broker in {state_dir}")
        return
    try:
        node = script.LocalBroker.from_dir(Path(state_dir))
        node.stop(timeout=timeout)
        node.close()
    except script.BrokerError as exc:
        raise CliError(str(exc)) from None
    click.echo(f"stopped {node.node}")


@broker.command("status")
@_dir_option
def broker_status(state_dir: str) -> None:
    """Whether the node runs (exit 0) or not (exit 1), and its URL."""
    from pathlib import Path

    script = load_broker_script()
    try:
        node = script.LocalBroker.from_dir(Path(state_dir))
    except script.BrokerError as exc:
        raise CliError(str(exc)) from None
    up = node.running()
    click.echo(f"{node.node}: {'running' if up else 'stopped'}, {redact_url(node.url)}")
    if up and node.management:
        click.echo(f"management API: {node.management_url}")
    sys.exit(0 if up else 1)


@cli.command()
@_url_option
def demo(url: str | None) -> None:
    """Two workers share ten tasks (examples/demo.py); a local node unless AMQP_URL is set."""
    module = load_demo()
    if url is not None:
        os.environ["AMQP_URL"] = _resolve(url)
    sys.exit(module.main())


@cli.command(
    "outbox",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def outbox(args: tuple[str, ...]) -> None:
    """The transactional outbox (aio-workq[postgres]): `schema`, `migrate`, `relay`.

    `aio-workq outbox relay --dsn DSN [--url AMQP_URL]` publishes committed outbox rows with
    confirms until SIGTERM; `aio-workq outbox --help` lists the options.
    """
    try:
        from aio_workq.outbox.__main__ import main as outbox_main
    except ImportError:
        raise CliError(
            "the outbox needs PostgreSQL's driver: pip install 'aio-workq[postgres]'"
        ) from None
    sys.exit(outbox_main(list(args)))
