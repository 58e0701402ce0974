"""Run an isolated local RabbitMQ node (Debian's rabbitmq-server) for tests, demos and benchmarks.

Everything the node needs lives in one directory: config, cookie (``HOME``), mnesia data, logs,
pid file and ``state.json`` (ports and pids, so another process can stop it). The node gets its own
name, ports and epmd, bound to loopback only.

Shipped in the package so that users' test suites get it too (`aio_workq.testing`, the
`workq_amqp_url` pytest fixture). Standard library only: the repository's `scripts/broker.py`
(its command line) loads this file also without the package's dependencies.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from ._node import (
    alive,
    free_port,
    pick_ports,
    read_pid,
    read_state,
    send_signal,
    spawn,
    tail,
    terminate,
    wait_until,
    write_state,
)

# Re-exported: the names this module has always offered (scripts/broker.py re-exports them).
from ._rabbitmq import AMQP_HEADER as AMQP_HEADER
from ._rabbitmq import BIN as BIN
from ._rabbitmq import CTL as CTL
from ._rabbitmq import DIST_ARGS as DIST_ARGS
from ._rabbitmq import HOW_TO_GET_ONE as HOW_TO_GET_ONE
from ._rabbitmq import SERVER as SERVER
from ._rabbitmq import BrokerError as BrokerError
from ._rabbitmq import TLSListener as TLSListener
from ._rabbitmq import amqp_answers as amqp_answers
from ._rabbitmq import ensure_installed as ensure_installed
from ._rabbitmq import node_env, rabbitmq_conf, rabbitmqctl, wait_ready, write_node_files
from ._rabbitmq import start_epmd as start_epmd

__all__ = (
    "STATE_KEYS",
    "BrokerError",
    "LocalBroker",
    "TLSListener",
    "amqp_answers",
    "ensure_installed",
    "free_port",
    "start_epmd",
)

log = logging.getLogger(__name__)

STATE_KEYS = (
    "name", "amqp_port", "dist_port", "epmd_port", "management", "management_port",
    "consumer_timeout_ms", "server_pid", "epmd_pid", "tls", "tls_port",
)  # fmt: skip
"""The fields of a `LocalBroker` that its ``state.json`` keeps."""
PORTS = ("amqp_port", "dist_port", "epmd_port", "management_port", "tls_port")


@dataclass
class LocalBroker:
    """One RabbitMQ node whose whole state lives in ``base_dir``; data survives stop()/start()."""

    base_dir: Path
    name: str = "workq"
    amqp_port: int = 0
    dist_port: int = 0
    epmd_port: int = 0
    management: bool = False
    management_port: int = 0
    consumer_timeout_ms: int | None = None
    tls: TLSListener | None = None
    tls_port: int = 0
    server_pid: int | None = field(default=None, repr=False)  # the rabbitmq-server shell wrapper
    epmd_pid: int | None = field(default=None, repr=False)
    _procs: dict[int, subprocess.Popen[bytes]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    # --- paths and settings ---------------------------------------------------------------

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir).resolve()
        if isinstance(self.tls, dict):  # from state.json
            self.tls = TLSListener(**self.tls)

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def tls_url(self) -> str:
        """The amqps:// URL of the TLS listener (host ``localhost``, as the certificate says)."""
        if self.tls is None:
            raise BrokerError(f"{self.node} has no TLS listener: pass tls=TLSListener(...)")
        return f"amqps://guest:guest@localhost:{self.tls_port}/"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}/"

    @property
    def pid_file(self) -> Path:
        return self.base_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        """stdout/stderr of rabbitmq-server (the node's own log is in ``base_dir/log``)."""
        return self.base_dir / "server.log"

    @property
    def node_log_file(self) -> Path:
        return self.base_dir / "log" / f"{self.node}.log"

    def env(self) -> dict[str, str]:
        """The environment that isolates this node; the CLI tools need the same one."""
        return node_env(
            self.base_dir,
            self.node,
            amqp_port=self.amqp_port,
            dist_port=self.dist_port,
            epmd_port=self.epmd_port,
            pid_file=self.pid_file,
            erl_args=self._erl_args(),
        )

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start the node (and its epmd) and wait until it accepts AMQP clients."""
        if self.running():
            return
        t0 = time.monotonic()
        self._reap()
        pick_ports(self, PORTS)
        write_node_files(self.base_dir, self._config_lines(), management=self.management)
        try:
            self._start_epmd()
            self.pid_file.unlink(missing_ok=True)
            proc = spawn(self._server_command(), self.log_file, env=self.env(), cwd=self.base_dir)
            self.server_pid = proc.pid
            self._procs[proc.pid] = proc
            self.save_state()
            try:
                wait_ready(proc, self.amqp_port, self.ctl, since=t0, timeout=timeout)
            except BrokerError as e:
                raise self._error(str(e)) from None
        except BaseException:
            self.close()
            raise
        log.info(  # the address only: the URL carries the password
            "RabbitMQ %s up on 127.0.0.1:%s in %.1fs", self.node, self.amqp_port,
            time.monotonic() - t0,
        )  # fmt: skip

    def stop(self, timeout: float = 30) -> None:
        """Graceful stop (SIGTERM to beam, SIGKILL after timeout). Idempotent; data is kept."""
        beam = self.beam_pid()
        target = beam or (self.server_pid if alive(self.server_pid, "rabbitmq-server") else None)
        if target:
            send_signal(target, signal.SIGCONT)  # a paused node cannot handle SIGTERM
            send_signal(target, signal.SIGTERM)
            if not wait_until(lambda: not alive(target), timeout):
                log.warning("%s did not stop in %ss: SIGKILL", self.node, timeout)
                send_signal(target, signal.SIGKILL)
        self._finish(beam)

    def kill(self) -> None:
        """SIGKILL the node (a crash); start() brings it back with its durable data."""
        beam = self.beam_pid()
        send_signal(beam, signal.SIGKILL)
        self._finish(beam)

    def pause(self) -> None:
        """SIGSTOP the node: TCP connects still succeed, but nothing answers."""
        send_signal(self._require_beam(), signal.SIGSTOP)

    def resume(self) -> None:
        send_signal(self._require_beam(), signal.SIGCONT)

    def close(self) -> None:
        """stop() and stop this node's epmd."""
        self.stop()
        terminate(self.epmd_pid, "epmd")
        self._reap()
        self.epmd_pid = None
        self.save_state()

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- queries --------------------------------------------------------------------------

    def beam_pid(self) -> int | None:
        """The running node's pid (from RABBITMQ_PID_FILE), or None."""
        return read_pid(self.pid_file, "beam.smp")

    def running(self) -> bool:
        return self.beam_pid() is not None and amqp_answers(self.amqp_port)

    def ctl(self, *args: str, timeout: float = 30) -> str:
        """Run rabbitmqctl against this node; returns its stdout."""
        return rabbitmqctl(self.node, *args, env=self.env(), cwd=self.base_dir, timeout=timeout)

    def queues(self) -> list[dict[str, Any]]:
        out = self.ctl(
            "list_queues", "-q", "--formatter", "json",
            "name", "messages", "messages_ready", "messages_unacknowledged", "consumers",
            "arguments",
        )  # fmt: skip
        result: list[dict[str, Any]] = json.loads(out)
        return result

    # --- state file (lets another process stop or query the node) -------------------------

    def save_state(self) -> None:
        if not self.base_dir.is_dir():  # never started: nothing to record
            return
        state = {k: getattr(self, k) for k in STATE_KEYS}
        state["tls"] = asdict(self.tls) if self.tls else None
        write_state(self.base_dir / "state.json", state)

    @classmethod
    def from_dir(cls, base_dir: Path) -> LocalBroker:
        """The broker whose state.json is in base_dir (raises BrokerError if there is none)."""
        state = read_state(Path(base_dir) / "state.json", BrokerError, "broker")
        return cls(Path(base_dir), **{k: state[k] for k in STATE_KEYS if k in state})

    # --- what a subclass may change (scripts/cluster.py's ClusterNode does) ---------------

    def _erl_args(self) -> str:
        """Extra Erlang VM arguments of the node and of its CLI tools."""
        return DIST_ARGS

    def _config_lines(self) -> list[str]:
        """The lines of the node's ``rabbitmq.conf``."""
        return rabbitmq_conf(
            amqp_port=self.amqp_port,
            management_port=self.management_port if self.management else None,
            consumer_timeout_ms=self.consumer_timeout_ms,
            tls=self.tls,
            tls_port=self.tls_port,
        )

    def _server_command(self) -> list[str]:
        """The command that starts the node (a subclass may wrap it, e.g. in setpriv)."""
        return [str(SERVER)]

    # --- internals ------------------------------------------------------------------------

    def _start_epmd(self) -> None:
        if alive(self.epmd_pid, "epmd"):
            return
        proc = start_epmd(self.epmd_port, self.base_dir / "log")
        self.epmd_pid = proc.pid
        self._procs[proc.pid] = proc

    def _finish(self, beam: int | None) -> None:
        """After beam was signalled: wait for it, then make sure the wrapper's group is gone."""
        wait_until(lambda: not alive(beam), 10)
        wrapper = self.server_pid
        if wrapper in self._procs or alive(wrapper, "rabbitmq-server"):
            assert wrapper is not None
            if not wait_until(lambda: not alive(wrapper), 5):
                log.warning("rabbitmq-server wrapper %s still alive: SIGKILL", wrapper)
            try:
                os.killpg(wrapper, signal.SIGKILL)  # wrapper, erl_child_setup, anything left
            except (ProcessLookupError, PermissionError):
                pass
            wait_until(lambda: not alive(wrapper), 5)
        self._reap()
        self.pid_file.unlink(missing_ok=True)
        if wrapper is not None:
            self.server_pid = None
            self.save_state()

    def _reap(self) -> None:
        for pid, proc in list(self._procs.items()):
            if proc.poll() is not None:
                del self._procs[pid]

    def _require_beam(self) -> int:
        pid = self.beam_pid()
        if pid is None:
            raise BrokerError(f"{self.node} is not running (no live pid in {self.pid_file})")
        return pid

    def _error(self, what: str) -> BrokerError:
        return BrokerError(
            f"RabbitMQ node {self.node} in {self.base_dir} failed to start: {what}\n"
            f"{tail(self.log_file)}\n{tail(self.node_log_file)}\n"
            f"If RabbitMQ itself is the problem, {HOW_TO_GET_ONE}."
        )
