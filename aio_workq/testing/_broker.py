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
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = (
    "BrokerError",
    "LocalBroker",
    "TLSListener",
    "amqp_answers",
    "ensure_installed",
    "free_port",
    "start_epmd",
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
_STATE_KEYS = (
    "name", "amqp_port", "dist_port", "epmd_port", "management", "management_port",
    "consumer_timeout_ms", "server_pid", "epmd_pid", "tls", "tls_port",
)  # fmt: skip


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
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "rabbitmq-server"]):
        # apt's chatter goes to stderr so that stdout stays clean for the CLI's URL.
        if subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=2).returncode != 0:
            raise BrokerError(f"`{' '.join(cmd)}` failed: {HOW_TO_GET_ONE}")
    if not SERVER.exists():
        raise BrokerError(f"rabbitmq-server was installed but {SERVER} is still missing")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


def _alive(pid: int | None, comm: str | None = None) -> bool:
    """Whether pid runs (and is named comm, if given); a zombie counts as gone."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, rest = stat.split(" (", 1)[1].rsplit(") ", 1)
    return rest[0] != "Z" and (comm is None or name == comm)


def _signal(pid: int | None, sig: signal.Signals) -> None:
    if pid:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait(gone: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not gone():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"({path} not found)"
    return f"--- last lines of {path} ---\n" + "\n".join(text)


def start_epmd(port: int, log_dir: Path) -> subprocess.Popen[bytes]:
    """An epmd of our own on 127.0.0.1:`port`, logging to `log_dir/epmd.log`; it listens when
    this returns. A node must find it, or Erlang would start an untracked epmd of its own.

    Raises:
        BrokerError: epmd exited (its port taken?) or did not listen within 10 s.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "epmd.log").open("ab") as out:
        proc = subprocess.Popen(
            ["epmd", "-address", "127.0.0.1", "-port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def listening() -> bool:
        if proc.poll() is not None:
            raise BrokerError(
                f"epmd exited with code {proc.returncode} (port {port} taken?)\n"
                + _tail(log_dir / "epmd.log")
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    if not _wait(listening, 10):
        proc.kill()
        proc.wait()
        raise BrokerError(f"epmd did not listen on 127.0.0.1:{port} in 10s")
    return proc


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
        d = self.base_dir
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k != "NOTIFY_SOCKET"
        }
        env.update(
            HOME=str(d),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=DIST_ARGS,
            RABBITMQ_CTL_ERL_ARGS=DIST_ARGS,
        )
        return env

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start the node (and its epmd) and wait until it accepts AMQP clients."""
        if self.running():
            return
        t0 = time.monotonic()
        deadline = t0 + timeout
        self._reap()
        self._pick_ports()
        self._write_files()
        try:
            self._start_epmd()
            self.pid_file.unlink(missing_ok=True)
            with self.log_file.open("ab") as out:
                proc = subprocess.Popen(
                    self._server_command(),
                    env=self.env(),
                    cwd=self.base_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.server_pid = proc.pid
            self._procs[proc.pid] = proc
            self.save_state()
            while not amqp_answers(self.amqp_port):
                if proc.poll() is not None:
                    raise self._error(f"rabbitmq-server exited with code {proc.returncode}")
                if time.monotonic() > deadline:
                    raise self._error(f"no AMQP answer on port {self.amqp_port} in {timeout}s")
                time.sleep(0.1)
            left = max(deadline - time.monotonic(), 1.0)
            try:
                self.ctl("await_startup", "--timeout", str(int(left) + 1), timeout=left)
            except BrokerError as e:
                raise self._error(str(e)) from None
        except BaseException:
            self.close()
            raise
        log.info("RabbitMQ %s up on %s in %.1fs", self.node, self.url, time.monotonic() - t0)

    def stop(self, timeout: float = 30) -> None:
        """Graceful stop (SIGTERM to beam, SIGKILL after timeout). Idempotent; data is kept."""
        beam = self.beam_pid()
        target = beam or (self.server_pid if _alive(self.server_pid, "rabbitmq-server") else None)
        if target:
            _signal(target, signal.SIGCONT)  # a paused node cannot handle SIGTERM
            _signal(target, signal.SIGTERM)
            if not _wait(lambda: not _alive(target), timeout):
                log.warning("%s did not stop in %ss: SIGKILL", self.node, timeout)
                _signal(target, signal.SIGKILL)
        self._finish(beam)

    def kill(self) -> None:
        """SIGKILL the node (a crash); start() brings it back with its durable data."""
        beam = self.beam_pid()
        _signal(beam, signal.SIGKILL)
        self._finish(beam)

    def pause(self) -> None:
        """SIGSTOP the node: TCP connects still succeed, but nothing answers."""
        _signal(self._require_beam(), signal.SIGSTOP)

    def resume(self) -> None:
        _signal(self._require_beam(), signal.SIGCONT)

    def close(self) -> None:
        """stop() and stop this node's epmd."""
        self.stop()
        if _alive(self.epmd_pid, "epmd"):
            _signal(self.epmd_pid, signal.SIGTERM)
            _wait(lambda: not _alive(self.epmd_pid), 5)
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
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid, "beam.smp") else None

    def running(self) -> bool:
        return self.beam_pid() is not None and amqp_answers(self.amqp_port)

    def ctl(self, *args: str, timeout: float = 30) -> str:
        """Run rabbitmqctl against this node; returns its stdout."""
        cmd = [str(CTL), "-n", self.node, *args]
        try:
            res = subprocess.run(
                cmd,
                env=self.env(),
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise BrokerError(f"`rabbitmqctl {' '.join(args)}` timed out after {timeout}s") from e
        if res.returncode != 0:
            raise BrokerError(
                f"`rabbitmqctl {' '.join(args)}` failed (exit {res.returncode}): "
                f"{(res.stderr or res.stdout).strip()}"
            )
        return res.stdout

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
        state = {k: getattr(self, k) for k in _STATE_KEYS}
        state["tls"] = asdict(self.tls) if self.tls else None
        (self.base_dir / "state.json").write_text(json.dumps(state, indent=1) + "\n")

    @classmethod
    def from_dir(cls, base_dir: Path) -> LocalBroker:
        """The broker whose state.json is in base_dir (raises BrokerError if there is none)."""
        path = Path(base_dir) / "state.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BrokerError(f"no broker state in {path} ({e}): start one first") from e
        return cls(Path(base_dir), **{k: state[k] for k in _STATE_KEYS if k in state})

    # --- internals ------------------------------------------------------------------------

    def _pick_ports(self) -> None:
        taken: set[int] = set()
        for attr in ("amqp_port", "dist_port", "epmd_port", "management_port", "tls_port"):
            port = getattr(self, attr)
            while not port or port in taken:
                port = free_port()
            taken.add(port)
            setattr(self, attr, port)

    def _write_files(self) -> None:
        d = self.base_dir
        (d / "log").mkdir(parents=True, exist_ok=True)
        (d / "mnesia").mkdir(exist_ok=True)
        cookie = d / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16).upper())
            cookie.chmod(0o400)
        (d / "rabbitmq-env.conf").write_text("")
        (d / "advanced.config").write_text("[].\n")
        plugins = "rabbitmq_management" if self.management else ""
        (d / "enabled_plugins").write_text(f"[{plugins}].\n")
        conf = [
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
            "disk_free_limit.absolute = 100MB",
        ]
        if self.management:
            conf += [
                "management.tcp.ip = 127.0.0.1",
                f"management.tcp.port = {self.management_port}",
            ]
        if self.consumer_timeout_ms is not None:
            conf.append(f"consumer_timeout = {self.consumer_timeout_ms}")
        if self.tls is not None:
            conf += self.tls.config(self.tls_port)
        (d / "rabbitmq.conf").write_text("\n".join(conf) + "\n")

    def _start_epmd(self) -> None:
        if _alive(self.epmd_pid, "epmd"):
            return
        proc = start_epmd(self.epmd_port, self.base_dir / "log")
        self.epmd_pid = proc.pid
        self._procs[proc.pid] = proc

    def _finish(self, beam: int | None) -> None:
        """After beam was signalled: wait for it, then make sure the wrapper's group is gone."""
        _wait(lambda: not _alive(beam), 10)
        wrapper = self.server_pid
        if wrapper in self._procs or _alive(wrapper, "rabbitmq-server"):
            assert wrapper is not None
            if not _wait(lambda: not _alive(wrapper), 5):
                log.warning("rabbitmq-server wrapper %s still alive: SIGKILL", wrapper)
            try:
                os.killpg(wrapper, signal.SIGKILL)  # wrapper, erl_child_setup, anything left
            except (ProcessLookupError, PermissionError):
                pass
            _wait(lambda: not _alive(wrapper), 5)
        self._reap()
        self.pid_file.unlink(missing_ok=True)
        if wrapper is not None:
            self.server_pid = None
            self.save_state()

    def _reap(self) -> None:
        for pid, proc in list(self._procs.items()):
            if proc.poll() is not None:
                del self._procs[pid]

    def _server_command(self) -> list[str]:
        """The command that starts the node (a subclass may wrap it, e.g. in setpriv)."""
        return [str(SERVER)]

    def _require_beam(self) -> int:
        pid = self.beam_pid()
        if pid is None:
            raise BrokerError(f"{self.node} is not running (no live pid in {self.pid_file})")
        return pid

    def _error(self, what: str) -> BrokerError:
        return BrokerError(
            f"RabbitMQ node {self.node} in {self.base_dir} failed to start: {what}\n"
            f"{_tail(self.log_file)}\n{_tail(self.node_log_file)}\n"
            f"If RabbitMQ itself is the problem, {HOW_TO_GET_ONE}."
        )
