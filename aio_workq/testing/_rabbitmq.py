"""What a local RabbitMQ node is made of: its install, files, environment, epmd and probes.

`LocalBroker` (`_broker.py`) runs a node from these pieces, and the repository's cluster
(`scripts/cluster.py`) runs three: the node's config files and the environment that isolates it
(`write_node_files`, `rabbitmq_conf`, `node_env`), its own epmd (`start_epmd`), `rabbitmqctl`
against it (`rabbitmqctl`) and the AMQP handshake probe (`amqp_answers`).

Standard library only: the scripts load this file also without the package's dependencies.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ._node import apt_install, run_tool, spawn, tail, wait_until, write_cookie

__all__ = (
    "AMQP_HEADER",
    "BIN",
    "CTL",
    "DIST_ARGS",
    "HOW_TO_GET_ONE",
    "SERVER",
    "BrokerError",
    "TLSListener",
    "amqp_answers",
    "ensure_installed",
    "node_env",
    "rabbitmq_conf",
    "rabbitmqctl",
    "start_epmd",
    "wait_ready",
    "write_node_files",
)

log = logging.getLogger(__name__)

BIN = Path("/usr/lib/rabbitmq/bin")
SERVER = BIN / "rabbitmq-server"
CTL = BIN / "rabbitmqctl"
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
DIST_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"
HOW_TO_GET_ONE = (
    "install it with `sudo apt-get install rabbitmq-server` (Debian/Ubuntu), or use a running "
    "broker instead: set AIO_WORKQ_AMQP_URL for the tests, AMQP_URL for the examples "
    "(e.g. amqp://guest:guest@localhost:5672/ after `docker compose up -d` with compose.yaml)"
)


class BrokerError(RuntimeError):
    """A local broker could not be installed, started, stopped or queried."""


@dataclass(frozen=True)
class TLSListener:
    """A TLS listener (``listeners.ssl.default``): PEM paths, and whether clients need a cert.

    `make_pki` of the repository's `scripts/tls.py` writes a matching CA, server certificate
    and key.
    """

    cacertfile: str
    certfile: str
    keyfile: str
    verify_peer: bool = False  # mutual TLS: verify_peer + fail_if_no_peer_cert

    def config(self, port: int) -> list[str]:
        lines = [
            f"listeners.ssl.default = 127.0.0.1:{port}",
            f"ssl_options.cacertfile = {self.cacertfile}",
            f"ssl_options.certfile = {self.certfile}",
            f"ssl_options.keyfile = {self.keyfile}",
        ]
        if self.verify_peer:
            lines += ["ssl_options.verify = verify_peer", "ssl_options.fail_if_no_peer_cert = true"]
        else:
            lines += ["ssl_options.verify = verify_none"]
        return lines


def ensure_installed() -> None:
    """Install Debian's rabbitmq-server if it is missing (only as root; otherwise explain how)."""
    if SERVER.exists():
        return
    if os.geteuid() != 0:
        raise BrokerError(f"RabbitMQ is not installed ({SERVER} is missing): {HOW_TO_GET_ONE}")
    log.warning("%s is missing: installing rabbitmq-server with apt-get", SERVER)
    failed = apt_install("rabbitmq-server")
    if failed is not None:
        raise BrokerError(f"`{failed}` failed: {HOW_TO_GET_ONE}")
    if not SERVER.exists():
        raise BrokerError(f"rabbitmq-server was installed but {SERVER} is still missing")


