"""`aio-workq dashboard`: the dashboard (aio_workq.dashboard) on aiohttp's web server."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import click

from aio_workq import (
    AccessRefusedError,
    AuthenticationError,
    BrokerConnectionError,
    TLSError,
    redact_url,
)

from ._errors import CliError
from ._options import err_console, resolve, url_option

__all__ = ("check_broker", "dashboard")


def check_broker(amqp_url: str) -> None:
    """Connect once before serving: credentials, vhost or TLS the broker refuses end the command
    (they won't fix themselves); a broker not reachable yet is only noted (the pages say so
    until it answers).

    Raises:
        AuthenticationError: the broker refused the user name or password.
        AccessRefusedError: the broker refused the virtual host.
        TLSError: the TLS handshake failed.
    """
    from aio_workq.admin.queues import connect

    async def once() -> None:
        connection = await connect(amqp_url)
        await connection.close()

    try:
        asyncio.run(once())
    except (AuthenticationError, AccessRefusedError, TLSError):
        raise
    except BrokerConnectionError as exc:
        err_console.print(
            f"note: {exc}; serving anyway, the pages say so until it answers",
            highlight=False, soft_wrap=True,
        )  # fmt: skip


@click.command("dashboard")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@url_option
@click.option(
    "--management-url",
    help="The management API (default: tried next to the broker, else passive declares).",
)
@click.option(
    "--no-management", is_flag=True,
    help="Don't use the management API: passive declares of the --queue names only.",
)  # fmt: skip
@click.option(
    "--queue", "queues", multiple=True, metavar="NAME",
    help="A queue to show without the management API; repeat for more.",
)  # fmt: skip
@click.option(
    "--store", metavar="URL",
    help="The job store, for the Jobs page: sqlite:///path/jobs.db or postgresql://...",
)  # fmt: skip
@click.option(
    "--schedules", "schedules_target", metavar="MODULE:ATTR",
    help="The Scheduler (or Schedules) whose group the Schedules page reads.",
)  # fmt: skip
@click.option(
    "--allow-actions", is_flag=True,
    help="Offer replay, purge and cancel (they need the token); read-only without it.",
)  # fmt: skip
@click.option(
    "--token-file", type=click.Path(dir_okay=False), metavar="PATH",
    help="The tokens that may act, one a line (default: AIO_WORKQ_DASHBOARD_TOKEN).",
)  # fmt: skip
def dashboard(
    host: str,
    port: int,
    url: str | None,
    management_url: str | None,
    no_management: bool,
    queues: tuple[str, ...],
    store: str | None,
    schedules_target: str | None,
    allow_actions: bool,
    token_file: str | None,
) -> None:
    """Serve the dashboard: queues, workers, dead letters, jobs and schedules, live.

    Read-only unless --allow-actions (each action then needs the token: sign in on the page,
    or send `Authorization: Bearer TOKEN`). Binds 127.0.0.1 unless told otherwise.
    """
    try:
        from aiohttp import web

        from aio_workq.dashboard import Dashboard, Security, aiohttp_app, store_from_url
    except ImportError:
        raise CliError(
            "the dashboard needs its extra: pip install 'aio-workq[dashboard]'"
        ) from None
    amqp_url = resolve(url)
    security = Security.load(allow_actions=allow_actions, token_file=token_file)
    if token_file is None and os.environ.get("AIO_WORKQ_DASHBOARD_TOKEN") and not allow_actions:
        err_console.print("note: a token is set but actions are off (--allow-actions)")
    group_kw: dict[str, Any] = {}
    if schedules_target is not None:
        from ._target import build_scheduler

        scheduler = build_scheduler(schedules_target, amqp_url)
        group_kw["schedules_group"] = scheduler.names.lease.removesuffix(".lease")
    board = Dashboard(
        url=amqp_url, management_url="" if no_management else management_url, queues=queues,
        store=None if store is None else store_from_url(store), security=security, **group_kw,
    )  # fmt: skip
    check_broker(amqp_url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    mode = "actions allowed (with the token)" if allow_actions else "read-only"
    listening = listen(host, port)  # before saying where it serves: the port may be taken
    with listening:
        bound = listening.getsockname()[1]
        where = f"[{host}]" if ":" in host else host
        err_console.print(
            f"aio-workq dashboard on http://{where}:{bound}/ for {redact_url(amqp_url)}, {mode}",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
        web.run_app(aiohttp_app(board), sock=listening, print=None, handle_signals=True)


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on `host:port` (port 0: one the system picks).

    Raises:
        CliError: the address can't be bound (in use, not this machine's, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise CliError(
            f"cannot listen on {host}:{port}: "
            f"{os.strerror(exc.errno) if exc.errno else exc}; give another --port "
            "(or --host)"
        ) from None
