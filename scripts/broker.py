"""Run an isolated local RabbitMQ node (Debian's rabbitmq-server) for tests, demos and benchmarks.

The node itself is `aio_workq/testing/_broker.py`, shipped inside the package so that users' test
suites get it too; this module re-exports it for the repository (tests, bench, cluster, demos)
and is its command line. It also works without the venv (`python3 -m scripts.broker` in the
Makefile): the broker's modules are standard library only, so they are loaded without the
package when its dependencies are not installed (`scripts/_testing.py`).

CLI::

    python -m scripts.broker start --dir .broker/dev [--port N] [--management] [--tls DIR]
    python -m scripts.broker status --dir .broker/dev [--url-only]
    python -m scripts.broker stop --dir .broker/dev

`start` and `status` show the URLs without the password (`amqp://guest:***@...`) and the
management API's URL when the node has one; `--url-only` prints only the full URLs (the
amqps:// one second when there is a TLS listener), for scripts:
`export AMQP_URL=$(python3 -m scripts.broker status --url-only)`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from scripts.tls import TLSError, make_pki

if TYPE_CHECKING:
    # `X as X`: re-exported
    from aio_workq.testing._broker import DIST_ARGS as DIST_ARGS
    from aio_workq.testing._broker import SERVER as SERVER
    from aio_workq.testing._broker import STATE_KEYS as STATE_KEYS
    from aio_workq.testing._broker import BrokerError as BrokerError
    from aio_workq.testing._broker import LocalBroker as LocalBroker
    from aio_workq.testing._broker import TLSListener as TLSListener
    from aio_workq.testing._broker import amqp_answers as amqp_answers
    from aio_workq.testing._broker import ensure_installed as ensure_installed
    from aio_workq.testing._broker import free_port as free_port
    from aio_workq.testing._broker import start_epmd as start_epmd
else:
    from scripts._testing import load_testing_module

    globals().update(
        {
            k: v
            for k, v in vars(load_testing_module("_broker")).items()
            if not k.startswith("__") and k != "annotations"
        }
    )

__all__ = (
    "BrokerError",
    "LocalBroker",
    "TLSListener",
    "amqp_answers",
    "ensure_installed",
    "free_port",
    "main",
    "report",
)


def shown(url: str) -> str:
    """`url` without its password: the library's `redact_url`, or (no venv) the same for the
    node's own `scheme://user:password@host:port/` URLs."""
    try:
        from aio_workq import redact_url
    except ImportError:
        scheme, sep, rest = url.partition("://")
        userinfo, at, host = rest.rpartition("@")
        if not at or ":" not in userinfo:
            return url
        return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{host}"
    return redact_url(url)


def report(broker: LocalBroker, *, running: bool, started: bool = False) -> list[str]:
    """What `start` (`started`) and `status` print: the URLs without the password, the
    management API's URL, and where the full URL is."""
    if started:
        lines = [f"RabbitMQ node {broker.node} is up at {shown(broker.url)}"]
    else:
        lines = [f"{broker.node}: {'running' if running else 'stopped'}, {shown(broker.url)}"]
    if broker.tls:
        lines.append(f"TLS: {shown(broker.tls_url)}")
    if running and broker.management:
        lines.append(f"management API: {broker.management_url}")
    if started:
        lines.append(
            "the full URL, for AMQP_URL: python3 -m scripts.broker status "
            f"--dir {broker.base_dir} --url-only"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.broker", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path, default=Path(".broker/dev"), help="node directory")
    parser.add_argument("--port", type=int, default=0, help="AMQP port (start; default: free)")
    parser.add_argument("--management", action="store_true", help="enable the HTTP API (start)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds (start/stop)")
    parser.add_argument(
        "--tls",
        type=Path,
        metavar="DIR",
        help="also listen for amqps:// with a test CA and certificates made in DIR (start)",
    )
    parser.add_argument("--mtls", action="store_true", help="with --tls: require a client cert")
    parser.add_argument(
        "--url-only",
        action="store_true",
        help="start/status: print only the URLs, with the password, one a line (for scripts)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        if args.command == "start":
            ensure_installed()
            args.dir.mkdir(parents=True, exist_ok=True)
            try:
                broker = LocalBroker.from_dir(args.dir)
            except BrokerError:
                broker = LocalBroker(args.dir)
            if args.port and not broker.running():
                broker.amqp_port = args.port
            broker.management = broker.management or args.management
            if args.tls and not broker.running():
                pki = make_pki(args.tls)
                broker.tls = TLSListener(
                    str(pki.ca_cert), str(pki.server_cert), str(pki.server_key), args.mtls
                )
            broker.start(timeout=args.timeout)
            print(
                "\n".join(
                    _urls(broker) if args.url_only else report(broker, running=True, started=True)
                )
            )
            return 0
        if args.command == "stop" and not (args.dir / "state.json").exists():
            print(f"no broker in {args.dir}")
            return 0
        broker = LocalBroker.from_dir(args.dir)
        if args.command == "stop":
            broker.stop(timeout=args.timeout)
            broker.close()
            print(f"stopped {broker.node}")
            return 0
        up = broker.running()
        print("\n".join(_urls(broker) if args.url_only else report(broker, running=up)))
        return 0 if up else 1
    except (BrokerError, TLSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _urls(broker: LocalBroker) -> list[str]:
    return [broker.url, *([broker.tls_url] if broker.tls else [])]


if __name__ == "__main__":
    sys.exit(main())