def amqp_answers(port: int, timeout: float = 1.0) -> bool:
    """True when something on 127.0.0.1:port answers the AMQP 0-9-1 protocol header."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(AMQP_HEADER)
            data = b""
            while len(data) < 4:
                chunk = s.recv(64)
                if not chunk:
                    return False
                data += chunk
            return True
    except OSError:
        return False


def wait_ready(
    proc: subprocess.Popen[bytes],
    amqp_port: int,
    ctl: Callable[..., str],
    *,
    since: float,
    timeout: float,
) -> None:
    """Wait until the node that proc started answers AMQP on amqp_port and has finished booting
    (``rabbitmqctl await_startup``, run through ctl), by timeout seconds after `since` (a
    `time.monotonic()` reading).

    Raises:
        BrokerError: the server exited, did not answer in time, or `await_startup` failed.
    """
    deadline = since + timeout
    while not amqp_answers(amqp_port):
        if proc.poll() is not None:
            raise BrokerError(f"rabbitmq-server exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise BrokerError(f"no AMQP answer on port {amqp_port} in {timeout}s")
        time.sleep(0.1)
    left = max(deadline - time.monotonic(), 1.0)
    ctl("await_startup", "--timeout", str(int(left) + 1), timeout=left)


def start_epmd(port: int, log_dir: Path) -> subprocess.Popen[bytes]:
    """An epmd of our own on 127.0.0.1:`port`, logging to `log_dir/epmd.log`; it listens when
    this returns. A node must find it, or Erlang would start an untracked epmd of its own.

    Raises:
        BrokerError: epmd exited (its port taken?) or did not listen within 10 s.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / "epmd.log"
    proc = spawn(["epmd", "-address", "127.0.0.1", "-port", str(port)], log_file)

    def listening() -> bool:
        if proc.poll() is not None:
            raise BrokerError(
                f"epmd exited with code {proc.returncode} (port {port} taken?)\n" + tail(log_file)
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    if not wait_until(listening, 10):
        proc.kill()
        proc.wait()
        raise BrokerError(f"epmd did not listen on 127.0.0.1:{port} in 10s")
    return proc


def node_env(
    base_dir: Path,
    node: str,
    *,
    amqp_port: int,
    dist_port: int,
    epmd_port: int,
    pid_file: Path,
    erl_args: str = DIST_ARGS,
) -> dict[str, str]:
    """The environment that isolates a node in base_dir (the CLI tools need the same one):
    ours minus any ``RABBITMQ_*`` / ``ERL_*``, with its name, ports, files and Erlang args."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RABBITMQ_", "ERL_")) and k != "NOTIFY_SOCKET"
    }
    env.update(
        HOME=str(base_dir),
        RABBITMQ_CONF_ENV_FILE=str(base_dir / "rabbitmq-env.conf"),
        RABBITMQ_NODENAME=node,
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(amqp_port),
        RABBITMQ_DIST_PORT=str(dist_port),
        RABBITMQ_MNESIA_BASE=str(base_dir / "mnesia"),
        RABBITMQ_LOG_BASE=str(base_dir / "log"),
        RABBITMQ_PID_FILE=str(pid_file),
        RABBITMQ_CONFIG_FILE=str(base_dir / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(base_dir / "advanced.config"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(base_dir / "enabled_plugins"),
        ERL_EPMD_ADDRESS="127.0.0.1",
        ERL_EPMD_PORT=str(epmd_port),
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=erl_args,
        RABBITMQ_CTL_ERL_ARGS=erl_args,
    )
    return env


def rabbitmq_conf(
    *,
    amqp_port: int,
    management_port: int | None = None,
    consumer_timeout_ms: int | None = None,
    tls: TLSListener | None = None,
    tls_port: int = 0,
) -> list[str]:
    """The lines of ``rabbitmq.conf``: listeners on 127.0.0.1 (management with a port)."""
    conf = [
        f"listeners.tcp.default = 127.0.0.1:{amqp_port}",
        "disk_free_limit.absolute = 100MB",
    ]
    if management_port is not None:
        conf += ["management.tcp.ip = 127.0.0.1", f"management.tcp.port = {management_port}"]
    if consumer_timeout_ms is not None:
        conf.append(f"consumer_timeout = {consumer_timeout_ms}")
    if tls is not None:
        conf += tls.config(tls_port)
    return conf


def write_node_files(base_dir: Path, conf: list[str], *, management: bool) -> None:
    """Write a node's files into base_dir: log and mnesia dirs, a cookie (kept once made),
    ``rabbitmq.conf`` of conf, the plugins file and empty env / advanced configs."""
    (base_dir / "log").mkdir(parents=True, exist_ok=True)
    (base_dir / "mnesia").mkdir(exist_ok=True)
    write_cookie(base_dir / ".erlang.cookie")
    (base_dir / "rabbitmq-env.conf").write_text("")
    (base_dir / "advanced.config").write_text("[].\n")
    plugins = "rabbitmq_management" if management else ""
    (base_dir / "enabled_plugins").write_text(f"[{plugins}].\n")
    (base_dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")


def rabbitmqctl(
    node: str, *args: str, env: Mapping[str, str], cwd: Path, timeout: float = 30
) -> str:
    """Run rabbitmqctl against node (in its environment); returns its stdout.

    Raises:
        BrokerError: it failed or timed out (the message has its stderr).
    """
    return run_tool(
        [str(CTL), "-n", node, *args],
        label=f"rabbitmqctl {' '.join(args)}",
        error=BrokerError,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
